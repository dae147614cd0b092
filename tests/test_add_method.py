"""Adding a method touches no product file (docs/architecture.md, "Adding a method").

A toy CBAM-like method and its backbone are registered from a test-only module
(tests/toy_method.py): its config section loads, is checked and named in errors; the public
trainer (``hpc.train.main``, in this process: the class is registered here) trains it; the run
loads back like any other (``hpc.inference.load_model``) and predicts; and no product module names it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_method  # noqa: F401  (registers toy_cnn and toy_cbam, as a plugin would)
from medattn.config import load_config, load_saved_config
from medattn.errors import ConfigError
from medattn.methods import method_class, method_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
method: toy_cbam
model: {backbone: toy_cnn, weights: none, pool: avg}
data: {image_size: 32, resize: 40, num_workers: 0}
stages:
  train: {epochs: 1, batch_size: 8, optimizer: {name: adam, lr: 0.01}, scheduler: {name: none}}
toy_cbam: {reduction: 4}
runtime: {log_every: 100, tensorboard: false}
"""


@pytest.fixture()
def config_file(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(CONFIG)
    return p


def test_the_config_knows_the_method_from_its_registration(config_file):
    assert "toy_cbam" in method_names() and method_class("toy_cbam") is toy_method.ToyCBAMMethod
    cfg = load_config(config_file)
    assert (cfg.method, cfg.toy_cbam.reduction, cfg.toy_cbam.kernel) == ("toy_cbam", 4, 3)
    assert list(cfg.sections) == ["toy_cbam"]  # only its own section
    with pytest.raises(ConfigError, match="toy_cbam.kernal"):
        load_config(config_file, ["toy_cbam.kernal=5"])
    with pytest.raises(ConfigError, match=r"'toy_cbam.kernel': 4 is not one of 3, 5, 7"):
        load_config(config_file, ["toy_cbam.kernel=4"])  # its choices
    with pytest.raises(ConfigError, match="toy_cbam.reduction' must be >= 1"):
        load_config(config_file, ["toy_cbam.reduction=0"])  # its check_config
    # Its section, set on another method's config, is named as its own.
    with pytest.raises(ConfigError, match="belongs to toy_cbam"):
        load_config("demo", ["toy_cbam.reduction=2"])
    with pytest.raises(ConfigError, match="method 'toy_cbam' has no stage 'warmup'"):
        toy_method.ToyCBAMMethod(load_config(config_file, ["stages.warmup.epochs=1"]), None)


def test_trains_loads_back_and_predicts(config_file, tmp_path):
    from hpc import train as train_mod
    from hpc.inference import load_model
    from medattn.data.fake import write_fake_prepared
    from medattn.data.prepared import PreparedDataset
    from medattn.views import ViewSpec, normalize, render_views, sample_views

    prep = write_fake_prepared(tmp_path / "prep", n=40, size=40, seed=3)
    run = tmp_path / "run"
    assert train_mod.main(["--config", str(config_file), "--data", str(prep), "--out", str(run)]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in recs if r["stage"] == "train"][-1]
    assert rec["global_step"] >= 2 and np.isfinite(rec["train/loss"])
    assert load_saved_config(run / "config.yaml").toy_cbam.reduction == 4  # the saved config loads back

    lr = load_model(run)
    assert isinstance(lr.method, toy_method.ToyCBAMMethod) and isinstance(lr.model, toy_method.ToyCBAMNet)
    fresh = lr.method.build_model()
    trained = lr.model.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())  # weights were learnt

    ds = PreparedDataset.open(prep)
    idx = ds.indices("test")[:4]
    spec = ViewSpec.from_config(lr.cfg.data, ds.image_size, ds.channels, train=False)
    images = ds.read_batch(idx)
    x = render_views(images, sample_views(spec, len(idx), None), spec)
    # the network input is the one normalisation (medattn.views.normalize) of the centre view
    assert x.shape == (len(idx), 1, 32, 32) and torch.isfinite(x).all()
    out = lr.method.predict(lr.model, {"image": x}, "train")
    probs, heat = out["probs"]["main"], out["heatmap"]
    assert probs.shape == (len(idx), len(lr.spec.label_names)) and ((probs >= 0) & (probs <= 1)).all()
    assert heat.shape == (len(idx), 8, 8) and heat.min() >= 0 and heat.max() <= 1
    assert lr.method.branch_label("main") == "CBAM head"
    full = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.allclose(normalize(full, spec.mean, spec.std), (full.float() / 255 - spec.mean[0]) / spec.std[0])


def test_no_product_file_names_the_toy_method():
    hits = [str(p.relative_to(REPO)) for pkg in ("medattn", "hpc", "jobs", "sweeps") for p in (REPO / pkg).rglob("*")
            if p.is_file() and p.suffix in (".py", ".yaml", ".md") and ("toy_cbam" in p.read_text() or "toy_cnn" in p.read_text())]
    assert hits == []
