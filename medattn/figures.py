"""Figures for evaluations and run reports: ROC grids, training curves, sweep scatters,
attention overlays and localisation-overlap distributions.

Every function builds a :class:`matplotlib.figure.Figure` directly (never ``pyplot``: no global
figure registry, no GUI backend, nothing shown, safe in worker processes and threads) and
returns it; pass ``path=`` to also write a PNG at ``dpi``. The file is written to a temporary
name beside ``path`` and renamed, so a crash never leaves half a PNG.

Colours come from the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies) and heat maps use ``inferno`` (perceptually uniform, readable in grey scale).
Figures keep a fixed layout (no ``bbox_inches="tight"``), so a saved PNG has exactly
``figsize * dpi`` pixels and data coordinates map to predictable pixels.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from medattn import metrics as M
from medattn.boxes import denormalize, to_xyxy

__all__ = [
    "OKABE_ITO", "ATTENTION_BOX_COLOR", "GT_BOX_COLOR", "HEATMAP_CMAP", "save_figure",
    "plot_roc_curves", "plot_training_curves", "plot_metric_vs_param", "overlay_panel",
    "plot_iobb_distribution", "plot_reliability",
]

# Okabe & Ito (2008), "Color Universal Design": eight colours distinguishable by people with
# protanopia, deuteranopia and tritanopia. Black is last so that lines get colours first.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#CC79A7",  # reddish purple
    "#F0E442",  # yellow
    "#000000",  # black
)
# On an inferno heat map (black-purple-red-yellow) a cool colour stands out; the two boxes also
# differ in line style (solid attention box, dashed ground truth) for readers who cannot tell
# the colours apart.
ATTENTION_BOX_COLOR = "#56B4E9"  # sky blue
GT_BOX_COLOR = "#009E73"  # bluish green
HEATMAP_CMAP = "inferno"
CHANCE_COLOR = "#999999"


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG at ``dpi`` atomically (temporary file, then rename).

    Parent directories are created. Returns the path written.
    """
    from medattn.fileio import atomic_file

    path = Path(path)
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white")
    return path


def _finish(fig: Figure, path: str | os.PathLike | None, dpi: int) -> Figure:
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def _grid(n: int, ncols: int | None) -> tuple[int, int]:
    if ncols is None:
        ncols = min(n, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / ncols), ncols


# --------------------------------------------------------------------------------------------
# ROC curves
# --------------------------------------------------------------------------------------------
def plot_roc_curves(probs: Any, labels: Any, label_names: Sequence[str],
                    eval_labels: Sequence[str] | None = None, title: str | None = None, *,
                    ci: M.BootstrapCI | Mapping[str, tuple[float, float]] | None = None,
                    ncols: int | None = None, panel_size: float = 2.6,
                    path: str | os.PathLike | None = None, dpi: int = 150) -> Figure:
    """A grid of per-class ROC curves, each panel titled with the class and its AUROC.

    Args:
        probs: (N, L) scores. labels: (N, L) 0/1 targets.
        label_names: the L column names.
        eval_labels: the classes to draw (default all), e.g. the 14 diseases.
        title: the figure title; the mean AUROC over the drawn classes is appended.
        ci: per-class confidence intervals (a :class:`~medattn.metrics.BootstrapCI` or
            ``{name: (lo, hi)}``), shown beside each AUROC.
        ncols: panels per row (default about the square root of the number of classes).
        panel_size: inches per panel. path, dpi: save a PNG.

    A class with no positives (or no negatives) gets a panel that says so instead of a curve.
    """
    p = M._scores(probs, "probs", ndim=2)
    y = M._binary_labels(labels, "labels", ndim=2)
    if p.shape != y.shape:
        raise ValueError(f"probs has shape {p.shape} but labels has shape {y.shape}")
    names = M._names(label_names, p.shape[1])
    drawn = M._eval_names(names, eval_labels)
    if not drawn:
        raise ValueError("eval_labels is empty: nothing to plot")
    intervals = ci.per_class if isinstance(ci, M.BootstrapCI) else (ci or {})
    nrows, ncols = _grid(len(drawn), ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    aucs = {}
    for k, name in enumerate(drawn):
        ax = axes.flat[k]
        j = names.index(name)
        n_pos = int(y[:, j].sum())
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=CHANCE_COLOR)
        ax.set_title(f"{name} (n+={n_pos})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        if n_pos == 0 or n_pos == y.shape[0]:
            aucs[name] = math.nan
            why = "no positives" if n_pos == 0 else "no negatives"
            ax.text(0.5, 0.5, f"AUROC undefined\n({why})", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
            continue
        fpr, tpr, _ = M.roc_curve_points(p[:, j], y[:, j])
        auc = M.auroc(p[:, j], y[:, j], name=name)
        aucs[name] = auc
        ax.plot(fpr, tpr, color=OKABE_ITO[0], lw=1.5)
        text = f"AUROC {auc:.3f}"
        if name in intervals and not any(math.isnan(v) for v in intervals[name]):
            lo, hi = intervals[name]
            text += f"\n[{lo:.3f}, {hi:.3f}]"
        ax.text(0.97, 0.04, text, ha="right", va="bottom", fontsize=8, transform=ax.transAxes,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
    for ax in axes.flat[len(drawn):]:
        ax.set_axis_off()
    for ax in axes[-1]:
        ax.set_xlabel("False positive rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("True positive rate")
    defined = [v for v in aucs.values() if not math.isnan(v)]
    mean_txt = f"mean AUROC {np.mean(defined):.3f} over {len(defined)} classes" if defined else ""
    fig.suptitle(f"{title} — {mean_txt}" if title and mean_txt else (title or mean_txt or "ROC"))
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------
def _series(records: Sequence[Mapping[str, Any]], key: str, reduce: str = "last"
            ) -> dict[str, tuple[list, list]]:
    """``{stage: (epochs, values)}`` for ``key``; several records of one stage and epoch are
    reduced to the last one or to their mean."""
    by_stage: dict[str, dict[float, list[float]]] = {}
    for r in records:
        if key not in r or r.get("epoch") is None:
            continue
        v = r[key]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        stage = str(r.get("stage", "train"))
        by_stage.setdefault(stage, {}).setdefault(float(r["epoch"]), []).append(float(v))
    pick = (lambda vs: vs[-1]) if reduce == "last" else (lambda vs: float(np.mean(vs)))
    return {s: (sorted(d), [pick(d[e]) for e in sorted(d)]) for s, d in by_stage.items()}


def plot_training_curves(records: Sequence[Mapping[str, Any]], *,
                         loss_keys: Sequence[str] = ("train/loss", "val/loss"),
                         metric_key: str = "val/mean_auroc", reduce: str = "last",
                         title: str | None = None, path: str | os.PathLike | None = None,
                         dpi: int = 150) -> Figure:
    """Loss and validation metric per epoch, one colour per stage.

    Args:
        records: dicts like a run's epoch records (hpc.run.Run.records), e.g.
            ``{"stage": "global", "epoch": 3, "train/loss": 0.21, "val/mean_auroc": 0.80}``.
            Records without ``epoch`` or without a key are skipped for that key. Missing
            ``stage`` = "train".
        loss_keys: keys drawn in the left panel (solid, dashed, dotted in this order).
        metric_key: key drawn in the right panel.
        reduce: several records of one stage and epoch (per-step lines, or an epoch logged
            again after a requeue) give ``"last"`` (default: the value the run ended with) or
            ``"mean"`` (e.g. the epoch's mean training loss from per-step lines).
        title: figure title. path, dpi: save a PNG.

    Stages keep their own epoch axis (AG-CNN's global, local and fusion each count from 0),
    so lines of different stages overlap in x; colours tell them apart. A panel with no data
    says so.
    """
    records = list(records)
    if not records:
        raise ValueError("plot_training_curves: no records")
    if reduce not in ("last", "mean"):
        raise ValueError(f"reduce must be 'last' or 'mean', got {reduce!r}")
    stages = list(dict.fromkeys(str(r.get("stage", "train")) for r in records))
    color = {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(stages)}
    styles = ("-", "--", ":", "-.")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    drawn = False
    for i, key in enumerate(loss_keys):
        for stage, (ep, val) in _series(records, key, reduce).items():
            ax_loss.plot(ep, val, ls=styles[i % len(styles)], marker="o", ms=3, color=color[stage],
                         label=f"{stage} {key}")
            drawn = True
    if not drawn:
        ax_loss.text(0.5, 0.5, f"no {' / '.join(loss_keys)} in the records", ha="center",
                     va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("Loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    series = _series(records, metric_key, reduce)
    for stage, (ep, val) in series.items():
        ax_metric.plot(ep, val, marker="o", ms=3, color=color[stage], label=stage)
        b = int(np.argmax(val))
        ax_metric.plot([ep[b]], [val[b]], marker="*", ms=11, color=color[stage], ls="none")
    if not series:
        ax_metric.text(0.5, 0.5, f"no {metric_key} in the records", ha="center", va="center",
                       transform=ax_metric.transAxes)
    ax_metric.set_title(f"{metric_key} (★ best per stage)" if series else metric_key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(metric_key.split("/")[-1])
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------
def plot_metric_vs_param(df: Any, param: str, metric: str, *, hue: str | None = None,
                         log_x: bool | None = None, maximize: bool = True,
                         title: str | None = None, path: str | os.PathLike | None = None,
                         dpi: int = 150) -> Figure:
    """Scatter of a metric (e.g. each trial's best ``val/mean_auroc``) against a swept parameter.

    Args:
        df: a pandas DataFrame, or a list of dicts, one row per trial.
        param: the column on the x axis (numeric, or categorical: one x position per value).
        metric: the column on the y axis. Rows where it is missing/NaN are left out.
        hue: an optional column that colours the points (e.g. another swept parameter).
        log_x: log-scale x (default: when a positive numeric parameter spans >= 2 decades).
        maximize: whether the best trial (marked with a star) has the highest metric.
        title: figure title. path, dpi: save a PNG.
    """
    import pandas as pd

    frame = df if isinstance(df, pd.DataFrame) else pd.DataFrame(list(df))
    for col in (param, metric) + ((hue,) if hue else ()):
        if col not in frame.columns:
            raise ValueError(f"column {col!r} not in the table (columns: {list(frame.columns)})")
    frame = frame[frame[metric].notna()]
    if frame.empty:
        raise ValueError(f"no rows with a value for {metric!r}")
    yv = frame[metric].to_numpy(dtype=np.float64)
    kind = frame[param]
    numeric = pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind)
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    if numeric:
        xv = frame[param].to_numpy(dtype=np.float64)
        if log_x is None:
            pos = xv[np.isfinite(xv)]
            log_x = bool(pos.size and pos.min() > 0 and pos.max() / pos.min() >= 100)
    else:
        cats = list(dict.fromkeys(frame[param].astype(str)))
        xv = np.array([cats.index(v) for v in frame[param].astype(str)], dtype=np.float64)
        ax.set_xticks(range(len(cats)), cats)
        log_x = False
    if hue:
        groups = list(dict.fromkeys(frame[hue].astype(str)))
        hv = frame[hue].astype(str).to_numpy()
        for i, g in enumerate(groups):
            sel = hv == g
            ax.scatter(xv[sel], yv[sel], s=28, color=OKABE_ITO[i % len(OKABE_ITO)], alpha=0.85,
                       label=f"{hue}={g}", edgecolors="white", linewidths=0.5)
    else:
        ax.scatter(xv, yv, s=28, color=OKABE_ITO[0], alpha=0.85, edgecolors="white",
                   linewidths=0.5, label="trial")
    b = int(np.argmax(yv) if maximize else np.argmin(yv))
    ax.scatter([xv[b]], [yv[b]], marker="*", s=220, color=OKABE_ITO[1], zorder=3,
               label=f"best {yv[b]:.4g} at {param}={_fmt(frame[param].iloc[b])}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs {param} ({len(frame)} trials)")
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------------
# Attention overlays
# --------------------------------------------------------------------------------------------
def _box_pixels(box: Any, fmt: str, normalized: bool, w: int, h: int) -> np.ndarray:
    b = to_xyxy(box, fmt).reshape(4)
    return denormalize(b, h, w) if normalized else b


def _draw_box(ax, b: np.ndarray, color: str, ls: str, label: str | None = None) -> None:
    ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor=color,
                           lw=2.0, ls=ls, label=label))


def overlay_panel(image: Any, heatmap: Any, attn_box: Any = None,
                  gt_boxes: Sequence[Any] | None = None, title: str | None = None, *,
                  gt_labels: Sequence[str] | None = None, box_format: str = "xyxy",
                  normalized: bool = True, alpha: float = 0.45, crop: Any = None,
                  crop_title: str = "local branch input (crop)",
                  path: str | os.PathLike | None = None, dpi: int = 150) -> Figure:
    """A 1 x 3 panel: image | heat map | image with the heat map, attention box and GT boxes
    (1 x 4 with ``crop``: the attention crop, e.g. what AG-CNN's local branch sees).

    Args:
        image: (H, W) grey image, uint8 (0-255) or float (shown from its min to its max; [0, 1]
            floats are shown as 0-1), or (H, W, 3) RGB.
        heatmap: (h, w) attention in [0, 1], any size: it is stretched over the image.
        attn_box: the attention (crop) box, drawn solid in :data:`ATTENTION_BOX_COLOR`.
        gt_boxes: ground-truth boxes, drawn dashed in :data:`GT_BOX_COLOR` and labelled with
            ``gt_labels`` when given.
        title: figure title.
        box_format: ``"xyxy"`` ([x0, y0, x1, y1], default) or ``"xywh"`` ([x, y, w, h], the
            prepared manifest's convention); x to the right, y down, origin top-left.
        normalized: box coordinates are fractions of the image width/height (default; the
            prepared manifest stores boxes so); ``False`` = pixels of ``image``.
        alpha: opacity of the heat map in the overlay.
        crop: an optional fourth panel, (h, w) or (h, w, 3) like ``image`` (uint8 0-255 or float),
            titled ``crop_title``. path, dpi: save a PNG.
    """
    img = M._as_array(image, "image")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"image: expected (H, W) or (H, W, 3), got shape {img.shape}")
    hm = M._as_array(heatmap, "heatmap", dtype=np.float64)
    if hm.ndim != 2:
        raise ValueError(f"heatmap: expected (h, w), got shape {hm.shape}")
    if not np.all(np.isfinite(hm)):
        raise ValueError("heatmap: contains NaN or inf")
    if hm.size and (hm.min() < -1e-6 or hm.max() > 1 + 1e-6):
        raise ValueError(f"heatmap: values must be in [0, 1], got [{hm.min():.4g}, {hm.max():.4g}]")
    if gt_labels is not None and gt_boxes is not None and len(gt_labels) != len(gt_boxes):
        raise ValueError(f"gt_labels has {len(gt_labels)} names for {len(gt_boxes)} gt_boxes")
    h, w = img.shape[:2]
    if img.dtype == np.uint8:
        vmin, vmax = 0, 255
    else:
        img = img.astype(np.float64)
        vmin, vmax = float(img.min()), float(img.max())
        if vmin >= 0.0 and vmax <= 1.0:
            vmin, vmax = 0.0, 1.0
    extent = (0, w, h, 0)  # pixel edges: x right, y down

    crop_img = None
    if crop is not None:
        crop_img = M._as_array(crop, "crop")
        if crop_img.ndim == 3 and crop_img.shape[2] == 1:
            crop_img = crop_img[..., 0]
        if crop_img.ndim not in (2, 3) or (crop_img.ndim == 3 and crop_img.shape[2] not in (3, 4)):
            raise ValueError(f"crop: expected (h, w) or (h, w, 3), got shape {crop_img.shape}")
    fig = Figure(figsize=(16, 4.4) if crop_img is not None else (12, 4.4), layout="constrained")
    axes = fig.subplots(1, 4 if crop_img is not None else 3)
    grey = dict(cmap="gray", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest") \
        if img.ndim == 2 else dict(extent=extent)
    axes[0].imshow(img, **grey)
    axes[0].set_title("image")
    im = axes[1].imshow(np.clip(hm, 0, 1), cmap=HEATMAP_CMAP, vmin=0, vmax=1, extent=extent,
                        interpolation="bilinear")
    axes[1].set_title("attention heat map")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    axes[2].imshow(img, **grey)
    axes[2].imshow(np.clip(hm, 0, 1), cmap=HEATMAP_CMAP, vmin=0, vmax=1, extent=extent,
                   interpolation="bilinear", alpha=alpha)
    axes[2].set_title("overlay")
    if attn_box is not None:
        _draw_box(axes[2], _box_pixels(attn_box, box_format, normalized, w, h),
                  ATTENTION_BOX_COLOR, "-", "attention box")
    for i, gb in enumerate(gt_boxes or ()):
        b = _box_pixels(gb, box_format, normalized, w, h)
        _draw_box(axes[2], b, GT_BOX_COLOR, "--", "ground truth" if i == 0 else None)
        if gt_labels is not None:
            axes[2].text(b[0], b[1], f" {gt_labels[i]}", color="white", fontsize=8, va="bottom",
                         ha="left", bbox=dict(boxstyle="square,pad=0.1", fc=GT_BOX_COLOR,
                                              ec="none", alpha=0.9), clip_on=True)
    if attn_box is not None or gt_boxes:
        axes[2].legend(loc="lower right", fontsize=7, framealpha=0.8)
    for ax in axes[:3]:
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    if crop_img is not None:
        ch, cw = crop_img.shape[:2]
        if crop_img.ndim == 2:
            lo, hi = (0, 255) if crop_img.dtype == np.uint8 else (
                (0.0, 1.0) if crop_img.min() >= 0 and crop_img.max() <= 1 else (crop_img.min(), crop_img.max()))
            axes[3].imshow(crop_img, cmap="gray", vmin=lo, vmax=hi, extent=(0, cw, ch, 0), interpolation="nearest")
        else:
            axes[3].imshow(crop_img, extent=(0, cw, ch, 0))
        axes[3].set_title(crop_title)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------------
# Localisation overlaps
# --------------------------------------------------------------------------------------------
def plot_iobb_distribution(values_by_class: Mapping[str, Any], *, metric_name: str = "IoBB",
                           thresholds: Sequence[float] = (0.1, 0.25, 0.5), title: str | None = None,
                           path: str | os.PathLike | None = None, dpi: int = 150) -> Figure:
    """Distribution of per-box overlaps (IoBB or IoU): a box plot per class (with the boxes'
    values as points) and a histogram of all values, with reference lines at ``thresholds``.

    Args:
        values_by_class: ``{class: overlaps in [0, 1]}``, e.g. grouped
            :attr:`~medattn.metrics.LocalizationResult.overlaps`. Empty classes are skipped.
        metric_name: the axis label ("IoBB" or "IoU").
        thresholds: T values marked as dashed lines (Wang et al. use 0.1-0.9).
        title: figure title. path, dpi: save a PNG.
    """
    data = {str(k): M._as_array(v, f"values_by_class[{k!r}]", dtype=np.float64).ravel()
            for k, v in values_by_class.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    data = {k: v for k, v in data.items() if v.size}
    if not data:
        raise ValueError("plot_iobb_distribution: no values")
    names = list(data)
    fig = Figure(figsize=(max(8.0, 4.5 + 0.6 * len(names)), 4.2), layout="constrained")
    ax_box, ax_hist = fig.subplots(1, 2, width_ratios=[max(1.0, len(names) / 4), 1])
    ax_box.boxplot([data[k] for k in names], widths=0.6, showfliers=False,
                   medianprops=dict(color=OKABE_ITO[1], lw=1.5))
    rng = np.random.default_rng(0)  # fixed jitter: the same data always gives the same figure
    for i, k in enumerate(names, start=1):
        x = i + rng.uniform(-0.18, 0.18, size=data[k].size)
        ax_box.scatter(x, data[k], s=8, color=OKABE_ITO[0], alpha=0.5, linewidths=0)
    ax_box.set_xticks(range(1, len(names) + 1), [f"{k}\n(n={data[k].size})" for k in names],
                      rotation=30 if len(names) > 4 else 0, fontsize=8)
    ax_box.set_ylabel(metric_name)
    ax_box.set_ylim(-0.02, 1.02)
    ax_box.set_title(f"{metric_name} per class")
    allv = np.concatenate(list(data.values()))
    ax_hist.hist(allv, bins=np.linspace(0, 1, 21), color=OKABE_ITO[0], edgecolor="white")
    ax_hist.set_xlabel(metric_name)
    ax_hist.set_ylabel("boxes")
    ax_hist.set_title(f"all classes (n={allv.size})")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    # Threshold lines avoid blue (the data) and vermillion (the medians).
    line_colors = [OKABE_ITO[k] for k in (2, 3, 5, 7, 4, 6)]
    for i, t in enumerate(thresholds):
        c = line_colors[i % len(line_colors)]
        acc = float(np.mean(allv > t))
        ax_box.axhline(t, ls="--", lw=0.8, color=c)
        ax_hist.axvline(t, ls="--", lw=1.0, color=c, label=f"T={t:g}: {acc:.0%} > T")
    if thresholds:
        ax_hist.legend(fontsize=8)
    for ax in (ax_box, ax_hist):
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return _finish(fig, path, dpi)


# --------------------------------------------------------------------------------------------
# reliability diagram
# --------------------------------------------------------------------------------------------
def plot_reliability(curves: Mapping[str, Mapping[str, Any]], *, title: str = "Reliability diagram",
                     path: str | os.PathLike | None = None, dpi: int = 110) -> Figure:
    """Observed frequency against mean predicted probability per bin, one line per curve (e.g.
    ``{"before": ..., "after T": ...}``, each the ``reliability`` data of
    :func:`medattn.metrics.calibration_summary`: ``confidence``, ``frequency``, ``count``, ``ece``),
    with the diagonal of perfect calibration and, below, how many predictions fall in each bin."""
    fig = Figure(figsize=(5.2, 5.6))
    ax = fig.add_axes((0.13, 0.34, 0.82, 0.58))
    hx = fig.add_axes((0.13, 0.08, 0.82, 0.17))
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    width = None
    for i, (name, r) in enumerate(curves.items()):
        conf = np.array([np.nan if v is None else v for v in r["confidence"]], np.float64)
        freq = np.array([np.nan if v is None else v for v in r["frequency"]], np.float64)
        ok = ~np.isnan(conf)
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ece = r.get("ece")
        ax.plot(conf[ok], freq[ok], "o-", color=color, ms=4, lw=1.5,
                label=f"{name} (ECE {ece:.3f})" if ece is not None else name)
        n_bins = len(r["count"])
        width = 1.0 / n_bins
        centers = (np.arange(n_bins) + 0.5) * width
        hx.bar(centers + (i - 0.5) * width * 0.4 * (len(curves) > 1), r["count"], width=width * 0.4 if len(curves) > 1
               else width * 0.9, color=color, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    hx.set_xlim(0, 1)
    hx.set_yscale("symlog")
    hx.set_ylabel("count", fontsize=8)
    hx.tick_params(labelsize=7)
    return _finish(fig, path, dpi)
