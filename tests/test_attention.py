"""AG-CNN attention ops on hand-made maps with hand-computed answers (medattn.attention)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from hpc.syncs import count_syncs
from medattn.attention import (attention_boxes, component_schedule, connected_components, crop_and_resize,
                               heatmap, largest_component_box, otsu_threshold, threshold_mask)
from medattn.boxes import normalize, view_to_source


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# --------------------------------------------------------------------------------------------
# heat map
# --------------------------------------------------------------------------------------------
def two_channel_map() -> torch.Tensor:
    """(1, 2, 7, 7): three hot cells where max|f|, mean|f| and sum f disagree."""
    f = torch.zeros(1, 2, 7, 7)
    f[0, 0, 2, 3], f[0, 1, 2, 3] = -4.0, 1.0  # max|f| 4, mean|f| 2.5, sum -3
    f[0, 1, 5, 5] = 3.0                        # max|f| 3, mean|f| 1.5, sum 3
    f[0, 0, 0, 0], f[0, 1, 0, 0] = 2.0, 2.0    # max|f| 2, mean|f| 2,   sum 4
    return f


def expected_map(cells: dict[tuple[int, int], float], rest: float = 0.0) -> torch.Tensor:
    h = torch.full((1, 7, 7), rest)
    for (r, c), v in cells.items():
        h[0, r, c] = v
    return h


def test_heatmap_max_is_eq3_minmax_scaled():
    h = heatmap(two_channel_map(), "max", "minmax")
    torch.testing.assert_close(h, expected_map({(2, 3): 1.0, (5, 5): 0.75, (0, 0): 0.5}))


def test_heatmap_l1_l2_sum_differ_from_max():
    f = two_channel_map()
    torch.testing.assert_close(heatmap(f, "l1"), expected_map({(2, 3): 1.0, (5, 5): 0.6, (0, 0): 0.8}))
    s17 = math.sqrt(17.0)
    torch.testing.assert_close(heatmap(f, "l2"),
                               expected_map({(2, 3): 1.0, (5, 5): 3 / s17, (0, 0): math.sqrt(8) / s17}))
    # sum: -3, 3, 4 and 0 elsewhere; minmax: (v + 3) / 7 -> the hottest cell moves to (0, 0)
    torch.testing.assert_close(heatmap(f, "sum", "minmax"),
                               expected_map({(2, 3): 0.0, (5, 5): 6 / 7, (0, 0): 1.0}, rest=3 / 7))
    # max-only scaling (seed 001): v / 4, negatives clipped
    torch.testing.assert_close(heatmap(f, "sum", "max"), expected_map({(2, 3): 0.0, (5, 5): 0.75, (0, 0): 1.0}))


def test_heatmap_max_scaling_and_per_image():
    f = torch.cat([two_channel_map(), 10 * two_channel_map()])
    h = heatmap(f, "max", "max")  # 4, 3, 2, 0 -> / 4
    torch.testing.assert_close(h[0], expected_map({(2, 3): 1.0, (5, 5): 0.75, (0, 0): 0.5})[0])
    torch.testing.assert_close(h[1], h[0])  # scaled per image, not per batch


def test_heatmap_constant_maps_are_zero_without_nan():
    f = torch.stack([torch.full((3, 5, 5), 2.5), torch.zeros(3, 5, 5), torch.full((3, 5, 5), -1.0)])
    for mode in ("max", "l1", "l2", "sum"):
        for scale in ("minmax", "max"):
            h = heatmap(f, mode, scale)
            assert torch.equal(h, torch.zeros(3, 5, 5)), (mode, scale)
    # all-negative signed map under max-only scaling: nothing positive -> zeros
    neg = -torch.rand(1, 2, 4, 4) - 0.1
    assert torch.equal(heatmap(neg, "sum", "max"), torch.zeros(1, 4, 4))


def test_heatmap_bf16_input_gives_float32_in_unit_range():
    h = heatmap(torch.randn(2, 8, 7, 7).bfloat16(), "max")
    assert h.dtype == torch.float32 and h.min() == 0 and h.max() == 1


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="heatmap='mean'"):
        heatmap(torch.zeros(1, 1, 2, 2), "mean")


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def test_eq4_mask_tau_is_strict():
    h = heatmap(two_channel_map(), "max")  # 1, 0.75, 0.5
    m = threshold_mask(h, 0.7)
    assert m.sum() == 2 and m[0, 2, 3] and m[0, 5, 5] and not m[0, 0, 0]
    assert threshold_mask(torch.tensor([[[0.7, 0.7001]]]), 0.7).tolist() == [[[False, True]]]


def reference_otsu(levels: np.ndarray) -> int:
    """Otsu as cv2 computes it (a plain loop over 256 thresholds, first maximum wins)."""
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64) / levels.size
    mu_t = float((np.arange(256) * hist).sum())
    q1 = mu1_sum = 0.0
    best, best_t = 0.0, 0
    for t in range(256):
        q1 += hist[t]
        mu1_sum += t * hist[t]
        q2 = 1.0 - q1
        if min(q1, q2) < 1e-7 or max(q1, q2) > 1.0 - 1e-7:
            continue
        mu1, mu2 = mu1_sum / q1, (mu_t - mu1_sum) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
        if sigma > best:
            best, best_t = sigma, t
    return best_t


def test_otsu_on_a_bimodal_map():
    h = torch.full((1, 8, 8), 0.2)
    h[0, 2:6, 1:7] = 0.8  # levels floor(51.0)=51 and floor(204.0)=204
    t = otsu_threshold(h)
    assert t.tolist() == [51]  # any t in [51, 203] separates; the first maximum wins
    m = threshold_mask(h, method="otsu")
    assert torch.equal(m, h > 0.5)


def test_otsu_batched_equals_reference_loop():
    g = torch.Generator().manual_seed(1)
    lo = 0.25 + 0.05 * torch.randn(5, 30, 30, generator=g)
    hi = 0.7 + 0.1 * torch.randn(5, 30, 30, generator=g)
    pick = torch.rand(5, 30, 30, generator=g) < torch.linspace(0.1, 0.6, 5).view(5, 1, 1)
    h = torch.where(pick, hi, lo).clamp(0, 1)
    t = otsu_threshold(h)
    levels = (h * 255).floor().long().numpy()
    assert t.tolist() == [reference_otsu(levels[i]) for i in range(5)]
    # a constant map has no threshold: t = 0, and a zero map gives an empty mask
    assert otsu_threshold(torch.zeros(1, 4, 4)).tolist() == [0]
    assert not threshold_mask(torch.zeros(1, 4, 4), method="otsu").any()


# --------------------------------------------------------------------------------------------
# connected components
# --------------------------------------------------------------------------------------------
def same_partition(ours: np.ndarray, ref: np.ndarray) -> bool:
    if not np.array_equal(ours == 0, ref == 0):
        return False
    fg = ours > 0
    pairs = set(zip(ours[fg].tolist(), ref[fg].tolist()))
    return len(pairs) == len(np.unique(ours[fg])) == len(np.unique(ref[fg]))


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_connected_components_match_scipy(connectivity, density):
    g = torch.Generator().manual_seed(int(density * 100) + connectivity)
    mask = torch.rand(8, 41, 37, generator=g) < density
    labels = connected_components(mask, connectivity).numpy()
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for i in range(len(mask)):
        ref, _ = ndimage.label(mask[i].numpy(), structure=structure)
        assert same_partition(labels[i], ref), i


def test_connected_components_long_snake_and_spiral():
    # Worst cases for label propagation: one 1-pixel-wide path through the whole map.
    n = 48
    snake = np.zeros((n, n), bool)
    snake[::2] = True
    for r in range(1, n, 2):
        snake[r, n - 1 if (r // 2) % 2 == 0 else 0] = True
    spiral = np.zeros((n, n), bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        spiral[top, left:right + 1] = True
        spiral[top:bottom + 1, right] = True
        spiral[bottom, left:right + 1] = True
        spiral[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    masks = torch.from_numpy(np.stack([snake, spiral, ~snake]))
    labels = connected_components(masks).numpy()
    for i in range(3):
        ref, _ = ndimage.label(masks[i].numpy(), structure=np.ones((3, 3)))
        assert same_partition(labels[i], ref)
    assert len(np.unique(labels[0][labels[0] > 0])) == 1  # the snake is one region


def test_diagonal_neighbours_depend_on_connectivity():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = True
    assert len(connected_components(m, 8).unique()) == 2  # background + one region
    assert len(connected_components(m, 4).unique()) == 3


STRUCTURES = {8: np.ones((3, 3), int), 4: ndimage.generate_binary_structure(2, 1)}


def assert_matches_scipy(masks: torch.Tensor, connectivity: int) -> None:
    labels = connected_components(masks, connectivity)
    assert labels.dtype == torch.int64 and labels.shape == masks.shape
    labels = labels.numpy()
    for i in range(len(masks)):
        ref, _ = ndimage.label(masks[i].numpy(), structure=STRUCTURES[connectivity])
        assert same_partition(labels[i], ref), (connectivity, tuple(masks.shape), i)


def blob_masks(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Thresholded smoothed noise: a few large regions with ragged edges, as heat maps give."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, h, w, generator=g)
    for _ in range(3):
        x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    x = x.squeeze(1)
    keep = torch.rand(b, generator=g) * 0.6 + 0.2  # keep 20-80 % of each map
    cut = x.flatten(1).quantile(1 - keep, dim=1).diagonal()  # image i at its own quantile
    return x > cut.view(b, 1, 1)


def noisy_masks(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.linspace(0.3, 0.6, b).view(b, 1, 1)
    return torch.rand(b, h, w, generator=g) < p


def snake(n: int, m: int | None = None) -> np.ndarray:
    """One 1-pixel path through every other row, turning at alternate ends (a boustrophedon)."""
    m = m or n
    a = np.zeros((n, m), bool)
    a[::2] = True
    for r in range(1, n, 2):
        a[r, m - 1 if (r // 2) % 2 == 0 else 0] = True
    return a


def spiral(n: int) -> np.ndarray:
    """A 1-pixel spiral corridor from the border to the centre, 1-pixel walls (one path for 8-conn)."""
    a = np.zeros((n, n), bool)
    r, c, dr, dc = 0, 0, 0, 1
    a[0, 0] = True
    while True:
        moved = False
        for _ in range(4):
            r1, c1, r2, c2 = r + dr, c + dc, r + 2 * dr, c + 2 * dc
            # step if the cell after next is free and inside: keeps a wall between turns
            if 0 <= r2 < n and 0 <= c2 < n and not a[r2, c2] and not a[r1, c1]:
                a[r1, c1] = a[r2, c2] = True
                r, c = r2, c2
                moved = True
                break
            dr, dc = dc, -dr  # turn right
        if not moved:
            return a


def maze(n: int, seed: int) -> np.ndarray:
    """A random perfect maze (spanning tree of the cells at even coordinates), 1-pixel corridors."""
    rng = np.random.default_rng(seed)
    cells = (n + 1) // 2
    a = np.zeros((n, n), bool)
    seen = np.zeros((cells, cells), bool)
    stack = [(0, 0)]
    seen[0, 0] = True
    a[0, 0] = True
    while stack:
        i, j = stack[-1]
        nxt = [(i + di, j + dj) for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0))
               if 0 <= i + di < cells and 0 <= j + dj < cells and not seen[i + di, j + dj]]
        if not nxt:
            stack.pop()
            continue
        k, m = nxt[rng.integers(len(nxt))]
        seen[k, m] = True
        a[2 * k, 2 * m] = a[i + k, j + m] = True  # the cell and the wall between
        stack.append((k, m))
    return a


def diagonal_zigzag(n: int) -> np.ndarray:
    """Diagonal strokes joined only corner to corner: one region for 8-connectivity, pixels for 4."""
    a = np.zeros((n, n), bool)
    for r in range(n):
        a[r, r % (2 * (n // 2)) if (r // (n // 2)) % 2 == 0 else (n // 2) - 1 - r % (n // 2)] = True
    return a


def adversarial_masks(n: int) -> torch.Tensor:
    check = (np.add.outer(np.arange(n), np.arange(n)) % 2).astype(bool)
    sn = snake(n)
    masks = [sn, sn[::-1].copy(), sn.T.copy(), spiral(n), spiral(n)[::-1, ::-1].copy(), maze(n, 0), maze(n, 1).T.copy(),
             check, ~check, np.ones((n, n), bool), np.zeros((n, n), bool), diagonal_zigzag(n), ~sn]
    return torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (13, 17), (224, 224)])
@pytest.mark.parametrize("b", [1, 16])
def test_components_equal_scipy_on_blobs_and_noise(connectivity, hw, b):
    seed = hw[0] * 1000 + hw[1] + b + connectivity
    assert_matches_scipy(blob_masks(b, *hw, seed), connectivity)
    assert_matches_scipy(noisy_masks(b, *hw, seed + 1), connectivity)


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("n", [64, 224])
def test_components_equal_scipy_on_adversarial_shapes(connectivity, n):
    masks = adversarial_masks(n)
    assert_matches_scipy(masks, connectivity)
    labels = connected_components(masks, connectivity)
    for i in (0, 3, 5):  # snake, spiral, maze: each one region whatever the connectivity
        assert len(labels[i][labels[i] > 0].unique()) == 1, i
    if connectivity == 8:
        assert len(labels[7][labels[7] > 0].unique()) == 1  # checkerboard: one region through corners
    else:
        assert len(labels[7][labels[7] > 0].unique()) == n * n // 2  # every square alone
    assert (labels[10] == 0).all() and (labels[9] > 0).all() and len(labels[9].unique()) == 1


def test_components_small_and_odd_maps():
    for hw in [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (13, 17)]:
        for connectivity in (8, 4):
            masks = torch.cat([noisy_masks(8, *hw, sum(hw)), torch.ones(1, *hw, dtype=torch.bool),
                               torch.zeros(1, *hw, dtype=torch.bool)])
            assert_matches_scipy(masks, connectivity)


def test_adversarial_maze_needs_several_rounds(monkeypatch):
    # The fixed schedule is a worst-case bound; this checks the mazes are hard enough that a
    # schedule cut to 3 of its 13 rounds gets them wrong (they need 5-6 here).
    import medattn.attention as attention

    masks = adversarial_masks(224)[5:7]
    assert_matches_scipy(masks, 8)
    full = attention.component_schedule
    monkeypatch.setattr(attention, "component_schedule", lambda n0: full(n0)[:3])
    with pytest.raises(AssertionError):
        assert_matches_scipy(masks, 8)


def test_component_schedule_is_the_proven_bound():
    # floor(log2 N0) rounds; round k runs ceil(log2 floor(N0 / 2^k)) pointer jumps
    assert component_schedule(1) == [] and component_schedule(2) == [1] and component_schedule(3) == [2]
    s = component_schedule(112 * 112)  # 224x224, 8-connectivity: 2x2 blocks
    assert len(s) == 13 == int(math.log2(112 * 112)) and sum(s) == 104 and s[0] == 14 and s[-1] == 2
    for n0 in range(1, 300):
        s = component_schedule(n0)
        assert len(s) == (n0.bit_length() - 1)
        assert s == [math.ceil(math.log2(n0 // 2 ** k)) for k in range(len(s))]


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------
def test_single_pixel_box_is_on_pixel_edges():
    m = torch.zeros(1, 7, 9, dtype=torch.bool)
    m[0, 3, 5] = True
    boxes, empty = largest_component_box(m)
    assert boxes.tolist() == [[5.0, 3.0, 6.0, 4.0]] and empty.tolist() == [False]
    torch.testing.assert_close(normalize(boxes, 7, 9), torch.tensor([[5 / 9, 3 / 7, 6 / 9, 4 / 7]]))


def test_two_blobs_largest_and_all():
    m = torch.zeros(2, 20, 30, dtype=torch.bool)
    m[:, 2:5, 3:6] = True        # 3x3 = 9 pixels
    m[:, 10:18, 20:24] = True    # 8x4 = 32 pixels: the largest
    m[1, 0, 29] = True           # an extra isolated pixel in image 1
    boxes, empty = largest_component_box(m, "largest")
    assert boxes.tolist() == [[20, 10, 24, 18], [20, 10, 24, 18]] and not empty.any()
    union, _ = largest_component_box(m, "all")
    assert union.tolist() == [[3, 2, 24, 18], [3, 0, 30, 18]]


def test_tie_goes_to_the_first_region_in_raster_order():
    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, 6:8, 0:2] = True   # starts on row 6
    m[0, 1:3, 7:9] = True   # starts on row 1: first in raster order
    boxes, _ = largest_component_box(m)
    assert boxes.tolist() == [[7, 1, 9, 3]]


def test_empty_mask_gives_the_whole_image_and_a_flag():
    m = torch.zeros(3, 6, 8, dtype=torch.bool)
    m[1, 2, 2] = True
    for component in ("largest", "all"):
        boxes, empty = largest_component_box(m, component)
        assert empty.tolist() == [True, False, True]
        assert boxes[0].tolist() == [0, 0, 8, 6] and boxes[2].tolist() == [0, 0, 8, 6]
        assert boxes[1].tolist() == [2, 2, 3, 3]


def reference_box(feat: np.ndarray, tau: float, size: int) -> list[float]:
    """One image, the obvious way: numpy heat map, torch resize, scipy labels, numpy box (pixels)."""
    h = np.abs(feat).max(axis=0)
    lo, hi = h.min(), h.max()
    h = (h - lo) / (hi - lo) if hi - lo > 1e-6 * max(abs(hi), abs(lo)) else np.zeros_like(h)
    h = F.interpolate(torch.from_numpy(h).float()[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)[0, 0].numpy()
    lab, n = ndimage.label(h > tau, structure=np.ones((3, 3)))
    if n == 0:
        return [0, 0, size, size]
    counts = np.bincount(lab.ravel())[1:]
    rows, cols = np.nonzero(lab == int(np.argmax(counts)) + 1)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_attention_boxes_batched_equals_per_sample_reference():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(12, 6, 7, 7, generator=g)
    feats[0] = 0.0  # constant -> empty mask -> the whole image
    feats[1, :, 1, 1] = 9.0  # one dominant cell
    for tau in (0.3, 0.7, 0.9):
        boxes, heat, empty = attention_boxes(feats, tau=tau, size=56, return_empty=True)
        ref = torch.tensor([reference_box(feats[i].numpy(), tau, 56) for i in range(len(feats))])
        assert torch.equal(boxes, normalize(ref, 56, 56)), tau
        assert heat.shape == (12, 56, 56) and empty[0]
    # boxes are in [0, 1] and non-degenerate
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2] > boxes[:, 0]).all()


def reference_largest_box(mask: np.ndarray, connectivity: int) -> list[int]:
    """scipy labels in raster order of first pixels; the first of the largest wins (argmax)."""
    lab, n = ndimage.label(mask, structure=STRUCTURES[connectivity])
    if n == 0:
        return [0, 0, mask.shape[1], mask.shape[0]]
    rows, cols = np.nonzero(lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("connectivity", [8, 4])
def test_largest_component_box_equals_scipy(connectivity):
    for hw in [(1, 1), (7, 7), (13, 17), (224, 224)]:
        ties = torch.zeros(2, *hw, dtype=torch.bool)  # equal regions: the first in raster order wins
        ties[:, -1, -1] = ties[:, 0, 0] = True
        masks = torch.cat([blob_masks(16, *hw, 5), noisy_masks(16, *hw, 6), ties])
        if hw == (224, 224):
            masks = torch.cat([masks, adversarial_masks(224)])
        boxes, empty = largest_component_box(masks, "largest", connectivity)
        ref = [reference_largest_box(m.numpy(), connectivity) for m in masks]
        assert boxes.tolist() == ref, hw
        assert empty.tolist() == [not m.any() for m in masks]


def test_attention_and_crops_never_sync():
    """No op of the attention path makes the host wait for the GPU: no .item(), torch.equal,
    nonzero, boolean-mask indexing, cross-device copy, nor tensor built from Python data."""
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(16, 8, 7, 7, generator=g)
    feats[0] = 0.0  # an empty mask
    images = torch.rand(16, 3, 224, 224, generator=g)
    hires = torch.randint(0, 256, (16, 1, 512, 512), dtype=torch.uint8, generator=g)
    for threshold in ("tau", "otsu"):
        for component in ("largest", "all"):
            with count_syncs() as c:
                boxes, heat, empty = attention_boxes(feats, tau=0.7, threshold=threshold, component=component,
                                                     size=224, return_empty=True)
                crops = crop_and_resize(images, boxes, 224)
                crops_hi = crop_and_resize(hires, view_to_source(boxes, boxes), 224)
            assert c.syncs == 0 and c.host_tensors == 0, (threshold, component, c.sync_ops)
            assert c.ops > 0 and crops.shape == (16, 3, 224, 224) and crops_hi.shape == (16, 1, 224, 224)
            assert bool(empty[0]) and boxes[0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_attention_boxes_at_feature_resolution():
    f = two_channel_map()
    boxes, heat = attention_boxes(f, tau=0.7, size=None)  # 7x7, no resize (seed 001)
    assert heat.shape == (1, 7, 7)
    # (2,3) and (5,5) pass; they are not 8-connected; both are single cells; the first wins
    torch.testing.assert_close(boxes, torch.tensor([[3 / 7, 2 / 7, 4 / 7, 3 / 7]]))
    union, _ = attention_boxes(f, tau=0.7, component="all")
    torch.testing.assert_close(union, torch.tensor([[3 / 7, 2 / 7, 6 / 7, 6 / 7]]))


# --------------------------------------------------------------------------------------------
# crops
# --------------------------------------------------------------------------------------------
def ramp(h: int, w: int, c: int = 1) -> torch.Tensor:
    """I[ch, y, x] = x + 1000 y + 10^6 ch: every pixel says where it is."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([x + 1000 * y + 1e6 * ch for ch in range(c)])


def test_crop_at_native_size_returns_the_exact_pixels():
    img = ramp(32, 48, c=2)[None]
    box = normalize(torch.tensor([[8.0, 4.0, 24.0, 20.0]]), 32, 48)  # 16 x 16 pixels
    crop = crop_and_resize(img, box, 16)
    torch.testing.assert_close(crop, img[:, :, 4:20, 8:24])
    whole = crop_and_resize(img, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), (32, 48))
    torch.testing.assert_close(whole, img)


def test_crop_upscale_samples_pixel_centres_bilinearly():
    img = ramp(32, 32)[None]
    box = normalize(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), 32, 32)
    crop = crop_and_resize(img, box, 16)  # 2x: output pixel j sits at 8 + (j + 0.5) / 2 - 0.5
    pos = 8 + (torch.arange(16) + 0.5) / 2 - 0.5
    expect = pos.view(1, 16) + 1000 * pos.view(16, 1)
    torch.testing.assert_close(crop[0, 0], expect)


def test_same_normalised_box_crops_any_resolution():
    lo, hi = ramp(64, 64)[None], ramp(256, 256)[None]
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    a = crop_and_resize(lo, box, 32)   # 32x32 pixels of the 64 image: exact
    b = crop_and_resize(hi, box, 32)   # 128x128 pixels of the 256 image, averaged 4x4
    torch.testing.assert_close(a[0, 0], lo[0, 0, 32:64, 16:48])
    # the ramp is linear: the 4x4 average of the 256 image at output pixel j is at 4 j + 1.5,
    # i.e. the 64 image's coordinate (4 j + 1.5 + 0.5) / 4 - 0.5 = j: the same place, 4x finer
    ys = 128 + 4 * torch.arange(32) + 1.5
    xs = 64 + 4 * torch.arange(32) + 1.5
    torch.testing.assert_close(b[0, 0], xs.view(1, -1) + 1000 * ys.view(-1, 1))


def test_downscale_is_antialiased():
    img = torch.zeros(1, 1, 64, 64)
    img[..., ::4] = 1.0  # vertical lines every 4 pixels: 25% coverage
    out = crop_and_resize(img, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 16)
    # one bilinear sample per output pixel would land between lines and read 0
    torch.testing.assert_close(out, torch.full((1, 1, 16, 16), 0.25))


def test_crop_uint8_input_and_batch_boxes():
    img = (ramp(16, 16) % 256).to(torch.uint8)[None].repeat(3, 1, 1, 1)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5]])
    out = crop_and_resize(img, boxes, 8)
    assert out.dtype == torch.float32
    ref = img.float()
    torch.testing.assert_close(out[0, 0], ref[0, 0, 0:8, 0:8])
    torch.testing.assert_close(out[1, 0], ref[1, 0, 8:16, 8:16])
    torch.testing.assert_close(out[2, 0], ref[2, 0, 0:8, 4:12])


def test_map_boxes_to_source_with_flip():
    view = torch.tensor([[0.2, 0.1, 0.6, 0.9], [0.2, 0.1, 0.6, 0.9]])  # 0.4 wide, 0.8 high
    box = torch.tensor([[0.0, 0.5, 0.25, 1.0], [0.0, 0.5, 0.25, 1.0]])
    src = view_to_source(box, view, torch.tensor([False, True]))
    torch.testing.assert_close(src, torch.tensor([[0.2, 0.5, 0.3, 0.9], [0.5, 0.5, 0.6, 0.9]]))
