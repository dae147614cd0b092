"""Subgroup AUROC: does the model work as well for women as for men, for the old as for the young,
on AP as on PA films?

Subgroups (every one named in the output):

* ``sex``: ``F`` and ``M`` (``Female``/``Male`` and lower case are read as the same).
* ``age``: :data:`AGE_BANDS`: ``<40`` (age < 40), ``40-60`` (40 <= age <= 60), ``>60`` (age > 60), in
  years; an unknown age is in no band.
* ``view``: ``PA`` and ``AP`` (other projections, e.g. lateral, are in neither).

Each subgroup's AUROC per label has a percentile-bootstrap interval clustered by patient within
the subgroup (:func:`medattn.metrics.bootstrap.bootstrap_auroc_ci`). A subgroup in which a label
has fewer than :data:`medattn.metrics.bootstrap.MIN_POSITIVES` positive patients gets no interval
for that label and is listed under ``too_few`` (a subgroup without positives or negatives has no
AUROC at all). The **gap** of a label within an attribute is the largest AUROC minus the smallest
over that attribute's subgroups that have an interval (too-small subgroups would make the gap
mostly noise); ``largest_gap`` is the largest of those over the three attributes, with the two
subgroups named.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medattn.metrics._inputs import MetricWarning
from medattn.metrics.bootstrap import MIN_POSITIVES, bootstrap_auroc_ci

AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<40", -math.inf, 40.0), ("40-60", 40.0, 60.0), (">60", 60.0, math.inf))
SEXES = ("F", "M")
VIEWS = ("PA", "AP")
_SEX_NAMES = {"f": "F", "female": "F", "m": "M", "male": "M"}


def normalise_sex(values: Any) -> np.ndarray:
    """``F``/``M`` for each value (F, Female, M, Male in any case), ``""`` for anything else."""
    return np.array([_SEX_NAMES.get(str(v).strip().lower(), "") if v is not None else "" for v in values],
                    dtype=object)


def age_band(age: Any) -> np.ndarray:
    """The :data:`AGE_BANDS` name of each age (``""`` when unknown): <40, 40-60 (both ends), >60."""
    a = np.asarray(age, np.float64)
    out = np.full(a.shape, "", dtype=object)
    out[a < 40] = "<40"
    out[(a >= 40) & (a <= 60)] = "40-60"
    out[a > 60] = ">60"
    return out


def subgroup_masks(sex: Any = None, age: Any = None, view: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """``{attribute: {subgroup: (N,) bool}}`` for the attributes given (None: left out)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if sex is not None:
        s = normalise_sex(sex)
        out["sex"] = {g: s == g for g in SEXES}
    if age is not None:
        b = age_band(age)
        out["age"] = {name: b == name for name, _, _ in AGE_BANDS}
    if view is not None:
        v = np.array([str(x).strip().upper() if x is not None else "" for x in view], dtype=object)
        out["view"] = {g: v == g for g in VIEWS}
    return out


def subgroup_auroc(probs: Any, labels: Any, label_names: Sequence[str], eval_labels: Sequence[str],
                   masks: dict[str, dict[str, np.ndarray]], groups: Any, *, n_boot: int = 1000,
                   alpha: float = 0.05, seed: int = 0, min_positives: int = MIN_POSITIVES) -> dict[str, Any]:
    """AUROC with patient-clustered intervals per subgroup and label, and the gaps.

    Args:
        probs: (N, L) scores. labels: (N, L) 0/1. label_names: the L names; eval_labels: those reported.
        masks: from :func:`subgroup_masks`. groups: (N,) patient ids.
        n_boot, alpha, seed, min_positives: as :func:`bootstrap_auroc_ci`.

    Returns:
        ``{"attributes": {attr: {group: {"n_images", "n_patients", "auroc": {label: v},
        "ci": {label: [lo, hi]}, "positives": {label: patients}, "too_few": [labels]}}},
        "gaps": {attr: {label: {"gap", "high", "low"}}}, "largest_gap": {label: {"attribute",
        "gap", "high", "low"}}, ...}``; values that do not exist are None.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    g = np.asarray(groups).astype(str)
    names = list(label_names)
    attrs: dict[str, Any] = {}
    for attr, groups_of in masks.items():
        attrs[attr] = {}
        for name, m in groups_of.items():
            m = np.asarray(m, bool)
            entry: dict[str, Any] = {"n_images": int(m.sum()), "n_patients": int(len(np.unique(g[m])))}
            if m.sum() < 2:
                entry.update(auroc={k: None for k in eval_labels}, ci={k: [None, None] for k in eval_labels},
                             positives={k: int(y[m, names.index(k)].sum()) for k in eval_labels},
                             too_few=list(eval_labels))
                attrs[attr][name] = entry
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)  # a subgroup without positives: None
                ci = bootstrap_auroc_ci(p[m], y[m], names, list(eval_labels), n_boot=max(1, n_boot),
                                        alpha=alpha, seed=seed, groups=g[m], min_positives=min_positives)
            entry["auroc"] = {k: _f(ci.estimate[k]) for k in eval_labels}
            entry["ci"] = {k: ([_f(ci.per_class[k][0]), _f(ci.per_class[k][1])] if n_boot > 0 else [None, None])
                           for k in eval_labels}
            entry["positives"] = dict(ci.positives)
            entry["too_few"] = [k for k in eval_labels if k in ci.too_few or entry["auroc"][k] is None]
            attrs[attr][name] = entry
    gaps: dict[str, Any] = {}
    largest: dict[str, Any] = {}
    for attr, groups_of in attrs.items():
        gaps[attr] = {}
        for k in eval_labels:
            vals = {name: e["auroc"][k] for name, e in groups_of.items()
                    if e["auroc"][k] is not None and k not in e["too_few"]}
            if len(vals) < 2:
                gaps[attr][k] = {"gap": None, "high": None, "low": None}
                continue
            hi = max(vals, key=vals.get)
            lo = min(vals, key=vals.get)
            gaps[attr][k] = {"gap": vals[hi] - vals[lo], "high": hi, "low": lo}
            if largest.get(k) is None or gaps[attr][k]["gap"] > largest[k]["gap"]:
                largest[k] = {"attribute": attr, **gaps[attr][k]}
    for k in eval_labels:
        largest.setdefault(k, None)
    return {"attributes": attrs, "gaps": gaps, "largest_gap": largest,
            "age_bands": [name for name, _, _ in AGE_BANDS],
            "min_positives": min_positives, "n_boot": n_boot,
            "method": "patient-clustered percentile bootstrap within each subgroup"}


def _f(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
