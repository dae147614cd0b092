"""Helpers for tests on the real local SLURM cluster (scripts/slurm-local.sh)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
SLURM_DIR = Path(os.environ.get("MEDATTN_SLURM_DIR", "/tmp/medattn-slurm"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def start_cluster() -> bool:
    """Start the local cluster (idempotent); skip the test when it cannot run here.

    Returns whether it was already running (then the tests leave it running).
    """
    was_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if r.returncode in (3, 4):  # not installed / not root
        pytest.skip(f"local SLURM cluster unavailable: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    return was_up


def stop_cluster() -> None:
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=60)


def env(**extra) -> dict[str, str]:
    """Environment for medattn commands and jobs: this checkout, one thread, no GPU."""
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
             SLURM_CONF=str(SLURM_DIR / "slurm.conf"))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def medattn(*args: str, timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medattn", *map(str, args)], env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def job_ids(text: str) -> list[str]:
    """The job ids a medattn command printed ("job 12"), each once, in order."""
    return list(dict.fromkeys(re.findall(r"job (\d+)", text)))


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (the cluster keeps finished jobs for an hour)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def squeue_states(job_ids_: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids_), "-o", "%i|%T"],
                         capture_output=True, text=True).stdout
    return dict(line.split("|", 1) for line in out.split())


def wait_jobs(job_ids_: list[str], timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = squeue_states(job_ids_)
        if all(st.get(j) in TERMINAL for j in job_ids_):
            return st
        time.sleep(0.5)
    raise AssertionError(f"jobs {job_ids_} not finished after {timeout} s: {squeue_states(job_ids_)}")


def queued(comment_prefix: str = "medattn:") -> list[str]:
    """Jobs not yet ended whose comment starts with ``comment_prefix``."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "|" in line and line.split("|", 2)[2].startswith(comment_prefix)]


def records(run: Path) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def wait_for_line(path: Path, needle: str, timeout: float = 180) -> None:
    """Wait until a (job log) file contains ``needle``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if needle in Path(path).read_text(errors="replace"):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path} after {timeout} s")


class RequeueNudger:
    """Start requeued jobs as soon as SLURM allows it.

    A requeued job may start again after ``cred_expire`` seconds (10 on the local cluster),
    but slurmctld only re-examines begin times every ~30 s. Once the begin time has passed,
    ``scontrol update StartTime=now`` makes it eligible at once. This only removes idle
    waiting; the requeue itself is SLURM's and the job's.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.nudged: list[str] = []

    def __enter__(self) -> "RequeueNudger":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i|%r|%S"], capture_output=True,
                                 text=True).stdout
            for line in out.splitlines():
                jid, reason, start = (line.split("|") + ["", ""])[:3]
                if reason != "BeginTime":
                    continue
                try:  # the begin time while it is ahead, "N/A" once it has passed
                    due = datetime.fromisoformat(start) <= datetime.now()
                except ValueError:
                    due = start == "N/A"
                if due:
                    subprocess.run(["scontrol", "update", f"jobid={jid}", "StartTime=now"], capture_output=True)
                    self.nudged.append(jid)
