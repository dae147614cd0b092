"""What submitit runs on every task of a ``medattn submit`` job: one stage of a run, trained
in-process by :func:`hpc.train.train`, requeued on preemption or time-out.

The stop/requeue protocol (docs/slurm.md, "Requeue design"):

1. submitit starts each task with its own handler on USR2 (checkpoint + ``scontrol requeue`` on
   global rank 0, nothing on the other ranks) and logs-and-ignores SIGTERM. This object keeps
   a reference to that handler, then lets the trainer replace it: with
   ``MEDATTN_STOP_SIGNALS=USR2`` the trainer's handler only sets ``hpc.stop.STOP``.
2. SLURM sends USR2 to every task ``signal_delay`` seconds before the time limit, or when the
   job is preempted. Each rank sets its flag; every few steps (the same steps on every rank)
   all ranks agree (an all-reduce of the flag), so they stop after the *same* step even if
   the signal reached them at different moments, or only some of them.
3. The trainer saves the stage's resume checkpoint (rank 0 writes, every rank waits at a
   barrier until it is renamed into place) and returns ``EXIT_CHECKPOINTED``.
4. Only then does rank 0 call submitit's handler: it calls :meth:`StageRunner.checkpoint`
   (which resubmits this same object: all state is in the run dir), decides time-out vs
   preemption (time-outs are counted against ``max_timeouts``), runs ``scontrol requeue``
   and exits. The other ranks wait to be terminated by the requeue.
5. The requeued job starts from the top; the trainer resumes from that checkpoint on every rank,
   at the step after the one where it stopped.

SIGUSR1 is never used: NCCL reserves it.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import submitit


class StageRunner(submitit.helpers.Checkpointable):
    """Train ``stages`` of the run in ``out`` (resuming it) on this task's rank.

    Args:
        config: config name or YAML path (as for ``medattn train``).
        data: prepared data directory.
        out: run directory (shared filesystem).
        overrides: ``key=value`` config overrides.
        stages: the stages this job trains (one, in a chain).
        hide_gpus: set ``CUDA_VISIBLE_DEVICES=""`` (the job asked for no GPUs; a GPU node would
            otherwise expose GPUs that belong to other jobs).
    """

    def __init__(self, config: str, data: str, out: str, overrides: list[str], stages: list[str],
                 hide_gpus: bool = False):
        self.config = config
        self.data = data
        self.out = out
        self.overrides = list(overrides)
        self.stages = list(stages)
        self.hide_gpus = hide_gpus
        self.attempt = 0  # incremented by checkpoint(): how many times this job was requeued

    def __call__(self) -> dict[str, Any]:
        # submitit's USR2 handler (a SignalHandler method), installed before this call.
        requeue_handler = signal.getsignal(signal.SIGUSR2)
        # The trainer turns USR2 into its STOP flag; SIGTERM stays with submitit, which logs and
        # ignores it (SLURM sends TERM on scancel and before a preemption kill: a cancelled job
        # must not requeue itself).
        os.environ["MEDATTN_STOP_SIGNALS"] = "USR2"
        if self.hide_gpus:  # before torch looks at CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from hpc import train as train_mod
        from hpc.run import Run

        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1") or 1))
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        print(f"medattn: job {os.environ.get('SLURM_JOB_ID')} rank {rank} attempt {self.attempt + 1}: "
              f"stage(s) {','.join(self.stages)} of {self.out}", flush=True)
        rc = train_mod.train(self.config, self.data, self.out, self.overrides, stages=self.stages)
        if rc == 0:
            return {"run": self.out, "stages": {s: Run(self.out).state()["stages"].get(s) for s in self.stages},
                    "attempts": self.attempt + 1}
        if rc == train_mod.EXIT_CHECKPOINTED:
            self._requeue(requeue_handler, rank)
        raise RuntimeError(f"training of {self.out} ended with status {rc}")

    def _requeue(self, handler: Any, rank: int) -> None:
        """Every rank has passed the checkpoint barrier: requeue through submitit (rank 0)."""
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, submitit.core.job_environment.SignalHandler):
            raise RuntimeError("the trainer checkpointed on USR2 but this task was not started by submitit on "
                               "SLURM, so nothing can requeue it: submit again to resume")
        if rank != 0:
            # The requeue terminates this job step: die on its SIGTERM instead of idling until
            # SIGKILL. Rank 0 keeps ignoring it, logs the requeue and exits by itself.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"medattn: rank {rank}: checkpoint complete on every rank; "
              + ("requeueing the job" if rank == 0 else "rank 0 requeues the job"), flush=True)
        handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + scontrol requeue + exit; others: return
        # Ranks > 0 (and rank 0 if the requeue returned): the requeue kills this step within
        # seconds. If it does not come, rank 0 failed to requeue and says why in its log.
        deadline = time.time() + 600
        while time.time() < deadline:
            time.sleep(1)
        print("medattn: the job was not requeued within 10 minutes; see rank 0's log", file=sys.stderr)
        raise RuntimeError("checkpointed but not requeued")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before the requeue. The trainer has already written the
        checkpoint, so the job is resubmitted as it is: it resumes from the run dir."""
        self.attempt += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"StageRunner({self.out!r}, stages={self.stages})"
