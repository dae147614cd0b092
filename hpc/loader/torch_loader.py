"""The plain PyTorch fallback: same samples, same order, same view parameters as the DALI
pipeline (both read a :class:`BatchSource`), with the pixel work done by torch on the CPU in
DataLoader workers."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpc.loader.source import BatchSource
from hpc.loader.workers import setup_worker, spawn_guard
from medattn.views import render_views


class _StepDataset(Dataset):
    """Item (epoch_idx, k) = the whole batch of step k of that epoch (so workers parallelise over
    batches, in order). The epoch travels with the key, not in the dataset, because persistent
    workers keep the copy of the dataset they were started with."""

    def __init__(self, source: BatchSource, hires: bool):
        self.source, self.hires = source, hires

    def __len__(self) -> int:
        return self.source.num_steps(0)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch_idx, k = key
        raw = self.source(epoch_idx, k)
        if raw is None:
            raise IndexError(key)
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


class _EpochSteps(Sampler):
    """The keys of the current epoch; the DataLoader asks for a fresh iterator each epoch (in
    the main process), so setting ``epoch_idx`` before ``iter(loader)`` picks the epoch."""

    def __init__(self, source: BatchSource):
        self.source, self.epoch_idx = source, 0

    def __len__(self) -> int:
        return self.source.num_steps(self.epoch_idx)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e = self.epoch_idx
        return iter([(e, k) for k in range(self.source.num_steps(e))])


class TorchBatches:
    """Iterates epochs of a BatchSource through one DataLoader (workers = DataConfig.num_workers).

    The workers persist across epochs (and, for an evaluation loader, across validations): a
    new worker costs a process start, and under CUDA's ``spawn`` context an import of torch and
    medattn (2.6-2.9 s to the first batch on 2 cores, 150 epochs plus their validations in a
    paper run). :meth:`close` ends them."""

    def __init__(self, source: BatchSource, num_workers: int, pin_memory: bool, hires: bool, prefetch: int = 2):
        self.source = source
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.hires = hires
        self.prefetch = prefetch
        self._sampler = _EpochSteps(source)
        self._loader: DataLoader | None = None
        self._it = None

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            kwargs = {}
            if self.num_workers > 0:
                kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": True,
                          "multiprocessing_context": "spawn" if torch.cuda.is_available() else None,
                          "worker_init_fn": setup_worker}
            self._loader = DataLoader(_StepDataset(self.source, self.hires), batch_size=None,
                                      sampler=self._sampler, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, **kwargs)
        return self._loader

    def epoch(self, epoch_idx: int) -> Iterator[dict[str, torch.Tensor]]:
        self._sampler.epoch_idx = epoch_idx
        dl = self._dataloader()
        with spawn_guard():  # the workers start here, on the first epoch (see hpc/loader/workers.py)
            it = iter(dl)
        self._it = it
        # An epoch left half-way (a stop, a validation that ends early) is fine: the next
        # iter() tells the persistent workers to drop what they had prefetched.
        yield from it

    def close(self) -> None:
        """End the worker processes now rather than whenever the loader is garbage-collected."""
        it, self._it, self._loader = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
