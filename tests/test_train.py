"""The trainer end to end on CPU: stages, eval, DDP with 2 gloo processes, exact resume after
a hard kill, checkpoint-and-exit on SIGTERM, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc import evaluate as evaluate_mod
from hpc import train as train_mod
from prepfix import make_prepared

REPO = Path(__file__).resolve().parents[1]
# Small and fast: 32 px input, 2 epochs per stage, DALI CPU pipeline reading in-thread.
BASE = ["data.image_size=32", "data.resize=40", "stages.*.epochs=2", "stages.*.batch_size=16",
        "data.num_workers=0", "runtime.log_every=2"]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=128, size=48, seed=1)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_cmd(nproc, out, prep, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return launcher + ["-m", "medattn", "train", "--config", "demo", "--data", str(prep), "--out", str(out),
                       *BASE, *extra]


def _records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _final(run, stage):
    return [r for r in _records(run) if r["stage"] == stage][-1]


def test_train_three_stages_and_eval(prep, tmp_path):
    run = tmp_path / "run"
    torch.set_num_threads(1)
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(run), *BASE]) == 0
    recs = _records(run)
    assert [(r["stage"], r["epoch"]) for r in recs] == [
        ("global", 1), ("global", 2), ("local", 1), ("local", 2), ("fusion", 0), ("fusion", 1), ("fusion", 2)]
    state = json.loads((run / "state.json").read_text())["stages"]
    assert all(state[s]["done"] for s in ("global", "local", "fusion"))
    for s in ("global", "local", "fusion"):
        assert (run / "ckpt" / s / "best.pt").is_file() and (run / "ckpt" / s / "last.pt").is_file()
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    prov = json.loads((run / "provenance.json").read_text())[-1]
    assert prov["world_size"] == 1 and prov["seed"] == 0 and "torch" in prov["versions"]
    # blobs are easy: the global branch must learn them
    assert _final(run, "global")["select/best"] > 0.8

    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "50"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["auroc"]) == {"global", "local", "fusion"}
    for branch in m["auroc"].values():
        assert set(m["eval_labels"]) | {"mean"} <= set(branch)
    assert m["auroc"]["global"]["mean"] > 0.75
    assert m["auroc_ci"]["fusion"]["mean"][0] <= m["auroc"]["fusion"]["mean"] <= m["auroc_ci"]["fusion"]["mean"][1]
    loc = m["localization"]
    assert loc["n_boxes"] > 0 and "0.1" in loc["overall"]["acc_iobb"]
    import pandas as pd

    preds = pd.read_csv(run / "eval" / "preds.csv")
    n_test = (pd.read_parquet(prep / "manifest.parquet")["split"] == "test").sum()
    assert len(preds) == 3 * n_test and preds["image"].nunique() == n_test
    assert {"p_Atelectasis", "y_Atelectasis", "p_No Finding"} <= set(preds.columns)


def test_two_processes_match_one(prep, tmp_path):
    """DDP over 2 gloo processes == 1 process on the same data.

    The global stage trains BatchNorm, whose batch statistics are per process (8 vs 16
    images), so it agrees within a tolerance. The fusion stage trains only a linear head on
    frozen branches (BatchNorm in eval mode), so there DDP must match one process exactly, up
    to float summation order.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((1, one), (2, two)):
        r = subprocess.run(_train_cmd(nproc, out, prep, "--stages", "global"), env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        # runtime.sync_bn=auto on gloo: said, not silently ignored (SyncBatchNorm is CUDA-only)
        assert ("cannot be synchronised on cpu" in r.stdout + r.stderr) == (nproc == 2)
    g1, g2 = _final(one, "global"), _final(two, "global")
    assert g2["world_size"] == 2 and g1["global_step"] == g2["global_step"]
    assert abs(g1["train/loss"] - g2["train/loss"]) < 0.25 * g1["train/loss"]
    assert abs(g1["val/global/mean_auroc"] - g2["val/global/mean_auroc"]) < 0.15

    # Same global+local weights for both, then the fusion stage with 1 and 2 processes.
    r = subprocess.run(_train_cmd(1, one, prep, "--stages", "global,local"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(two)
    shutil.copytree(one, two)
    for nproc, out in ((1, one), (2, two)):
        r = subprocess.run(_train_cmd(nproc, out, prep), env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    f1, f2 = _final(one, "fusion"), _final(two, "fusion")
    assert f2["world_size"] == 2
    assert f1["train/loss"] == pytest.approx(f2["train/loss"], rel=1e-4, abs=1e-6)
    for k, v in f1.items():
        if k.startswith("val/fusion/"):
            assert f2[k] == pytest.approx(v, abs=1e-4), k


def test_hard_kill_resumes_with_the_same_steps(prep, tmp_path):
    """A run killed without warning mid-epoch resumes from its last step checkpoint and ends
    with the same optimizer steps — and the same weights — as an uninterrupted run."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    base = ["stages.global.epochs=3", "--stages", "global"]
    r = subprocess.run(_train_cmd(1, ref, prep, *base), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spe = _records(ref)[0]["global_step"]  # steps per epoch
    assert spe >= 4
    # checkpoint every spe+2 steps (epoch 2, step 2), die at step spe+3 (epoch 2, step 3)
    extra = base + [f"runtime.ckpt_every_steps={spe + 2}"]
    r = subprocess.run(_train_cmd(1, cut, prep, *extra), env=_env(MEDATTN_FAULT_AFTER_STEPS=spe + 3),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stderr[-3000:]
    last = torch.load(cut / "ckpt" / "global" / "last.pt", weights_only=False)
    assert (last["epoch"], last["step"], last["global_step"]) == (1, 2, spe + 2)
    r = subprocess.run(_train_cmd(1, cut, prep, *extra), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at epoch 2 step 2" in r.stdout
    a, b = _records(ref), _records(cut)
    assert [(x["stage"], x["epoch"]) for x in b] == [("global", 1), ("global", 2), ("global", 3)]  # none twice
    assert a[-1]["global_step"] == b[-1]["global_step"] == 3 * spe
    # every epoch's mean loss, including the interrupted one (its running sums are checkpointed)
    for x, y in zip(a, b):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5), x["epoch"]
    wa = torch.load(ref / "ckpt" / "global" / "last.pt", weights_only=False)["model"]
    wb = torch.load(cut / "ckpt" / "global" / "last.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (/proc SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_sigterm_while_starting_exits_3_and_writes_nothing(prep, tmp_path):
    """A stop during start-up (while torch is still being imported) is an orderly exit 3, as a
    scheduler or a sweep expects of a stopped trainer, not a death by SIGTERM."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "medattn", "train", "--config", "demo", "--data", str(prep),
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not _catches(p.pid, signal.SIGTERM) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    # the CLI installs the handler first thing: torch's library is not loaded yet
    assert "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text()
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 3, text
    assert "stopped by signal 15 before training started" in text
    assert not out.exists()


def test_sigterm_saves_a_checkpoint_and_exits_3(prep, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(1, out, prep, "stages.global.epochs=40", "--stages", "global")
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "ckpt" / "global" / "last.pt").is_file():
            time.sleep(0.2)
        assert (out / "ckpt" / "global" / "last.pt").is_file(), "no epoch finished in time"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == train_mod.EXIT_CHECKPOINTED, stderr[-2000:]
    assert "stopped by signal" in stdout
    last = torch.load(out / "ckpt" / "global" / "last.pt", weights_only=False)
    steps_done = last["global_step"]
    assert 0 < steps_done < last["epoch"] * 1000 + 1000 and last["epoch"] < 40
    # Resuming with a *different* epoch count is a different config: refused, naming the section.
    r = subprocess.run(_train_cmd(1, out, prep, "--stages", "global"), env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "stages" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["agcnn.tua=0.5"], "agcnn.tua"),
    (["--stages", "fusion"], "must finish before"),
    (["--stages", "nosuch"], "nosuch"),
])
def test_bad_input_fails_clearly(prep, tmp_path, capsys, args, needle):
    argv = ["--config", "demo", "--data", str(prep), "--out", str(tmp_path / "r"), *BASE, "runtime.tensorboard=false"]
    assert train_mod.main(argv + args) == 2
    assert needle in capsys.readouterr().err


def test_missing_data_and_changed_config(prep, tmp_path, capsys):
    assert train_mod.main(["--config", "demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "config.yaml").write_text("method: agcnn\nstages: {global: {epochs: 1}}\n")
    assert train_mod.main(["--config", "demo", "--data", str(prep), "--out", str(tmp_path / "r2"), *BASE]) == 2
    assert "different config" in capsys.readouterr().err
