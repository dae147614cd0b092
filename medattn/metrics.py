"""Evaluation metrics: AUROC (multi-label, binary, one-vs-rest), bootstrap CIs, ROC points,
Youden operating points and Wang et al. (2017) box localisation accuracy.

Everything takes numpy arrays (torch tensors are accepted and moved to the CPU) and returns
plain floats, dicts and small dataclasses, so the results can be written to JSON/CSV as is.

Conventions used throughout:

* A *score* is anything monotone in the model's belief that the label is present (probability,
  logit); AUROC only depends on the order of the scores.
* Labels are 0/1 (bool, int or float). Anything else raises ``ValueError``.
* A metric that is undefined (a class with no positives or no negatives) is ``nan`` and a
  :class:`MetricWarning` names the class; means over classes are nan-means.
* Operating points call a sample positive when ``score >= threshold`` (the same rule as
  ``sklearn.metrics.roc_curve``).

The AUROC is computed from ranks (Mann-Whitney U): with average ranks for tied scores, a tied
positive/negative pair counts 1/2, exactly as ``sklearn.metrics.roc_auc_score``.

Example:
    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MetricWarning", "auroc", "per_class_auroc", "mean_auroc", "BootstrapCI", "bootstrap_auroc_ci",
    "roc_curve_points", "youden_threshold", "binary_report", "accuracy", "per_class_auroc_ovr",
    "macro_auroc_ovr", "BOX_FORMATS", "WANG_THRESHOLDS", "to_xyxy", "box_area", "box_intersection",
    "box_iou", "box_iobb", "LocalizationResult", "localization_accuracy",
]


class MetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. a class without positives); it is NaN."""


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq would compare the sample arrays elementwise
class BootstrapCI:
    """Percentile-bootstrap confidence intervals for per-class and mean AUROC.

    Attributes:
        per_class: ``{name: (lo, hi)}``.
        mean: ``(lo, hi)`` of the mean AUROC over the evaluated classes.
        estimate: ``{name: auroc}`` on the full data (the point estimates).
        mean_estimate: mean AUROC on the full data.
        samples: (n_boot, L) AUROC of each resample, columns in ``per_class`` order; NaN where a
            resample has no positives (or no negatives) for that class.
        mean_samples: (n_boot,) nan-mean over classes of each resample.
        n_boot, alpha, seed: the settings used.
    """

    per_class: dict[str, tuple[float, float]]
    mean: tuple[float, float]
    estimate: dict[str, float]
    mean_estimate: float
    samples: np.ndarray = field(repr=False)
    mean_samples: np.ndarray = field(repr=False)
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0


def _resample_indices(n: int, n_boot: int, seed: int):
    """Yield the bootstrap resamples in chunks: (b, n) arrays of row indices drawn uniformly
    with replacement, ``rng.integers(0, n, size=(b, n))`` with ``rng = default_rng(seed)``.

    The chunk size depends only on n, so (n, n_boot, seed) fixes every resample.
    """
    # About a million cells per chunk keeps the working arrays small enough to stay in cache,
    # which is measurably faster than one big block.
    chunk = int(max(1, min(256, 1_000_000 // max(n, 1))))
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(b, n) int32: how often each of the n rows appears in each resample of ``idx`` (b, m)."""
    b = idx.shape[0]
    flat = (idx + np.arange(b, dtype=np.int64)[:, None] * n).ravel()
    # int32 halves the memory traffic of the gathers and cumsums (counts never exceed n).
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.int32)


def bootstrap_auroc_ci(probs: Any, labels: Any, label_names: Sequence[str] | None = None,
                       eval_labels: Sequence[str] | None = None, *, n_boot: int = 1000,
                       alpha: float = 0.05, seed: int = 0) -> BootstrapCI:
    """Percentile-bootstrap CIs of per-class AUROC and of the mean AUROC.

    Images (rows) are resampled with replacement; the same resamples serve every class, so the
    CI of the mean reflects the correlation between classes. A resample is represented by how
    often each image is drawn, which gives exactly the AUROC of the resampled data (ties and
    duplicates included) without copying it; 1000 resamples of 25,000 x 14 take a few seconds.

    Args:
        probs: (N, L) scores. labels: (N, L) 0/1 targets.
        label_names: the L column names (default ``"0"``, ``"1"``, ...).
        eval_labels: the classes to evaluate and average (default all).
        n_boot: number of resamples. alpha: 1 - confidence level (0.05 = 95% CI).
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same CIs.

    Returns:
        A :class:`BootstrapCI`. Resamples in which a class has no positives are left out of
        that class's interval (they are NaN in ``samples``); a class without positives in the
        data has CI ``(nan, nan)``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    estimate = per_class_auroc(probs, labels, label_names, eval_labels)
    p = _scores(probs, "probs", ndim=2)
    y = _binary_labels(labels, "labels", ndim=2)
    names = _names(label_names, p.shape[1])
    cols = [names.index(k) for k in estimate]
    n = p.shape[0]
    samples = np.full((n_boot, len(cols)), np.nan)
    row = 0
    preps = {c: _RankPrep.of(p[:, j], y[:, j]) for c, j in enumerate(cols)
             if not math.isnan(estimate[names[j]])}
    for idx in _resample_indices(n, n_boot, seed):
        counts = _counts(idx, n)
        b = counts.shape[0]
        for c, prep in preps.items():
            samples[row:row + b, c] = prep.auroc_weighted(counts)
        row += b
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    per_class = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as intended
        for c, k in enumerate(estimate):
            col = samples[:, c]
            lo, hi = (np.nanpercentile(col, q) if np.any(~np.isnan(col)) else (np.nan, np.nan))
            per_class[k] = (float(lo), float(hi))
        mean_samples = np.nanmean(samples, axis=1) if samples.shape[1] else np.full(n_boot, np.nan)
        mlo, mhi = (np.nanpercentile(mean_samples, q) if np.any(~np.isnan(mean_samples))
                    else (np.nan, np.nan))
    defined = [v for v in estimate.values() if not math.isnan(v)]
    return BootstrapCI(per_class=per_class, mean=(float(mlo), float(mhi)), estimate=estimate,
                       mean_estimate=float(np.mean(defined)) if defined else math.nan,
                       samples=samples, mean_samples=mean_samples, n_boot=n_boot, alpha=alpha,
                       seed=seed)


# --------------------------------------------------------------------------------------------
# ROC curve and binary operating points
# --------------------------------------------------------------------------------------------
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
# Single-label (softmax) metrics
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


# --------------------------------------------------------------------------------------------
# Boxes and localisation (Wang et al. 2017)
# --------------------------------------------------------------------------------------------
BOX_FORMATS = ("xywh", "xyxy")
"""``"xywh"``: [x, y, w, h], (x, y) the top-left corner (BBox_List_2017.csv, the prepared
manifest). ``"xyxy"``: [x0, y0, x1, y1], top-left and bottom-right corners. Any unit (pixels or
normalised) works as long as predicted and ground-truth boxes use the same one."""

# Wang et al. 2017 report T(IoBB) in {0.1, 0.25, 0.5, 0.75, 0.9} (Table 4) and T(IoU) in
# {0.1, ..., 0.7} (supplementary Table 7); the default is their union.
WANG_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9)


def to_xyxy(boxes: Any, fmt: str) -> np.ndarray:
    """Boxes (..., 4) in ``fmt`` (``"xywh"`` or ``"xyxy"``) as float [x0, y0, x1, y1].

    Raises ValueError for an unknown format, a last axis other than 4, non-finite values or a
    negative width/height.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"box format {fmt!r} is not one of {BOX_FORMATS}")
    b = _as_array(boxes, "boxes", dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes: expected shape (..., 4), got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes: non-finite coordinate")
    if fmt == "xywh":
        b = np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)
    if np.any(b[..., 2:] < b[..., :2]):
        raise ValueError(f"boxes: negative width or height (format {fmt!r})")
    return b


def box_area(boxes: Any, *, fmt: str) -> np.ndarray:
    """Area of each box (..., 4) -> (...)."""
    b = to_xyxy(boxes, fmt)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_intersection(pred: Any, gt: Any, *, fmt: str) -> np.ndarray:
    """Intersection area |P ∩ G| of box pairs; shapes broadcast like numpy ((N,1,4) vs (1,M,4)
    gives an N x M matrix)."""
    p, g = to_xyxy(pred, fmt), to_xyxy(gt, fmt)
    w = np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0])
    h = np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def box_iou(pred: Any, gt: Any, *, fmt: str) -> np.ndarray:
    """IoU = |P ∩ G| / |P ∪ G| of box pairs (broadcasting over leading axes); 0 where the union
    is empty."""
    inter = box_intersection(pred, gt, fmt=fmt)
    union = box_area(pred, fmt=fmt) + box_area(gt, fmt=fmt) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def box_iobb(pred: Any, gt: Any, *, fmt: str) -> np.ndarray:
    """IoBB = |P ∩ G| / |P|, P the predicted (detected) box, G the ground truth (Wang et al.
    2017, "intersection over the detected B-Box area"); 0 where P has no area.

    Not symmetric: a small P inside a large G scores 1, a large P around a small G scores low.
    """
    inter = box_intersection(pred, gt, fmt=fmt)
    area = box_area(pred, fmt=fmt)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, inter / area, 0.0)


@dataclass(frozen=True, eq=False)
class LocalizationResult:
    """Localisation accuracy per class and overall (see :func:`localization_accuracy`).

    Attributes:
        metric: ``"iobb"`` or ``"iou"``. thresholds: the T values.
        classes: class names in report order.
        accuracy: ``{class: {T: fraction of that class's GT boxes with overlap > T}}``.
        overall: ``{T: accuracy}`` over all GT boxes pooled (micro average).
        macro: ``{T: mean of the per-class accuracies}``.
        mean_overlap: ``{class: mean overlap}`` (a missing prediction counts 0).
        overall_mean_overlap: mean overlap over all GT boxes.
        n_boxes, n_missing: GT boxes per class, and how many of them had no predicted box.
        overlaps: (M,) the overlap of each GT box, in input order.
    """

    metric: str
    thresholds: tuple[float, ...]
    classes: tuple[str, ...]
    accuracy: dict[str, dict[float, float]]
    overall: dict[float, float]
    macro: dict[float, float]
    mean_overlap: dict[str, float]
    overall_mean_overlap: float
    n_boxes: dict[str, int]
    n_missing: dict[str, int]
    overlaps: np.ndarray = field(repr=False)

    def to_frame(self):
        """A table (pandas DataFrame): one row per class plus ``all (micro)`` and
        ``mean (macro)``; columns ``n_boxes``, ``n_missing``, ``mean_<metric>`` and
        ``acc@<T>`` for each threshold."""
        import pandas as pd

        rows = []
        for c in self.classes:
            r = {"class": c, "n_boxes": self.n_boxes[c], "n_missing": self.n_missing[c],
                 f"mean_{self.metric}": self.mean_overlap[c]}
            r.update({f"acc@{t:g}": self.accuracy[c][t] for t in self.thresholds})
            rows.append(r)
        r = {"class": "all (micro)", "n_boxes": sum(self.n_boxes.values()),
             "n_missing": sum(self.n_missing.values()),
             f"mean_{self.metric}": self.overall_mean_overlap}
        r.update({f"acc@{t:g}": self.overall[t] for t in self.thresholds})
        rows.append(r)
        defined = [self.mean_overlap[c] for c in self.classes]
        r = {"class": "mean (macro)", "n_boxes": sum(self.n_boxes.values()),
             "n_missing": sum(self.n_missing.values()),
             f"mean_{self.metric}": _nanmean(defined)}
        r.update({f"acc@{t:g}": self.macro[t] for t in self.thresholds})
        rows.append(r)
        return pd.DataFrame(rows)


def _lookup(pred_boxes: Mapping, key: Any) -> np.ndarray | None:
    v = pred_boxes.get(key)
    if v is None:
        return None
    a = _as_array(v, f"pred_boxes[{key!r}]", dtype=np.float64)
    if a.size == 0:
        return None
    return a.reshape(-1, 4)


def localization_accuracy(pred_boxes: Any, gt_boxes: Any, gt_labels: Sequence[str],
                          gt_images: Sequence[str] | None = None, *, fmt: str,
                          metric: str = "iobb",
                          thresholds: Sequence[float] = WANG_THRESHOLDS,
                          classes: Sequence[str] | None = None) -> LocalizationResult:
    """Box localisation accuracy as defined by Wang et al. 2017 (ChestX-ray8, Table 4).

    Definition: each *ground-truth* box G (one row of BBox_List_2017.csv) is scored against the
    predicted box(es) P of its image; its overlap is IoBB = |P∩G|/|P| (``metric="iobb"``) or
    IoU = |P∩G|/|P∪G| (``metric="iou"``), the maximum over P when an image has several
    predicted boxes. G counts as correctly localised when overlap **> T** (strictly). The
    accuracy of a class at T is the fraction of that class's GT boxes correctly localised;
    ``overall`` pools all GT boxes (micro), ``macro`` averages the classes. A GT box whose
    image (or image and class) has no predicted box counts as a miss with overlap 0 and is
    counted in ``n_missing``. Wang et al.'s average false positives (AFP) are not computed.

    Args:
        pred_boxes: the predicted boxes, in one of three forms:
            * an (M, 4) array aligned with ``gt_boxes`` (row i is the box to score GT box i);
            * a mapping ``image id -> box`` (one class-agnostic box per image, as AG-CNN's
              attention crop gives; a (K, 4) array of several boxes is allowed);
            * a mapping ``(image id, class) -> box(es)`` (per-class boxes, e.g. from
              class-specific CAMs).
            A mapping needs ``gt_images``. ``None`` or an empty array as a value is a miss.
        gt_boxes: (M, 4) ground-truth boxes. gt_labels: (M,) their class names.
        gt_images: (M,) the image id of each GT box (needed with a mapping).
        fmt: box format of both predicted and GT boxes, ``"xywh"`` or ``"xyxy"`` (no default:
            BBox_List_2017.csv and the prepared manifest use xywh, crop code often xyxy).
        metric: ``"iobb"`` (Wang's Table 4) or ``"iou"`` (supplementary Table 7).
        thresholds: the T values (default :data:`WANG_THRESHOLDS`).
        classes: report order of the classes (default: order of first appearance). A listed
            class without GT boxes gets NaN accuracies.

    Returns:
        A :class:`LocalizationResult`; ``.to_frame()`` gives the table.
    """
    if metric not in ("iobb", "iou"):
        raise ValueError(f"metric must be 'iobb' or 'iou', got {metric!r}")
    ts = tuple(float(t) for t in thresholds)
    if not ts or any(not 0.0 <= t < 1.0 for t in ts):
        raise ValueError(f"thresholds must be in [0, 1), got {list(thresholds)}")
    g = to_xyxy(gt_boxes, fmt).reshape(-1, 4)
    labels = [str(x) for x in gt_labels]
    m = g.shape[0]
    if len(labels) != m:
        raise ValueError(f"gt_labels has {len(labels)} entries but gt_boxes has {m} rows")
    overlap_fn = box_iobb if metric == "iobb" else box_iou
    overlaps = np.zeros(m)
    missing = np.zeros(m, dtype=bool)
    if isinstance(pred_boxes, Mapping):
        if gt_images is None:
            raise ValueError("gt_images is needed when pred_boxes is a mapping")
        images = list(gt_images)
        if len(images) != m:
            raise ValueError(f"gt_images has {len(images)} entries but gt_boxes has {m} rows")
        per_class = any(isinstance(k, tuple) for k in pred_boxes)
        for i in range(m):
            key = (images[i], labels[i]) if per_class else images[i]
            p = _lookup(pred_boxes, key)
            if p is None:
                missing[i] = True
                continue
            overlaps[i] = float(np.max(overlap_fn(to_xyxy(p, fmt), g[i], fmt="xyxy")))
    else:
        p = to_xyxy(pred_boxes, fmt).reshape(-1, 4)
        if p.shape[0] != m:
            raise ValueError(f"pred_boxes has {p.shape[0]} rows but gt_boxes has {m}; pass a "
                             "mapping image -> box to score one box per image")
        overlaps = overlap_fn(p, g, fmt="xyxy").astype(np.float64)
    order = list(dict.fromkeys(classes if classes is not None else labels))
    unknown = sorted(set(labels) - set(order))
    if unknown:
        raise ValueError(f"gt_labels has classes {unknown} not in classes={list(order)}")
    lab = np.array(labels, dtype=object)
    acc, mean_ov, n_boxes, n_miss = {}, {}, {}, {}
    for c in order:
        sel = lab == c
        n_boxes[c] = int(sel.sum())
        n_miss[c] = int(missing[sel].sum())
        if n_boxes[c] == 0:
            acc[c] = {t: math.nan for t in ts}
            mean_ov[c] = math.nan
            continue
        acc[c] = {t: float(np.mean(overlaps[sel] > t)) for t in ts}
        mean_ov[c] = float(np.mean(overlaps[sel]))
    overall = {t: float(np.mean(overlaps > t)) if m else math.nan for t in ts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = {t: float(np.nanmean([acc[c][t] for c in order])) if order else math.nan
                 for t in ts}
    return LocalizationResult(
        metric=metric, thresholds=ts, classes=tuple(order), accuracy=acc, overall=overall,
        macro=macro, mean_overlap=mean_ov,
        overall_mean_overlap=float(np.mean(overlaps)) if m else math.nan,
        n_boxes=n_boxes, n_missing=n_miss, overlaps=overlaps)


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if v.size and not np.all(np.isnan(v)) else math.nan
