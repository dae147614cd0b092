"""What every metric shares: reading its inputs and the warning for an undefined value.

Inputs are numpy arrays (torch tensors are detached and copied to the CPU, without importing
torch). Labels are 0/1 (bool, int or float); anything else raises ``ValueError``. Scores must be
finite: a NaN score is a diverged model, not a value to rank. Also used by
:mod:`medattn.figures`, which draws from the same inputs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class MetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. a class without positives); it is NaN."""



def _as_array(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and copied to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as a numeric array ({e})") from None


def _scores(x: Any, name: str = "scores", ndim: int = 1) -> np.ndarray:
    a = _as_array(x, name, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise ValueError(f"{name}: non-finite value at index {bad} (a diverged model?)")
    return a


def _binary_labels(x: Any, name: str = "labels", ndim: int = 1) -> np.ndarray:
    a = _as_array(x, name)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.dtype == bool:
        return a
    if a.size and not np.all((a == 0) | (a == 1)):
        bad = np.argwhere(~((a == 0) | (a == 1)))[0].tolist()
        raise ValueError(f"{name}: labels must be 0 or 1, got {a[tuple(bad)]!r} at index {bad}")
    return a.astype(bool)


def _same_length(a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{an} has {a.shape[0]} rows but {bn} has {b.shape[0]}")


def _names(label_names: Sequence[str] | None, n: int) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(n)]
    names = [str(s) for s in label_names]
    if len(names) != n:
        raise ValueError(f"label_names has {len(names)} names but the arrays have {n} columns")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names has duplicates: {names}")
    return names


def _eval_names(names: Sequence[str], eval_labels: Sequence[str] | None) -> list[str]:
    if eval_labels is None:
        return list(names)
    missing = [e for e in eval_labels if e not in names]
    if missing:
        raise ValueError(f"eval_labels {missing} are not among the label names {list(names)}")
    return list(eval_labels)


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if v.size and not np.all(np.isnan(v)) else math.nan
