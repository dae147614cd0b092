"""Calibration: whether a predicted probability means what it says.

* **ECE** (expected calibration error; Naeini et al. 2015, Guo et al. 2017): the probabilities of
  one label are put into :data:`N_BINS` = 15 bins; ECE = sum over bins of (images in the bin / all
  images) * |observed frequency of the label in the bin - mean predicted probability in the bin|.
  Two binnings, always named in the output because they give different numbers:

  - ``equal-width``: bin k holds ``k/15 <= p < (k+1)/15`` (p = 1 falls in the last bin), as Guo
    et al. For chest X-ray labels most probabilities are small, so most images share the first
    bin or two.
  - ``equal-mass``: the images sorted by p (ties in row order) and cut into 15 bins of as equal
    size as possible (sizes differ by at most one; image of rank r goes to bin ``r * 15 // N``)
    (Nixon et al. 2019, "adaptive" binning): every bin holds the same share of the images.

* **Brier score**: mean over images of (p - y)^2, per label (Brier 1950). Lower is better; it mixes
  calibration and discrimination.
* **Reliability diagram**: per bin, the image count, the mean predicted probability and the
  observed frequency (the data of the plot; the report draws it).
* **Temperature scaling** (Guo et al. 2017), fitted on the validation split and applied to test:

  - multi-label (independent sigmoids): ``p' = sigmoid(logit(p) / T_label)``, **one temperature per
    label**. Each label is its own binary classifier with its own logit scale and prevalence
    (Hernia at 0.2 % and Infiltration at 18 % in ChestX-ray14), so one shared T would have to
    trade one label's calibration against another's; Guo et al.'s single T is for one softmax,
    where all classes share the logits. A label with fewer than :data:`MIN_POSITIVES` positives
    (or negatives) in the validation split cannot be fitted reliably and gets the one temperature
    fitted on every label pooled (named ``pooled`` in the output).
  - single-label (softmax): one temperature, ``p' = softmax(log p / T)``, as Guo et al.

  T is found by minimising the negative log-likelihood on the validation split. With a = 1/T the
  NLL is convex in a, so its derivative is increasing and has one root, found by Newton's method
  kept inside a shrinking bracket (a in [1e-3, 1e3], vectorised over labels). A temperature does not reorder the images of a
  label, so AUROC is unchanged by it; ECE and Brier change.

Logits are recovered from the stored probabilities (clipped to [1e-7, 1 - 1e-7], as the
validation loss does), so calibration needs no second pass of the model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medattn.metrics._inputs import _binary_labels, _names, _scores

N_BINS = 15
BINNINGS = ("equal-width", "equal-mass")
# Fewest validation positives (and negatives) for a label's own temperature; below it the pooled one.
MIN_POSITIVES = 5
EPS = 1e-7
_A_LO, _A_HI = 1e-3, 1e3  # bounds of a = 1/T searched


def _inputs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, L) probabilities and 0/1 labels; 1-D inputs become one column (``squeeze`` True)."""
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs, np.float64)
    squeeze = p.ndim == 1
    if squeeze:
        p = p[:, None]
        labels = np.asarray(labels)[:, None]
    p = _scores(p, "probs", ndim=2)
    y = _binary_labels(labels, "labels", ndim=2)
    if p.shape != y.shape:
        raise ValueError(f"probs has shape {p.shape} but labels has shape {y.shape}")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("probs: calibration needs probabilities in [0, 1]")
    return p, y, squeeze


def bin_index(probs: np.ndarray, n_bins: int = N_BINS, binning: str = "equal-width") -> np.ndarray:
    """(N, L) bin of each probability, 0..n_bins-1 (see the module doc for the two binnings)."""
    if binning not in BINNINGS:
        raise ValueError(f"binning {binning!r}: use one of {', '.join(BINNINGS)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = np.asarray(probs, np.float64)
    if binning == "equal-width":
        return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    n = p.shape[0]
    order = np.argsort(p, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[:, None].repeat(p.shape[1], axis=1), axis=0)
    return rank * n_bins // max(n, 1)


@dataclass(frozen=True)
class Reliability:
    """Per label and bin (arrays of shape (L, n_bins)): ``count`` images, ``confidence`` (mean
    predicted probability, NaN in an empty bin) and ``frequency`` (observed share of positives)."""

    binning: str
    n_bins: int
    count: np.ndarray = field(repr=False)
    confidence: np.ndarray = field(repr=False)
    frequency: np.ndarray = field(repr=False)

    def ece(self) -> np.ndarray:
        """(L,) expected calibration error: sum over bins of count/N * |frequency - confidence|."""
        n = self.count.sum(axis=1)
        gap = np.where(self.count > 0, np.abs(self.frequency - self.confidence), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, (self.count * gap).sum(axis=1) / n, np.nan)


def reliability(probs: Any, labels: Any, n_bins: int = N_BINS, binning: str = "equal-width") -> Reliability:
    """The reliability-diagram data of every column (one bincount over all labels at once)."""
    p, y, _ = _inputs(probs, labels)
    n, L = p.shape
    b = bin_index(p, n_bins, binning) + np.arange(L)[None, :] * n_bins  # label j's bins at j*n_bins...
    flat = b.ravel()
    size = L * n_bins
    count = np.bincount(flat, minlength=size).reshape(L, n_bins)
    psum = np.bincount(flat, weights=p.ravel(), minlength=size).reshape(L, n_bins)
    ysum = np.bincount(flat, weights=y.ravel().astype(np.float64), minlength=size).reshape(L, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, psum / np.maximum(count, 1), np.nan)
        freq = np.where(count > 0, ysum / np.maximum(count, 1), np.nan)
    return Reliability(binning, n_bins, count, conf, freq)


def ece(probs: Any, labels: Any, n_bins: int = N_BINS, binning: str = "equal-width") -> np.ndarray | float:
    """Expected calibration error of each column ((N, L) -> (L,)); a float for 1-D inputs."""
    _, _, squeeze = _inputs(probs, labels)
    e = reliability(probs, labels, n_bins, binning).ece()
    return float(e[0]) if squeeze else e


def brier(probs: Any, labels: Any) -> np.ndarray | float:
    """Brier score of each column: mean over images of (p - y)^2; a float for 1-D inputs."""
    p, y, squeeze = _inputs(probs, labels)
    b = np.mean((p - y) ** 2, axis=0) if p.shape[0] else np.full(p.shape[1], np.nan)
    return float(b[0]) if squeeze else b


# --------------------------------------------------------------------------------------------
# temperature scaling
# --------------------------------------------------------------------------------------------
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow for large |z|


def _solve(grad_hess, k: int, iters: int = 100, tol: float = 1e-12) -> np.ndarray:
    """Roots in a of increasing functions: ``grad_hess(a)`` ((k,) -> g (k,), g' (k,)), a in
    [_A_LO, _A_HI], clamped to a bound where the root lies outside.

    Safeguarded Newton: the bracket [lo, hi] shrinks with every evaluation (g > 0: the root is
    below a); a Newton step that leaves the bracket is replaced by its geometric midpoint, so it
    converges like bisection at worst and in a handful of steps near the root.
    """
    lo = np.full(k, _A_LO)
    hi = np.full(k, _A_HI)
    a = np.ones(k)
    for _ in range(iters):
        g, h = grad_hess(a)
        up = g > 0
        hi = np.where(up, a, hi)
        lo = np.where(up, lo, a)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = a - g / h
        # At the root the Newton step lands on a itself, which is now a bracket end: inclusive.
        ok = np.isfinite(step) & (step >= lo) & (step <= hi)
        new = np.where(ok, step, np.sqrt(lo * hi))
        done = np.abs(new - a) <= tol * a
        a = new
        if done.all():
            break
    return a


def _fit_sigmoid(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """a = 1/T minimising sum_i BCE(sigmoid(a z_ij), y_ij) for each column j of (N, K):
    d/da = sum (sigmoid(a z) - y) z, d2/da2 = sum s (1 - s) z^2 >= 0."""
    yf = y.astype(np.float64)

    def gh(a):
        s = _sigmoid(z * a[None, :])
        return np.sum((s - yf) * z, axis=0), np.sum(s * (1 - s) * z * z, axis=0)
    return _solve(gh, z.shape[1])


def _fit_softmax(logp: np.ndarray, target: np.ndarray) -> float:
    """a = 1/T minimising -sum_i log softmax(a * logp_i)[target_i]; the derivative is
    sum_i (E_softmax[logp_i] - logp_i[target_i]), increasing in a."""
    zt = logp[np.arange(len(target)), target]

    def gh(a):
        s = a[0] * logp
        s = s - s.max(axis=1, keepdims=True)
        w = np.exp(s)
        w /= w.sum(axis=1, keepdims=True)
        mean = (w * logp).sum(axis=1)
        var = (w * logp * logp).sum(axis=1) - mean ** 2  # d/da of the softmax mean of logp
        return np.array([np.sum(mean - zt)]), np.array([np.sum(var)])
    return float(_solve(gh, 1)[0])


@dataclass(frozen=True)
class Temperature:
    """Fitted temperatures: ``temperature`` {label: T}; ``kind`` {label: "own" | "pooled"}
    (multi-label) or one T for every label (``task == "singlelabel"``, kind ``softmax``)."""

    temperature: dict[str, float]
    kind: dict[str, str]
    pooled: float
    task: str = "multilabel"
    n: int = 0
    positives: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "temperature": dict(self.temperature), "kind": dict(self.kind),
                "pooled": self.pooled, "n_images": self.n, "positives": dict(self.positives),
                "min_positives": MIN_POSITIVES,
                "scheme": ("one temperature per label (sigmoid), pooled below "
                           f"{MIN_POSITIVES} positives or negatives" if self.task != "singlelabel"
                           else "one temperature (softmax)")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Temperature":
        return cls({k: float(v) for k, v in d["temperature"].items()}, dict(d.get("kind", {})),
                   float(d.get("pooled", 1.0)), d.get("task", "multilabel"), int(d.get("n_images", 0)),
                   dict(d.get("positives", {})))

    def vector(self, label_names: Sequence[str]) -> np.ndarray:
        missing = [k for k in label_names if k not in self.temperature]
        if missing:
            raise ValueError(f"no temperature for labels {missing}")
        return np.array([self.temperature[k] for k in label_names], np.float64)


def fit_temperature(probs: Any, labels: Any, label_names: Sequence[str] | None = None, *,
                    task: str = "multilabel", targets: Any = None,
                    min_positives: int = MIN_POSITIVES) -> Temperature:
    """Fit temperatures on validation predictions (see the module doc).

    Args:
        probs: (N, L) probabilities. labels: (N, L) 0/1 targets.
        label_names: the L names. task: ``multilabel`` (per label) or ``singlelabel`` (one T;
            ``targets`` (N,) class indices, default the argmax of ``labels``).
        min_positives: fewer validation positives or negatives than this: the pooled T.
    """
    p, y, _ = _inputs(probs, labels)
    names = _names(label_names, p.shape[1])
    n = p.shape[0]
    if n == 0:
        raise ValueError("fit_temperature: no validation images")
    if task == "singlelabel":
        t = np.asarray(targets if targets is not None else y.argmax(1), np.int64)
        a = _fit_softmax(np.log(np.clip(p, EPS, 1.0)), t)
        T = 1.0 / a
        return Temperature({k: T for k in names}, {k: "softmax" for k in names}, T, task, n,
                           {k: int(y[:, j].sum()) for j, k in enumerate(names)})
    z = _logit(p)
    pos = y.sum(axis=0)
    neg = n - pos
    own = (pos >= min_positives) & (neg >= min_positives)
    pooled = float(1.0 / _fit_sigmoid(z.reshape(-1, 1), y.reshape(-1, 1))[0])
    temps = np.full(len(names), pooled)
    if own.any():
        temps[own] = 1.0 / _fit_sigmoid(z[:, own], y[:, own])
    return Temperature({k: float(temps[j]) for j, k in enumerate(names)},
                       {k: "own" if own[j] else "pooled" for j, k in enumerate(names)}, pooled, task, n,
                       {k: int(pos[j]) for j, k in enumerate(names)})


def apply_temperature(probs: Any, temperature: Any, task: str = "multilabel") -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(logit(p) / T)`` per column (T: scalar or (L,)), or for
    ``singlelabel`` ``softmax(log p / T)`` over each row."""
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs, np.float64)
    T = np.asarray(temperature, np.float64)
    if np.any(T <= 0) or not np.all(np.isfinite(T)):
        raise ValueError(f"temperatures must be positive and finite, got {T}")
    if task == "singlelabel":
        s = np.log(np.clip(p, EPS, 1.0)) / float(np.ravel(T)[0])
        s -= s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=-1, keepdims=True)
    return _sigmoid(_logit(p) / T)


def calibration_summary(probs: Any, labels: Any, label_names: Sequence[str], eval_labels: Sequence[str],
                        n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE (both binnings) and Brier per label and their means over ``eval_labels``, and the
    reliability-diagram data of ``eval_labels`` pooled (every label-image pair one point,
    equal-width bins), ready for JSON."""
    p, y, _ = _inputs(probs, labels)
    names = list(label_names)
    out: dict[str, Any] = {}
    cols = [names.index(k) for k in eval_labels]
    for binning in BINNINGS:
        e = reliability(p, y, n_bins, binning).ece()
        entry = {k: _f(e[names.index(k)]) for k in names}
        entry["mean"] = _f(np.nanmean(e[cols])) if cols and not np.all(np.isnan(e[cols])) else None
        out[f"ece_{binning.replace('-', '_')}"] = entry
    b = brier(p, y)
    out["brier"] = {k: _f(b[names.index(k)]) for k in names}
    out["brier"]["mean"] = _f(np.mean(b[cols])) if cols else None
    if cols:
        r = reliability(p[:, cols].reshape(-1, 1), y[:, cols].reshape(-1, 1), n_bins, "equal-width")
        out["reliability"] = {"binning": "equal-width", "n_bins": n_bins, "pooled_labels": list(eval_labels),
                              "count": r.count[0].tolist(), "confidence": [_f(v) for v in r.confidence[0]],
                              "frequency": [_f(v) for v in r.frequency[0]],
                              "ece": _f(r.ece()[0])}
    return out


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
