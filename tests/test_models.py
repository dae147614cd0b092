"""The ClassifierModel contract over the whole registry, and AG-CNN end to end (CPU, small inputs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medattn.config import ModelConfig
from medattn.methods.agcnn import AGCNNConfig
from medattn.errors import ConfigError
from medattn.models import ClassifierModel, build_agcnn, create_model, is_model, list_models


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


K = 5  # classes
SIZE = 64  # input pixels: small enough to keep the registry-wide test fast

# Spot checks of the built-in backbones against the architectures' known widths (pooled vector,
# feature map). Not a list of every model: the contract test below runs over whatever is
# registered (a new backbone needs no edit here). Seed 002's VGG16 keeps torchvision's 4096-4096
# MLP, whose output is its "pooled" vector (medattn.models.backbones.VGG16MLP).
KNOWN_WIDTHS = {"resnet18": (512, 512), "resnet50": (2048, 2048), "resnet152": (2048, 2048),
                "densenet121": (1024, 1024), "vgg16_bn": (512, 512), "vgg16_bn_lka": (512, 512), "vgg16": (4096, 512)}


def test_a_backbone_ending_in_an_mlp_is_refused_by_dualattendmed():
    from medattn.errors import ConfigError
    from medattn.models.wsdan import WSDAN

    with pytest.raises(ConfigError, match="vgg16.*MLP"):
        WSDAN(create_model("vgg16", num_classes=0, in_chans=1, weights="none"), num_classes=3, num_maps=4)


def test_registry_lists_the_backbones():
    names = list_models()
    assert names == sorted(names) and set(KNOWN_WIDTHS) <= set(names)
    assert is_model("resnet50") and not is_model("resnet51")
    for name, (pooled, fmap) in KNOWN_WIDTHS.items():
        with torch.device("meta"):
            m = create_model(name, num_classes=K)
        assert (m.num_features, m.map_channels) == (pooled, fmap), name


@pytest.mark.parametrize("name", list_models())
def test_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=K, in_chans=1, weights="none", drop_rate=0.1)
    assert isinstance(model, ClassifierModel)
    assert (model.arch, model.num_classes, model.in_chans) == (name, K, 1)
    x = torch.randn(2, 1, SIZE, SIZE)

    # forward = forward_head(forward_features), finite, every parameter gets a gradient
    model.train()
    feats = model.forward_features(x)
    side = SIZE // model.feature_stride
    assert feats.shape == (2, model.map_channels, side, side)
    out = model.forward_head(feats)
    assert out.shape == (2, K) and torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad

    # eval: one forward_features (with a hook on the Grad-CAM layer) and one forward
    layer = model.gradcam_layer()
    assert any(layer is m for m in model.modules())
    seen = []
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        hook.remove()
        assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0] == 2  # (B, C, h, w)
        torch.testing.assert_close(model(x), model.forward_head(feats))
        pooled = model.forward_head(feats, pre_logits=True)
        if model.map_channels != model.num_features:  # an MLP's hidden output (vgg16), not a pooled map
            assert pooled.shape == (2, model.num_features)
        else:
            torch.testing.assert_close(pooled, feats.amax(dim=(2, 3)))  # pool="max" is Pool5
        maps = model.attention_maps(feats)
        assert maps.shape == (2, 1, side, side) and (maps >= 0).all()
        torch.testing.assert_close(maps[:, 0], feats.abs().amax(dim=1))

        # reset_classifier(0): the head returns the pooled features; then a fresh head
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model.forward_head(feats), pooled)
        model.reset_classifier(3)
        assert model.num_classes == 3 and model.forward_head(feats).shape == (2, 3)


def test_avg_pool_and_three_channels():
    model = create_model("resnet18", num_classes=2, in_chans=3, pool="avg").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(dim=(2, 3)))
    assert model.conv1.in_channels == 3


def test_resnet_layer4_stride_1_is_output_stride_16():
    # ResNet-152 at 224 on the meta device: shapes only, no compute.
    with torch.device("meta"):
        r152 = create_model("resnet152", num_classes=K, layer4_stride=1)
        default = create_model("resnet152", num_classes=K)
        x = torch.empty(2, 1, 224, 224)
        assert r152.forward_features(x).shape == (2, 2048, 14, 14)
        assert default.forward_features(x).shape == (2, 2048, 7, 7)
    assert r152.feature_stride == 16
    # and for real on a small BasicBlock ResNet
    r18 = create_model("resnet18", num_classes=K, layer4_stride=1)
    assert r18.forward_features(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 512, 4, 4)


def test_bad_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        create_model("resnet5O", num_classes=K)
    with pytest.raises(ConfigError, match="no option 'layer4_stride'"):
        create_model("densenet121", num_classes=K, layer4_stride=1)
    with pytest.raises(ConfigError, match="model.pool='mean'"):
        create_model("resnet18", num_classes=K, pool="mean")
    with pytest.raises(ConfigError, match="layer4_stride=3"):
        create_model("resnet18", num_classes=K, layer4_stride=3)


# --------------------------------------------------------------------------------------------
# AG-CNN: the network, and its attention path through the method (the code training runs)
# --------------------------------------------------------------------------------------------
def agcnn_method(local: str = "", **kw):
    """AGCNNMethod + its model, resnet18 branches at random init (the demo config otherwise)."""
    from medattn.config import load_config
    from medattn.methods import DataSpec, build

    torch.manual_seed(0)
    over = ["model.backbone=resnet18", "model.weights=none", f"data.image_size={SIZE}", f"data.resize={SIZE}",
            f"agcnn.local_backbone={local}", "agcnn.crop_source=input"] + [f"agcnn.{k}={v}" for k, v in kw.items()]
    cfg = load_config("demo", over)
    spec = DataSpec(tuple(f"c{i}" for i in range(K)), tuple(f"c{i}" for i in range(K)), "multilabel", 1, 128)
    return build(cfg, spec)


def _batch(x, **extra):
    n = x.shape[0]
    return {"image": x, "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4), **extra}


def test_agcnn_end_to_end():
    method, model = agcnn_method(local="densenet121")  # different backbones, unshared weights
    assert model.global_branch is not model.local_branch
    assert model.fusion.in_features == 512 + 1024 and model.fusion.out_features == K
    x = torch.randn(2, 1, SIZE, SIZE)
    out = method.forward(model, _batch(x), "fusion")
    for key in ("global", "local", "fusion"):
        assert out[key].shape == (2, K) and torch.isfinite(out[key]).all(), key
    boxes = out["boxes"]
    assert boxes.shape == (2, 4) and (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert out["heatmap"].shape == (2, SIZE, SIZE) and out["empty"].shape == (2,)
    assert out["crops"].shape == x.shape
    # all three parts learn from the joint loss; the crop itself carries no gradient
    sum(out[k].sum() for k in ("global", "local", "fusion")).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not out["crops"].requires_grad


def test_agcnn_parts_compose_like_the_method_and_the_network():
    method, model = agcnn_method()
    model.eval()
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        out = method.forward(model, _batch(x), "fusion")
        lg, feats, pg = model.forward_global(x)
        boxes, heat, empty = method.attend(feats, SIZE)
        crops = method.crop(_batch(x), boxes)
        ll, pl = model.forward_local(crops)
        torch.testing.assert_close(out["global"], lg)
        torch.testing.assert_close(out["local"], ll)
        torch.testing.assert_close(out["fusion"], model.forward_fusion(pg, pl))
        torch.testing.assert_close(out["boxes"], boxes)
        # the network's forward given the crops
        for a, b in zip(model(x, crops), (lg, ll, out["fusion"])):
            torch.testing.assert_close(a, b)
        # prediction and training both go through the same path
        pred = method.predict(model, _batch(x), "fusion")
        torch.testing.assert_close(pred["probs"]["fusion"], out["fusion"].sigmoid())
        torch.testing.assert_close(pred["crops"], crops)
    loss, logs = method.training_loss(model, {**_batch(x), "labels": torch.zeros(3, K)}, "local", 0)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(ll, torch.zeros(3, K)))
    assert "crop_area" in logs


def test_agcnn_hires_crop_matches_the_view():
    """A view cut 1:1 from a prepared image, flipped or not: cropping the attention box from the
    prepared image (``crop_source=prepared``, as the loaders give it: uint8, flipped like the view)
    equals cropping the view."""
    from medattn.attention import crop_and_resize  # noqa: PLC0415
    from medattn.views import view_boxes

    method, model = agcnn_method(crop_source="prepared")
    assert method.needs_hires("local") and not method.needs_hires("global")
    input_method, _ = agcnn_method()
    g = torch.Generator().manual_seed(0)
    hires = (torch.rand(2, 1, 128, 128, generator=g) * 255).round().to(torch.uint8)
    window = np.array([[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.5, 1.0]], np.float32)
    flipped = np.array([False, True])
    vb = torch.from_numpy(view_boxes(window, flipped))  # the view in the flipped prepared image
    hires = torch.where(torch.from_numpy(flipped).view(-1, 1, 1, 1), hires.flip(-1), hires)
    view = method.normalize_uint8(crop_and_resize(hires.float(), vb, 64))  # 64 px of 128: exact pixels
    # Boxes away from the view's edges: at an edge the hires crop rightly samples the real
    # pixels just outside the view, where a crop of the view can only repeat its border.
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.125, 0.25, 0.5, 0.75]])
    batch = {"image": view, "view_box": vb, "hires": hires}
    torch.testing.assert_close(method.crop(batch, boxes), input_method.crop(batch, boxes), atol=1e-5, rtol=1e-5)
    out = method.forward(model, batch, "fusion")
    assert out["fusion"].shape == (2, K)


def test_agcnn_config_errors():
    with pytest.raises(ConfigError, match="agcnn.heatmap"):
        agcnn_method(heatmap="mean")
    with pytest.raises(ConfigError, match="agcnn.tau"):
        agcnn_method(tau=1.5)
    with pytest.raises(ConfigError, match="local_backbone='vgg16_bn'"):
        build_agcnn(ModelConfig(backbone="resnet18", weights="/some/file.pth"),
                    AGCNNConfig(local_backbone="vgg16_bn"), num_classes=K)
