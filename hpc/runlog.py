"""What a run prints and records, on rank 0 only.

* On a terminal: a tqdm progress bar per epoch. In a batch log (SLURM, CI, pipes): one plain
  line every ``runtime.log_every`` steps, so logs stay small and greppable.
* the run's epoch records (hpc.run): one JSON object per finished epoch (stage, epoch, losses,
  validation AUROC per branch and class, throughput, wall time). On resume, records of epochs
  that will be retrained are dropped first, so each (stage, epoch) appears exactly once.
* TensorBoard in the run's TensorBoard folder: the epoch records and step means as scalars
  (``<stage>/<key>``), per-epoch precision-recall curves of the validation predictions for
  every evaluated label (``<stage>/val_pr/<label>``, the branch that selects the checkpoint),
  a few validation heat-map overlays per validation (``<stage>/val_heatmaps``, 4 images: the
  network's view in grey, the attention map in red), and at the run's end its hparams: the
  flattened config and the final metrics (``final/<stage>/best``, ``final/<key>``), so runs of
  a sweep compare in TensorBoard's HPARAMS tab.
* ETAs: the epoch, the stage and the run, in the progress bar and the log lines. The stage's
  is the epoch's remaining steps at the current step rate plus its remaining epochs at the last
  epoch's duration (training and validation); the run's adds the later stages' epochs at the
  current step rate (an estimate: a later stage may be cheaper per step, e.g. AG-CNN's fusion).
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


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


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
        self._plan: dict[str, tuple[int, int]] = {}  # stage -> (epochs, steps per epoch), in run order
        self._epoch_time: dict[str, float] = {}  # stage -> seconds of its last epoch (train + validation)
        self._stage = ""
        self._epoch = 0
        self._epochs = 0
        self._start_step = 0
        self.eta: dict[str, float] = {}  # the latest estimates, seconds: epoch, stage, run
        self.global_step_hint = 0  # the step validation images and curves are logged at

    @property
    def tensorboard(self) -> bool:
        """Whether this process writes TensorBoard (rank 0 with runtime.tensorboard)."""
        return self._tb is not None

    # ------------------------------------------------------------------ ETA
    def set_plan(self, stages: dict[str, tuple[int, int]]) -> None:
        """The stages this launch trains, in order: ``{stage: (epochs, steps per epoch)}``."""
        self._plan = dict(stages)

    def _update_eta(self, step: int) -> None:
        done = step - self._start_step
        if done <= 0:
            return
        per_step = (time.time() - self._tstart) / done
        left = max(0, self._steps - step) * per_step
        later_epochs = max(0, self._epochs - self._epoch - 1)
        per_epoch = self._epoch_time.get(self._stage, self._steps * per_step)
        stage_left = left + later_epochs * per_epoch
        order = list(self._plan)
        rest = order[order.index(self._stage) + 1:] if self._stage in order else []
        run_left = stage_left + sum(e * n * per_step for e, n in (self._plan[s] for s in rest))
        self.eta = {"epoch": left, "stage": stage_left, "run": run_left}

    def eta_text(self) -> str:
        """``ETA epoch 0:12 stage 3:40 run 1:02:00`` (empty before the first estimate)."""
        if not self.eta:
            return ""
        return "ETA " + " ".join(f"{k} {format_duration(v)}" for k, v in self.eta.items())

    # ------------------------------------------------------------------ epoch records
    def drop_epochs_from(self, stage: str, epoch: int) -> None:
        """Remove records of ``stage`` with epoch > ``epoch`` (they are about to be retrained)."""
        if self.primary:
            self.run.drop_records_from(stage, epoch)

    def epoch_record(self, record: dict[str, Any], global_step: int) -> None:
        if not self.primary:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        secs = (rec.get("train/time_s") or 0.0) + (rec.get("val/time_s") or 0.0)
        if secs > 0:
            self._epoch_time[rec.get("stage", "")] = secs
        self.run.append_record(rec)
        if self._tb is not None:
            stage = rec.get("stage", "")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "global_step"):
                    self._tb.add_scalar(f"{stage}/{k}", v, global_step)
            self._tb.flush()

    # ------------------------------------------------------------------ TensorBoard: validation, hparams
    def val_pr_curves(self, stage: str, branch: str, names: list[str], labels: Any, probs: Any,
                      global_step: int) -> None:
        """One precision-recall curve per evaluated label: ``labels`` (N, L) 0/1 and ``probs``
        (N, L), columns in ``names`` order. Labels without a positive have no curve."""
        if not (self.primary and self._tb is not None):
            return
        import numpy as np

        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        for j, name in enumerate(names):
            if y[:, j].any():
                self._tb.add_pr_curve(f"{stage}/val_pr/{name}", y[:, j] > 0, np.clip(p[:, j], 0.0, 1.0),
                                      global_step, num_thresholds=101)
        self._tb.add_text(f"{stage}/val_pr_branch", branch, global_step)

    def val_heatmaps(self, stage: str, views: list[Any], heatmaps: list[Any], global_step: int,
                     captions: list[str] | None = None) -> None:
        """A few overlays: each (h, w[, C]) uint8 view in grey with its [0, 1] heat map in red."""
        if not (self.primary and self._tb is not None) or not views:
            return
        import torch
        import torch.nn.functional as F

        out = []
        side = max(int(v.shape[0]) for v in views)
        for view, heat in zip(views, heatmaps):
            g = torch.as_tensor(view, dtype=torch.float32)
            g = (g.mean(dim=-1) if g.ndim == 3 else g) / 255.0
            g = F.interpolate(g[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            h = torch.as_tensor(heat, dtype=torch.float32).clamp(0, 1)
            h = F.interpolate(h[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            a = 0.5 * h  # the map's weight in the blend: hot regions turn red, cold ones stay grey
            out.append(torch.stack([g * (1 - a) + a, g * (1 - a), g * (1 - a)]))
        self._tb.add_images(f"{stage}/val_heatmaps", torch.stack(out).clamp(0, 1), global_step, dataformats="NCHW")
        if captions:
            self._tb.add_text(f"{stage}/val_heatmaps_images", "  \n".join(captions), global_step)
        self._tb.flush()

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's hparams at its end: the flattened config (``stages.global.optimizer.lr``...)
        and its final metrics, in the run's own event file (TensorBoard's HPARAMS tab)."""
        if not (self.primary and self._tb is not None):
            return
        from torch.utils.tensorboard.summary import hparams

        hp = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in flatten(config).items()}
        met = {k: float(v) for k, v in metrics.items() if isinstance(_clean(v), (int, float))}
        exp, ssi, sei = hparams(hp, met)
        writer = self._tb._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)
        for k, v in met.items():
            self._tb.add_scalar(k, v)
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
        self._stage, self._epoch, self._epochs, self._start_step = stage, epoch, epochs, start_step
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
                self._update_eta(step)
                post = {k: f"{v:.4g}" for k, v in scalars.items()}
                if self.eta:  # tqdm shows the epoch's own ETA; the stage's and the run's follow
                    post.update(stage_eta=format_duration(self.eta["stage"]), run_eta=format_duration(self.eta["run"]))
                self._bar.set_postfix(post, refresh=False)
        elif scalars and self.progress == "log" and (step % self.log_every == 0 or step == self._steps):
            dt = max(1e-9, time.time() - self._tstart)
            self._update_eta(step)
            s = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            log.info(f"{self._desc} step {step}/{self._steps} {s} {self._seen / dt:.1f} img/s | {self.eta_text()}")

    def end_epoch(self, summary: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.primary and self.progress != "none":
            eta = ""
            if self._stage in self._epoch_time and self.eta:
                # after the epoch: the rest of the stage at this epoch's duration, and the run
                per_epoch = self._epoch_time[self._stage]
                stage_left = max(0, self._epochs - self._epoch - 1) * per_epoch
                run_left = stage_left + self.eta["run"] - self.eta["stage"]
                eta = f" | ETA stage {format_duration(stage_left)} run {format_duration(max(0.0, run_left))}"
            log.info(f"{self._desc} {summary}{eta}")

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
