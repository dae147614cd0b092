"""The papers' presets (issue 16): AG-CNN `paper`, DualAttendMed `cal` / `published` / `corrected`,
Grad-CAM `gradcam_vgg16_published`, `medattn configs` listing them, and the hand-computed CAL
values of the multi-label extension."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medattn.config import load_config
from medattn.methods import DataSpec, create_method
from medattn.methods.dualattendmed import centre_loss, class_sums, combine_cls, update_centres
from medattn.views import ViewSpec

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("agcnn_resnet50_paper", "agcnn_densenet121_paper", "dualattendmed_cal", "dualattendmed_published",
                 "gradcam_vgg16_published")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def test_configs_lists_the_paper_presets():
    out = subprocess.run([sys.executable, "-m", "medattn", "configs"], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    for p in PAPER_PRESETS + ("dualattendmed_resnet152", "agcnn_resnet50"):
        assert p in names, p


def test_agcnn_paper_presets_follow_the_text():
    for name, backbone, batches in (("agcnn_resnet50_paper", "resnet50", (128, 64, 64)),
                                    ("agcnn_densenet121_paper", "densenet121", (64, 32, 32))):
        cfg = load_config(name)
        assert (cfg.model.backbone, cfg.model.weights, cfg.model.pool) == (backbone, "imagenet", "max")
        d = cfg.data
        assert (d.resize, d.image_size, d.train_crop, d.hflip, d.normalize) == (256, 224, "random_resized", True, "mean")
        assert cfg.agcnn.fusion_init == "random"
        for stage, bs in zip(("global", "local", "fusion"), batches):
            st = cfg.stages[stage]
            assert st.batch_size == bs and st.epochs == 50
            assert (st.optimizer.name, st.optimizer.lr, st.optimizer.momentum) == ("sgd", 0.01, 0.9)
            # "divided by 10 after 20 epochs", read as stated: one drop at 20.
            assert (st.scheduler.name, st.scheduler.milestones, st.scheduler.gamma) == ("multistep", [20], 0.1)
            assert (st.select_metric, st.select_mode) == ("val/mean_auroc", "max")
    # The patient-disjoint default keeps its own settings (and medattn's fusion head init).
    default = load_config("agcnn_resnet50")
    assert default.data.train_crop == "random" and default.data.normalize == "imagenet"
    assert default.agcnn.fusion_init == "global"
    # Mean subtraction only: (x - mean) with std 1, on the 0..1 scale.
    v = ViewSpec.from_config(load_config("agcnn_resnet50_paper").data, 256, 1, train=False)
    assert v.std == (1.0,) and v.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))


def _sp(z: float) -> float:  # softplus: BCE-with-logits of label 1 at -z, of label 0 at z
    return math.log1p(math.exp(z))


def test_cal_multilabel_extension_by_hand():
    """One image, two classes, labels [1, 0]; BCE replaces CAL's CE, the rest is CAL's."""
    y = torch.tensor([[1.0, 0.0]])
    raw = torch.tensor([[2.0, -1.0]])
    aug = torch.tensor([[1.0, 0.0], [0.0, -2.0]])             # crop, drop
    aux = torch.tensor([[1.5, -1.5], [0.5, -0.5], [-1.0, 1.0]])  # raw, crop, drop (p - p_cf)
    l_raw = F.binary_cross_entropy_with_logits(raw, y)
    l_aug = F.binary_cross_entropy_with_logits(aug, y.repeat(2, 1))
    l_aux = F.binary_cross_entropy_with_logits(aux, y.repeat(3, 1))
    h_raw = (_sp(-2.0) + _sp(-1.0)) / 2
    h_aug = (_sp(-1.0) + _sp(0.0) + _sp(0.0) + _sp(-2.0)) / 4
    h_aux = (2 * _sp(-1.5) + 2 * _sp(-0.5) + 2 * _sp(1.0)) / 6
    assert l_raw.item() == pytest.approx(h_raw) and l_aug.item() == pytest.approx(h_aug)
    assert l_aux.item() == pytest.approx(h_aux)
    # CAL: CE_raw/3 + CE_aux + 2/3 CE_aug.
    assert combine_cls("corrected", l_raw, l_aug, l_aux).item() == pytest.approx(h_raw / 3 + h_aux + 2 * h_aug / 3)
    # Centres from zero, beta 0.05: c_k += beta (mean of X over images positive for k - c_hat_k).
    x = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    new = update_centres(torch.zeros(2, 2), *class_sums(x, pos), 0.05, "corrected")
    torch.testing.assert_close(new, torch.tensor([[0.03, 0.04], [0.04, 0.02]]))
    # CenterLoss over the 3 positive (image, class) pairs against c_hat = 0: (1 + 1 + 1) / 3.
    assert centre_loss(x, torch.zeros(2, 2), pos).item() == pytest.approx(1.0)
    c_hat = F.normalize(new, dim=-1)  # [.6, .8] and [2, 1] / sqrt(5)
    d = [(0.0, 0.0), (0.6 - 2 / 5 ** 0.5, 0.8 - 1 / 5 ** 0.5), (1 - 2 / 5 ** 0.5, -1 / 5 ** 0.5)]
    assert centre_loss(x, c_hat, pos).item() == pytest.approx(sum(a * a + b * b for a, b in d) / 3, abs=1e-6)


def test_dualattendmed_presets():
    spec = DataSpec(tuple(f"c{i}" for i in range(3)), tuple(f"c{i}" for i in range(3)), "multilabel", 1, 32)
    cal = load_config("dualattendmed_cal")
    s = create_method(cal, spec).settings
    d = cal.dualattendmed
    assert (s.crop_theta, s.drop_theta, s.lambda_att, s.lambda_center) == ((0.4, 0.6), (0.2, 0.5), 0.0, 1.0)
    assert (d.lambda_div, d.eval_crop_theta, d.eval_crop_padding, d.eval_flip) == (0.0, 0.1, 0.05, False)
    assert (s.attention, s.centre_init) == ("bn_relu", "zeros")
    pub = create_method(load_config("dualattendmed_published"), spec).settings
    assert (pub.variant, pub.crop_theta, pub.lambda_att) == ("published", (0.5, 0.5), 0.5)
    cor = load_config("dualattendmed_resnet152")
    assert (cor.dualattendmed.variant, cor.dualattendmed.lambda_div, cor.dualattendmed.eval_crop_theta) == (
        "corrected", 0.1, 0.5)
    # The cal loss is classification + centre loss only: no diversity term on a real step.
    torch.manual_seed(0)
    demo = load_config("dualattendmed_demo", ["dualattendmed.num_maps=4", "data.image_size=32", "data.resize=32",
                                              "dualattendmed.lambda_div=0", "dualattendmed.eval_crop_theta=0.1",
                                              "dualattendmed.eval_crop_padding=0.05"])
    meth = create_method(demo, DataSpec(tuple(f"c{i}" for i in range(15)), tuple(f"c{i}" for i in range(15)),
                                        "multilabel", 1, 32))
    model = meth.build_model().train()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 32, 32, generator=g), "labels": (torch.rand(4, 15, generator=g) < 0.3).float(),
             "target": torch.full((4,), -1), "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)}
    loss, logs = meth.training_loss(model, batch, "main", 0)
    assert loss.item() == pytest.approx((logs["cls"] + logs["center"]).item(), rel=1e-6)


@pytest.mark.slow  # two 138M-parameter VGG16s: ~20 s on a quiet core
def test_gradcam_vgg16_published_head_scheduler_and_imagenet_file(tmp_path):
    """The paper's VGG16: no BN, torchvision's 4096-4096 classifier loaded from the ImageNet file,
    only the last Linear new; the plateau watches the validation loss (lower is better)."""
    import torchvision

    from medattn.models import create_model
    from medattn.models.weights import load_weights

    cfg = load_config("gradcam_vgg16_published")
    assert (cfg.model.backbone, cfg.gradcam_loss.variant, cfg.gradcam_loss.target) == ("vgg16", "published", "predicted")
    st = cfg.stages["train"]
    assert (st.scheduler.name, st.scheduler.monitor, st.scheduler.monitor_mode) == ("plateau", "val/loss", "min")
    assert (st.select_metric, st.select_mode, st.optimizer.name, st.optimizer.lr) == ("val/accuracy", "max", "adam", 1e-5)
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(num_classes=1000)
    path = tmp_path / "vgg16-397923af.pth"  # torchvision's file name: loaded like `imagenet`
    torch.save(tv.state_dict(), path)
    model = create_model("vgg16", num_classes=2, in_chans=1, drop_rate=0.5)
    load_weights(model, str(path))
    sd = model.state_dict()
    torch.testing.assert_close(sd["classifier.0.weight"], tv.classifier[0].weight)
    torch.testing.assert_close(sd["classifier.3.weight"], tv.classifier[3].weight)
    torch.testing.assert_close(sd["features.28.weight"], tv.features[28].weight)
    torch.testing.assert_close(sd["features.0.weight"], tv.features[0].weight.sum(1, keepdim=True))
    assert sd["fc.weight"].shape == (2, 4096) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # Same parameters as torchvision's vgg16 with a 2-class last layer, less the 2 summed stem channels.
    n_tv = sum(p.numel() for p in tv.parameters()) - (4096 * 1000 + 1000) + (4096 * 2 + 2)
    assert sum(p.numel() for p in model.parameters()) == n_tv - 64 * 2 * 9
    # The 1-channel model on a gray image = torchvision's on the image replicated to RGB, up to the
    # 4096-d vector before the last Linear (eval mode: dropout off; the summed stem is exact).
    model.eval()
    tv.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        ref = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x.repeat(1, 3, 1, 1))), 1))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert model.gradcam_layer() is model.features[28]


def test_plateau_watches_its_monitor():
    from hpc.schedule import LRSchedule

    st = load_config("gradcam_vgg16_published", ["stages.train.scheduler.patience=1"]).stages["train"]
    s = LRSchedule(st, 10)
    for loss in (1.0, 0.9, 0.8, 0.7):  # falling loss: never reduced (it would be, read as "max")
        s.end_epoch(loss)
    assert s.lr(4) == pytest.approx(1e-5)
    for loss in (0.75, 0.76):  # two epochs without a new minimum, patience 1: x 0.1
        s.end_epoch(loss)
    assert s.lr(6) == pytest.approx(1e-6)


def test_cal_preset_is_cal():
    """dualattendmed_cal: no channel attention, 448 px from 512 (CAL's Resize(448 / 0.875) -> crop 448),
    synchronised batch norm, CAL's batch (4 per GPU x 4 GPUs) and its per-iteration schedule."""
    from hpc.schedule import LRSchedule

    cal = load_config("dualattendmed_cal")
    assert cal.dualattendmed.channel_attention is False and cal.runtime.sync_bn in ("auto", True)
    assert (cal.data.image_size, cal.data.resize, cal.data.train_crop) == (448, 512, "random")
    st = cal.stages["main"]
    assert (st.batch_size, st.epochs, st.optimizer.lr) == (16, 160, 1e-3)
    assert (st.scheduler.name, st.scheduler.gamma, st.scheduler.step_epochs) == ("exp", 0.9, 2)
    # CAL adjust_learning(epoch, i / len): 1e-3 * 0.9 ** ((epoch + i / len) / 2), by hand with 4 steps an epoch.
    sched = LRSchedule(st, steps_per_epoch=4)
    for epoch, step, want in ((0, 0, 1e-3), (0, 2, 1e-3 * 0.9 ** 0.25), (1, 0, 1e-3 * 0.9 ** 0.5),
                              (1, 3, 1e-3 * 0.9 ** 0.875), (2, 0, 9e-4), (3, 1, 1e-3 * 0.9 ** (13 / 8)),
                              (159, 3, 1e-3 * 0.9 ** (159.75 / 2))):
        assert sched.lr(epoch, step) == pytest.approx(want, rel=1e-12), (epoch, step)
    assert sched.lr(1, 0) == pytest.approx(0.00094868329805051, rel=1e-12)  # 1e-3 * sqrt(0.9)
    # WS-DAN's StepLR(2, 0.9) (the old form) is 0.9^-0.875 - 1 = 9.6 % above CAL's at epoch 1, step 3 of 4.
    step_form = LRSchedule(load_config("dualattendmed_cal", ["stages.main.scheduler.name=step"]).stages["main"], 4)
    assert step_form.lr(1, 3) / sched.lr(1, 3) == pytest.approx(0.9 ** -0.875)
    # The others keep DualAttendMed's channel attention.
    for name in ("dualattendmed_resnet152", "dualattendmed_published"):
        assert load_config(name).dualattendmed.channel_attention is True


def test_channel_attention_switch_builds_cal_network():
    from medattn.models.wsdan import WSDAN

    spec = DataSpec(tuple(f"c{i}" for i in range(3)), tuple(f"c{i}" for i in range(3)), "multilabel", 1, 32)
    over = ["model.weights=none", "dualattendmed.num_maps=4", "data.image_size=32", "data.resize=32"]
    torch.manual_seed(0)
    off = create_method(load_config("dualattendmed_demo", over + ["dualattendmed.channel_attention=false"]),
                        spec).build_model().eval()
    on = create_method(load_config("dualattendmed_demo", over), spec).build_model().eval()
    assert isinstance(off, WSDAN) and off.channel_attention is None and on.channel_attention is not None
    assert not any("channel_attention" in k for k in off.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = off.forward_all(x)
        f = off.backbone.forward_features(x)
    assert torch.equal(out.channel_weights, torch.ones(2, off.num_features))
    # With no channel attention the maps read the backbone features F themselves.
    torch.testing.assert_close(out.maps, off.attentions(f))
