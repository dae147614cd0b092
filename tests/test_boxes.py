"""medattn.boxes: round trips, hand-computed values, and the same numbers as the helpers it
replaced (attention._scale_xy / normalize_boxes / map_boxes_to_source, agcnn.map_boxes,
views.view_boxes, gradcam.lung_box_in_view's arithmetic, inference._to_view,
overlays.gt_boxes / to_view, metrics.to_xyxy, _images.mask_box), whose formulas are
written out below as the references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc.syncs import count_syncs
from medattn import boxes as B
from medattn.gradcam import lung_box_in_view

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def random_xyxy(rng: np.random.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    a = rng.uniform(lo, hi, size=(n, 2, 2))
    a.sort(axis=1)  # x0 <= x1, y0 <= y1
    return np.stack([a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1]], 1)


def windows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Views' windows as the loaders draw them: float32, at least 0.2 of the image each way."""
    w = rng.uniform(0.2, 1.0, size=(n, 2))
    x0 = rng.uniform(0, 1 - w[:, 0])
    y0 = rng.uniform(0, 1 - w[:, 1])
    return np.stack([x0, y0, x0 + w[:, 0], y0 + w[:, 1]], 1).astype(np.float32)


# ------------------------------------------------------------------------------ formats
def test_xywh_xyxy_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    xyxy = random_xyxy(rng, 50)
    xywh = B.xyxy_to_xywh(xyxy)
    np.testing.assert_array_equal(xywh[:, :2], xyxy[:, :2])
    np.testing.assert_allclose(B.xywh_to_xyxy(xywh), xyxy, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(B.xywh_to_xyxy(np.array([1.0, 2, 3, 4])), [1, 2, 4, 6])  # one box
    t = torch.from_numpy(xyxy)
    torch.testing.assert_close(B.xyxy_to_xywh(t), torch.from_numpy(xywh), rtol=0, atol=0)
    torch.testing.assert_close(B.xywh_to_xyxy(B.xyxy_to_xywh(t)), t, rtol=0, atol=1e-15)
    assert B.xywh_to_xyxy(np.zeros((0, 4))).shape == (0, 4)


def test_to_xyxy_matches_the_old_metrics_helper_and_checks():
    rng = np.random.default_rng(1)
    xywh = np.concatenate([rng.uniform(0, 900, (30, 2)), rng.uniform(0, 100, (30, 2))], 1)
    old = np.concatenate([xywh[..., :2], xywh[..., :2] + xywh[..., 2:]], axis=-1)
    np.testing.assert_array_equal(B.to_xyxy(xywh, "xywh"), old)
    np.testing.assert_array_equal(B.to_xyxy(torch.from_numpy(old), "xyxy"), old)
    for box, fmt, match in (([0, 0, 1, 1], "cxcywh", "not one of"), ([0, 0, -1, 1], "xywh", "negative"),
                            ([0, 0, 1], "xyxy", "4"), ([0, 0, np.nan, 1], "xyxy", "non-finite")):
        with pytest.raises(ValueError, match=match):
            B.to_xyxy(box, fmt)


def test_records_xyxy_matches_the_old_report_helper():
    recs = [{"label": "Mass", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4},
            {"label": "Nodule", "x": 0.55, "y": 0.05, "w": 0.1, "h": 0.15}]
    got, labels = B.records_xyxy(recs)
    old = np.array([[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in recs], dtype=np.float64)
    np.testing.assert_array_equal(got, old)
    assert labels == ["Mass", "Nodule"]
    got, labels = B.records_xyxy(recs, ["Nodule"])
    np.testing.assert_array_equal(got, old[1:])
    assert labels == ["Nodule"]
    got, labels = B.records_xyxy(recs, [])
    assert got.shape == (0, 4) and labels == []


# ------------------------------------------------------------------------------ units
def test_normalise_denormalise_round_trip_and_old_scale_xy():
    rng = np.random.default_rng(2)
    px = random_xyxy(rng, 40, 0, 224).astype(np.float32)
    t = torch.from_numpy(px)
    n = B.normalize(t, 180, 224)
    # The old attention._scale_xy: a float32 copy, x divided by w and y by h in place.
    ref = t.to(torch.float32, copy=True)
    ref.view(-1, 2, 2)[..., 0].div_(224.0)
    ref.view(-1, 2, 2)[..., 1].div_(180.0)
    assert n.dtype == torch.float32 and torch.equal(n, ref)
    torch.testing.assert_close(B.denormalize(n, 180, 224), t)
    assert t.tolist() == px.tolist()  # the input is not touched
    # numpy: float64, same arithmetic; figures' old `b * [w, h, w, h]`
    b = px.astype(np.float64)
    np.testing.assert_array_equal(B.denormalize(b, 180, 224), b * np.array([224, 180, 224, 180], np.float64))
    np.testing.assert_allclose(B.normalize(B.denormalize(b, 180, 224), 180, 224), b, rtol=1e-15)
    torch.testing.assert_close(B.normalize(torch.tensor([[5.0, 3, 6, 4]]), 7, 9),
                               torch.tensor([[5 / 9, 3 / 7, 6 / 9, 4 / 7]]))
    # xywh scales the same way (columns 0, 2 with x; 1, 3 with y): BBox_List pixels of the 1024² original
    xywh = np.array([[512.0, 256, 128, 64]])
    np.testing.assert_array_equal(B.normalize(xywh, 1024, 2048), [[0.25, 0.25, 0.0625, 0.0625]])
    np.testing.assert_allclose(B.xywh_to_xyxy(B.normalize(xywh, 1024, 2048)),
                               B.normalize(B.xywh_to_xyxy(xywh), 1024, 2048), rtol=1e-15)


def test_pixel_window_is_the_loaders_rounding():
    def old(win, s):  # views.render_views / inference._window_pixels
        x0, y0, x1, y1 = (float(v) for v in win)
        left, top = int(round(x0 * s)), int(round(y0 * s))
        return left, top, max(left + 1, int(round(x1 * s))), max(top + 1, int(round(y1 * s)))

    rng = np.random.default_rng(3)
    for win in list(windows(rng, 200)) + [np.array([0.5, 0.5, 0.5, 0.5], np.float32)]:
        for s in (7, 64, 512):
            assert B.pixel_window(win, s, s) == old(win, s)
    assert B.pixel_window([0.25, 0.5, 0.75, 1.0], 64, 32) == (8, 32, 24, 64)


def test_mask_bounds_and_mask_xywh_match_the_old_mask_box():
    def old(a):  # _images.mask_box after decoding (and methods.lungseg.box_of_mask)
        h, w = a.shape[:2]
        rows = np.flatnonzero(a.any(axis=1))
        cols = np.flatnonzero(a.any(axis=0))
        if len(rows) == 0:
            return None
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
        return [x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h]

    rng = np.random.default_rng(4)
    for _ in range(50):
        m = rng.random((int(rng.integers(3, 40)), int(rng.integers(3, 40)))) < rng.uniform(0, 0.05)
        assert B.mask_xywh(m) == old(m)  # exact, including the None of an empty mask
    m = np.zeros((10, 20), bool)
    m[2:5, 3:9] = True
    assert B.mask_bounds(m) == (3, 2, 9, 5)
    assert B.mask_xywh(m) == [3 / 20, 2 / 10, 6 / 20, 3 / 10]
    assert B.mask_bounds(np.zeros((4, 4))) is None


# ------------------------------------------------------------------------------ views
def test_mirror_matches_the_old_view_boxes():
    rng = np.random.default_rng(5)
    win = windows(rng, 64)
    flip = rng.random(64) < 0.5
    old = win.copy()
    old[flip, 0] = 1 - win[flip, 2]
    old[flip, 2] = 1 - win[flip, 0]
    got = B.mirror(win, flip)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, old)
    np.testing.assert_allclose(B.mirror(got, flip), win, rtol=0, atol=1e-7)  # an involution (up to rounding)
    torch.testing.assert_close(B.mirror(torch.from_numpy(win), torch.from_numpy(flip)), torch.from_numpy(old),
                               rtol=0, atol=0)


def test_view_to_source_matches_the_old_helpers():
    rng = np.random.default_rng(6)
    n = 64
    boxes = torch.from_numpy(random_xyxy(rng, n).astype(np.float32))
    vb = torch.from_numpy(windows(rng, n))
    flip = torch.from_numpy(rng.random(n) < 0.5)
    # agcnn.map_boxes: no flip (the source is flipped like the view)
    x0, y0, x1, y1 = vb.unbind(-1)
    w, h = (x1 - x0).unsqueeze(-1), (y1 - y0).unsqueeze(-1)
    old = torch.stack([x0, y0, x0, y0], -1) + boxes * torch.cat([w, h, w, h], -1)
    assert torch.equal(B.view_to_source(boxes, vb), old)
    # attention.map_boxes_to_source with flip
    vw, vh = vb[:, 2] - vb[:, 0], vb[:, 3] - vb[:, 1]
    ox0 = torch.where(flip, vb[:, 2] - boxes[:, 2] * vw, vb[:, 0] + boxes[:, 0] * vw)
    ox1 = torch.where(flip, vb[:, 2] - boxes[:, 0] * vw, vb[:, 0] + boxes[:, 2] * vw)
    old = torch.stack([ox0, vb[:, 1] + boxes[:, 1] * vh, ox1, vb[:, 1] + boxes[:, 3] * vh], 1)
    got = B.view_to_source(boxes, vb, flip)
    assert torch.equal(got, old) and bool((got[:, 0] <= got[:, 2]).all())
    # numpy gives the same numbers
    np.testing.assert_array_equal(B.view_to_source(boxes.numpy(), vb.numpy(), flip.numpy()), old.numpy())
    # hand-computed: a 0.4 x 0.8 view at (0.2, 0.1), mirrored in the second row
    view = torch.tensor([[0.2, 0.1, 0.6, 0.9]] * 2)
    box = torch.tensor([[0.0, 0.5, 0.25, 1.0]] * 2)
    torch.testing.assert_close(B.view_to_source(box, view, torch.tensor([False, True])),
                               torch.tensor([[0.2, 0.5, 0.3, 0.9], [0.5, 0.5, 0.6, 0.9]]))


@pytest.mark.parametrize("flipped", [False, True])
def test_view_source_view_round_trip(flipped):
    rng = np.random.default_rng(7 + flipped)
    n = 100
    boxes = random_xyxy(rng, n)
    win = windows(rng, n).astype(np.float64)
    flip = (rng.random(n) < 0.5) if flipped else None
    src = B.view_to_source(boxes, win, flip)
    np.testing.assert_allclose(B.source_to_view(src, win, flip), boxes, rtol=0, atol=1e-12)
    t = torch.from_numpy(boxes)
    tf = None if flip is None else torch.from_numpy(flip)
    back = B.source_to_view(B.view_to_source(t, torch.from_numpy(win), tf), torch.from_numpy(win).float(), tf)
    torch.testing.assert_close(back, t.float(), rtol=0, atol=1e-5)
    # source -> view -> source
    s = random_xyxy(rng, n)
    np.testing.assert_allclose(B.view_to_source(B.source_to_view(s, win, flip), win, flip), s, rtol=0, atol=1e-12)


def test_source_to_view_matches_the_old_report_helpers():
    rng = np.random.default_rng(9)
    n = 32
    boxes = random_xyxy(rng, n).astype(np.float32)  # the prediction's boxes, as infer gets them
    vb = windows(rng, n)
    # inference._to_view
    w = (vb[:, 2] - vb[:, 0])[:, None]
    h = (vb[:, 3] - vb[:, 1])[:, None]
    off = np.stack([vb[:, 0], vb[:, 1], vb[:, 0], vb[:, 1]], 1)
    old = (boxes - off) / np.concatenate([w, h, w, h], 1)
    got = B.source_to_view(boxes, vb)
    assert got.dtype == old.dtype
    np.testing.assert_array_equal(got, old)
    # overlays.to_view: one window for every GT box, float64
    gt = random_xyxy(rng, 5)
    win = vb[0].astype(np.float64)
    x0, y0, x1, y1 = (float(v) for v in win)
    old = (gt - np.array([x0, y0, x0, y0])) / np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    np.testing.assert_array_equal(B.source_to_view(gt, win), old)
    assert B.source_to_view(np.zeros((0, 4)), win).shape == (0, 4)


def test_lung_box_in_view_matches_its_old_arithmetic():
    rng = np.random.default_rng(10)
    n = 64
    lung = torch.from_numpy(B.xyxy_to_xywh(random_xyxy(rng, n))).float()
    lung[3] = float("nan")
    win = torch.from_numpy(windows(rng, n))
    flip = torch.from_numpy(rng.random(n) < 0.5)
    b = lung.float()
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    sx, sy = (win[:, 2] - win[:, 0]).clamp_min(1e-6), (win[:, 3] - win[:, 1]).clamp_min(1e-6)
    x0, x1 = (x0 - win[:, 0]) / sx, (x1 - win[:, 0]) / sx
    y0, y1 = (y0 - win[:, 1]) / sy, (y1 - win[:, 1]) / sy
    x0, x1 = torch.where(flip, 1 - x1, x0), torch.where(flip, 1 - x0, x1)
    old = torch.stack([x0, y0, x1, y1], 1).clamp(0, 1)
    old[3] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.equal(lung_box_in_view(lung, win, flip), old)


def test_torch_conversions_do_not_sync():
    """The conversions the training step runs stay on the device: no sync, no host tensor."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(16, 4, generator=g).sort(dim=1).values[:, [0, 1, 2, 3]]
    vb = torch.rand(16, 4, generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    lung = torch.rand(16, 4, generator=g)
    with count_syncs() as c:
        B.view_to_source(boxes, vb, flip)
        B.source_to_view(boxes, vb, flip)
        B.denormalize(B.normalize(boxes, 7, 9), 7, 9)
        B.xyxy_to_xywh(B.xywh_to_xyxy(boxes))
        lung_box_in_view(lung, vb, flip)
    assert c.syncs == 0 and c.host_tensors == 0, c.sync_ops
    assert c.ops > 0
