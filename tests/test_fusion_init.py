"""AG-CNN's fusion head initialised from the branch heads (agcnn.fusion_init): before any fusion
training the fusion logits are the mean of the branches' (branches), the global branch's
(global), or PyTorch's random init (random, the paper's literal head); the trainer applies it once
when the fusion stage starts fresh, not on resume."""
from __future__ import annotations

import pytest
import torch

from medattn.config import load_config
from medattn.errors import ConfigError
from medattn.methods import DataSpec, create_method
from medattn.methods.agcnn import init_fusion_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _method(how: str):
    cfg = load_config("demo", ["model.weights=none", "data.image_size=32", "data.resize=32",
                               "agcnn.crop_source=input", f"agcnn.fusion_init={how}"])
    names = tuple(f"c{i}" for i in range(5))
    return create_method(cfg, DataSpec(names, names, "multilabel", 1, 32))


@pytest.mark.parametrize("how", ["branches", "global", "random"])
def test_fusion_head_starts_from_the_branches(how):
    torch.manual_seed(0)
    meth = _method(how)
    model = meth.build_model().eval()
    before = model.fusion.weight.detach().clone()
    meth.init_stage(model, "local")  # only the fusion stage touches the head
    assert torch.equal(model.fusion.weight, before)
    meth.init_stage(model, "fusion")
    batch = {"image": torch.randn(3, 1, 32, 32), "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)}
    with torch.no_grad():
        out = meth.forward(model, batch, "fusion")
    g, loc, f = out["global"], out["local"], out["fusion"]
    if how == "branches":
        torch.testing.assert_close(f, (g + loc) / 2, atol=1e-5, rtol=1e-5)
    elif how == "global":
        torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(model.fusion.weight, before)
        assert not torch.allclose(f, (g + loc) / 2, atol=1e-3)


def test_fusion_init_errors():
    with pytest.raises(ConfigError, match="agcnn.fusion_init"):
        _method("average")
    meth = _method("branches")
    with pytest.raises(ConfigError, match="expected random, branches or global"):
        init_fusion_head(meth.build_model(), "average")


def test_fusion_stage_keeps_its_starting_head_unless_an_epoch_beats_it(tmp_path):
    """With fusion_init=global and a fusion learning rate of 0 no epoch can beat the starting head
    on validation, so the stage's best checkpoint is epoch 0 and the fusion branch's test
    predictions are the global branch's, exactly."""
    import json

    import pandas as pd

    from hpc import evaluate as evaluate_mod
    from hpc import train as train_mod
    from tests_prep import make_multilabel

    prep = make_multilabel(tmp_path / "prep")
    run = tmp_path / "run"
    fast = ["data.image_size=32", "data.resize=32", "stages.*.epochs=1", "stages.*.batch_size=16",
            "data.num_workers=0", "data.loader=torch", "runtime.tensorboard=false", "runtime.progress=none",
            "agcnn.crop_source=input", "agcnn.fusion_init=global", "stages.fusion.optimizer.lr=0"]
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), *fast]) == 0
    state = json.loads((run / "state.json").read_text())["stages"]["fusion"]
    assert state["best_epoch"] == 0 and state["done"]
    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "0"]) == 0
    preds = pd.read_csv(run / "eval" / "preds.csv")
    g = preds[preds["branch"] == "global"].filter(like="p_").to_numpy()
    f = preds[preds["branch"] == "fusion"].filter(like="p_").to_numpy()
    assert abs(g - f).max() < 1e-5
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["auroc"]["fusion"]["mean"] == pytest.approx(m["auroc"]["global"]["mean"], abs=1e-6)
    # Provenance: eval records where the fusion stage started and which head/epoch it evaluated.
    fus = m["stages"]["fusion"]
    assert fus["fusion_init"] == "global" and fus["start"] == "global head"
    assert fus["best_epoch"] == 0 and fus["checkpoint"] == "best"
    assert fus["evaluated"] == "global head, kept: no fusion epoch beat it on validation"
    assert m["stages"]["global"]["kept"] == "global epoch 1" and "evaluated" not in m["stages"]["global"]
    # The starting head's validation is a record (epoch 0) and a point of the curve.
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fusion_recs = [r for r in recs if r["stage"] == "fusion"]
    assert [r["epoch"] for r in fusion_recs] == [0, 1] and fusion_recs[0]["initial"] is True
    assert fusion_recs[0]["val/fusion/mean_auroc"] == pytest.approx(state["best_metric"])
    assert [r["epoch"] for r in recs if r["stage"] == "global"] == [1]  # no epoch 0 where nothing was kept

    # The report says it in words and credits no fusion epoch.
    from hpc.report import build_report

    res = build_report(run, samples=0, log=lambda *a: None)
    for page in (res.markdown.read_text(), res.html.read_text()):
        assert "The fusion output is the global head (agcnn.fusion_init=global) it started from, kept: no fusion " \
               "epoch beat it on validation" in page
        assert "epoch 0: global head kept" in page
        assert "fusion epoch 1" not in page
    md = res.markdown.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| fusion | 1/1 |"))
    assert "(epoch 0: global head kept)" in row and "(epoch 1)" not in row
    assert "so the global head was kept" in md
