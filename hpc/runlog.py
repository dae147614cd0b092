"""What a run prints and records, on rank 0 only.

* On a terminal: a tqdm progress bar per epoch. In a batch log (SLURM, CI, pipes): one plain
  line every ``runtime.log_every`` steps, so logs stay small and greppable.
* the run's epoch records (hpc.run): one JSON object per finished epoch (stage, epoch, losses,
  validation AUROC per branch and class, throughput, wall time). On resume, records of epochs
  that will be retrained are dropped first, so each (stage, epoch) appears exactly once.
* TensorBoard scalars in the run's TensorBoard folder.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

log = logging.getLogger("medattn")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted, not to the stream that was
    current when the handler was made (in-process runs, e.g. tests that capture output, swap
    and close stdout objects between runs)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(primary: bool) -> None:
    if not log.handlers:
        h = _StdoutHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if primary else logging.WARNING)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class RunLogger:
    """Progress, log lines, the epoch records and TensorBoard of a run (all on rank 0 only)."""

    def __init__(self, run, primary: bool, progress: str = "auto", tensorboard: bool = True,
                 log_every: int = 20):
        self.run = run  # hpc.run.Run
        self.primary = primary
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "log"
        self.progress = progress
        self.log_every = max(1, log_every)
        self._tb = None
        if primary and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run.tb_dir))
            except Exception as e:  # TensorBoard is optional at run time
                log.warning(f"TensorBoard disabled: {e}")
        self._bar = None
        self._t0 = time.time()

    # ------------------------------------------------------------------ epoch records
    def drop_epochs_from(self, stage: str, epoch: int) -> None:
        """Remove records of ``stage`` with epoch > ``epoch`` (they are about to be retrained)."""
        if self.primary:
            self.run.drop_records_from(stage, epoch)

    def epoch_record(self, record: dict[str, Any], global_step: int) -> None:
        if not self.primary:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        self.run.append_record(rec)
        if self._tb is not None:
            stage = rec.get("stage", "")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "global_step"):
                    self._tb.add_scalar(f"{stage}/{k}", v, global_step)
            self._tb.flush()

    def step_scalars(self, stage: str, scalars: dict[str, float], global_step: int) -> None:
        if self.primary and self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{stage}/step/{k}", v, global_step)

    # ------------------------------------------------------------------ progress
    def start_epoch(self, stage: str, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        self._desc = f"[{stage}] epoch {epoch + 1}/{epochs}"
        self._steps = steps
        self._tstart = time.time()
        self._seen = 0
        if self.primary and self.progress == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=steps, initial=start_step, desc=self._desc, leave=False,
                             dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, scalars: dict[str, float] | None, images_so_far: int) -> None:
        self._seen = images_so_far
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.update(1)
            if scalars:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
        elif scalars and self.progress == "log" and (step % self.log_every == 0 or step == self._steps):
            dt = max(1e-9, time.time() - self._tstart)
            s = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            log.info(f"{self._desc} step {step}/{self._steps} {s} {self._seen / dt:.1f} img/s")

    def end_epoch(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.primary and self.progress != "none":
            log.info(f"{self._desc} {summary}")

    def info(self, msg: str) -> None:
        if self.primary:
            log.info(msg)

    def warning(self, msg: str) -> None:
        """A warning in the log (``WARNING: ...``), on rank 0."""
        if self.primary:
            log.warning(f"WARNING: {msg}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
