"""The metrics an evaluation reports, composed from the single metrics of this package for one
run's predictions (:class:`~medattn.metrics.accumulate.Predictions`) and its data description
(``DataSpec``): per-branch AUROC and validation loss, seed 002's binary-task table, box
localisation against the manifest's ground truth, and means of per-image extras.

The trainer's per-epoch validation and ``medattn eval`` both call these, so the two agree
exactly. The inputs are the gathered predictions with padding already dropped
(:class:`~medattn.metrics.accumulate.Accumulator`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from medattn.boxes import records_xyxy
from medattn.metrics._inputs import MetricWarning
from medattn.metrics.accumulate import Predictions
from medattn.metrics.auroc import mean_auroc, per_class_auroc, per_class_auroc_ovr
from medattn.metrics.localization import WANG_THRESHOLDS, localization_accuracy
from medattn.metrics.operating import binary_report

if TYPE_CHECKING:
    from medattn.methods.base import DataSpec


def extras_means(pred: Predictions | None) -> dict[str, float | None]:
    """Mean of each per-image extra (``predict(...)["extras"]``) over the images where it is
    defined (NaN = not defined for that image, e.g. no target region); None if none is."""
    if pred is None:
        return {}
    out: dict[str, float | None] = {}
    for name, v in pred.extras.items():
        v = np.asarray(v, dtype=np.float64)
        ok = np.isfinite(v)
        out[name] = float(v[ok].mean()) if ok.any() else None
    return out


def classification_metrics(pred: Predictions, labels: np.ndarray, spec: DataSpec,
                           targets: np.ndarray | None = None) -> dict[str, Any]:
    """Per branch: AUROC per label (all labels) and the mean over ``spec.eval_labels``."""
    y = labels[pred.index]
    out: dict[str, Any] = {}
    for branch, p in pred.probs.items():
        with warnings.catch_warnings():
            # A class without positives in a small split is reported as NaN (n/a), not warned
            # about on every validation.
            warnings.simplefilter("ignore", MetricWarning)
            if spec.task == "singlelabel" and targets is not None and len(p) and np.allclose(p.sum(1), 1, atol=1e-3):
                # One-vs-rest AUROC of softmax probabilities (equal to the AUROC against the one-hot
                # labels, through the single-label API, which checks the rows).
                per = per_class_auroc_ovr(p, targets[pred.index], list(spec.label_names))
            else:
                per = per_class_auroc(p, y, list(spec.label_names))
        entry: dict[str, Any] = {name: per[name] for name in spec.label_names}
        if spec.task == "singlelabel" and targets is not None:
            entry["macro_auroc"] = mean_auroc(per)  # one-vs-rest, unweighted over every class
        entry["mean"] = mean_auroc(per, list(spec.eval_labels))
        if spec.task == "singlelabel" and targets is not None:
            entry["accuracy"] = float((p.argmax(1) == targets[pred.index]).mean())
        entry["loss"] = probability_loss(p, y, spec, None if targets is None else targets[pred.index])
        out[branch] = entry
    return out


def probability_loss(p: np.ndarray, y: np.ndarray, spec: DataSpec, targets: np.ndarray | None = None) -> float:
    """The validation loss from predicted probabilities (``val/loss``).

    Single-label: cross-entropy of the target class, -mean log p[target]. Multi-label: binary
    cross-entropy averaged over the evaluated labels (``spec.eval_labels``) and images.
    Probabilities are clipped to [1e-7, 1 - 1e-7].
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(p) == 0:
        return float("nan")
    if spec.task == "singlelabel" and targets is not None and (targets >= 0).all():
        return float(-np.log(p[np.arange(len(p)), targets]).mean())
    cols = spec.eval_indices
    pe, ye = p[:, cols], np.asarray(y, dtype=np.float64)[:, cols]
    return float(-(ye * np.log(pe) + (1 - ye) * np.log(1 - pe)).mean())


def binary_metrics(pred: Predictions, spec: DataSpec, targets: np.ndarray) -> dict[str, Any] | None:
    """Seed 002's binary-task table for a 2-class single-label run, per branch: AUC of the
    positive class's probability, the Youden-optimal threshold with its sensitivity and
    specificity, and the operating point at 0.5 (:func:`medattn.metrics.binary_report`).
    None for any other task."""
    if spec.task != "singlelabel" or spec.num_classes != 2:
        return None
    t = targets[pred.index]
    out: dict[str, Any] = {"positive_class": spec.label_names[1]}
    for branch, p in pred.probs.items():
        out[branch] = binary_report(p[:, 1], t == 1)
    return out


def localization_metrics(pred: Predictions, ds) -> dict[str, Any] | None:
    """Attention box vs ground-truth boxes: IoU, IoBB and T(IoBB)/T(IoU) accuracy per class.

    Wang et al. 2017: a ground-truth box is correctly localised when the predicted box of its
    image has IoBB (|P∩G|/|P|) or IoU above T. AG-CNN predicts one class-agnostic box per image.
    """
    if pred.boxes is None or "boxes" not in ds.manifest.columns:
        return None
    records, pred_rows = [], []
    for row, i in enumerate(pred.index):
        for b in ds.boxes(int(i)):
            records.append(b)
            pred_rows.append(row)
    if not records:
        return None
    g, gt_labels = records_xyxy(records)
    p = pred.boxes[np.asarray(pred_rows)].astype(np.float64)
    out: dict[str, Any] = {"n_boxes": len(records), "n_images": int(len(set(pred_rows))),
                           "box_format": "normalised [x0, y0, x1, y1] of the prepared image",
                           "thresholds": list(WANG_THRESHOLDS), "per_class": {}, "overall": {}}
    for metric in ("iobb", "iou"):
        r = localization_accuracy(p, g, gt_labels, fmt="xyxy", metric=metric, thresholds=WANG_THRESHOLDS)
        out["overall"][f"{metric}_mean"] = float(r.overall_mean_overlap)
        out["overall"][f"acc_{metric}"] = {str(t): float(r.overall[t]) for t in r.thresholds}
        out["overall"][f"macro_acc_{metric}"] = {str(t): float(r.macro[t]) for t in r.thresholds}
        for cls in r.classes:
            e = out["per_class"].setdefault(cls, {"n": int(sum(1 for lab in gt_labels if lab == cls))})
            e[f"{metric}_mean"] = float(r.mean_overlap[cls])
            e[f"acc_{metric}"] = {str(t): float(r.accuracy[cls][t]) for t in r.thresholds}
        out[f"{metric}_values"] = {cls: [float(v) for v, lab in zip(r.overlaps, gt_labels) if lab == cls]
                                   for cls in r.classes}
    return out
