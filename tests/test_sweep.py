"""medattn sweep on a real two-node Ray cluster: a head and a worker started as separate
processes (`ray start --block`), token authentication, one trial slot per node (a custom
resource), tiny trials (32 px, 1-2 epochs per stage) on the blobs dataset.

One scenario, as a user would live it (and within the time budget of the suite): a 6-trial
sweep over tau and focal gamma whose driver is SIGKILLed mid-sweep and then resumed by running
the same command. Checked: no trainer outlives the killed driver; finished trials are not run
again and interrupted ones resume their run dirs; ASHA (its rungs persisted across the restart)
stops some trials early and their trainers checkpoint and exit; trials ran on both nodes; the
global stage was trained once and shared; results.csv, best.yaml and the plots are right.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from medattn.config import load_config
from prepfix import make_prepared
from hpc.run import Run

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=32", "data.resize=40", "stages.global.epochs=1", "stages.local.epochs=2",
        "stages.fusion.epochs=1", "stages.*.batch_size=16", "data.num_workers=2", "runtime.tensorboard=false",
        "runtime.log_every=2"]
MAX_T = 3  # epochs a trial trains: local 2 + fusion 1 (global is shared)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} (exit {proc.poll()}):\n{path.read_text(errors='replace')[-3000:]}")


class RayCluster:
    """Two Ray nodes on this host, each a separate `ray start --block` process."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mrt", dir="/tmp"))  # short: Ray's socket paths
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                        RAY_USAGE_STATS_ENABLED="0")
        self.procs: list[subprocess.Popen] = []
        self.node_ids: list[str] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", '--resources={"medattn_slot": 1}', "--disable-usage-stats",
               f"--temp-dir={self.tmp / name}", *args]
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        _wait_for_text(log, "Ray runtime started", p, 120)

    def start(self) -> "RayCluster":
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                             f"--ray-client-server-port={_free_port()}"])
        self._start("worker", [f"--address={self.address}"])
        probe = ("import ray, time\nray.init(address=%r)\nfor _ in range(60):\n"
                 "    ids = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
                 "    if len(ids) == 2: break\n    time.sleep(1)\nprint(' '.join(ids))\n") % self.address
        r = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120)
        self.node_ids = r.stdout.split()
        assert len(self.node_ids) == 2, r.stdout + r.stderr[-3000:]
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):  # worker first; SIGTERM: `ray start --block` stops its node
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=96, size=40, seed=1)


def sweep_cmd(cluster, prep, out, *extra):
    return [sys.executable, "-m", "medattn", "sweep", "--config", "sweep_demo", "--data", str(prep),
            "--out", str(out), "--space", "tau=uniform(0.5,0.9)", "--space", "gamma=choice(0,1,2,3)", "--max-concurrent", "2",
            "--trial-resource", "medattn_slot=1", "--address", cluster.address, "--quiet", *extra, *TINY]


def trainers_of(out: Path) -> list[int]:
    """PIDs of live processes whose command line mentions the sweep directory."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "medattn train" in cmd and str(out) in cmd:
                pids.append(int(d.name))
    return pids


def launches(run: Path) -> int:
    """How many times a trainer was started in this run dir (train.log headers)."""
    return sum(line.startswith("=== ") for line in (run / "train.log").read_text().splitlines())


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _progress(out: Path):
    """(finished trial dirs, dirs of trials in the middle of their first trained epoch)."""
    dirs = sorted(x.parent for x in (out / "trials").glob("*/train.log")) if (out / "trials").is_dir() else []
    finished = [d for d in dirs if Run(d).stages_done(["local", "fusion"])
                or json.loads((d / "sweep_trial.json").read_text()).get("status") == "stopped"]
    training = [d for d in dirs if d not in finished and "[local] epoch 1/" in (d / "train.log").read_text()]
    return finished, training


def test_two_node_sweep_asha_shared_global_and_resume_after_driver_kill(cluster, prep, tmp_path):
    """A 6-trial sweep over tau and gamma on two nodes. The driver is SIGKILLed once some
    trials have finished and another is training; the same command then resumes it."""
    out = tmp_path / "sweep"
    cmd = sweep_cmd(cluster, prep, out, "--num-samples", "6", "--search", "random", "--seed", "0",
                    "--grace-period", "1", "--reduction-factor", "2")
    t0 = time.time()
    log = tmp_path / "driver1.log"
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, env=cluster.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    finished, training = [], []
    while time.time() < deadline and p.poll() is None:
        finished, training = _progress(out)
        if len(finished) >= 2 and training:
            break
        time.sleep(0.3)
    assert len(finished) >= 2 and training, f"exit {p.poll()}:\n{log.read_text()[-3000:]}"
    before = {d.name: (d / "metrics.jsonl").stat().st_mtime_ns for d in finished}
    os.kill(p.pid, signal.SIGKILL)  # the driver only: Ray must take its trials down
    p.wait()
    t_kill = time.time() - t0
    deadline = time.time() + 30
    while trainers_of(out) and time.time() < deadline:
        time.sleep(0.5)
    assert trainers_of(out) == [], "a trainer outlived the killed driver"

    r = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    print(f"6-trial sweep: killed after {t_kill:.0f} s, resumed run {time.time() - t0 - t_kill:.0f} s")
    assert "resuming the experiment" in r.stdout
    assert "each trial gets 0 GPU(s) (the cluster has 0" in r.stdout  # the default on a GPU-less cluster

    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6 and df["trial_id"].is_unique
    assert set(df["state"]) <= {"completed", "stopped"}, df[["trial_id", "state", "error"]]
    done, stopped = df[df["state"] == "completed"], df[df["state"] == "stopped"]
    assert len(stopped) >= 1 and len(done) >= 1
    assert set(done["epochs"]) == {MAX_T} and done["last_stage"].eq("fusion").all()
    # ASHA stops only at its rungs: 1 and 2 epochs (grace 1, reduction factor 2, max_t 3)
    assert set(stopped["epochs"]) <= {1, 2}
    assert set(stopped["trial_id"]) == set(json.loads((out / "asha_stopped.json").read_text()))
    # trials ran on both nodes (both nodes share 127.0.0.1, so Ray node ids tell them apart)
    assert set(df["node_id"]) == set(cluster.node_ids)

    runs = {t: out / "trials" / t for t in df["trial_id"]}
    # finished before the kill: not run again; interrupted: the trainer resumed on its run dir
    for name, mtime in before.items():
        assert launches(runs[name]) == 1 and (runs[name] / "metrics.jsonl").stat().st_mtime_ns == mtime
    asha_stops = set(json.loads((out / "asha_stopped.json").read_text()))
    for d in training:  # (unless ASHA stopped it in the instant before the kill)
        assert launches(d) == 2 or (d.name in asha_stops and launches(d) == 1)
    for d in runs.values():  # every epoch recorded once, in order, whatever happened
        recs = [(x["stage"], x["epoch"]) for x in records(d)]
        assert recs == [("global", 1), ("local", 1), ("local", 2), ("fusion", 0), ("fusion", 1)][:len(recs)]
    # the highest AUROC after the first epoch is never below a rung cutoff: not stopped at rung 1
    first = {t: [x for x in records(d) if x["stage"] == "local"][0]["val/local/mean_auroc"] for t, d in runs.items()}
    top = max(first.values())
    assert all(df.set_index("trial_id").loc[t, "epochs"] >= 2 for t, v in first.items() if v == top)

    # one global stage for all: trained once in the base run, hard-linked into every trial
    (base,) = list((out / "base").iterdir())
    assert Run(base).stages_done(["global"]) and launches(base) == 1
    g_best = (base / "ckpt" / "global" / "best.pt").stat().st_ino
    for t, d in runs.items():
        assert (d / "ckpt" / "global" / "best.pt").stat().st_ino == g_best
        log_text = (d / "train.log").read_text()
        assert "[global] already done" in log_text and "[global] epoch" not in log_text
        cfg = load_config(d / "config.yaml")
        row = df.set_index("trial_id").loc[t]
        assert cfg.agcnn.tau == pytest.approx(row["tau"]) and cfg.focal.gamma == row["gamma"]
        ledger = json.loads((d / "sweep_trial.json").read_text())
        if row["state"] == "stopped" and "trainer_exit" in ledger:
            last_launch = log_text[log_text.rindex("\n=== ") + 1:] if "\n=== " in log_text else log_text
            if ledger["trainer_exit"] == -signal.SIGTERM:
                # the stop came in the first instants of a launch, before Python had even loaded
                # medattn (hpc/stop.py): that launch trained nothing, so nothing was lost
                assert "epoch" not in last_launch.split("\n", 1)[1], last_launch
            else:
                # ASHA's stop reached the trainer as SIGTERM: it checkpointed (or had not started
                # training yet) and exited 3
                assert ledger["trainer_exit"] == 3
                assert "stopped by signal 15" in last_launch
        elif row["state"] == "stopped":
            # ASHA stopped it in the instant before the driver was killed, so the trainer went
            # down with the driver before its exit was recorded; the resumed sweep kept the stop
            assert d in training and d.name in asha_stops and launches(d) == 1
    assert trainers_of(out) == []

    # best.yaml: the completed trial with the highest validation mean AUROC, ready to train
    b = done.sort_values("best_auroc", ascending=False).iloc[0]
    assert f"best trial {b['trial_id']}" in (out / "best.yaml").read_text()
    bc = load_config(out / "best.yaml")
    assert bc.agcnn.tau == pytest.approx(b["tau"]) and bc.focal.gamma == b["gamma"]
    assert bc.stages["local"].loss == "focal" and bc.data.image_size == 32
    assert not math.isnan(b["best_auroc"]) and 0.0 <= b["best_auroc"] <= 1.0
    for n in ("tau", "gamma"):
        assert (out / "plots" / f"auroc_vs_{n}.png").read_bytes()[:4] == b"\x89PNG"
    assert "medattn sweep: best:" in r.stdout


@pytest.mark.slow
def test_ddp_inside_a_trial(cluster, prep, tmp_path):
    """--nproc-per-trial 2: each trial (and the shared base) trains under torchrun with 2 gloo
    processes, on the node Ray placed it."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "medattn", "sweep", "--config", "sweep_demo", "--data", str(prep), "--out", str(out),
           "--space", "gamma=choice(1,2)", "--num-samples", "1", "--search", "random", "--scheduler", "none",
           "--nproc-per-trial", "2", "--trial-resource", "medattn_slot=1", "--address", cluster.address, "--quiet",
           *TINY, "stages.local.epochs=1"]
    r = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (trial,) = list((out / "trials").iterdir())
    (base,) = list((out / "base").iterdir())
    assert {x["world_size"] for x in records(trial)} == {2}  # global (from the base), local, fusion
    assert "torch.distributed.run --standalone --nproc-per-node=2" in (trial / "train.log").read_text()
    assert "2 process(es) on cpu" in (base / "train.log").read_text()
    assert pd.read_csv(out / "results.csv")["state"].tolist() == ["completed"]


def test_trials_get_the_clusters_gpus_by_default(tmp_path, monkeypatch):
    """Without --gpus-per-trial a trial gets one GPU per trainer process when the Ray cluster
    has GPUs (Ray hides GPUs from a task that asked for none: a default of 0 would train every
    trial on CPUs next to idle GPUs); an explicit 0 stays 0. Ray's GPU count is declared here
    (a logical resource), which is all this decision reads."""
    import ray

    from sweeps import driver

    def plan(gpu, nproc):
        job = type("Job", (), {"nproc": nproc})()
        return driver.SweepPlan(out=tmp_path, job=job, num_samples=1, search="random", scheduler="none", max_t=1,
                                grace_period=1, reduction_factor=3, max_concurrent=0, max_failures=0, seed=0,
                                resources={"cpu": 1.0, "gpu": gpu})

    lines: list[str] = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # Ray refuses GPUs that this hides
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, configure_logging=False)
    try:
        p = plan(None, 1)
        driver.resolve_gpus(p, ray, lines.append)
        assert p.resources["gpu"] == 1.0 and "each trial gets 1 GPU(s) (the cluster has 2" in lines[-1]
        p = plan(None, 2)  # DDP inside a trial: one GPU per process
        driver.resolve_gpus(p, ray, lines.append)
        assert p.resources["gpu"] == 2.0
        p = plan(0.0, 1)
        driver.resolve_gpus(p, ray, lines.append)
        assert p.resources["gpu"] == 0.0
    finally:
        ray.shutdown()
