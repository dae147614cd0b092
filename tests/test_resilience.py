"""Runs that survive what a cluster does to them, in the configuration users run: loader workers
on (DALI and the PyTorch fallback), signals sent to the whole process group as SLURM and a
terminal send them, checkpoints loaded onto a non-CPU device (``meta`` stands in for CUDA),
checkpoints that cannot run code, a failed start that leaves --out as it was, and a device
choice that is logged and recorded instead of silent.

tests/test_chaos.py interrupts a two-process run many times; this file takes one interruption
at a time.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc import checkpoint, distributed
from hpc import train as train_mod
from medattn.errors import ConfigError, DataError
from prepfix import make_prepared

REPO = Path(__file__).resolve().parents[1]
# As tests/test_train.py, with loader workers on: every stage has 4 steps per epoch.
BASE = ["data.image_size=32", "data.resize=40", "stages.*.epochs=2", "stages.*.batch_size=16",
        "data.num_workers=2", "runtime.log_every=2", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=128, size=48, seed=1)


def _env(tmp: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               MEDATTN_FAULT_DIR=str(tmp))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(out: Path, prep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medattn", "train", "--config", "demo", "--data", str(prep), "--out", str(out),
            *BASE, *extra]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _wait_marker(tmp: Path, point: str, proc: subprocess.Popen, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(tmp.glob(f"{point}.*"))
        if found:
            return found[0]
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before reaching {point}"
        time.sleep(0.05)
    raise AssertionError(f"{point} not reached in {timeout} s")


@pytest.fixture(scope="module")
def references(prep, tmp_path_factory):
    """Uninterrupted runs (three stages, workers on), one per loader: the steps and metrics an
    interrupted run must end with. (DALI's and PyTorch's resize differ in the last bits.)"""
    runs: dict[str, Path] = {}

    def get(loader: str) -> Path:
        if loader not in runs:
            tmp = tmp_path_factory.mktemp(f"ref-{loader}")
            out = tmp / "run"
            r = subprocess.run(_cmd(out, prep, f"data.loader={loader}"), env=_env(tmp), capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            runs[loader] = out
        return runs[loader]

    return get


@pytest.fixture(scope="module")
def reference(references):
    return references("dali")


def _assert_same_run(got: Path, ref: Path) -> None:
    """Same (stage, epoch, optimizer steps) sequence, each epoch once, and the same metrics."""
    a, b = _records(ref), _records(got)
    assert [(x["stage"], x["epoch"], x["global_step"]) for x in b] == \
        [(x["stage"], x["epoch"], x["global_step"]) for x in a]
    for x, y in zip(a, b):
        for k, v in x.items():
            if (k.startswith("val/") and not k.endswith("time_s")) or k in ("train/loss", "select/best"):
                assert y[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (x["stage"], x["epoch"], k)
    state = json.loads((got / "state.json").read_text())["stages"]
    assert all(state[s]["done"] for s in ("global", "local", "fusion"))


@pytest.mark.slow
@pytest.mark.parametrize("loader, sig, status", [
    ("dali", signal.SIGUSR2, train_mod.EXIT_CHECKPOINTED),
    ("torch", signal.SIGUSR2, train_mod.EXIT_CHECKPOINTED),
    ("dali", signal.SIGINT, train_mod.EXIT_INTERRUPTED),
    ("torch", signal.SIGTERM, train_mod.EXIT_CHECKPOINTED),
])
def test_group_signal_with_workers_on_checkpoints_then_rerun_matches(prep, references, tmp_path, loader, sig,
                                                                      status):
    """SLURM's ``scancel --signal`` (and a terminal's Ctrl-C) reach every process of the job,
    loader workers included. The workers must live on, the trainer must checkpoint and exit with
    the documented status, nothing may be left running, and the rerun must end exactly where an
    uninterrupted run ends."""
    out = tmp_path / "run"
    # Stop in the middle of the local stage's first epoch (global: 8 steps, then 2 more).
    proc = subprocess.Popen(_cmd(out, prep, f"data.loader={loader}"), start_new_session=True,
                            env=_env(tmp_path, MEDATTN_FAULT_HOLD="step@10"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_marker(tmp_path, "step", proc)
        members = _group(proc.pid)
        assert len(members) >= 3, f"expected the trainer and its loader workers, got {members}"
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, stdout[-2000:] + stderr[-3000:]
    assert f"stopped by signal {int(sig)} at step 2; checkpoint saved" in stdout
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    deadline = time.time() + 10  # workers end with their trainer (none survives it)
    while _group(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group(proc.pid), f"processes left behind: {_group(proc.pid)}"
    last = checkpoint.load(out / "ckpt" / "local" / "last.pt")
    assert (last["epoch"], last["step"], last["global_step"]) == (0, 2, 2)

    r = subprocess.run(_cmd(out, prep, f"data.loader={loader}"), env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[local] resuming at epoch 1 step 2 (global step 2)" in r.stdout
    _assert_same_run(out, references(loader))


def test_resume_restores_every_state_whatever_the_map_location(reference, prep):
    """The trainer loads last.pt onto the training device. On a GPU the saved random states
    would become CUDA tensors, which torch.set_rng_state refuses; ``meta`` reproduces that on
    a CPU machine. The one resume path (TrainState) must restore the RNG streams, counters and
    states from a checkpoint loaded there."""
    from hpc.schedule import LRSchedule, build_optimizer
    from medattn.config import load_saved_config
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method

    path = reference / "ckpt" / "fusion" / "last.pt"
    saved = checkpoint.load(path, "cpu")
    state = checkpoint.load(path, "meta")
    assert all(t.device.type == "meta" for t in state["model"].values())
    cfg = load_saved_config(reference / "config.yaml")
    ds = PreparedDataset.open(prep)
    method = create_method(cfg, DataSpec.from_dataset(ds, cfg))
    model = method.build_model().to("meta")
    params = method.prepare_stage(model, "fusion")
    st = cfg.stages["fusion"]
    ts = checkpoint.TrainState("fusion", model, build_optimizer(params, st), LRSchedule(st, 4),
                               torch.amp.GradScaler("cuda", enabled=False), method)
    torch.manual_seed(12345)
    np.random.seed(1)
    random.seed(2)
    assert ts.load_state_dict(state, rank=0, world_size=1)
    assert (ts.epoch, ts.step, ts.global_step) == (2, 0, 8)
    assert ts.best == saved["best"] and ts.best_epoch == saved["best_epoch"]
    # the random streams are those of rank 0 when the checkpoint was written
    rng = saved["rng"][0]
    assert torch.get_rng_state().numpy().tobytes() == rng["torch"]
    assert np.random.get_state()[1].tolist() == rng["numpy"][1]
    assert random.getstate()[1] == tuple(rng["python"][1])
    assert all(p.device.type == "meta" for p in model.parameters())
    # the optimizer's momentum buffers came along (on the device of the parameters)
    assert ts.optimizer.state_dict()["param_groups"][0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]


def test_rng_state_survives_any_map_location_and_the_safe_loader(tmp_path):
    distributed.seed_everything(7)
    state = distributed.rng_state()
    path = tmp_path / "s.pt"
    torch.save({"rng": [state]}, path)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    for loc in ("cpu", "meta"):
        loaded = checkpoint.load(path, loc)["rng"][0]
        distributed.set_rng_state(loaded)
        got = (torch.rand(3), np.random.rand(3), random.random())
        assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2], loc


class _RunsCode:
    """A pickle that would create a file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(reference, tmp_path, capsys):
    from hpc import evaluate as evaluate_mod

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "note": _RunsCode(marker)}, evil)
    with pytest.raises(DataError, match=r"evil.pt: refused: it holds a Python object \(\w+\)"):
        checkpoint.load(evil)
    assert not marker.exists()
    # A NumPy scalar is refused too (format-1 checkpoints kept NumPy RNG states)
    torch.save({"best": np.float64(0.5)}, tmp_path / "np.pt")
    with pytest.raises(DataError, match="refused"):
        checkpoint.load(tmp_path / "np.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="unreadable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    # a shared run directory whose best.pt was replaced: eval refuses it and runs nothing
    import shutil

    run = tmp_path / "shared"
    shutil.copytree(reference, run)
    torch.save({"model": {}, "note": _RunsCode(marker)}, run / "ckpt" / "fusion" / "best.pt")
    assert evaluate_mod.main(["--run", str(run), "--split", "test", "--bootstrap", "0"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize("args, needle", [
    (["model.backbone=nosuchnet"], "nosuchnet"),
    (["model.weights=/nonexistent/r18.pth"], "/nonexistent/r18.pth"),
    (["stages.global.batch_size=4096"], "fewer than one batch"),
    (["data.loader=nosuch"], "data.loader"),
    (["agcnn.tua=0.5"], "agcnn.tua"),
])
def test_a_failed_start_leaves_out_as_it_was(prep, tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    argv = ["--config", "demo", "--data", str(prep), "--out", str(out), *BASE, "data.num_workers=0"]
    assert train_mod.main(argv + args) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_start_then_the_corrected_command_runs(prep, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "demo", "--out", str(out), *BASE, "data.num_workers=0", "stages.*.epochs=1",
            "--stages", "global"]
    assert train_mod.main(argv + ["--data", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err and not out.exists()
    # an existing run directory is left byte for byte as it was, too
    assert train_mod.main(argv + ["--data", str(prep)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert train_mod.main(argv + ["--data", str(prep), "model.backbone=nosuchnet"]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_device_cuda_without_cuda_fails_loudly_and_auto_says_why(prep, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "demo", "--data", str(prep), "--out", str(out), *BASE, "data.num_workers=0",
            "stages.*.epochs=1", "--stages", "global"]
    assert train_mod.main(argv + ["runtime.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "runtime.device=cuda but CUDA cannot be used: CUDA_VISIBLE_DEVICES is empty" in err
    assert not out.exists()
    assert train_mod.main(argv) == 0
    prov = json.loads((out / "provenance.json").read_text())[-1]
    assert prov["device"]["requested"] == "auto" and prov["device"]["chosen"] == "cpu"
    assert "CUDA_VISIBLE_DEVICES is empty" in prov["device"]["reason"]


def test_auto_warns_when_gpus_are_there_but_cuda_cannot_use_them(monkeypatch, caplog):
    """A driver too old for the CUDA 13 wheels: torch.cuda.is_available() is False on a GPU node."""
    import logging

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(distributed, "cuda_status",
                        lambda: (False, "The NVIDIA driver on your system is too old (found version 11040)"))
    monkeypatch.setattr(distributed, "_gpu_hardware_present", lambda: True)
    dev, info = distributed.choose_device("auto")
    assert dev.type == "cpu" and info["gpu_hardware"] and "driver on your system is too old" in info["reason"]
    distributed._DEVICE_INFO.clear()
    distributed._DEVICE_INFO.update(info)
    log = logging.getLogger("medattn-test-device")
    with caplog.at_level(logging.INFO, logger="medattn-test-device"):
        distributed.log_device(log)
    assert "has NVIDIA GPUs but CUDA cannot use them" in caplog.text and "runtime.device=cuda" in caplog.text
    with pytest.raises(ConfigError, match="driver on your system is too old"):
        distributed.choose_device("cuda")
