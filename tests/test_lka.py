"""VGG16-BN + LKA (seed 004): the model (shapes, parameter count, ImageNet trunk), focal loss by
hand, the 14-output head on 15-label data, and both stages through the runtime on one split."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medattn import losses
from medattn.config import load_config
from medattn.errors import ConfigError
from medattn.methods import DataSpec, create_method
from medattn.models import create_model
from medattn.models.lka import LKA
from prepfix import make_prepared


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ------------------------------------------------------------------------------------- model
def test_published_head_has_15418702_trainable_parameters():
    m = create_model("vgg16_bn_lka", num_classes=14, in_chans=3, pool="avg", drop_rate=0.5)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 15_418_702
    # by hand: VGG16-BN features 14,723,136 + LKA(256) 85,248 + 2 x LKA(512) 301,568 + Linear 7,182
    assert sum(p.numel() for p in m.features.parameters()) == 14_723_136
    assert sum(p.numel() for p in m.lka.parameters()) == 85_248 + 2 * 301_568
    assert sum(p.numel() for p in m.fc.parameters()) == 512 * 14 + 14
    assert isinstance(m.global_pool, torch.nn.Module) and m.global_pool.kind == "avg" and m.drop.p == 0.5


def test_lka_blocks_sit_before_the_pools_of_blocks_3_to_5():
    m = create_model("vgg16_bn_lka", num_classes=14, in_chans=1, pool="avg", drop_rate=0.5).eval()
    seen = {}
    for name, mod in m.lka.items():
        mod.register_forward_hook(lambda _m, i, o, n=name: seen.update({n: (tuple(i[0].shape), tuple(o.shape))}))
    with torch.no_grad():
        assert m(torch.randn(2, 1, 64, 64)).shape == (2, 14)
    # at 64 px: block 3 ends at 16x16 (before pool 23), block 4 at 8x8, block 5 at 4x4
    assert seen == {"b3": ((2, 256, 16, 16),) * 2, "b4": ((2, 512, 8, 8),) * 2, "b5": ((2, 512, 4, 4),) * 2}
    # the LKA input is the block's last ReLU output (features[22], [32], [42]); pools follow
    assert [type(m.features[i]).__name__ for i in (22, 23, 32, 33, 42, 43)] == ["ReLU", "MaxPool2d"] * 3


def test_lka_is_the_published_composition():
    torch.manual_seed(0)
    lka = LKA(8)
    assert (lka.conv0.kernel_size, lka.conv0.groups, lka.conv0.padding) == ((5, 5), 8, (2, 2))
    assert (lka.conv_spatial.kernel_size, lka.conv_spatial.dilation, lka.conv_spatial.groups,
            lka.conv_spatial.padding) == ((7, 7), (3, 3), 8, (9, 9))
    assert lka.conv1.kernel_size == (1, 1) and lka.conv1.groups == 1
    assert all(c.bias is not None for c in (lka.conv0, lka.conv_spatial, lka.conv1))
    x = torch.randn(2, 8, 12, 12)
    f = torch.nn.functional
    attn = f.conv2d(x, lka.conv0.weight, lka.conv0.bias, padding=2, groups=8)
    attn = f.conv2d(attn, lka.conv_spatial.weight, lka.conv_spatial.bias, padding=9, dilation=3, groups=8)
    attn = f.conv2d(attn, lka.conv1.weight, lka.conv1.bias)
    torch.testing.assert_close(lka(x), x * attn)


def test_imagenet_file_initialises_the_trunk_and_not_the_lka(tmp_path, monkeypatch):
    from medattn.models.weights import imagenet_file

    # A file in torchvision's vgg16_bn format (random values), under torchvision's file name.
    ref = create_model("vgg16_bn", num_classes=0, in_chans=3, weights="none")
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    sd["classifier.6.weight"] = torch.zeros(1000, 4096)  # torchvision's classifier: dropped
    monkeypatch.setenv("MEDATTN_WEIGHTS_DIR", str(tmp_path))
    torch.save(sd, tmp_path / imagenet_file("vgg16_bn").filename)
    torch.manual_seed(1)
    m = create_model("vgg16_bn_lka", num_classes=14, in_chans=1, weights="imagenet", pool="avg", drop_rate=0.5)
    torch.testing.assert_close(m.features[0].weight, sd["features.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(m.features[40].weight, sd["features.40.weight"])
    torch.manual_seed(1)
    fresh = create_model("vgg16_bn_lka", num_classes=14, in_chans=1, weights="none", pool="avg", drop_rate=0.5)
    torch.testing.assert_close(m.lka.b4.conv1.weight, fresh.lka.b4.conv1.weight)  # untouched


# ------------------------------------------------------------------------------------- focal loss
def _focal_by_hand(z, y, alpha=1.0, gamma=2.0, class_alpha=None):
    total, n = 0.0, 0
    for row_z, row_y in zip(z, y):
        for j, (zz, yy) in enumerate(zip(row_z, row_y)):
            p = 1 / (1 + math.exp(-zz))
            bce = -(yy * math.log(p) + (1 - yy) * math.log(1 - p))
            p_t = p if yy else 1 - p
            a = alpha if class_alpha is None else (class_alpha[j] if yy else 1 - class_alpha[j])
            total += a * (1 - p_t) ** gamma * bce
            n += 1
    return total / n


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_focal_loss_matches_the_formula(gamma, alpha):
    z = [[2.0, -1.0, 0.0], [0.5, -3.0, 4.0]]
    y = [[1, 0, 1], [0, 0, 1]]
    got = losses.focal(torch.tensor(z), torch.tensor(y, dtype=torch.float32), alpha, gamma)
    assert float(got) == pytest.approx(_focal_by_hand(z, y, alpha, gamma), rel=1e-6)


def test_focal_loss_literal_values_and_per_class_alpha():
    # z = 0, y = 1: p_t = 1/2, BCE = ln 2; gamma 2 -> (1/2)^2 ln 2
    assert float(losses.focal(torch.zeros(1, 1), torch.ones(1, 1))) == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # gamma 0, alpha 1 is plain BCE
    z, y = torch.tensor([[1.5, -0.5]]), torch.tensor([[0.0, 1.0]])
    assert float(losses.focal(z, y, 1.0, 0.0)) == pytest.approx(float(losses.bce(z, y)), rel=1e-6)
    # per-class alpha: positives weighted a_c, negatives 1 - a_c (Lin et al.)
    zz = [[2.0, -1.0, 0.3], [-0.7, 1.2, 0.0]]
    yy = [[1, 0, 0], [1, 1, 0]]
    ca = [0.9, 0.25, 0.6]
    got = losses.focal(torch.tensor(zz), torch.tensor(yy, dtype=torch.float32), 1.0, 2.0, torch.tensor(ca))
    assert float(got) == pytest.approx(_focal_by_hand(zz, yy, gamma=2.0, class_alpha=ca), rel=1e-6)
    # e.g. the first element alone: p = sigma(2), (1 - p)^2 * 0.9 * -log p
    p = 1 / (1 + math.exp(-2.0))
    first = losses.focal(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 1.0, 2.0, torch.tensor([0.9]))
    assert float(first) == pytest.approx(0.9 * (1 - p) ** 2 * -math.log(p), rel=1e-6)


# ------------------------------------------------------------------------------------- 14 vs 15 outputs
def _spec(**kw):
    from medattn.data.labels import DISEASES, NIH_LABELS

    return DataSpec(tuple(NIH_LABELS), tuple(DISEASES), "multilabel", 1, 32, **kw)


def test_fourteen_outputs_train_on_the_diseases_and_report_no_finding_as_none_of_them():
    cfg = load_config("vgg_lka_demo", ["model.backbone=resnet18"])
    method = create_method(cfg, _spec())
    assert method.num_classes == 14 and method.out_idx == list(range(14))
    torch.manual_seed(0)
    logits = torch.randn(3, 14)
    labels = torch.zeros(3, 15)
    labels[0, 2] = labels[1, 14] = labels[2, [0, 13]] = 1
    batch = {"labels": labels}
    torch.testing.assert_close(method.loss_fn(logits, batch, "bce"), losses.bce(logits, labels[:, :14]))
    torch.testing.assert_close(method.loss_fn(logits, batch, "focal"), losses.focal(logits, labels[:, :14], 1.0, 2.0))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    probs = method.predict(Fixed(), {"image": torch.zeros(3, 1, 8, 8)}, "focal")["probs"]["main"]
    p = torch.sigmoid(logits)
    torch.testing.assert_close(probs[:, :14], p)
    torch.testing.assert_close(probs[:, 14], torch.prod(1 - p, dim=1))
    with pytest.raises(ConfigError, match="num_classes=7"):
        create_method(load_config("vgg_lka_demo", ["model.num_classes=7"]), _spec())
    with pytest.raises(ConfigError, match="focal.class_alpha"):
        create_method(load_config("vgg_lka_demo", ["focal.class_alpha=[0.5, 0.5]"]), _spec())
    with pytest.raises(ConfigError, match="bce or focal"):
        create_method(load_config("vgg_lka_demo", ["stages.focal.loss=ce"]), _spec())


# ------------------------------------------------------------------------------------- runtime
def test_both_stages_train_on_one_patient_split_and_evaluate(tmp_path):
    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod
    from medattn.data.prepared import PreparedDataset

    prep = make_prepared(tmp_path / "prep", n=96, size=32, seed=3)
    run = tmp_path / "run"
    args = ["--config", "vgg_lka_demo", "--data", str(prep), "--out", str(run), "data.image_size=32",
            "data.resize=32", "stages.*.epochs=1", "stages.*.batch_size=16", "runtime.tensorboard=false",
            "runtime.progress=none", "data.loader=torch", "data.max_samples=32",
            # the fake data scores 4 diseases: 4 outputs = the evaluated labels (as 14 on NIH)
            "model.num_classes=4"]
    assert train_mod.main(args) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "val/main/loss" in r]
    assert [r["stage"] for r in epochs] == ["warmup", "bce", "focal"]
    assert all(r["select/metric"] == "val/main/loss" and math.isfinite(r["val/main/loss"]) for r in epochs)
    saved = load_config(run / "config.yaml")
    assert saved.stages["focal"].loss == "focal" and saved.lka.abnormal_only_stages == ["warmup", "bce"]

    # Which images each stage trains and validates on: the method decides, from ONE prepared split.
    ds = PreparedDataset.open(prep)
    method = create_method(saved, DataSpec.from_dataset(ds, saved))
    man = ds.manifest
    test_patients = set(man.loc[man["split"] == "test", "patient"])
    seen = {}
    for stage in ("warmup", "bce", "focal"):
        for split in ("train", "val"):
            idx = method.stage_indices(ds, stage, split, ds.indices(split))
            assert set(man.loc[idx, "split"]) == {split}  # the prepared split, never re-drawn
            assert not set(man.loc[idx, "patient"]) & test_patients
            seen[stage, split] = set(idx.tolist())
    y = ds.labels_matrix()
    abnormal = {i for i in range(len(ds)) if y[i, :4].max() > 0}
    for split in ("train", "val"):
        assert seen["warmup", split] == seen["bce", split] == seen["focal", split] & abnormal
        assert seen["focal", split] == set(ds.indices(split).tolist())
    assert set(man.loc[list(seen["focal", "train"]), "patient"]).isdisjoint(
        set(man.loc[list(seen["focal", "val"]), "patient"]))

    assert evaluate_mod.main(["--run", str(run), "--bootstrap", "0"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["stage"] == "focal" and len(m["eval_labels"]) == 4 and "No Finding" in m["auroc"]["main"]
    preds = pd.read_csv(run / "eval" / "preds.csv")
    p = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(p[:, 14], np.prod(1 - p[:, :4], axis=1), rtol=1e-4, atol=1e-6)
    assert np.all(p[:, 4:14] == 0)  # unevaluated diseases without an output
