"""Loaders: a DALI pipeline (GPU operators on CUDA, CPU operators otherwise) and a PyTorch
DataLoader fallback that yield the same samples in the same order (see plan.py).

The package itself imports nothing heavy: loader worker processes import
:mod:`hpc.loader.source` (NumPy and the prepared format only) and must not pay for torch (seconds
and ~0.8 GB per worker). ``from hpc.loader import TrainLoader`` loads :mod:`hpc.loader.loaders`.
"""
from __future__ import annotations

__all__ = ["TrainLoader", "EvalLoader", "TrainPlan", "EvalPlan", "ViewSpec", "resolve_kind"]


def __getattr__(name: str):
    if name in ("TrainPlan", "EvalPlan"):
        from hpc.loader import plan

        return getattr(plan, name)
    if name == "ViewSpec":
        from medattn.views import ViewSpec

        return ViewSpec
    if name in ("TrainLoader", "EvalLoader", "resolve_kind"):
        from hpc.loader import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'hpc.loader' has no attribute {name!r}")
