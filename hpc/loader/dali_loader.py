"""The DALI pipeline: prepared shards -> view (ROI resize with flip, rotation, brightness/
contrast) -> normalised CHW float, on GPU operators when CUDA is present and CPU operators
otherwise (the same graph; only the device of the pixel operators changes).

Samples enter through a parallel ``external_source`` whose workers run the shared
:class:`BatchSource` (a memory-mapped read of the chosen indices, no decoding), so sharding,
global reshuffling and padding are decided by hpc.loader.plan exactly as for the PyTorch
fallback. DALI's own readers cannot shard by an externally decided order, and the order is
what makes DALI and the fallback yield identical samples and makes resume exact.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hpc.loader.source import BatchSource, DaliCallback
from hpc.loader.workers import spawn_guard
from medattn.errors import MissingDependencyError


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliBatches:
    """Iterates epochs of a BatchSource through a DALI pipeline.

    Args:
        source: the rank's batch source (its plan fixes the batch size).
        device: torch device the batches land on; CUDA -> GPU operators and device_id.
        num_threads: DALI CPU threads.
        py_workers: external-source worker processes (0 = read in the calling thread).
        hires: also return the prepared image (flipped like the view) as uint8 CHW.
    """

    def __init__(self, source: BatchSource, device: torch.device, num_threads: int = 2, py_workers: int = 1,
                 hires: bool = False, prefetch: int = 2, seed: int = 0):
        if not dali_available():
            raise MissingDependencyError("nvidia.dali", "dali", "the DALI loader; or set data.loader=torch")
        self.source = source
        self.device = device
        self.hires = hires
        self._next_epoch_idx = 0
        self._pipe = self._build(num_threads, py_workers, prefetch, seed)
        self._iter = None

    def _build(self, num_threads: int, py_workers: int, prefetch: int, seed: int):
        from nvidia.dali import fn, pipeline_def, types

        spec = self.source.spec
        gpu = self.device.type == "cuda"
        batch = self.source.plan.local_batch if self.source.train else self.source.plan.batch_size
        callback = DaliCallback(self.source)
        parallel = py_workers > 0

        @pipeline_def(batch_size=batch, num_threads=num_threads,
                      device_id=(self.device.index or 0) if gpu else None, seed=seed,
                      prefetch_queue_depth=prefetch, py_num_workers=max(py_workers, 1),
                      py_start_method="spawn", exec_dynamic=True)
        def pipe():
            n_out = 8 + (spec.rotate_deg > 0) + 2 * (spec.brightness > 0 or spec.contrast > 0)
            outs_in = fn.external_source(
                source=callback, num_outputs=n_out, batch=True, batch_info=True, parallel=parallel,
                layout=["HWC"] + [""] * (n_out - 1),
                dtype=[types.UINT8, types.INT64, types.UINT8, types.FLOAT, types.UINT8]
                + [types.FLOAT] * (n_out - 5))
            images, index, valid, window, flip, view_box, roi_start, roi_end = outs_in[:8]
            extra = list(outs_in[8:])
            angle = extra.pop(0) if spec.rotate_deg > 0 else None
            bright, contrast = (extra[0], extra[1]) if extra else (None, None)
            pix = images.gpu() if gpu else images
            view = fn.resize(pix, size=[spec.crop, spec.crop], roi_start=roi_start, roi_end=roi_end,
                             roi_relative=True, antialias=True, dtype=types.FLOAT)
            if spec.rotate_deg > 0:
                view = fn.rotate(view, angle=angle, keep_size=True, fill_value=0.0)
            if spec.brightness > 0 or spec.contrast > 0:
                view = fn.brightness_contrast(view, brightness=bright, contrast=contrast,
                                              contrast_center=127.5)
            view = fn.crop_mirror_normalize(view, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255.0 for m in spec.mean],
                                            std=[s * 255.0 for s in spec.std])
            outs = [view, index, valid, window, flip, view_box]
            if gpu:
                # Every output on the GPU: the training step then copies nothing from the host
                # (a copy from DALI's pageable CPU buffers would make the host wait).
                outs = [outs[0]] + [o.gpu() for o in outs[1:]]
            if self.hires:
                h = fn.flip(pix, horizontal=fn.cast(flip, dtype=types.INT32))
                outs.append(fn.transpose(h, perm=[2, 0, 1]))
            return tuple(outs)

        p = pipe()
        # build() starts the external-source worker processes: born with the stop signals
        # blocked, so a signal to the process group cannot kill one before it ignores them.
        with spawn_guard():
            p.build()
        return p

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        names = ["image", "index", "valid", "window", "flip", "view_box"] + (["hires"] if self.hires else [])
        return DALIGenericIterator([self._pipe], names, auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)

    def close(self) -> None:
        """Stop the worker processes now (DALI closes its pool when the pipeline goes away)."""
        self._iter = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            del pipe

    def epoch(self, epoch_idx: int) -> Iterator[dict[str, torch.Tensor]]:
        if self._pipe is None:
            raise RuntimeError("this DALI loader was closed")
        if epoch_idx != self._next_epoch_idx:
            raise RuntimeError(f"DALI epochs must be consumed in order: expected {self._next_epoch_idx}, "
                               f"got {epoch_idx}")
        if self._iter is None:
            self._iter = self._iterator()
        else:
            self._iter.reset()
        self._next_epoch_idx += 1
        for out in self._iter:
            b = out[0]
            # DALI owns these buffers until the next iteration; the trainer consumes a batch
            # before asking for the next one, so no copy is needed except for dtype fixes.
            batch = {"image": b["image"], "index": b["index"].view(-1).clone(),
                     "valid": b["valid"].view(-1).bool(), "window": b["window"].clone(),
                     "flip": b["flip"].view(-1).bool(), "view_box": b["view_box"].clone()}
            if self.hires:
                batch["hires"] = b["hires"]
            yield batch
