"""Predictions of an evaluation, collected batch by batch (on each rank) and put together.

An evaluation loader pads the last batches so that every rank runs the same number of them
(``valid`` is False on the padding), and each rank sees a different share of the samples. The
:class:`Accumulator` keeps each batch's outputs on the device they were computed on, without a
host transfer per batch; :meth:`Accumulator.part` moves them to the host once, at the end, and
drops the padding; :meth:`Accumulator.merge` puts the parts of every rank together in sample
order and checks that no sample was counted twice. Gathering the parts across ranks is the
runtime's business (``hpc.inference``); everything here runs on one process.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """What an evaluation predicted, one row per sample, in ascending sample index."""

    index: np.ndarray  # (N,) sample indices, ascending
    probs: dict[str, np.ndarray]  # branch -> (N, L) float32
    boxes: np.ndarray | None = None  # (N, 4) normalised [x0, y0, x1, y1] in the prepared image
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) per-image values


class Accumulator:
    """One rank's predictions, batch by batch, kept on their device until :meth:`part`.

    Each :meth:`add` stores two new device tensors (no host sync): the sample indices with -1 on
    padding, and every float output (probabilities of each branch, boxes, extras) packed as
    float32 columns of one matrix. Both are copies, so a loader or a compiled model that reuses
    its output buffers cannot change what was stored.

    Example:
        >>> acc = Accumulator()
        >>> for batch in loader:                                    # doctest: +SKIP
        ...     out = method.predict(model, batch, stage)
        ...     acc.add(batch["index"], out["probs"], batch["valid"], out.get("boxes"), out.get("extras"))
        >>> preds = acc.result()                                    # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._index: list[Any] = []
        self._values: list[Any] = []
        self._layout: list[tuple[str, str, tuple[int, ...]]] | None = None  # (kind, name, row shape)

    def add(self, index: Any, probs: Mapping[str, Any], valid: Any, boxes: Any = None,
            extras: Mapping[str, Any] | None = None) -> None:
        """Store one batch.

        Args:
            index: (B,) int64 sample indices. valid: (B,) bool, False on padding.
            probs: branch -> (B, L) probabilities. boxes: (B, 4) or None.
            extras: name -> (B,) per-image values (NaN where undefined), or None.

        Raises:
            ValueError: when the branches, boxes or extras differ from the first batch's.
        """
        import torch

        b = int(index.shape[0])
        parts = [("probs", k, v) for k, v in probs.items()]
        if boxes is not None:
            parts.append(("boxes", "", boxes))
        parts += [("extras", k, v) for k, v in (extras or {}).items()]
        layout = [(kind, name, tuple(v.shape[1:])) for kind, name, v in parts]
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"predictions changed between batches: {self._layout} then {layout}")
        self._index.append(torch.where(valid.to(index.device, torch.bool), index.detach(), -1))
        if parts:
            self._values.append(torch.cat([v.detach().reshape(b, -1).to(torch.float32) for _, _, v in parts],
                                          dim=1))

    def part(self) -> dict[str, Any]:
        """This rank's predictions as numpy arrays, padding dropped, in the order seen:
        ``{"index", "probs", "boxes", "extras"}`` (what :meth:`merge` takes). Two device-to-host
        copies in all: the indices, and the packed float columns."""
        if not self._index:
            return {"index": np.zeros(0, np.int64), "probs": {}, "boxes": None, "extras": {}}
        import torch

        index = torch.cat(self._index).cpu().numpy()
        keep = index >= 0
        out: dict[str, Any] = {"index": index[keep], "probs": {}, "boxes": None, "extras": {}}
        if self._values:
            values = torch.cat(self._values).cpu().numpy()[keep]
            col = 0
            for kind, name, shape in self._layout or []:
                width = int(np.prod(shape))  # 1 for a () row
                v = values[:, col:col + width].reshape(-1, *shape)
                col += width
                if kind == "boxes":
                    out["boxes"] = v
                else:
                    out[kind][name] = v
        return out

    @staticmethod
    def merge(parts: Sequence[Mapping[str, Any]]) -> Predictions:
        """The parts of every rank (:meth:`part`) as one :class:`Predictions` in sample order.

        Raises:
            RuntimeError: when a sample appears twice (padding that was not dropped).
        """
        index = np.concatenate([p["index"] for p in parts])
        order = np.argsort(index, kind="stable")
        index = index[order]
        if len(np.unique(index)) != len(index):
            raise RuntimeError("evaluation saw a sample twice: padding was not dropped")
        first = parts[0]
        probs = {b: np.concatenate([p["probs"][b] for p in parts])[order] for b in first["probs"]}
        boxes = None
        if first["boxes"] is not None:
            boxes = np.concatenate([p["boxes"] for p in parts])[order]
        extras = {k: np.concatenate([p["extras"][k] for p in parts])[order] for k in first["extras"]}
        return Predictions(index, probs, boxes, extras)

    def result(self) -> Predictions:
        """This accumulator's predictions alone (one process, no other rank)."""
        return self.merge([self.part()])
