"""Inference over a split on every rank, gathering on rank 0, and the metrics computed from it.

Used by the trainer's per-epoch validation and by ``medattn eval``, so the two agree exactly.
Padding added to give every rank the same number of batches is dropped (``valid``) before any
metric is computed, and the gathered predictions are put back in sample order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpc import distributed, faults
from medattn.methods.base import DataSpec, Method

# T(IoBB)/T(IoU) thresholds: 0.1-0.7 (Wang et al. supplementary) plus Table 4's 0.25/0.75/0.9.
LOC_THRESHOLDS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9)


@dataclass
class Predictions:
    index: np.ndarray  # (N,) sample indices, ascending
    probs: dict[str, np.ndarray]  # branch -> (N, L)
    boxes: np.ndarray | None = None  # (N, 4) normalised [x0, y0, x1, y1] in the prepared image
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def autocast_ctx(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_inference(method: Method, model: torch.nn.Module, loader, stage: str, device: torch.device,
                  precision: str = "fp32", channels_last: bool = False,
                  max_batches: int | None = None) -> Predictions | None:
    """Predict on this rank's share; returns the gathered Predictions on rank 0, None elsewhere."""
    was_training = model.training
    model.eval()
    idx_l, probs_l, boxes_l, extras_l = [], {}, [], {}
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        if channels_last and device.type == "cuda":
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            out = method.predict(model, batch, stage)
        if k == 0:
            faults.point("validation")
        valid = batch["valid"].bool()
        idx_l.append(batch["index"][valid].cpu().numpy())
        for b, p in out["probs"].items():
            probs_l.setdefault(b, []).append(p[valid].float().cpu().numpy())
        if out.get("boxes") is not None:
            boxes_l.append(out["boxes"][valid].float().cpu().numpy())
        for name, v in (out.get("extras") or {}).items():
            extras_l.setdefault(name, []).append(v[valid].float().cpu().numpy())
    model.train(was_training)
    local = {
        "index": np.concatenate(idx_l) if idx_l else np.zeros(0, np.int64),
        "probs": {b: np.concatenate(v) for b, v in probs_l.items()},
        "boxes": np.concatenate(boxes_l) if boxes_l else None,
        "extras": {k: np.concatenate(v) for k, v in extras_l.items()},
    }
    parts = distributed.all_gather_object(local)
    if not distributed.current().is_primary:
        return None
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    index = index[order]
    if len(np.unique(index)) != len(index):
        raise RuntimeError("evaluation saw a sample twice: padding was not dropped")
    branches = parts[0]["probs"].keys()
    probs = {b: np.concatenate([p["probs"][b] for p in parts])[order] for b in branches}
    boxes = None
    if parts[0]["boxes"] is not None:
        boxes = np.concatenate([p["boxes"] for p in parts])[order]
    extras = {k: np.concatenate([p["extras"][k] for p in parts])[order] for k in parts[0]["extras"]}
    return Predictions(index, probs, boxes, extras)


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
    from medattn import metrics as M

    import warnings

    y = labels[pred.index]
    out: dict[str, Any] = {}
    for branch, p in pred.probs.items():
        with warnings.catch_warnings():
            # A class without positives in a small split is reported as NaN (n/a), not warned
            # about on every validation.
            warnings.simplefilter("ignore", M.MetricWarning)
            if spec.task == "singlelabel" and targets is not None and len(p) and np.allclose(p.sum(1), 1, atol=1e-3):
                # One-vs-rest AUROC of softmax probabilities (equal to the AUROC against the one-hot
                # labels, through the single-label API, which checks the rows).
                per = M.per_class_auroc_ovr(p, targets[pred.index], list(spec.label_names))
            else:
                per = M.per_class_auroc(p, y, list(spec.label_names))
        entry: dict[str, Any] = {name: per[name] for name in spec.label_names}
        if spec.task == "singlelabel" and targets is not None:
            entry["macro_auroc"] = M.mean_auroc(per)  # one-vs-rest, unweighted over every class
        entry["mean"] = M.mean_auroc(per, list(spec.eval_labels))
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
    from medattn import metrics as M

    if spec.task != "singlelabel" or spec.num_classes != 2:
        return None
    t = targets[pred.index]
    out: dict[str, Any] = {"positive_class": spec.label_names[1]}
    for branch, p in pred.probs.items():
        out[branch] = M.binary_report(p[:, 1], t == 1)
    return out


def localization_metrics(pred: Predictions, ds) -> dict[str, Any] | None:
    """Attention box vs ground-truth boxes: IoU, IoBB and T(IoBB)/T(IoU) accuracy per class.

    Wang et al. 2017: a ground-truth box is correctly localised when the predicted box of its
    image has IoBB (|P∩G|/|P|) or IoU above T. AG-CNN predicts one class-agnostic box per image.
    """
    from medattn import metrics as M

    if pred.boxes is None or "boxes" not in ds.manifest.columns:
        return None
    gt_boxes, gt_labels, pred_rows = [], [], []
    for row, i in enumerate(pred.index):
        for b in ds.boxes(int(i)):
            gt_boxes.append([b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]])
            gt_labels.append(b["label"])
            pred_rows.append(row)
    if not gt_boxes:
        return None
    p = pred.boxes[np.asarray(pred_rows)].astype(np.float64)
    g = np.asarray(gt_boxes, dtype=np.float64)
    out: dict[str, Any] = {"n_boxes": len(gt_boxes), "n_images": int(len(set(pred_rows))),
                           "box_format": "normalised [x0, y0, x1, y1] of the prepared image",
                           "thresholds": list(LOC_THRESHOLDS), "per_class": {}, "overall": {}}
    for metric in ("iobb", "iou"):
        r = M.localization_accuracy(p, g, gt_labels, fmt="xyxy", metric=metric, thresholds=LOC_THRESHOLDS)
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
