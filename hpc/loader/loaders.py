"""The loaders behind one interface (TrainLoader, EvalLoader): a DALI pipeline (GPU operators on
CUDA, CPU operators otherwise) and a PyTorch DataLoader fallback that yield the same samples in
the same order (see plan.py)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from hpc.loader.plan import EvalPlan, TrainPlan
from hpc.loader.source import BatchSource
from medattn.views import ViewSpec
from medattn.config import DataConfig
from medattn.data.prepared import PreparedDataset
from medattn.errors import ConfigError




def resolve_kind(kind: str) -> str:
    from hpc.loader.dali_loader import dali_available

    if kind == "auto":
        return "dali" if dali_available() else "torch"
    if kind == "dali" and not dali_available():
        raise ConfigError("data.loader=dali but NVIDIA DALI is not installed: pip install 'medattn[dali]' "
                          "(or set data.loader=torch)")
    return kind


class _Base:
    def __init__(self, ds: PreparedDataset, data: DataConfig, device: torch.device, kind: str, hires: bool,
                 seed: int, rank: int):
        self.ds, self.data, self.device, self.hires, self.seed, self.rank = ds, data, device, hires, seed, rank
        self.kind = resolve_kind(kind)
        self.reader = ds.pixel_reader()
        self.labels = torch.from_numpy(ds.labels_matrix()).to(device)
        self.targets = torch.from_numpy(ds.targets()).to(device)
        lb = ds.lung_boxes()
        self.lung = torch.from_numpy(lb).to(device) if lb is not None else None
        self._backend = None

    def _make_backend(self, source: BatchSource):
        if self.kind == "dali":
            from hpc.loader.dali_loader import DaliBatches

            return DaliBatches(source, self.device, num_threads=max(1, self.data.num_workers),
                               py_workers=self.data.num_workers, hires=self.hires,
                               prefetch=self.data.prefetch, seed=self.seed + 7919 * self.rank)
        from hpc.loader.torch_loader import TorchBatches

        return TorchBatches(source, self.data.num_workers, pin_memory=self.device.type == "cuda",
                            hires=self.hires, prefetch=self.data.prefetch)

    def close(self) -> None:
        """Stop the loader's worker processes (also done when the loader is garbage-collected)."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, with the per-sample tables looked up there.

        Nothing here waits for the device: the DALI pipeline hands every output over on the GPU
        already, and the DataLoader's batches come in pinned memory (``pin_memory``), so these
        copies are asynchronous; labels, targets and lung boxes are gathered on the device."""
        dev = self.device
        out = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        idx = out["index"]
        out["labels"] = self.labels[idx]
        out["target"] = self.targets[idx]
        if self.lung is not None:
            out["lung_box"] = self.lung[idx]
        return out


class TrainLoader(_Base):
    """Training batches for one rank. ``epoch(e, start_step)`` yields that epoch's batches."""

    def __init__(self, ds: PreparedDataset, data: DataConfig, plan: TrainPlan, rank: int, device: torch.device,
                 seed: int, hires: bool = False, kind: str | None = None, view_size: int | None = None):
        super().__init__(ds, data, device, kind or data.loader, hires, seed, rank)
        self.plan = plan
        self.spec = ViewSpec.from_config(data, ds.image_size, ds.channels, train=True, crop=view_size)
        self._source: BatchSource | None = None
        self._next = 0
        self._whole = True

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        src = self._source
        # The backend (its workers, DALI's pipeline) carries on into the next epoch when that
        # epoch follows a whole one; after an epoch left half-way, or for another start, it
        # is rebuilt (DALI cannot drop what it has prefetched).
        reusable = (src is not None and self._whole and epoch == src.start_epoch + self._next and
                    start_step == src.first_step(self._next))
        if not reusable:
            self.close()
            self._source = src = BatchSource(self.reader, self.spec, self.plan, self.rank, self.seed,
                                             start_epoch=epoch, start_step=start_step)
            self._backend = self._make_backend(src)
            self._next = 0
        idx, self._next = self._next, self._next + 1
        self._whole = False
        for batch in self._backend.epoch(idx):
            yield self._finish(batch)
        self._whole = True


class EvalLoader(_Base):
    """Every sample of a split exactly once over all ranks; ``valid`` marks padding."""

    def __init__(self, ds: PreparedDataset, data: DataConfig, indices: np.ndarray, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int = 0, hires: bool = False,
                 kind: str | None = None, view_size: int | None = None):
        super().__init__(ds, data, device, kind or data.loader, hires, seed, rank)
        self.plan = EvalPlan(np.asarray(indices, np.int64), batch_size, world_size)
        self.spec = ViewSpec.from_config(data, ds.image_size, ds.channels, train=False, crop=view_size)
        self._source = BatchSource(self.reader, self.spec, self.plan, rank, seed)
        self._next = 0

    def __len__(self) -> int:
        """Batches per pass on each rank (every rank runs the same number)."""
        return self.plan.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._backend is None:
            self._backend = self._make_backend(self._source)
        idx, self._next = self._next, self._next + 1
        for batch in self._backend.epoch(idx):
            yield self._finish(batch)
