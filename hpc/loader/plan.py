"""Which samples each rank sees, in which order, at each step — decided here, once, for both
loaders (DALI and the PyTorch fallback), so that they yield exactly the same samples.

Training: every epoch the whole split is reshuffled with a generator seeded by (seed, epoch)
(a *global* shuffle; DALI's reader-side ``random_shuffle`` only shuffles a local buffer, which on
patient-ordered NIH file names gives patient-correlated batches). The permutation is cut into
global batches of ``global_batch`` samples, the last incomplete one dropped, so every rank runs
the same number of steps (DDP would deadlock otherwise). Rank r takes the r-th contiguous slice
of each global batch. With one process the global batch is the same set, so a 1-process and an
N-process run see the same data at every step.

Evaluation: every sample exactly once. Samples are dealt to ranks in contiguous blocks, each
rank's block is padded to the same length (repeating a real index with ``valid=False``), and
the padding is dropped before metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])))
    return rng.permutation(n)


@dataclass(frozen=True)
class TrainPlan:
    indices: np.ndarray  # sample indices of the split
    global_batch: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(f"batch size {self.global_batch} is not divisible by the {self.world_size} "
                             "processes; choose a multiple")
        if len(self.indices) < self.global_batch:
            raise ValueError(f"the split has {len(self.indices)} samples, fewer than one batch of "
                             f"{self.global_batch}")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(steps, global_batch) sample indices for one epoch."""
        perm = self.indices[epoch_permutation(len(self.indices), self.seed, epoch)]
        n = self.steps_per_epoch * self.global_batch
        return perm[:n].reshape(self.steps_per_epoch, self.global_batch)

    def rank_batches(self, epoch: int, rank: int, start_step: int = 0) -> np.ndarray:
        """(steps - start_step, local_batch) indices for one rank."""
        order = self.epoch_order(epoch)
        b = self.local_batch
        return order[start_step:, rank * b:(rank + 1) * b]


@dataclass(frozen=True)
class EvalPlan:
    indices: np.ndarray
    batch_size: int  # per rank
    world_size: int

    @property
    def per_rank(self) -> int:
        return -(-len(self.indices) // self.world_size)

    def rank_samples(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, valid) for one rank, padded to ``per_rank`` entries."""
        n = len(self.indices)
        start = min(rank * self.per_rank, n)
        stop = min(start + self.per_rank, n)
        own = self.indices[start:stop]
        pad = self.per_rank - len(own)
        fill = own[-1:] if len(own) else self.indices[-1:]
        idx = np.concatenate([own, np.repeat(fill, pad)]) if pad else own
        valid = np.concatenate([np.ones(len(own), bool), np.zeros(pad, bool)])
        return idx.astype(np.int64), valid

    def rank_batches(self, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
        idx, valid = self.rank_samples(rank)
        return [(idx[i:i + self.batch_size], valid[i:i + self.batch_size])
                for i in range(0, len(idx), self.batch_size)]

    @property
    def steps(self) -> int:
        return -(-self.per_rank // self.batch_size)
