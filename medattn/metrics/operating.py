"""Operating points of a binary task: the Youden-optimal threshold and the table of rates at a
threshold (seed 002's binary-task metrics).

A sample is called positive when ``score >= threshold`` (the same rule as
``sklearn.metrics.roc_curve``, whose points :func:`medattn.metrics.auroc.roc_curve_points`
gives).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medattn.metrics._inputs import MetricWarning, _as_array, _binary_labels, _same_length, _scores
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


# --------------------------------------------------------------------------------------------
# Operating points chosen on one split (validation) and read on another (test), per label
# --------------------------------------------------------------------------------------------
# name -> target sensitivity (None: Youden's J). Chosen on validation, never on the test split.
OPERATING_POINTS: dict[str, float | None] = {"youden": None, "sens90": 0.90, "sens95": 0.95}


def sensitivity_threshold(scores: Any, labels: Any, target: float) -> tuple[float, float, float]:
    """The highest threshold whose sensitivity reaches ``target`` (so the specificity is the
    highest possible at that sensitivity).

    Returns ``(threshold, sensitivity, specificity)`` on these data; NaNs without positives or
    negatives. A sample is positive when ``score >= threshold``.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    fpr, tpr, thr = roc_curve_points(scores, labels, drop_intermediate=False)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return (math.nan, math.nan, math.nan)
    y = _binary_labels(labels)
    n_pos = int(y.sum())
    tp = np.rint(tpr * n_pos).astype(np.int64)
    # Exact integer comparison: tp / n_pos >= target  <=>  tp >= ceil(target * n_pos) (up to rounding
    # of target * n_pos, guarded by a small tolerance).
    need = math.ceil(target * n_pos - 1e-9)
    i = int(np.argmax(tp >= need))  # thresholds decrease along the curve: the first is the highest
    return float(thr[i]), float(tpr[i]), float(1.0 - fpr[i])


def choose_thresholds(probs: Any, labels: Any, label_names: Sequence[str],
                      eval_labels: Sequence[str] | None = None,
                      points: Sequence[str] = tuple(OPERATING_POINTS)) -> dict[str, dict[str, dict[str, float]]]:
    """Per operating point and label, the threshold chosen on these (validation) data and the
    sensitivity and specificity it has there: ``{point: {label: {"threshold", "sensitivity",
    "specificity"}}}``; NaN where the label lacks positives or negatives."""
    p = _scores(probs, "probs", ndim=2)
    y = _binary_labels(labels, "labels", ndim=2)
    names = list(label_names)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for point in points:
        if point not in OPERATING_POINTS:
            raise ValueError(f"operating point {point!r}: use one of {', '.join(OPERATING_POINTS)}")
        target = OPERATING_POINTS[point]
        out[point] = {}
        for k in (eval_labels or names):
            j = names.index(k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                if target is None:
                    thr, sens, spec, _ = youden_threshold(p[:, j], y[:, j])
                else:
                    thr, sens, spec = sensitivity_threshold(p[:, j], y[:, j], target)
            out[point][k] = {"threshold": thr, "sensitivity": sens, "specificity": spec}
    return out


RATES = ("sensitivity", "specificity", "ppv", "npv")


def rates_with_intervals(probs: Any, labels: Any, thresholds: Any, *, groups: Any = None, n_boot: int = 1000,
                         alpha: float = 0.05, seed: int = 0, min_positives: int | None = None
                         ) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV of each column at fixed thresholds, with
    percentile-bootstrap intervals (patient-clustered with ``groups``; the resamples of
    :func:`medattn.metrics.bootstrap.resample_counts`, the same as the AUROC intervals').

    Every resample's confusion counts come from one matrix product (resample counts (b, N) x
    indicators (N, 4L)), so 1000 resamples of 25,596 x 15 take about a second.

    Args:
        probs: (N, L) scores. labels: (N, L) 0/1. thresholds: (L,) (NaN: no operating point).

    Returns:
        ``{"tp", "fp", "fn", "tn": (L,) int counts, "<rate>": (L,) point values,
        "<rate>_ci": (2, L) lo/hi, "positives": (L,) positive units, "too_few": (L,) bool}``.
        Labels with fewer than ``min_positives`` positive units (patients when clustered) get
        no interval (NaN), as the AUROC intervals.
    """
    from medattn.metrics.bootstrap import MIN_POSITIVES, group_codes, percentile_interval, resample_counts

    p = _scores(probs, "probs", ndim=2)
    y = _binary_labels(labels, "labels", ndim=2)
    thr = np.asarray(thresholds, np.float64).reshape(-1)
    n, L = p.shape
    if thr.shape != (L,):
        raise ValueError(f"thresholds: expected {L} values, got {thr.shape}")
    min_pos = MIN_POSITIVES if min_positives is None else min_positives
    with np.errstate(invalid="ignore"):
        pred = p >= thr[None, :]  # NaN thresholds: never positive; their rates are set to NaN below
    ind = np.concatenate([pred & y, pred & ~y, ~pred & y, ~pred & ~y], axis=1).astype(np.float64)  # (N, 4L)
    code, n_units = group_codes(groups, n)

    def rates(c: np.ndarray) -> dict[str, np.ndarray]:
        tp, fp, fn, tn = (c[..., k * L:(k + 1) * L] for k in range(4))
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                    "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}

    full = ind.sum(axis=0)
    out: dict[str, np.ndarray] = {k: v.astype(np.int64) for k, v in zip(("tp", "fp", "fn", "tn"), np.split(full, 4))}
    point = rates(full)
    samples = {k: np.empty((n_boot, L)) for k in RATES}
    row = 0
    if n_boot > 0 and n:
        for counts in resample_counts(n, n_boot, seed, code, n_units):
            c = counts.astype(np.float64) @ ind
            for k, v in rates(c).items():
                samples[k][row:row + len(c)] = v
            row += len(c)
    if code is not None:
        positives = np.array([len(np.unique(code[y[:, j]])) for j in range(L)], np.int64)
    else:
        positives = y.sum(axis=0).astype(np.int64)
    too_few = positives < min_pos
    nothr = np.isnan(thr)
    for k in RATES:
        v = point[k]
        v[nothr] = np.nan
        out[k] = v
        ci = percentile_interval(samples[k][:row], alpha) if row else np.full((2, L), np.nan)
        ci[:, too_few | nothr] = np.nan
        out[f"{k}_ci"] = ci
    out["positives"] = positives
    out["too_few"] = too_few
    return out
