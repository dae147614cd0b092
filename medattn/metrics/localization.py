"""Box localisation accuracy (Wang et al. 2017, ChestX-ray8): IoU, IoBB and the fraction of
ground-truth boxes whose overlap with the predicted box exceeds T.

Box formats and geometry (area, intersection) are :mod:`medattn.boxes`'s; this module adds the
overlap measures and the accuracy table. Any unit (pixels or normalised) works as long as
predicted and ground-truth boxes use the same one.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medattn.boxes import FORMATS as BOX_FORMATS  # noqa: F401  (re-exported by medattn.metrics)
from medattn.boxes import area as box_area
from medattn.boxes import intersection as box_intersection
from medattn.boxes import to_xyxy
from medattn.metrics._inputs import _as_array, _nanmean

# Wang et al. 2017 report T(IoBB) in {0.1, 0.25, 0.5, 0.75, 0.9} (Table 4) and T(IoU) in
# {0.1, ..., 0.7} (supplementary Table 7); the default is their union.
WANG_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9)


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
