"""timm backbones through the model registry: the ClassifierModel contract, the 1-channel stem,
offline weights, clear errors, and a demo-sized run through the trainer, eval and report."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from medattn.cli import main as cli_main
from medattn.config import load_config
from medattn.errors import ConfigError
from medattn.models import create_model, is_model

timm = pytest.importorskip("timm", reason="the timm extra is not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

K = 3


@pytest.mark.parametrize("name,stride,channels", [("convnext_atto", 32, 320), ("pvt_v2_b0", 32, 256),
                                                  ("vit_tiny_patch16_224", 16, 192)])
def test_contract(name, stride, channels):
    torch.manual_seed(0)
    model = create_model(name, num_classes=K, in_chans=1, weights="none")
    assert (model.arch, model.in_chans, model.num_features, model.feature_stride) == (name, 1, channels, stride)
    x = torch.randn(2, 1, 64, 96)  # not square, not 224: ViTs interpolate their position embeddings
    seen = []
    hook = model.gradcam_layer().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    feats = model.forward_features(x)
    hook.remove()
    # a spatial map for every trunk (ViT tokens laid out on their grid), and Grad-CAM sees it
    assert feats.shape == (2, channels, 64 // stride, 96 // stride)
    assert seen == [tuple(feats.shape)]
    out = model.forward_head(feats)
    assert out.shape == (2, K) and torch.isfinite(out).all()
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(dim=(2, 3)))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_registry_names_and_errors(monkeypatch):
    assert is_model("convnext_atto") and is_model("timm/resnet18") and not is_model("convnext_atoo")
    # a built-in name stays torchvision's; timm/ asks for timm's model of that name
    assert type(create_model("timm/resnet18", num_classes=2, weights="none")).__name__ == "TimmBackbone"
    with pytest.raises(ConfigError, match=r"'convnext_atoo' is not a known model \(did you mean 'convnext_atto'\?\)"):
        create_model("convnext_atoo", num_classes=2)
    with pytest.raises(ConfigError, match="no option 'layer4_stride'.*drop_path_rate"):
        create_model("convnext_atto", num_classes=2, layer4_stride=1)
    # without timm: the error names the extra
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"pip install 'medattn\[timm\]'"):
        create_model("convnext_atto", num_classes=2)
    with pytest.raises(ConfigError, match=r"medattn\[timm\]"):
        load_config("demo", ["model.backbone=convnext_atto"])


def test_offline_weights_stem_summed_and_missing_file_named(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("MEDATTN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError) as e:
        create_model("convnext_atto", num_classes=K, weights="imagenet")
    assert f"expected: {tmp_path / 'convnext_atto.d2_in1k.safetensors'}" in str(e.value)
    assert "medattn weights fetch convnext_atto.d2_in1k" in str(e.value)

    torch.manual_seed(1)
    src = timm.create_model("convnext_atto", num_classes=1000)  # an ImageNet-shaped RGB model
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "convnext_atto.d2_in1k.safetensors")
    model = create_model("convnext_atto", num_classes=K, in_chans=1, weights="imagenet")
    # one channel: the RGB kernels summed (conv(W, [g,g,g]) == conv(W_R+W_G+W_B, g))
    torch.testing.assert_close(model.trunk.stem[0].weight, src.stem[0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.trunk.stages[3].blocks[0].conv_dw.weight, src.stages[3].blocks[0].conv_dw.weight)
    assert model.fc.weight.shape == (K, 320)  # medattn's head, not ImageNet's classifier
    # a medattn state dict of the same backbone is an exact fit; another backbone's is refused, naming keys
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    again = create_model("convnext_atto", num_classes=K, in_chans=1, weights=str(tmp_path / "mine.pt"))
    torch.testing.assert_close(again.trunk.stem[0].weight, model.trunk.stem[0].weight)
    with pytest.raises(ConfigError, match="does not fit"):
        create_model("pvt_v2_b0", num_classes=K, in_chans=1, weights=str(tmp_path / "mine.pt"))
    with pytest.raises(ConfigError, match="imagenet_v2 is torchvision's"):
        create_model("convnext_atto", num_classes=K, weights="imagenet_v2")


def test_configs_validates_like_train(capsys):
    """`medattn configs` refuses what `train` refuses, with the same message and exit status 2."""
    cases = {"model.backbone=convnext_tiy": "did you mean 'convnext_tiny'",
             "agcnn.local_backbone=resnet51x": "agcnn.local_backbone='resnet51x' is not a known model",
             "runtime.device=gpu": "'gpu' is not one of auto, cpu, cuda",
             "model.backbonee=resnet18": "unknown config key 'model.backbonee'"}
    for override, needle in cases.items():
        assert cli_main(["configs", "demo", override]) == 2, override
        err = capsys.readouterr().err
        assert needle in err, err
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
            load_config("demo", [override])  # what train calls first
    assert cli_main(["configs", "demo", "model.backbone=convnext_tiny"]) == 0
    assert "backbone: convnext_tiny" in capsys.readouterr().out
    assert cli_main(["configs", "gradcam_pvt"]) == 0
    assert "backbone: pvt_v2_b2_li" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_run_with_a_timm_backbone_trains_evaluates_reports(tmp_path):
    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod
    from prepfix import make_prepared

    prep = make_prepared(tmp_path / "prep", n=48, size=64, seed=1)
    run = tmp_path / "run"
    args = ["--config", "demo", "--data", str(prep), "--out", str(run), "model.backbone=convnext_atto",
            "data.image_size=64", "data.resize=64", "stages.*.epochs=1", "stages.*.batch_size=16",
            "data.num_workers=0", "runtime.log_every=2"]
    assert train_mod.main(args) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # ("fusion", 0): the fusion stage's starting head validated before training (agcnn.fusion_init)
    assert [(r["stage"], r["epoch"]) for r in recs] == [("global", 1), ("local", 1), ("fusion", 0), ("fusion", 1)]
    assert all(r["val/" + r["stage"] + "/mean_auroc"] is not None for r in recs)
    ck = torch.load(run / "ckpt" / "fusion" / "best.pt", weights_only=True)
    assert any(k.startswith("global_branch.trunk.stem") for k in ck["model"])
    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "0"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["auroc"]) == {"global", "local", "fusion"}
    assert cli_main(["report", "--run", str(run), "--samples", "2"]) == 0
    assert any((run / "report").glob("*.html"))
