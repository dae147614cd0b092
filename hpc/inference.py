"""Inference over a split on every rank, gathered on rank 0.

Used by the trainer's per-epoch validation and by ``medattn eval``, so the two agree exactly.
Each rank collects its batches in a :class:`medattn.metrics.Accumulator` (on the device, one
host transfer at the end); the parts are gathered on rank 0 (:mod:`hpc.distributed`), where the
padding that gives every rank the same number of batches is already dropped and the predictions
are put back in sample order. The metrics computed from them are :mod:`medattn.metrics.summary`'s.
"""
from __future__ import annotations

import contextlib

import torch

from hpc import distributed, faults
from medattn.methods.base import Method
from medattn.metrics import Accumulator, Predictions

__all__ = ["Predictions", "autocast_ctx", "run_inference"]


def autocast_ctx(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_inference(method: Method, model: torch.nn.Module, loader, stage: str, device: torch.device,
                  precision: str = "fp32", channels_last: bool = False,
                  max_batches: int | None = None) -> Predictions | None:
    """Predict on this rank's share; returns the gathered Predictions on rank 0, None elsewhere."""
    was_training = model.training
    model.eval()
    acc = Accumulator()
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        if channels_last and device.type == "cuda":
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            out = method.predict(model, batch, stage)
        if k == 0:
            faults.point("validation")
        acc.add(batch["index"], out["probs"], batch["valid"], out.get("boxes"), out.get("extras"))
    model.train(was_training)
    parts = distributed.all_gather_object(acc.part())
    if not distributed.current().is_primary:
        return None
    return Accumulator.merge(parts)
