"""Start and stop one trainer process (``medattn train``, or torchrun for DDP inside a trial).

A trial is a Ray actor; its trainer is a child process, so a sweep trains with exactly the
command a user would type. Three rules keep that safe:

* the trainer gets a clean environment: no torchrun or SLURM step variables leak in from Ray's
  ``srun``-started workers (hpc.distributed would otherwise think it is one rank of many);
* it dies with its parent thread (Linux ``PR_SET_PDEATHSIG``): if Ray kills the actor (driver
  killed, node lost), the trainer gets SIGTERM, saves a checkpoint and exits instead of training
  on as an orphan next to its own resumed copy;
* stopping it means SIGTERM to its process group (torchrun and every rank), then waiting for the
  checkpoint, then SIGKILL after a timeout.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Package root (the directory holding medattn/, hpc/, sweeps/): put on the trainer's PYTHONPATH
# so a source checkout works like an installed package on every node (shared filesystem).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
              "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
_KEEP_SLURM = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_CLUSTER_NAME")

try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def trainer_env(cpus: float | None = None, nproc: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer process started by a sweep.

    Args:
        cpus: CPUs of the trial; sets OMP_NUM_THREADS (per process) when the user did not.
        nproc: processes per trial.
        base: the environment to start from (default os.environ).
    """
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k in _DIST_VARS or (k.startswith("SLURM_") and k not in _KEEP_SLURM):
            env.pop(k)
    root = str(PACKAGE_ROOT)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root] + parts)
    if cpus and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, int(cpus // max(1, nproc))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def train_command(config: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                  nproc: int = 1, stages: list[str] | None = None) -> list[str]:
    """``python -m medattn train ...``, or under ``torch.distributed.run --standalone`` for nproc > 1."""
    from hpc.launch_args import command_line

    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return cmd + ["-m", "medattn", "train", *command_line(config, data, out, stages)]


def start(cmd: list[str], log_path: str | os.PathLike, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr appended to ``log_path``; see the module notes."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent, close_fds=True)
    finally:
        log.close()  # the child holds its own descriptor


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int | None:
    """SIGTERM the trainer's process group (it checkpoints and exits 3), wait, SIGKILL on timeout."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait()


def log_tail(path: str | os.PathLike, n: int = 30) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
