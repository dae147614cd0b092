"""The plain PyTorch fallback: same samples, same order, same view parameters as the DALI
pipeline (both read a :class:`BatchSource`), with the pixel work done by torch on the CPU in
DataLoader workers."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpc.loader.source import BatchSource
from hpc.loader.workers import setup_worker, spawn_guard
from medattn.views import render_views


class _StepDataset(Dataset):
    """Item k = the whole batch of step k (so workers parallelise over batches, in order)."""

    def __init__(self, source: BatchSource, epoch_idx: int, hires: bool):
        self.source, self.epoch_idx, self.hires = source, epoch_idx, hires

    def __len__(self) -> int:
        return self.source.num_steps(self.epoch_idx)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        raw = self.source(self.epoch_idx, k)
        if raw is None:
            raise IndexError(k)
        batch = {
            "image": render_views(raw["images"], raw, self.source.spec),
            "index": torch.from_numpy(raw["index"]),
            "valid": torch.from_numpy(raw["valid"]),
            "window": torch.from_numpy(raw["window"]),
            "flip": torch.from_numpy(raw["flip"]),
            "view_box": torch.from_numpy(raw["view_box"]),
        }
        if self.hires:
            h = torch.from_numpy(np.ascontiguousarray(raw["images"])).permute(0, 3, 1, 2)
            flip = torch.from_numpy(raw["flip"])
            if flip.any():
                h = torch.where(flip.view(-1, 1, 1, 1), h.flip(-1), h)
            batch["hires"] = h.contiguous()
        return batch


class TorchBatches:
    """Iterates one epoch of a BatchSource through a DataLoader (workers = DataConfig.num_workers)."""

    def __init__(self, source: BatchSource, num_workers: int, pin_memory: bool, hires: bool, prefetch: int = 2):
        self.source = source
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.hires = hires
        self.prefetch = prefetch

    def epoch(self, epoch_idx: int) -> Iterator[dict[str, torch.Tensor]]:
        ds = _StepDataset(self.source, epoch_idx, self.hires)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False,
                      "multiprocessing_context": "spawn" if torch.cuda.is_available() else None,
                      "worker_init_fn": setup_worker}
        dl = DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                        pin_memory=self.pin_memory, **kwargs)
        with spawn_guard():  # the workers start here (see hpc/loader/workers.py)
            it = iter(dl)
        try:
            yield from it
        finally:
            # A trainer that stops mid-epoch closes this generator: end the workers now rather
            # than whenever the iterator is garbage-collected.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        """Nothing persists between epochs (workers live for one epoch)."""
