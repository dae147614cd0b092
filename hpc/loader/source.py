"""The per-rank batch source shared by the DALI and PyTorch loaders.

A :class:`BatchSource` turns (epoch, step) into the raw batch of this rank: the prepared pixels
(uint8, straight from the memory-mapped shards), the sample indices, a validity mask (evaluation
padding) and the view parameters. It is immutable after construction and picklable, so DALI's
parallel external-source workers and DataLoader workers can each hold a copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpc.loader.plan import EvalPlan, TrainPlan
from medattn.views import ViewSpec, sample_views, view_boxes, view_rng
from medattn.data.prepared import PixelReader


class BatchSource:
    def __init__(self, reader: PixelReader, spec: ViewSpec, plan: TrainPlan | EvalPlan, rank: int, seed: int,
                 start_epoch: int = 0, start_step: int = 0):
        self.reader = reader
        self.spec = spec
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.train = isinstance(plan, TrainPlan)
        self._cache: tuple[int, Any] | None = None  # (epoch, its batches); (-1, samples) in evaluation

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __setstate__(self, state):
        # Unpickled in a loader worker (DALI's spawned external-source workers): before any
        # batch is read, stop the scheduler's signals from killing it (hpc/loader/workers.py).
        from hpc.loader.workers import setup_worker

        setup_worker()
        self.__dict__.update(state)

    # epoch_idx counts epochs since this source was built (DALI's BatchInfo.epoch_idx).
    def epoch_of(self, epoch_idx: int) -> int:
        return self.start_epoch + epoch_idx

    def first_step(self, epoch_idx: int) -> int:
        return self.start_step if epoch_idx == 0 else 0

    def num_steps(self, epoch_idx: int = 0) -> int:
        if self.train:
            return self.plan.steps_per_epoch - self.first_step(epoch_idx)
        return self.plan.steps

    def _train_batches(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.plan.rank_batches(epoch, self.rank))
        return self._cache[1]

    def __call__(self, epoch_idx: int, iteration: int) -> dict[str, np.ndarray] | None:
        """The raw batch, or None past the end of the epoch."""
        if self.train:
            epoch = self.epoch_of(epoch_idx)
            step = self.first_step(epoch_idx) + iteration
            batches = self._train_batches(epoch)
            if step >= len(batches):
                return None
            idx = batches[step]
            valid = np.ones(len(idx), bool)
            # Draw the views of the whole *global* batch and keep this rank's slice, so the
            # augmentation of a sample does not depend on how many processes share the batch.
            b = self.plan.local_batch
            views = sample_views(self.spec, self.plan.global_batch, view_rng(self.seed, epoch, step, 0))
            views = {k: v[self.rank * b:(self.rank + 1) * b] for k, v in views.items()}
        else:
            if iteration >= self.plan.steps:
                return None
            if self._cache is None:  # this rank's samples, once (not per batch: that is quadratic)
                self._cache = (-1, self.plan.rank_samples(self.rank))
            own, own_valid = self._cache[1]
            b = self.plan.batch_size
            idx, valid = own[iteration * b:(iteration + 1) * b], own_valid[iteration * b:(iteration + 1) * b]
            views = sample_views(self.spec, len(idx), None)
        images = self.reader.read_batch(idx)
        # Where each view sits in the prepared image (flipped like the view), computed here on the
        # host, so methods can report boxes in image coordinates and crop from ``hires`` without
        # the training step copying anything from the host.
        vb = view_boxes(views["window"], views["flip"].astype(bool)).astype(np.float32)
        return {"images": images, "index": idx.astype(np.int64), "valid": valid, "view_box": vb, **views}


class DaliCallback:
    """DALI batch-mode external-source callback: BatchInfo -> tuple of arrays. It lives here, not
    in dali_loader, because DALI's worker processes import its module to unpickle it: this one
    needs NumPy only, so a worker does not pay for importing torch."""

    def __init__(self, source: BatchSource):
        self.source = source

    def __call__(self, info):
        raw = self.source(info.epoch_idx, info.iteration)
        if raw is None:
            raise StopIteration
        win, flip = raw["window"], raw["flip"]
        # ROI in tensor order (y, x); an origin greater than the end flips that axis, which is
        # how the horizontal flip is folded into the resize.
        x_start = np.where(flip, win[:, 2], win[:, 0])
        x_end = np.where(flip, win[:, 0], win[:, 2])
        roi_start = np.stack([win[:, 1], x_start], 1).astype(np.float32)
        roi_end = np.stack([win[:, 3], x_end], 1).astype(np.float32)
        out = [raw["images"], raw["index"], raw["valid"].astype(np.uint8), win.astype(np.float32),
               flip.astype(np.uint8), raw["view_box"], roi_start, roi_end]
        spec = self.source.spec
        # Only the outputs the graph uses (DALI warns about, and pays for, unused ones).
        if spec.rotate_deg > 0:
            out.append(raw["angle"].astype(np.float32))
        if spec.brightness > 0 or spec.contrast > 0:
            out += [raw["brightness"].astype(np.float32), raw["contrast"].astype(np.float32)]
        return tuple(out)
