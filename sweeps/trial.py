"""One Tune trial = one ``medattn train`` run in ``DIR/trials/<trial_id>``.

The trial function (a Tune function trainable, running in a Ray actor on some node):

1. builds the trial's config (base config + the sampled parameters), seeds its run directory
   from the shared base run when there is one (sweeps.reuse), and writes the trial's ledger
   (``Run.sweep_trial_path``: parameters, node, status);
2. starts the trainer (sweeps.launch) and follows the run's epoch records as they grow: each finished
   epoch of a stage the trial trains is one ``ray.tune.report`` with ``mean_auroc`` = the
   validation mean AUROC of the branch that stage trains, so ``training_iteration`` counts
   epochs across the trained stages;
3. when Tune stops the trial (ASHA), the actor's cleanup SIGTERMs the trainer, which saves a
   checkpoint and exits (``_StopTrainer``); when the trainer fails, the trial fails with the
   end of its log.

A trial restarted after the driver was killed runs the same trainer command on the same run
directory, so the trainer resumes from its last checkpoint; the epochs already in
the run's records are reported again first (fast), so iteration counts stay consistent.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.run import Run
from sweeps import launch

METRIC = "mean_auroc"


@dataclass
class TrialJob:
    """Everything a trial needs, fixed for the whole sweep (pickled into the trainable).

    Attributes:
        out: the sweep directory (shared filesystem).
        data: the prepared directory.
        base_config: the resolved base config as a mapping.
        space: the SearchSpace.
        prefix: stages shared through the base run (already trained there).
        stages: the stages each trial trains (after the prefix), in order.
        base: the base run directory, or None.
        nproc: trainer processes per trial (torchrun when > 1).
        cpus: CPUs per trial (for OMP_NUM_THREADS).
        poll_s: how often the epoch records are checked.
        stop_timeout_s: how long a stopped trainer may take to checkpoint before SIGKILL.
        extra_env: variables added to the trainer's environment.
    """

    out: str
    data: str
    base_config: dict[str, Any]
    space: Any
    prefix: list[str]
    stages: list[str]
    base: str | None = None
    nproc: int = 1
    cpus: float = 1.0
    poll_s: float = 0.5
    stop_timeout_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def trial_config(self, sample: dict[str, Any]):
        """The resolved config of one trial."""
        import copy

        from medattn.config import load_config, set_key, validate

        cfg = load_config(None, data=copy.deepcopy(self.base_config))
        for key, value in self.space.overrides(sample):
            set_key(cfg, key, value)
        validate(cfg)
        return cfg


def run_dir_for(out: str | os.PathLike, trial_id: str) -> Path:
    return Path(out) / "trials" / trial_id


def write_ledger(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the trial's ledger (atomic; :meth:`hpc.run.Run.update_sweep_trial`)."""
    return Run(run_dir).update_sweep_trial(**fields)


def metric_of(rec: dict[str, Any]) -> float:
    """Validation mean AUROC of the branch the record's stage trains (NaN when not evaluated)."""
    sel = rec.get("select/metric") or ""
    parts = sel.split("/")
    key = f"val/{parts[1]}/mean_auroc" if len(parts) >= 3 and parts[0] == "val" else sel
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


class MetricsTail:
    """New epoch records of the given stages in a run's growing (or rewritten) record file, read
    with the run's own reader (:meth:`hpc.run.Run.records`: a line still being written does not
    parse and is left for the next look)."""

    def __init__(self, run: Run, stages: list[str]):
        self.run = run
        self.stages = stages
        self.seen: set[tuple[str, int]] = set()
        self._stamp: tuple[float, int] | None = None

    def new_records(self) -> list[dict[str, Any]]:
        try:
            st = self.run.metrics_path.stat()
        except FileNotFoundError:
            return []
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        out = []
        try:
            recs = self.run.records()
        except OSError:
            return []
        for rec in recs:
            key = (rec.get("stage"), rec.get("epoch"))
            # epoch 0 is the validation of a stage's starting weights, not a trained iteration
            if key[0] in self.stages and isinstance(key[1], int) and key[1] > 0 and key not in self.seen:
                self.seen.add(key)
                out.append(rec)
        return out


# The running trainer of this actor (one trial per actor), for _StopTrainer. The lock makes
# "start a trainer" and "Tune stops the trial" exclusive: a trial being stopped starts none.
_ACTIVE: dict[str, Any] = {}
_LOCK = threading.Lock()


def asha_stopped(out: str | os.PathLike) -> set[str]:
    """Trial ids that ASHA stopped early (sweeps.asha writes the list)."""
    path = Path(out) / "asha_stopped.json"
    try:
        return set(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError):
        return set()


class _StopTrainer:
    """Mixin for the function trainable (Tune's ``__mixins__`` hook): when Tune stops the trial,
    stop the trainer *before* the actor goes away. A function trainable's own thread is only
    woken after cleanup and the actor exits right after, too late for a checkpoint."""

    def cleanup(self):
        with _LOCK:
            _ACTIVE["stopping"] = True
            proc, run_dir = _ACTIVE.get("proc"), _ACTIVE.get("run_dir")
            timeout, stages = _ACTIVE.get("stop_timeout_s", 60.0), _ACTIVE.get("stages", [])
        if proc is not None and proc.poll() is None:
            rc = launch.stop(proc, timeout)
            # ASHA also "stops" a trial at its last epoch, while the trainer is wrapping up; a stop
            # that is not ASHA's is the experiment shutting down (Ctrl-C, SLURM USR2): resumed later.
            status = _status_after_exit(run_dir, stages, 0)
            if status == "stopped" and run_dir.name not in asha_stopped(run_dir.parent.parent):
                status = "interrupted"
            write_ledger(run_dir, status=status, trainer_exit=rc, ended=time.time())
        super().cleanup()  # type: ignore[misc]


def _status_after_exit(run_dir: Path, stages: list[str], rc: int) -> str:
    if Run(run_dir).stages_done(stages):
        return "completed"
    return "stopped" if rc == 0 else "error"


def run_trial(job: TrialJob, config: dict[str, Any]) -> None:
    """Body of the trainable (see the module notes)."""
    import ray
    from ray import tune

    from sweeps.reuse import seed_trial

    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    node_ip = ray.util.get_node_ip_address()
    run_dir = run_dir_for(job.out, trial_id)
    run = Run(run_dir)
    sample = {n: config[n] for n in job.space.names}
    cfg = job.trial_config(sample)
    if job.base:
        seed_trial(job.base, run_dir, job.prefix, cfg)
    elif not run.exists():
        run.save_config(cfg)
    tail = MetricsTail(run, job.stages)
    n, best = 0, {}

    def report(rec: dict[str, Any]) -> None:
        nonlocal n
        n += 1
        v = metric_of(rec)
        st = rec["stage"]
        if not math.isnan(v):
            best[st] = max(best.get(st, -math.inf), v)
        tune.report({METRIC: v, "best_auroc": best.get(st, math.nan), "stage": st,
                     "stage_epoch": rec["epoch"], "epochs": n, "node_id": node_id, "node_ip": node_ip})

    done = run.stages_done(job.stages)
    if done or trial_id in asha_stopped(job.out):
        # Finished (or stopped by ASHA) before a driver restart that Tune's experiment state had
        # not caught up with: report what is there, train nothing; the ledger keeps its node.
        for rec in tail.new_records():
            report(rec)
        write_ledger(run_dir, status="completed" if done else "stopped")
        return
    prev = run.sweep_trial().get("nodes", [])
    write_ledger(run_dir, trial_id=trial_id, params=sample,
                 overrides=[f"{k}={v}" for k, v in job.space.overrides(sample)], node_id=node_id, node_ip=node_ip,
                 hostname=socket.gethostname(), nodes=prev + [node_id], status="running", started=time.time(),
                 shared_stages=job.prefix, stages=job.stages)
    cmd = launch.train_command(run.config_path, job.data, run_dir, nproc=job.nproc)
    env = launch.trainer_env(job.cpus, job.nproc)
    env.update(job.extra_env)
    with _LOCK:
        if _ACTIVE.get("stopping"):  # Tune stopped the trial while it was being set up
            write_ledger(run_dir, status="interrupted")
            return
        proc = launch.start(cmd, run.train_log_path, env)
        _ACTIVE.update(proc=proc, run_dir=run_dir, stop_timeout_s=job.stop_timeout_s, stages=job.stages)
    try:
        while True:
            rc = proc.poll()
            for rec in tail.new_records():
                report(rec)
            if rc is not None:
                for rec in tail.new_records():  # written just before the exit
                    report(rec)
                break
            time.sleep(job.poll_s)
        with _LOCK:
            if _ACTIVE.get("stopping"):  # Tune stopped it: _StopTrainer wrote the ledger
                return
        status = _status_after_exit(run_dir, job.stages, rc)
        write_ledger(run_dir, status=status, trainer_exit=rc, ended=time.time(), epochs=n)
        if status != "completed":
            raise RuntimeError(f"trainer for trial {trial_id} exited with status {rc} "
                               f"(see {run.train_log_path}):\n{launch.log_tail(run.train_log_path)}")
    finally:
        if proc.poll() is None:  # the thread was stopped some other way
            launch.stop(proc, job.stop_timeout_s)
        with _LOCK:
            _ACTIVE.pop("proc", None)


def make_trainable(job: TrialJob):
    """The Tune function trainable for ``job`` (a closure, so the job travels with it)."""

    def medattn_trial(config):
        run_trial(job, config)

    medattn_trial.__mixins__ = (_StopTrainer,)
    return medattn_trial
