"""Continue a run with more epochs, and start a run from another run's weights (fine-tuning)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpc import train as train_mod
from hpc.run import Run, fit_init_weights, init_source
from medattn.errors import ConfigError
from prepfix import make_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

BASE = ["--config", "demo", "data.image_size=32", "data.resize=40", "stages.*.batch_size=16",
        "data.num_workers=0", "runtime.log_every=2", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=48, size=48, seed=1)


@pytest.fixture(scope="module")
def finished(prep, tmp_path_factory):
    """A finished three-stage demo run, one epoch per stage."""
    run = tmp_path_factory.mktemp("runs") / "base"
    assert train_mod.main([*BASE, "--data", str(prep), "--out", str(run), "stages.*.epochs=1"]) == 0
    return run


def _records(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_more_epochs_continue_the_run(prep, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _records(run)
    spe = before[0]["global_step"]  # steps per epoch
    args = [*BASE, "--data", str(prep), "--out", str(run), "stages.*.epochs=1"]

    # the last stage lengthened: only its new epoch trains, the others are untouched
    global_before = torch.load(run / "ckpt" / "global" / "best.pt", weights_only=True)["model"]
    assert train_mod.main([*args, "stages.fusion.epochs=2"]) == 0
    recs = _records(run)
    # fusion epoch 0: the validation of its starting head (fusion_init global), a record of its own
    assert [(r["stage"], r["epoch"]) for r in recs] == [("global", 1), ("local", 1), ("fusion", 0), ("fusion", 1),
                                                        ("fusion", 2)]
    assert recs[:4] == before  # the trained epochs' records are kept as they were
    assert recs[4]["global_step"] == 2 * spe  # the counter continues: one new epoch of steps
    assert "resuming at epoch 2" in capsys.readouterr().out
    g = torch.load(run / "ckpt" / "global" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(g[k], global_before[k]) for k in g)
    assert Run(run).config().stages["fusion"].epochs == 2  # the saved config follows

    # an earlier stage lengthened: it continues; the stages after it train again from their start
    assert train_mod.main([*args, "stages.fusion.epochs=2", "stages.global.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "continuing: stage global from epoch 1 to 2" in out and "trained again from their start: local, fusion" in out
    recs = _records(run)
    assert [(r["stage"], r["epoch"]) for r in recs] == [
        ("global", 1), ("global", 2), ("local", 1), ("fusion", 0), ("fusion", 1), ("fusion", 2)]
    assert recs[0] == before[0] and recs[1]["global_step"] == 2 * spe
    state = json.loads((run / "state.json").read_text())["stages"]
    assert all(state[s]["done"] for s in ("global", "local", "fusion")) and state["global"]["epochs"] == 2

    # the same command again: nothing to do; fewer epochs: refused, nothing changed
    assert train_mod.main([*args, "stages.fusion.epochs=2", "stages.global.epochs=2"]) == 0
    assert len(_records(run)) == 6
    assert train_mod.main([*args, "stages.fusion.epochs=2"]) == 2
    assert "stages.global.epochs=1 is lower than the run's 2" in capsys.readouterr().err
    # any other change is still refused
    assert train_mod.main([*args, "stages.global.epochs=2", "stages.fusion.epochs=3", "agcnn.tau=0.5"]) == 2
    assert "different config" in capsys.readouterr().err


def test_init_from_another_run_starts_from_its_weights(prep, finished, tmp_path, monkeypatch, capsys):
    src = torch.load(finished / "ckpt" / "global" / "best.pt", weights_only=True)["model"]
    seen = {}
    real_step = train_mod.optimizer_step

    def spy(step_module, *a, **kw):
        if not seen:  # the weights the first optimizer step starts from
            module = getattr(step_module, "module", step_module)
            seen.update({k: v.detach().clone() for k, v in module.model.state_dict().items()})
        return real_step(step_module, *a, **kw)

    monkeypatch.setattr(train_mod, "optimizer_step", spy)
    out = tmp_path / "ft"
    assert train_mod.main([*BASE, "--data", str(prep), "--out", str(out), "stages.*.epochs=1",
                           "--stages", "global", "--init-from", str(finished)]) == 0
    assert "initialised from run" in capsys.readouterr().out
    assert seen and set(seen) == set(src)
    for k in src:
        torch.testing.assert_close(seen[k], src[k], rtol=0, atol=0, msg=k)
    # saved with the config: resuming with the same command matches it
    assert Run(out).config().stages["global"].init_from == str(finished)
    # a run directory resolves to its best checkpoint of the same stage, else its last finished stage's
    assert init_source(finished, "global")[0] == finished / "ckpt" / "global" / "best.pt"
    assert init_source(finished, "train")[0] == finished / "ckpt" / "fusion" / "best.pt"


def test_init_from_checks_keys_and_skips_another_head(finished, tmp_path, prep, capsys):
    from medattn.models import create_model

    a = create_model("resnet18", num_classes=15, weights="none")
    b = create_model("resnet18", num_classes=4, weights="none")
    # another number of classes: the Linear head is skipped (named), the trunk must fit exactly
    assert fit_init_weights(b, a.state_dict(), "x") == ["fc.weight", "fc.bias"]
    c = create_model("resnet18", num_classes=15, in_chans=3, weights="none")
    with pytest.raises(ConfigError, match=r"shape mismatch: conv1.weight \(checkpoint \(64, 3, 7, 7\)"):
        fit_init_weights(a, c.state_dict(), "x")
    with pytest.raises(ConfigError, match="missing from the checkpoint: layer4"):
        fit_init_weights(a, {k: v for k, v in a.state_dict().items() if not k.startswith("layer4")}, "x")
    # through train: a run of another backbone is refused before anything is written
    out = tmp_path / "bad"
    assert train_mod.main([*BASE, "--data", str(prep), "--out", str(out), "model.backbone=resnet50",
                           "--init-from", str(finished)]) == 2
    err = capsys.readouterr().err
    # the backbones first, then a short count of the keys (naming 15 keys of another network says nothing more)
    assert "backbone resnet50 vs resnet18 (this run vs the checkpoint)" in err
    assert err.index("resnet50 vs resnet18") < err.index("does not fit this run's model")
    assert "global_branch.layer1.0.conv3.weight" not in err and len(err) < 500, err
    assert not out.exists()
    assert train_mod.main([*BASE, "--data", str(prep), "--out", str(out), "--init-from", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err


def test_stages_report_what_was_trained_and_a_resume_names_each_changed_key(prep, tmp_path, capsys):
    """``--stages global``: the log names the stages this launch trains (of all) and the done line
    the time each took and the stages left. A rerun may change loader-only keys (workers,
    prefetch); a change of the science is refused naming each key with both values."""
    out = tmp_path / "run"
    args = [*BASE, "--data", str(prep), "--out", str(out), "stages.*.epochs=1"]
    assert train_mod.main([*args, "--stages", "global"]) == 0
    text = capsys.readouterr().out
    assert "| stages global (of global, local, fusion)" in text
    done = next(line for line in text.splitlines() if f"done: {out}" in line)
    assert " | trained global 0:" in done and "not trained yet: local, fusion (rerun without --stages" in done
    assert "local" not in done.split("trained global")[1].split("not trained yet")[0]

    # another number of loader workers and prefetch: not a different run
    assert train_mod.main([*args, "--stages", "global", "data.num_workers=2", "data.prefetch=4"]) == 0
    text = capsys.readouterr().out
    assert "[global] already done" in text and "trained nothing (all done)" in text

    # the science changed: each key named, with the saved and the new value, the loader keys not
    assert train_mod.main([*args, "data.num_workers=2", "stages.local.grad_clip=0.5", "agcnn.tau=0.6"]) == 2
    err = capsys.readouterr().err
    assert "stages.local.grad_clip: 0.0 -> 0.5" in err and "agcnn.tau: 0.7 -> 0.6" in err, err
    assert "num_workers: 0 -> 2" not in err and "sections differ" not in err
