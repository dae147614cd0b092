"""Operating points of a binary task: the Youden-optimal threshold and the table of rates at a
threshold (seed 002's binary-task metrics).

A sample is called positive when ``score >= threshold`` (the same rule as
``sklearn.metrics.roc_curve``, whose points :func:`medattn.metrics.auroc.roc_curve_points`
gives).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from medattn.metrics._inputs import _as_array, _binary_labels, _same_length, _scores
from medattn.metrics.auroc import auroc, roc_curve_points


def youden_threshold(scores: Any, labels: Any) -> tuple[float, float, float, float]:
    """The operating point that maximises Youden's J = sensitivity + specificity - 1.

    J is compared exactly (as the integer ``tp * n_neg - fp * n_pos``), and ties go to the
    highest threshold, the first maximum along the ROC curve. (``argmax(tpr - fpr)`` on float
    rates usually agrees, but rounding can make it pick another tied point.)

    Returns:
        ``(threshold, sensitivity, specificity, youden_j)``; a sample is positive when
        ``score >= threshold``. NaNs (with a warning) if a class is missing.
    """
    fpr, tpr, thr = roc_curve_points(scores, labels, drop_intermediate=False)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return (math.nan, math.nan, math.nan, math.nan)
    y = _binary_labels(labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tp = np.rint(tpr * n_pos).astype(np.int64)
    fp = np.rint(fpr * n_neg).astype(np.int64)
    i = int(np.argmax(tp * n_neg - fp * n_pos))
    sens, spec = tp[i] / n_pos, (n_neg - fp[i]) / n_neg
    return float(thr[i]), float(sens), float(spec), float(sens + spec - 1.0)


def _confusion(s: np.ndarray, y: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return tp, fp, fn, tn


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _discriminant_power(sens: float, spec: float) -> float:
    """DP = sqrt(3)/pi * (ln(sens/(1-sens)) + ln(spec/(1-spec))); inf at sens or spec = 1."""
    def logit(p: float) -> float:
        if math.isnan(p):
            return math.nan
        if p <= 0.0:
            return -math.inf
        if p >= 1.0:
            return math.inf
        return math.log(p / (1.0 - p))
    a, b = logit(sens), logit(spec)
    if math.isinf(a) and math.isinf(b) and a != b:
        return math.nan
    return math.sqrt(3.0) / math.pi * (a + b)


def _operating_point(s: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    tp, fp, fn, tn = _confusion(s, y, threshold)
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    prec = _ratio(tp, tp + fp)
    return {
        "threshold": float(threshold), "accuracy": (tp + tn) / s.size,
        "sensitivity": sens, "specificity": spec, "precision": prec,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn), "youden_j": sens + spec - 1.0,
        "discriminant_power": _discriminant_power(sens, spec),
        "fdr": _ratio(fp, tp + fp), "for": _ratio(fn, fn + tn),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def binary_report(scores: Any, labels: Any, *, threshold: float = 0.5) -> dict[str, Any]:
    """The binary-task metrics that seed 002's tables report, at 0.5 and at the Youden point.

    Args:
        scores: (N,) probability of the positive class, or (N, 2) softmax probabilities (column
            1 is taken as the positive class).
        labels: (N,) 0/1 targets.
        threshold: the fixed operating point (0.5; for a 2-class softmax ``p1 >= 0.5`` is the
            argmax decision except at exact ties).

    Returns:
        ``{"auroc", "n", "n_pos", "n_neg", "at_threshold": {...}, "at_youden": {...}}``; each
        operating point holds threshold, accuracy, sensitivity, specificity, precision, f1,
        youden_j, discriminant_power (DP = sqrt(3)/pi * (logit sens + logit spec)), fdr, for
        and the confusion counts tp, fp, fn, tn. Rates with an empty denominator are NaN.
    """
    s = _as_array(scores, "scores", dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    s = _scores(s)
    y = _binary_labels(labels)
    _same_length(s, y, "scores", "labels")
    auc = auroc(s, y)
    thr, _, _, _ = youden_threshold(s, y) if not math.isnan(auc) else (math.nan,) * 4
    return {
        "auroc": auc, "n": int(y.size), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
        "at_threshold": _operating_point(s, y, threshold),
        "at_youden": _operating_point(s, y, thr) if not math.isnan(thr) else None,
    }
