"""AUROC: of one binary task, per class of a multi-label problem, their mean, one-vs-rest for a
single-label (softmax) problem, top-1 accuracy, and the points of the ROC curve.

The AUROC is computed from ranks (Mann-Whitney U): with average ranks for tied scores, a tied
positive/negative pair counts 1/2, exactly as ``sklearn.metrics.roc_auc_score``. It only
depends on the order of the scores, so probabilities and logits give the same value. A class
with no positives or no negatives has no AUROC: it is NaN and a :class:`MetricWarning` names the
class; means over classes are nan-means.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medattn.metrics._inputs import (MetricWarning, _as_array, _binary_labels, _eval_names, _names,
                                     _same_length, _scores)


@dataclass(frozen=True)
class _RankPrep:
    """What the AUROC of one task needs, computed once and reused for every resample.

    ``neg`` holds the negatives' indices sorted by score; ``lo``/``hi`` are, for each positive
    (indices ``pos``), the left/right insertion points of its score among the sorted negatives:
    ``lo`` negatives score strictly lower and ``hi - lo`` score the same.
    """

    pos: np.ndarray
    neg: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> "_RankPrep":
        pos = np.flatnonzero(labels)
        neg = np.flatnonzero(~labels)
        neg = neg[np.argsort(scores[neg], kind="stable")]
        neg_s = scores[neg]
        lo = np.searchsorted(neg_s, scores[pos], side="left")
        hi = np.searchsorted(neg_s, scores[pos], side="right")
        return cls(pos, neg, lo, hi)

    def auroc(self) -> float:
        """The AUROC with every sample counted once (the Mann-Whitney U / (n_pos * n_neg))."""
        den = self.pos.size * self.neg.size
        return float(np.sum(self.lo + self.hi) / (2.0 * den)) if den else math.nan

    def auroc_weighted(self, counts: np.ndarray) -> np.ndarray:
        """The AUROC for each row of ``counts`` (B, N): how often each sample is drawn.

        Each positive contributes its count times (negative count strictly below + half the
        negative count tied with it). With ``C`` the cumulative count of the sorted negatives,
        ``2 * below + tied = C[lo] + C[hi]``, so no per-resample sorting is needed. Counts
        stay integers (sums are exact); only the final products are float64, which is exact
        below 2**53.
        """
        cp = counts[:, self.pos]
        cum = np.zeros((counts.shape[0], self.neg.size + 1), dtype=counts.dtype)
        np.cumsum(counts[:, self.neg], axis=1, out=cum[:, 1:])
        twice = cum[:, self.lo]
        twice += cum[:, self.hi]
        num2 = np.einsum("ij,ij->i", cp.astype(np.float64), twice.astype(np.float64))
        den = cp.sum(axis=1, dtype=np.int64) * cum[:, -1].astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num2 / (2.0 * den), np.nan)


def auroc(scores: Any, labels: Any, *, name: str | None = None) -> float:
    """Area under the ROC curve of one binary task (rank-based; ties count 1/2, as sklearn).

    Args:
        scores: (N,) scores, higher = more likely positive (probabilities or logits).
        labels: (N,) 0/1 ground truth.
        name: the task's name, used only in the warning when the AUROC is undefined.

    Returns:
        The AUROC in [0, 1], or NaN (with a :class:`MetricWarning`) when the labels have no
        positives or no negatives.
    """
    s = _scores(scores)
    y = _binary_labels(labels)
    _same_length(s, y, "scores", "labels")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        what = "no positives" if n_pos == 0 else "no negatives"
        who = f"{name!r}: " if name is not None else ""
        warnings.warn(f"{who}AUROC undefined ({what} among {y.size} samples); reporting NaN",
                      MetricWarning, stacklevel=2)
        return math.nan
    return _RankPrep.of(s, y).auroc()


def per_class_auroc(probs: Any, labels: Any, label_names: Sequence[str] | None = None,
                    eval_labels: Sequence[str] | None = None) -> dict[str, float]:
    """AUROC of every column of a multi-label problem.

    Args:
        probs: (N, L) scores (sigmoid probabilities or logits).
        labels: (N, L) 0/1 targets.
        label_names: the L column names (default ``"0"``, ``"1"``, ...).
        eval_labels: compute only these columns (e.g. the 14 diseases, leaving out
            ``No Finding``); default all, in column order.

    Returns:
        ``{name: auroc}`` in ``eval_labels`` order; NaN (with a warning) for a column without
        positives or without negatives.
    """
    p = _scores(probs, "probs", ndim=2)
    y = _binary_labels(labels, "labels", ndim=2)
    if p.shape != y.shape:
        raise ValueError(f"probs has shape {p.shape} but labels has shape {y.shape}")
    names = _names(label_names, p.shape[1])
    out = {}
    for n in _eval_names(names, eval_labels):
        j = names.index(n)
        out[n] = auroc(p[:, j], y[:, j], name=n)
    return out


def mean_auroc(per_class: Mapping[str, float], eval_labels: Sequence[str] | None = None) -> float:
    """Mean AUROC over ``eval_labels`` (default all keys), ignoring NaN classes.

    For ChestX-ray14 pass the 14 diseases (``medattn.data.labels.DISEASES``), never No Finding.
    Returns NaN (with a warning) when every class is NaN.
    """
    keys = list(per_class) if eval_labels is None else list(eval_labels)
    missing = [k for k in keys if k not in per_class]
    if missing:
        raise ValueError(f"eval_labels {missing} have no AUROC (have: {list(per_class)})")
    vals = np.array([per_class[k] for k in keys], dtype=np.float64)
    if vals.size == 0 or np.all(np.isnan(vals)):
        warnings.warn("mean AUROC undefined: no class has a defined AUROC", MetricWarning,
                      stacklevel=2)
        return math.nan
    return float(np.nanmean(vals))


def roc_curve_points(scores: Any, labels: Any, *, drop_intermediate: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of the ROC curve, as ``sklearn.metrics.roc_curve`` returns them.

    Args:
        scores: (N,) scores. labels: (N,) 0/1 targets.
        drop_intermediate: leave out points that lie on a straight segment between their
            neighbours (the curve drawn is unchanged; 25,000 scores become a few thousand points).

    Returns:
        ``(fpr, tpr, thresholds)``, thresholds decreasing, the first one ``inf`` (the point
        (0, 0)); point i is the rate of ``score >= thresholds[i]``. With no positives (or no
        negatives) tpr (or fpr) is all NaN and a :class:`MetricWarning` is raised.
    """
    s = _scores(scores)
    y = _binary_labels(labels)
    _same_length(s, y, "scores", "labels")
    if s.size == 0:
        raise ValueError("roc_curve_points: no samples")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    thr = s[last]
    if drop_intermediate and tps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thr = np.r_[np.inf, thr]
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f"ROC curve undefined: {'no positives' if n_pos == 0 else 'no negatives'}",
                      MetricWarning, stacklevel=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
        tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thr


# --------------------------------------------------------------------------------------------
# Single-label (softmax) problems
# --------------------------------------------------------------------------------------------
def _class_targets(targets: Any, n: int, c: int) -> np.ndarray:
    t = _as_array(targets, "targets")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"targets: expected shape ({n},), got {t.shape}")
    if t.size and (not np.all(np.equal(np.mod(t, 1), 0)) or t.min() < 0 or t.max() >= c):
        raise ValueError(f"targets must be integer class indices in [0, {c}), got values "
                         f"{np.unique(t)[:10].tolist()}")
    return t.astype(np.int64)


def accuracy(logits_or_probs: Any, targets: Any) -> float:
    """Top-1 accuracy: the fraction of rows whose argmax equals the target class.

    Args:
        logits_or_probs: (N, C) logits or probabilities (argmax is the same for both).
        targets: (N,) integer class indices.
    """
    p = _scores(logits_or_probs, "logits_or_probs", ndim=2)
    t = _class_targets(targets, p.shape[0], p.shape[1])
    if t.size == 0:
        return math.nan
    return float(np.mean(np.argmax(p, axis=1) == t))


def _softmax_probs(probs: Any, from_logits: bool) -> np.ndarray:
    p = _scores(probs, "probs", ndim=2)
    if from_logits:
        z = p - p.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    if p.size and not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs: rows do not sum to 1; pass softmax probabilities, or logits "
                         "with from_logits=True (one-vs-rest AUROC depends on the softmax)")
    return p


def per_class_auroc_ovr(probs: Any, targets: Any, class_names: Sequence[str] | None = None, *,
                        from_logits: bool = False) -> dict[str, float]:
    """One-vs-rest AUROC of each class of a single-label (softmax) problem.

    Args:
        probs: (N, C) softmax probabilities (rows sum to 1), or logits with ``from_logits``.
        targets: (N,) integer class indices.
        class_names: the C class names (default ``"0"``, ``"1"``, ...).
        from_logits: apply a softmax first.

    Returns:
        ``{name: AUROC of probs[:, c] for target == c vs the rest}``; NaN (with a warning) for a
        class absent from the targets.
    """
    p = _softmax_probs(probs, from_logits)
    t = _class_targets(targets, p.shape[0], p.shape[1])
    names = _names(class_names, p.shape[1])
    return {n: auroc(p[:, c], t == c, name=n) for c, n in enumerate(names)}


def macro_auroc_ovr(probs: Any, targets: Any, *, from_logits: bool = False) -> float:
    """Unweighted mean of the one-vs-rest AUROCs, as sklearn's
    ``roc_auc_score(targets, probs, multi_class="ovr", average="macro")``."""
    return mean_auroc(per_class_auroc_ovr(probs, targets, from_logits=from_logits))
