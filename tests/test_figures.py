"""medattn.figures: every figure is saved, reloaded from the PNG and checked for content; the
overlay's boxes are found at the expected pixels."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from medattn import figures as F
from medattn import metrics as M
from medattn.data.labels import DISEASES, NIH_LABELS


def _load(path) -> np.ndarray:
    """The PNG as an (H, W, 3) uint8 array."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _assert_not_blank(px: np.ndarray, min_colors: int = 10) -> None:
    assert px.std() > 5.0, "figure looks blank (no pixel variance)"
    colors = np.unique(px.reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, f"only {len(colors)} distinct colours"


def _assert_size(px: np.ndarray, fig, dpi: int) -> None:
    w, h = fig.get_size_inches() * dpi
    assert px.shape[:2] == (round(h), round(w))
    assert 200 <= px.shape[0] <= 4000 and 200 <= px.shape[1] <= 4000


def _texts(fig) -> list[str]:
    out = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts]
        out.append(ax.get_title())
    return out


# --------------------------------------------------------------------------------------------
# ROC grid
# --------------------------------------------------------------------------------------------
def test_plot_roc_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((1500, 15)) < 0.1).astype(int)
    p = np.clip(rng.random((1500, 15)) * 0.7 + 0.3 * y, 0, 1)
    ci = M.bootstrap_auroc_ci(p, y, NIH_LABELS, DISEASES, n_boot=100)
    out = tmp_path / "figs" / "roc.png"  # the parent directory is created
    fig = F.plot_roc_curves(p, y, NIH_LABELS, DISEASES, "AG-CNN fusion", ci=ci, path=out, dpi=60)
    px = _load(out)
    _assert_size(px, fig, 60)
    _assert_not_blank(px)
    # 14 panels in a 4 x 4 grid; the two spare panels are hidden.
    assert len(fig.axes) == 16 and sum(ax.get_visible() and ax.axison for ax in fig.axes) == 14
    texts = _texts(fig)
    for j, name in enumerate(DISEASES):
        auc = M.auroc(p[:, j], y[:, j])
        lo, hi = ci.per_class[name]
        assert f"AUROC {auc:.3f}\n[{lo:.3f}, {hi:.3f}]" in texts
    assert any(t.startswith("AG-CNN fusion — mean AUROC") and f"{ci.mean_estimate:.3f}" in t
               for t in texts)
    # No Finding is not drawn.
    assert not any(t.startswith("No Finding") for t in texts)


def test_plot_roc_curves_undefined_class_and_dict_ci(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random((400, 3)) < 0.3).astype(int)
    y[:, 1] = 0
    p = rng.random((400, 3))
    fig = F.plot_roc_curves(p, y, ["a", "b", "c"], ci={"a": (0.4, 0.6)}, ncols=3,
                            path=tmp_path / "r.png", dpi=60)
    texts = _texts(fig)
    assert "AUROC undefined\n(no positives)" in texts
    assert any(t.startswith("AUROC") and "[0.400, 0.600]" in t for t in texts)
    _assert_not_blank(_load(tmp_path / "r.png"))
    with pytest.raises(ValueError, match="shape"):
        F.plot_roc_curves(p, y[:, :2], ["a", "b", "c"])


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------
def _records():
    recs = []
    for s, off in (("global", 0.0), ("local", 0.05), ("fusion", 0.1)):
        for e in range(6):
            recs.append({"stage": s, "epoch": e, "train/loss": 1.0 / (e + 1) + off,
                         "val/loss": 1.2 / (e + 1) + off, "lr": 0.01})
            recs.append({"stage": s, "epoch": e, "val/mean_auroc": 0.7 + 0.01 * e + off})
    recs.append({"stage": "global", "step": 17, "train/loss": 9.0})  # no epoch: skipped
    recs.append({"stage": "global", "epoch": 5, "val/mean_auroc": 0.99})  # re-logged: last wins
    return recs


def test_plot_training_curves(tmp_path):
    fig = F.plot_training_curves(_records(), title="run 42", path=tmp_path / "t.png", dpi=80)
    px = _load(tmp_path / "t.png")
    _assert_size(px, fig, 80)
    _assert_not_blank(px)
    ax_loss, ax_metric = fig.axes[:2]
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert set(lines) == {f"{s} {k}" for s in ("global", "local", "fusion")
                          for k in ("train/loss", "val/loss")}
    np.testing.assert_allclose(lines["local train/loss"].get_ydata(),
                               [1.0 / (e + 1) + 0.05 for e in range(6)])
    assert max(lines["global train/loss"].get_ydata()) < 9.0
    stages = {ln.get_label(): ln for ln in ax_metric.get_lines()
              if not ln.get_label().startswith("_")}
    assert set(stages) == {"global", "local", "fusion"}
    assert stages["global"].get_ydata()[-1] == 0.99
    # One colour per stage, shared by both panels and taken from the colour-blind-safe palette.
    colors = {s: stages[s].get_color() for s in stages}
    assert len(set(colors.values())) == 3 and set(colors.values()) <= set(F.OKABE_ITO)
    assert lines["fusion val/loss"].get_color() == colors["fusion"]
    # reduce="mean" averages records of one stage and epoch (here: the two global epoch-5 AUROCs).
    fig = F.plot_training_curves(_records(), reduce="mean")
    mean_lines = {ln.get_label(): ln for ln in fig.axes[1].get_lines()}
    assert mean_lines["global"].get_ydata()[-1] == pytest.approx((0.75 + 0.99) / 2)


def test_plot_training_curves_missing_metric_and_empty(tmp_path):
    recs = [{"epoch": e, "train/loss": 1.0 / (e + 1)} for e in range(4)]
    fig = F.plot_training_curves(recs, path=tmp_path / "t.png", dpi=60)
    assert "no val/mean_auroc in the records" in _texts(fig)
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["train train/loss"]
    _assert_not_blank(_load(tmp_path / "t.png"))
    with pytest.raises(ValueError, match="no records"):
        F.plot_training_curves([])


# --------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------
def test_plot_metric_vs_param(tmp_path):
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"tau": rng.uniform(0.3, 0.9, 24), "lam": rng.choice([0.1, 0.5, 1.0], 24)})
    df["best_auroc"] = 0.8 - (df["tau"] - 0.7) ** 2
    df.loc[3, "best_auroc"] = np.nan  # a failed trial
    fig = F.plot_metric_vs_param(df, "tau", "best_auroc", hue="lam", path=tmp_path / "s.png",
                                 dpi=80)
    _assert_not_blank(_load(tmp_path / "s.png"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tau" and ax.get_ylabel() == "best_auroc"
    assert ax.get_title() == "best_auroc vs tau (23 trials)"
    star = ax.collections[-1].get_offsets()[0]
    best = df["best_auroc"].idxmax()
    np.testing.assert_allclose(star, [df.loc[best, "tau"], df.loc[best, "best_auroc"]])
    assert len(ax.collections) == 4  # three lam groups + the best-trial star
    assert ax.get_xscale() == "linear"


def test_plot_metric_vs_param_log_and_categorical(tmp_path):
    rows = [{"lr": lr, "opt": opt, "auc": 0.7 + 0.01 * i}
            for i, (lr, opt) in enumerate([(1e-4, "sgd"), (1e-3, "adam"), (1e-2, "sgd"),
                                           (1e-1, "adamw")])]
    fig = F.plot_metric_vs_param(rows, "lr", "auc", path=tmp_path / "a.png", dpi=60)
    assert fig.axes[0].get_xscale() == "log"
    fig = F.plot_metric_vs_param(rows, "opt", "auc", maximize=False, path=tmp_path / "b.png",
                                 dpi=60)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sgd", "adam", "adamw"]
    np.testing.assert_allclose(ax.collections[-1].get_offsets()[0], [0, 0.7])  # minimum
    for name in ("a.png", "b.png"):
        _assert_not_blank(_load(tmp_path / name))
    with pytest.raises(ValueError, match="'gamma' not in the table"):
        F.plot_metric_vs_param(rows, "gamma", "auc")


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------
def _pixel(ax, x: float, y: float, height: int) -> tuple[int, int]:
    """(row, col) in the saved PNG of data point (x, y) of ``ax`` (valid after the save).

    Display coordinates are at the figure's own dpi; the PNG's height tells the saved dpi.
    """
    fig = ax.get_figure()
    scale = height / (fig.get_size_inches()[1] * fig.dpi)
    X, Y = ax.transData.transform((x, y)) * scale
    return int(round(height - Y)), int(round(X))


def _edge_hits(px: np.ndarray, ax, p0, p1, color: str, n: int = 40, tol: float = 60.0,
               radius: int = 2) -> float:
    """Fraction of n points along the segment p0-p1 (data coordinates) that have a pixel
    within ``tol`` (RGB distance) of ``color`` within ``radius`` pixels."""
    target = np.array(to_rgb(color)) * 255
    hits = 0
    for t in np.linspace(0.1, 0.9, n):  # keep away from the corners
        r, c = _pixel(ax, p0[0] + t * (p1[0] - p0[0]), p0[1] + t * (p1[1] - p0[1]), px.shape[0])
        patch = px[r - radius:r + radius + 1, c - radius:c + radius + 1].astype(float)
        hits += bool(np.any(np.linalg.norm(patch - target, axis=-1) < tol))
    return hits / n


def _box_edges(b):
    x0, y0, x1, y1 = b
    return [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1))]


def test_overlay_panel_draws_boxes_where_expected(tmp_path):
    h, w = 200, 300  # not square, so swapped x/y would show
    yy, xx = np.mgrid[0:h, 0:w]
    image = (40 + 120 * xx / w).astype(np.uint8)
    heat = np.zeros((14, 14))
    heat[3:7, 2:6] = 1.0
    attn = [0.1, 0.2, 0.5, 0.8]  # normalised xyxy
    gt = [0.6, 0.1, 0.9, 0.4]
    out = tmp_path / "overlay.png"
    fig = F.overlay_panel(image, heat, attn_box=attn, gt_boxes=[gt], gt_labels=["Mass"],
                          title="00000001_000.png", path=out, dpi=100)
    px = _load(out)
    _assert_size(px, fig, 100)
    _assert_not_blank(px)
    ax = fig.axes[2]
    attn_px = [attn[0] * w, attn[1] * h, attn[2] * w, attn[3] * h]
    gt_px = [gt[0] * w, gt[1] * h, gt[2] * w, gt[3] * h]
    for p0, p1 in _box_edges(attn_px):  # solid line: found all along the edge
        assert _edge_hits(px, ax, p0, p1, F.ATTENTION_BOX_COLOR) > 0.9
    for p0, p1 in _box_edges(gt_px)[1:]:  # dashed (the top edge carries the label)
        assert _edge_hits(px, ax, p0, p1, F.GT_BOX_COLOR) > 0.4
    styles = {p.get_edgecolor()[:3]: p.get_linestyle() for p in ax.patches}
    assert styles == {to_rgb(F.ATTENTION_BOX_COLOR): "-", to_rgb(F.GT_BOX_COLOR): "--"}
    # Neither colour where there is no box: the middle of each box and a spot between them.
    for b in (attn_px, gt_px):
        mid = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
        for color in (F.ATTENTION_BOX_COLOR, F.GT_BOX_COLOR):
            assert _edge_hits(px, ax, mid, (mid[0] + 1, mid[1]), color, n=5) == 0
    assert _edge_hits(px, ax, (0.55 * w, 0.6 * h), (0.55 * w, 0.9 * h), F.GT_BOX_COLOR) == 0
    # No box is drawn on the plain image or the plain heat map.
    for other in fig.axes[:2]:
        assert _edge_hits(px, other, (attn_px[0], attn_px[1] + 20), (attn_px[0], attn_px[3] - 20),
                          F.ATTENTION_BOX_COLOR) == 0
    assert "Mass" in _texts(fig) or " Mass" in _texts(fig)


def test_overlay_panel_box_conventions_give_the_same_picture(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.random((120, 160))  # float in [0, 1]
    heat = rng.random((7, 7))
    xyxy = [0.25, 0.25, 0.75, 0.5]
    xywh = [0.25, 0.25, 0.5, 0.25]
    pix = [40, 30, 120, 60]  # xyxy in pixels of a 160 x 120 image
    F.overlay_panel(image, heat, attn_box=xyxy, gt_boxes=[xyxy], path=tmp_path / "a.png", dpi=50)
    F.overlay_panel(image, heat, attn_box=xywh, gt_boxes=[xywh], box_format="xywh",
                    path=tmp_path / "b.png", dpi=50)
    F.overlay_panel(image, heat, attn_box=pix, gt_boxes=[pix], normalized=False,
                    path=tmp_path / "c.png", dpi=50)
    a, b, c = (_load(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_overlay_panel_on_a_real_nih_image(tmp_path, shared_nih):
    """A real 1024 x 1024 radiograph with its real Cardiomegaly box (BBox_List_2017, xywh px)."""
    name = "00001369_000.png"
    if not (shared_nih / "images" / name).is_file():
        pytest.skip(f"{name} not in the shared images")
    bb = pd.read_csv(shared_nih / "BBox_List_2017.csv")
    row = bb[bb["Image Index"] == name].iloc[0]
    box = row.iloc[2:6].to_numpy(dtype=float)  # x, y, w, h in pixels
    with Image.open(shared_nih / "images" / name) as im:
        image = np.asarray(im.convert("L"))
    yy, xx = np.mgrid[0:32, 0:32] * 32.0 + 16
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    heat = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 150.0 ** 2))
    out = tmp_path / "real.png"
    fig = F.overlay_panel(image, heat, gt_boxes=[box / 1024], gt_labels=[row["Finding Label"]],
                          box_format="xywh", title=name, path=out, dpi=80)
    px = _load(out)
    _assert_not_blank(px, min_colors=100)
    x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    for p0, p1 in _box_edges([x0, y0, x1, y1])[1:]:
        assert _edge_hits(px, fig.axes[2], p0, p1, F.GT_BOX_COLOR) > 0.4


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=np.zeros((4, 4, 2))), "image"),
    (dict(heatmap=np.zeros((2, 2, 2))), "heatmap"),
    (dict(heatmap=np.full((2, 2), 1.5)), r"\[0, 1\]"),
    (dict(heatmap=np.full((2, 2), np.nan)), "NaN"),
    (dict(attn_box=[0.5, 0.5, 0.1, 0.1]), "negative width"),
    (dict(gt_boxes=[[0, 0, 1, 1]], gt_labels=["a", "b"]), "2 names for 1"),
])
def test_overlay_panel_bad_input(kwargs, match):
    args = dict(image=np.zeros((4, 4)), heatmap=np.zeros((2, 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        F.overlay_panel(**args)


# --------------------------------------------------------------------------------------------
# overlap distribution
# --------------------------------------------------------------------------------------------
def test_plot_iobb_distribution(tmp_path):
    rng = np.random.default_rng(4)
    values = {"Mass": rng.random(40), "Nodule": rng.random(25) ** 3,
              "Cardiomegaly": rng.random(60) ** 0.3, "Hernia": []}
    fig = F.plot_iobb_distribution(values, title="AG-CNN attention box vs NIH boxes",
                                   path=tmp_path / "d.png", dpi=70)
    px = _load(tmp_path / "d.png")
    _assert_size(px, fig, 70)
    _assert_not_blank(px)
    ax_box, ax_hist = fig.axes
    labels = [t.get_text() for t in ax_box.get_xticklabels()]
    assert labels == ["Mass\n(n=40)", "Nodule\n(n=25)", "Cardiomegaly\n(n=60)"]  # empty skipped
    allv = np.concatenate([values[k] for k in ("Mass", "Nodule", "Cardiomegaly")])
    legend = [t.get_text() for t in ax_hist.get_legend().get_texts()]
    assert legend[1] == f"T=0.25: {np.mean(allv > 0.25):.0%} > T"
    assert sum(p.get_height() for p in ax_hist.patches) == 125
    with pytest.raises(ValueError, match="no values"):
        F.plot_iobb_distribution({"Mass": []})


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def test_save_figure_is_atomic_and_readable(tmp_path):
    fig = F.plot_iobb_distribution({"Mass": [0.1, 0.5, 0.9]})
    out = F.save_figure(fig, tmp_path / "deep" / "dir" / "x.png", dpi=40)
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["x.png"]
    assert out.stat().st_mode & 0o044  # not a private temp file: group/others may read it
    px = _load(out)
    w, h = fig.get_size_inches() * 40
    assert px.shape[:2] == (round(h), round(w))
    assert not math.isnan(px.mean())
