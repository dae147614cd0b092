"""`medattn sweep --slurm` on the real local SLURM cluster (scripts/slurm-local.sh: two slurmd,
n1 and n2, on this host): one allocation of two nodes starts Ray on both (head on n1, worker
on n2, token authentication), runs the Tune driver on n1 and stops Ray at the end; submitting
the same command again resumes the finished experiment instead of rerunning it."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from prepfix import make_prepared

slurm_util = pytest.importorskip("slurm_util", reason="the local SLURM helpers (tests/slurm_util.py) are missing")
pytest.importorskip("jobs.cluster", reason="the SLURM launcher (jobs.cluster) is missing")

pytestmark = [pytest.mark.ray, pytest.mark.slurm]
TINY = ["data.image_size=32", "data.resize=40", "stages.global.epochs=1", "stages.local.epochs=1",
        "stages.fusion.epochs=1", "stages.*.batch_size=16", "data.num_workers=2", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def slurm():
    was_up = slurm_util.start_cluster()
    yield
    if not was_up:
        slurm_util.stop_cluster()


def _job_log(out: Path, job: str) -> str:
    p = out / "slurm" / f"sweep-{job}.out"
    return p.read_text(errors="replace") if p.is_file() else ""


def _ray_leftovers(job: str) -> list[str]:
    r = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if f"/tmp/ray-{job}-" in line]


def test_sweep_on_a_slurm_allocation_and_resubmit(slurm, tmp_path):
    prep = make_prepared(tmp_path / "prep", n=96, size=40, seed=1)
    out = tmp_path / "sweep"
    args = ["sweep", "--slurm", "--profile", "local", "--nodes", "2", "--cpus-per-task", "1", "--config", "sweep_demo",
            "--data", str(prep), "--out", str(out), "--space", "tau=uniform(0.5,0.9)",
            "--space", "gamma=choice(0,1,2,3)", "--num-samples", "2", "--search", "random",
            "--scheduler", "none", "--quiet", *TINY]
    jobs = []
    try:
        r = slurm_util.medattn(*args, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        (job,) = slurm_util.job_ids(r.stdout)
        jobs.append(job)
        st = slurm_util.wait_jobs([job], timeout=400)
        log = _job_log(out, job)
        assert st[job] == "COMPLETED", log[-4000:]
        assert "medattn sweep: ray: 2 node(s)" in log and "stopping Ray on 2 node(s)" in log
        assert "sweep driver exited with status 0" in log
        df = pd.read_csv(out / "results.csv")
        assert len(df) == 2 and set(df["state"]) == {"completed"}
        # one trial slot per node (1 CPU each) and two trials at once: one on each node
        assert df["node_id"].nunique() == 2
        assert (out / "best.yaml").is_file() and len(list((out / "base").iterdir())) == 1
        assert _ray_leftovers(job) == []  # Ray stopped on both nodes
        script = (out / "slurm" / "sweep.sbatch").read_text()
        assert "#SBATCH --nodes=2" in script and "RAY_AUTH_MODE=token" in script

        # the same command again resumes the (finished) experiment: nothing is trained again
        r2 = slurm_util.medattn(*args, timeout=120)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert "resumes the sweep" in r2.stdout
        (job2,) = slurm_util.job_ids(r2.stdout)
        jobs.append(job2)
        # ... and while that job is queued or running, a third submission is refused
        r3 = slurm_util.medattn(*args, timeout=120)
        if slurm_util.squeue_states([job2]).get(job2) in ("PENDING", "RUNNING", "CONFIGURING"):
            assert r3.returncode == 2 and f"sweep job(s) {job2}" in r3.stderr, r3.stdout + r3.stderr
        else:  # it already ended: the submission is a plain resubmit
            assert r3.returncode == 0
            jobs += slurm_util.job_ids(r3.stdout)
        st = slurm_util.wait_jobs(jobs[1:], timeout=300)
        log2 = _job_log(out, job2)
        assert st[job2] == "COMPLETED", log2[-4000:]
        assert "resuming the experiment" in log2
        for d in (out / "trials").iterdir():
            launches = [x for x in (d / "train.log").read_text().splitlines() if x.startswith("=== ")]
            assert len(launches) == 1, d
        lines = [json.loads(x) for x in (out / "slurm" / "jobs.jsonl").read_text().splitlines()]
        assert [x["resume"] for x in lines[:2]] == [False, True]
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, env=slurm_util.env())
        for job in jobs:
            for n in ("n1", "n2"):
                shutil.rmtree(f"/tmp/ray-{job}-{n}", ignore_errors=True)


@pytest.mark.slow
def test_usr2_before_the_time_limit_requeues_and_resumes(slurm, tmp_path):
    """USR2 (what SLURM sends before the time limit or on preemption) stops the driver: the
    trainers checkpoint mid-epoch, the job requeues itself and the next start resumes them."""
    prep = make_prepared(tmp_path / "prep", n=96, size=40, seed=1)
    out = tmp_path / "sweep"
    args = ["sweep", "--slurm", "--profile", "local", "--nodes", "2", "--cpus-per-task", "1", "--config", "sweep_demo",
            "--data", str(prep), "--out", str(out), "--space", "gamma=choice(1,2)", "--search", "grid",
            "--scheduler", "none", "--quiet", *TINY, "stages.local.epochs=3", "runtime.log_every=1"]
    job = None
    try:
        with slurm_util.RequeueNudger():
            r = slurm_util.medattn(*args, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            (job,) = slurm_util.job_ids(r.stdout)
            deadline = time.time() + 300
            while time.time() < deadline:
                logs = [d / "train.log" for d in (out / "trials").glob("*")] if (out / "trials").is_dir() else []
                if len(logs) == 2 and all(x.is_file() and "[local] epoch 1/3 step 1/" in x.read_text() for x in logs):
                    break
                time.sleep(0.3)
            subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True, env=slurm_util.env())
            st = slurm_util.wait_jobs([job], timeout=400)
        log = _job_log(out, job)
        assert st[job] == "COMPLETED", log[-4000:]
        assert "USR2" in log and f"requeueing job {job}" in log
        assert int(slurm_util.job_info(job).get("Restarts", "0")) == 1
        df = pd.read_csv(out / "results.csv")
        assert set(df["state"]) == {"completed"} and len(df) == 2
        for d in (out / "trials").iterdir():
            text = (d / "train.log").read_text()
            assert "stopped by signal 15" in text and "[local] resuming at epoch" in text
    finally:
        if job:
            subprocess.run(["scancel", job], capture_output=True, env=slurm_util.env())
            for n in ("n1", "n2"):
                shutil.rmtree(f"/tmp/ray-{job}-{n}", ignore_errors=True)
