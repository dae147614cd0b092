"""Checkpoints: atomic writes, safe reads, what a checkpoint holds (the resume state of a
stage, the selected weights of one). Where they live in a run directory is hpc.run's business.

Every write goes through medattn.fileio (a temporary file in the same directory, fsync'd and
renamed into place, the directory fsync'd), so a kill or a crash at any moment leaves either
the old or the new file, never a truncated one.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, str, bytes, numbers) and
is read with ``torch.load(weights_only=True)``: opening a run directory from someone else
(``eval``, ``report``, ``viz``, a resume) cannot run code hidden in a pickle. A file that needs
anything more is refused with a message that names it.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

import torch

from hpc import faults
from medattn.errors import DataError
from medattn import fileio

# 2: RNG states as plain data (bytes/lists), loaded with weights_only=True. Format 1 kept
# NumPy arrays and torch ByteTensors, which only an unrestricted (code-running) unpickler reads.
CKPT_VERSION = 2


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` under medattn.fileio's durability rule (file and folder fsync'd);
    ``keep_previous``: the file replaced stays under that name (the previous resume checkpoint)."""
    with fileio.atomic_file(path, keep_previous=keep_previous,
                            before_replace=lambda: faults.point("ckpt_write")) as f:
        torch.save(obj, f)


def to_host(obj: Any) -> Any:
    """A copy of a checkpoint payload with every tensor copied to host memory (CPU tensors
    cloned too), so a background write is unaffected by the training that goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints one after another in a thread of their own, off the training loop.

    :meth:`submit` copies the payload to host memory (the only part the training waits for: a
    device-to-host copy) and returns; :meth:`wait` blocks until everything submitted is on disk
    and re-raises the first failed write. Writes stay atomic (:func:`atomic_torch_save`), so a kill
    during one leaves the previous file.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="medattn-ckpt-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            path, payload, previous = self._jobs.get()
            try:
                if self._error is None:
                    atomic_torch_save(payload, path, previous)
            except BaseException as e:  # surfaced by wait()
                self._error = e
            finally:
                self._jobs.task_done()

    def submit(self, payload: Any, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
        self._raise()
        self._jobs.put((Path(path), to_host(payload), keep_previous))

    def wait(self) -> None:
        self._jobs.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"a background checkpoint write failed: {e}") from e


class UnreadableCheckpointError(DataError):
    """A checkpoint file that cannot be read at all (truncated, zero bytes, not a torch file):
    what a crash leaves when the data never reached the disk. A resume falls back from it
    (hpc.run.Run.resume_state); a file refused for safety is a plain DataError and is not skipped."""


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only) onto ``map_location``.

    Raises:
        DataError: naming the file, when it is missing, unreadable, or would need the
            unrestricted unpickler (it carries Python objects: code could run on loading).
    """
    from medattn.safeload import UnreadableFileError, UnsafeFileError, load_plain

    try:
        obj = load_plain(path, map_location)
    except FileNotFoundError:
        raise DataError(path, "checkpoint not found") from None
    except UnsafeFileError as e:
        raise DataError(path, f"refused: {e}. medattn checkpoints (format {CKPT_VERSION}) never do; one "
                              "written by medattn before format 2 must be retrained, or converted by someone "
                              "who trusts the file") from None
    except UnreadableFileError as e:
        raise UnreadableCheckpointError(path, f"unreadable checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, f"not a medattn checkpoint (a {type(obj).__name__}, expected a mapping)")
    return obj


class TrainState:
    """Where a stage's training is and everything that must come back on resume.

    The model, optimizer, LR schedule, loss scaler and the method's extra state (e.g. feature
    centres), the counters, the best metric so far, the running sums of an interrupted epoch and
    every rank's random streams. :meth:`state_dict` is what a stage's resume checkpoint holds; load it with
    :func:`load` onto any device (the training device, or ``meta`` in tests): RNG states are
    plain bytes and lists, so the map location cannot change them.

    Args:
        stage: the stage name.
        model: the bare model (not the DDP wrapper).
        optimizer, scheduler, scaler: the stage's (scheduler: :class:`hpc.schedule.LRSchedule`).
        method: the Method (``extra_state``/``load_extra_state``).
    """

    def __init__(self, stage: str, model: torch.nn.Module, optimizer, scheduler, scaler, method):
        self.stage = stage
        self.model, self.optimizer, self.scheduler, self.scaler, self.method = (model, optimizer, scheduler,
                                                                                 scaler, method)
        self.epoch = 0  # epochs finished
        self.step = 0  # steps finished in the current epoch
        self.global_step = 0
        self.best: float | None = None
        self.best_epoch = -1  # 0-based epoch of ``best``
        self.bad_epochs = 0
        self.partial_epoch: dict[str, Any] | None = None  # running sums of the epoch in progress
        self.rng: list[dict[str, Any]] | None = None  # per rank, from the checkpoint

    def state_dict(self, *, rng: list[dict[str, Any]], world_size: int, config: dict[str, Any],
                   partial_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "version": CKPT_VERSION, "stage": self.stage, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "method": self.method.extra_state(),
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step, "best": self.best,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "rng": list(rng),
            "world_size": world_size, "config": config, "partial_epoch": partial_epoch,
            "spec": self.method.spec.to_dict(), "inference": inference_record(self.stage, self.method),
        }

    def load_state_dict(self, state: dict[str, Any], *, rank: int, world_size: int) -> bool:
        """Restore everything; returns whether this rank's random streams were restored (only
        when the checkpoint was written by as many ranks as there are now)."""
        from hpc import distributed

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_extra_state(state.get("method", {}))
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.partial_epoch = state.get("partial_epoch") if self.step > 0 else None
        rng = state.get("rng") or []
        if state.get("world_size") == world_size and rank < len(rng):
            distributed.set_rng_state(rng[rank])
            return True
        return False


def weights_payload(stage: str, model: torch.nn.Module, method, *, epoch: int, metric: float | None,
                    metric_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """What a stage's best checkpoint holds: the weights of one epoch and what they scored."""
    return {"version": CKPT_VERSION, "stage": stage, "model": model.state_dict(), "method": method.extra_state(),
            "epoch": epoch, "metric": metric, "metric_name": metric_name, "config": config,
            "spec": method.spec.to_dict(), "inference": inference_record(stage, method)}


def inference_record(stage: str, method) -> dict[str, Any]:
    """What using a stage's model on new images takes, beside the weights and ``spec`` (labels,
    task, channels, normalisation), as plain data: the method and backbone, which branches it
    predicts with, the output function, the preprocessing from an image file to the network input
    (prepare's LANCZOS resize to the prepared size, then the evaluation view of
    :mod:`medattn.views`: window, resize to the input size, normalisation), whether the training
    images were synthetic, and the medattn version. ``predict`` and ``export`` read the config and
    ``spec`` themselves; this record states it for a reader without medattn (and ``medattn
    predict`` shows it)."""
    from medattn.version import __version__
    from medattn.data._images import RESIZE_FILTER
    from medattn.views import ViewSpec

    cfg, spec = method.cfg, method.spec
    v = ViewSpec.from_config(cfg.data, spec.prepared_size, spec.channels, train=False)
    window = [float(w) for w in _eval_window(v)]
    return {
        "medattn_version": __version__, "method": method.name, "backbone": cfg.model.backbone,
        "stage": stage, "branches": list(method.branches(stage)), "branch": method.select_branch(stage),
        "output": "softmax" if spec.task == "singlelabel" else "sigmoid",
        "preprocessing": {"prepared_size": spec.prepared_size, "channels": spec.channels,
                          "resize_filter": RESIZE_FILTER, "view": v.mode, "resize": v.resize,
                          "input_size": v.crop, "window": window, "normalize": cfg.data.normalize,
                          "mean": list(v.mean), "std": list(v.std), "pixel_scale": 255.0},
        "synthetic": spec.synthetic, "source": spec.source,
    }


def _eval_window(v) -> list[float]:
    from medattn.views import sample_views

    return list(sample_views(v, 1, None)["window"][0])
