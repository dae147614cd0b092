"""Heat-map overlays: which images to show, and one figure per image (shared by ``medattn
report``, ``medattn viz`` and ``medattn predict --heatmaps``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medattn import figures
from medattn import metrics as M
from medattn.boxes import source_to_view
from hpc.inference import ImagePrediction


def select_samples(ds: Any, indices: Sequence[int], n: int, eval_labels: Sequence[str]) -> list[int]:
    """Up to ``n`` sample indices to show, deterministic: first images with ground-truth boxes
    (taking the box classes in turn, so one class does not fill the page), then images positive
    for an evaluated class (classes in turn), then the rest, each in index order.

    Args:
        ds: the PreparedDataset. indices: the candidates (e.g. the evaluated split).
        n: how many. eval_labels: the classes that count as findings.
    """
    indices = [int(i) for i in indices]
    if n <= 0 or not indices:
        return []
    names = list(ds.label_names)
    labels = ds.labels_matrix()
    chosen: list[int] = []
    taken: set[int] = set()

    def round_robin(groups: dict[str, list[int]]) -> None:
        queues = {k: list(v) for k, v in groups.items() if v}
        while queues and len(chosen) < n:
            for k in list(queues):
                q = queues[k]
                while q and q[0] in taken:
                    q.pop(0)
                if not q:
                    del queues[k]
                    continue
                i = q.pop(0)
                chosen.append(i)
                taken.add(i)
                if len(chosen) >= n:
                    return

    by_box: dict[str, list[int]] = {}
    for i in indices:
        for b in ds.boxes(i):
            by_box.setdefault(str(b["label"]), []).append(i)
    round_robin(dict(sorted(by_box.items())))
    by_label: dict[str, list[int]] = {}
    for name in eval_labels:
        if name in names:
            j = names.index(name)
            by_label[name] = [i for i in indices if labels[i, j] > 0]
    round_robin(by_label)
    for i in indices:
        if len(chosen) >= n:
            break
        if i not in taken:
            chosen.append(i)
            taken.add(i)
    return chosen


def image_iobb(pred: ImagePrediction, gt_xyxy: np.ndarray) -> np.ndarray:
    """IoBB (|P∩G|/|P|) of the image's attention box against each of its GT boxes."""
    if pred.box is None or len(gt_xyxy) == 0:
        return np.zeros(0)
    p = np.repeat(np.asarray(pred.box, np.float64).reshape(1, 4), len(gt_xyxy), 0)
    return M.box_iobb(p, gt_xyxy, fmt="xyxy")


def prob_text(pred: ImagePrediction, label_names: Sequence[str], classes: Sequence[str], branch: str | None = None
              ) -> str:
    """``"Effusion 0.91, Mass 0.40"`` for ``classes`` from ``branch`` (default: the last branch)."""
    branch = branch or list(pred.probs)[-1]
    p = pred.probs[branch]
    return ", ".join(f"{c} {p[list(label_names).index(c)]:.2f}" for c in classes)


def top_classes(pred: ImagePrediction, label_names: Sequence[str], eval_labels: Sequence[str], k: int = 3
                ) -> list[str]:
    branch = list(pred.probs)[-1]
    p = pred.probs[branch]
    names = list(label_names)
    cand = [c for c in eval_labels if c in names]
    return sorted(cand, key=lambda c: -p[names.index(c)])[:k]


def draw(pred: ImagePrediction, path: str | Path, title: str, gt_xyxy: np.ndarray, gt_labels: Sequence[str],
         dpi: int = 100) -> Path:
    """Write the overlay figure of one image (image | heat map | overlay | local crop)."""
    view = pred.view[..., 0] if pred.view.ndim == 3 and pred.view.shape[2] == 1 else pred.view
    h, w = view.shape[:2]
    heat = pred.heatmap if pred.heatmap is not None else np.zeros((h, w))
    fig = figures.overlay_panel(
        view, heat, attn_box=pred.view_box,
        gt_boxes=list(source_to_view(np.asarray(gt_xyxy, np.float64).reshape(-1, 4),
                                     np.asarray(pred.window, np.float64))) or None,
        gt_labels=list(gt_labels) or None, title=title, crop=pred.crop,
        crop_title="local branch input (crop)", path=path, dpi=dpi)
    del fig
    return Path(path)
