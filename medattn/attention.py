"""AG-CNN's attention ops: heat map -> mask -> largest connected region -> box -> crop.

Guan et al. 2018 (methods.md section 0): the heat map of the global branch's last conv map is
H(x, y) = max_k |f_k(x, y)| (Eq. 3), scaled to [0, 1] and resized to the input size; the mask is
H > tau (Eq. 4); the bounding box of the mask's largest connected region is cropped from the input
image and resized to the input size for the local branch.

Everything here is batched on the tensors' device, with no Python loop over the batch, and needs
no gradients (call it under ``torch.no_grad()`` or on detached features).

Boxes follow :mod:`medattn.boxes`: ``[x0, y0, x1, y1]`` on pixel *edges* (a single hot pixel
(r, c) gives ``[c, r, c+1, r+1]``, the whole (h, w) map ``[0, 0, w, h]``), normalised by the map
size, so the same box crops the 224 input or the 512 prepared image. Mapping a box between a
view and its source image is :func:`medattn.boxes.view_to_source`.

Example:
    >>> feats = global_branch.forward_features(x)                       # (B, 2048, 7, 7)
    >>> boxes, heat = attention_boxes(feats, tau=0.7, size=x.shape[-1]) # (B, 4) in [0,1], (B, 224, 224)
    >>> crops = crop_and_resize(x, boxes, 224)                          # (B, C, 224, 224)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from medattn.boxes import denormalize, normalize

HEATMAP_MODES = ("max", "l1", "l2", "sum")
SCALES = ("minmax", "max")
THRESHOLDS = ("tau", "otsu")
COMPONENTS = ("largest", "all")

# A map whose values vary by less than this fraction of its magnitude is treated as constant:
# float32 rounding noise must not be stretched to [0, 1] and thresholded as if it were signal.
_CONSTANT_RTOL = 1e-6


def _hw(size) -> tuple[int, int]:
    """S or (H, W) -> (H, W). Under ``torch.jit.trace`` a shape read from a tensor is a 0-d
    tensor; the sizes here are fixed by the model's input size, so they are taken as numbers."""
    if isinstance(size, (int, torch.Tensor)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------
# Heat map and mask
# --------------------------------------------------------------------------------------------
def heatmap(features: torch.Tensor, mode: str = "max", scale: str = "minmax") -> torch.Tensor:
    """Per-image heat map of a feature map, scaled to [0, 1].

    Args:
        features: (B, K, h, w) feature map (any float dtype; computed in float32).
        mode: ``max`` = max_k |f_k| (Eq. 3); ``l1`` = (1/K) sum_k |f_k|; ``l2`` = (1/K) sqrt(sum_k f_k^2)
            (the paper's two alternatives); ``sum`` = sum_k f_k (Ien001's code, signed).
        scale: ``minmax`` = (H - min) / (max - min) per image; ``max`` = H / max per image (seed 001),
            negative values (only possible with ``sum``) clipped to 0.

    Returns:
        (B, h, w) float32 in [0, 1]. A constant map (no spatial information) becomes all zeros,
        never NaN, so it thresholds to an empty mask.
    """
    _check("heatmap", mode, HEATMAP_MODES)
    _check("scale", scale, SCALES)
    if features.dim() != 4:
        raise ValueError(f"features must be (B, K, h, w), got shape {tuple(features.shape)}")
    f = features.detach().float()
    k = int(f.shape[1])
    if mode == "max":
        h = f.abs().amax(dim=1)
    elif mode == "l1":
        h = f.abs().mean(dim=1)
    elif mode == "l2":
        h = f.square().sum(dim=1).sqrt() / k
    else:
        h = f.sum(dim=1)
    return scale_maps(h, scale)


def scale_maps(h: torch.Tensor, scale: str = "minmax") -> torch.Tensor:
    """Scale each (h, w) map of a (B, h, w) batch to [0, 1]; constant maps -> zeros (see :func:`heatmap`)."""
    _check("scale", scale, SCALES)
    flat = h.flatten(1)
    hi = flat.amax(dim=1)
    lo = flat.amin(dim=1)
    mag = torch.maximum(hi.abs(), lo.abs())
    informative = (hi - lo) > _CONSTANT_RTOL * mag
    if scale == "minmax":
        den = torch.where(informative, hi - lo, torch.ones_like(hi))
        out = (h - lo.view(-1, 1, 1)) / den.view(-1, 1, 1)
    else:
        informative &= hi > 0
        den = torch.where(informative, hi, torch.ones_like(hi))
        out = (h / den.view(-1, 1, 1)).clamp_(min=0.0)
    out = out.clamp_(0.0, 1.0)
    return out * informative.view(-1, 1, 1)


def otsu_threshold(h: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold per image of a (B, H, W) batch of [0, 1] maps, on 256 levels.

    As Ien001's AG-CNN code (cv2 THRESH_OTSU on ``uint8(255 * H)``): levels q = floor(255 H); the
    threshold t maximises the between-class variance of {q <= t} vs {q > t}; the first maximum
    wins; with one level only, t = 0.

    Returns:
        (B,) int64 levels t; the mask is ``floor(255 * H) > t``.
    """
    b = h.shape[0]
    q = (h.detach().float().clamp(0, 1) * 255).floor().long().flatten(1)
    n = q.shape[1]
    hist = torch.zeros(b, 256, dtype=torch.int64, device=h.device).scatter_add_(1, q, torch.ones_like(q))
    levels = torch.arange(256, device=h.device, dtype=torch.int64)
    # Integer cumulative sums (exact, and deterministic on CUDA), then float64 as cv2 uses.
    w0 = hist.cumsum(1).double() / n  # P(q <= t)
    m0 = (hist * levels).cumsum(1).double() / n  # sum_{q <= t} q P(q)
    mt = m0[:, -1:]
    w1 = 1.0 - w0
    valid = (w0 > 1e-7) & (w1 > 1e-7)  # cv2 skips thresholds that leave one class (near) empty
    between = (mt * w0 - m0).square() / torch.where(valid, w0 * w1, torch.ones_like(w0))
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    t = between.argmax(dim=1)
    return torch.where(valid.any(dim=1), t, torch.zeros_like(t))


def threshold_mask(h: torch.Tensor, tau: float = 0.7, method: str = "tau") -> torch.Tensor:
    """Binary mask of a (B, H, W) [0, 1] heat map.

    Args:
        h: heat maps from :func:`heatmap` (possibly resized).
        tau: Eq. 4 threshold, mask = H > tau (``method="tau"``).
        method: ``tau`` (the paper) or ``otsu`` (Ien001's code; tau is ignored).

    Returns:
        (B, H, W) bool.
    """
    _check("threshold", method, THRESHOLDS)
    if method == "tau":
        return h > tau
    t = otsu_threshold(h)
    q = (h.detach().float().clamp(0, 1) * 255).floor().long()
    return q > t.view(-1, 1, 1)


# --------------------------------------------------------------------------------------------
# Connected components and boxes
# --------------------------------------------------------------------------------------------
def _neighbourhood_max(xp: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Max of each pixel's closed neighbourhood (itself and its 8 or 4 neighbours) over the last two
    dims of ``xp``, a map padded by one pixel on each side (the padding stands for the outside):
    (..., H + 2, W + 2) -> (..., H, W). Slices and ``maximum``: exact for integers."""
    if connectivity == 8:  # separable 3x3
        rows = torch.maximum(torch.maximum(xp[..., :-2], xp[..., 1:-1]), xp[..., 2:])
        return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])
    col = torch.maximum(torch.maximum(xp[..., :-2, 1:-1], xp[..., 1:-1, 1:-1]), xp[..., 2:, 1:-1])
    return torch.maximum(torch.maximum(xp[..., 1:-1, :-2], xp[..., 1:-1, 2:]), col)


def _initial_trees(fg: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, int]:
    """Star forest to start from: (B, H, W) int64 root id of each pixel (0 = background) and N0, a
    bound on the number of trees. 8-connectivity: the pixels of a 2x2 block are pairwise adjacent,
    so each block's foreground is one tree, rooted at its smallest id (N0 = blocks). 4-connectivity:
    each run of a row is one tree, rooted at its first pixel (N0 = H ceil(W/2), the most runs)."""
    b, hgt, wid = fg.shape
    hgt, wid = int(hgt), int(wid)  # fixed map sizes, also under torch.jit.trace (see _hw)
    n = hgt * wid
    ids = torch.arange(1, n + 1, device=fg.device).view(1, hgt, wid)
    if connectivity == 8:
        h2, w2 = -(-hgt // 2), -(-wid // 2)
        x = F.pad(torch.where(fg, ids, n + 1), (0, 2 * w2 - wid, 0, 2 * h2 - hgt), value=n + 1)
        blk = torch.minimum(torch.minimum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                            torch.minimum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))
        root = blk.view(b, h2, 1, w2, 1).expand(b, h2, 2, w2, 2).reshape(b, 2 * h2, 2 * w2)[:, :hgt, :wid]
        n0 = h2 * w2
    else:
        start = fg.clone()
        start[:, :, 1:] &= ~fg[:, :, :-1]
        # ids grow along a row: the running max of the run starts is the start of the pixel's run
        root = torch.where(start, ids, 0).cummax(dim=2).values
        n0 = hgt * -(-wid // 2)
    return torch.where(fg, root, 0), n0


def component_schedule(n0: int) -> list[int]:
    """Pointer jumps after each hooking round of :func:`connected_components`, for a start of at
    most ``n0`` trees per component: round k (from 0) starts with t_k <= n0 // 2^k trees and needs
    ceil(log2 t_k) jumps; rounds run while t_k >= 2, i.e. floor(log2 n0) rounds."""
    jumps = []
    t = n0
    while t >= 2:
        jumps.append((t - 1).bit_length())  # ceil(log2 t)
        t //= 2
    return jumps


def connected_components(mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Label the connected components of a batch of binary masks, on the mask's device, exactly and
    without any host-device synchronisation: a fixed number of rounds set by the map size alone.

    Algorithm (hook and shortcut on pointer trees, in the spirit of Shiloach-Vishkin). Pixel ids are
    1..n (raster index + 1, n = H W); ``par`` maps each id to an id of the same component, a root
    to itself, background to 0. At the start of every round each tree is a star (every pixel points
    to its root), so a pixel's root is ``par[pixel]``. Start: the 2x2 blocks (8-connectivity) or
    row runs (4-connectivity) as stars (:func:`_initial_trees`), at most N0 trees per component
    (N0 = ceil(H/2) ceil(W/2), or H ceil(W/2)). Round k, for every root r, with lo(r) and hi(r) the
    smallest and largest root over the closed neighbourhoods of r's pixels (lo(r) <= r <= hi(r)):

    (a) if lo(r) < r, r hooks onto lo(r);
    (b) if lo(r) = r < hi(r) and no root hooked onto r in (a), r hooks onto hi(r);

    then ``par <- par[par]`` ceil(log2 t_k) times, t_k = floor(N0 / 2^k) (:func:`component_schedule`).

    Proof that floor(log2 N0) rounds give exactly one label per component:

    1. Hooks join trees that touch, so a tree never leaves its component.
    2. The hooks form a forest. (a)-hooks strictly decrease the root id. A (b)-root has no incoming
       hook: none from (a) by its condition, none from (b) because a (b)-target hi(r) > r has the
       smaller neighbour r, so hooked in (a) and is no (b)-root. A cycle needs an incoming hook at
       each of its roots, so would be made of (a)-hooks only: impossible.
    3. Every tree that touches another tree merges with at least one: by (a), or a root hooks onto
       it, or by (b). So a component of t >= 2 trees keeps at most floor(t/2), and before round k
       it has t_k <= floor(N0 / 2^k) trees: after floor(log2 N0) rounds, one.
    4. A chain of hooks visits distinct roots of one component, so after round k's hooks a pixel is
       at most t_k pointers from its root; one jump halves that distance (rounding up), so
       ceil(log2 t_k) jumps make every tree a star again, as the next round needs.

    Cost: floor(log2 N0) rounds of about 15 tensor ops over (B, n) plus sum_k ceil(log2 t_k) <=
    L(L+1)/2 gathers, L = ceil(log2 N0): 13 rounds and 104 jumps at 224x224 (8-connectivity). All
    integer (ids in int32 for the neighbourhoods, int64 for the pointers): exact at any size; the
    loop counts depend on (H, W) only. The schedule is a worst-case bound: the hard cases of the
    tests (one-pixel mazes) are done after 6 rounds, snakes and spirals after 2.

    Args:
        mask: (B, H, W) bool (or 0/1).
        connectivity: 8 (diagonal neighbours connect; skimage ``connectivity=2``) or 4.

    Returns:
        (B, H, W) int64 labels, 0 = background; each component is labelled with the id (raster
        index + 1) of one of its pixels. Labels are not consecutive: compare partitions, not label
        values, with other implementations.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity} must be 4 or 8")
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    b, hgt, wid = mask.shape
    hgt, wid = int(hgt), int(wid)  # fixed map sizes, also under torch.jit.trace (see _hw)
    n = hgt * wid
    fg = mask.bool()
    root, n0 = _initial_trees(fg, connectivity)
    par = F.pad(root.view(b, n), (1, 0))  # (B, n + 1): index 0 is the background's "root"
    ids = torch.arange(n + 1, device=mask.device)
    # Neighbourhood maxima of (-root, root) in a buffer padded by "nothing" = -(n + 1): lo is taken as
    # a max of -root, where background pixels also count as nothing. int32 halves the memory traffic.
    small = torch.int32 if n < 2 ** 31 - 1 else torch.int64
    nothing = -(n + 1)
    off = torch.where(fg, 0, nothing).to(small)
    buf = torch.full((2, b, hgt + 2, wid + 2), nothing, dtype=small, device=mask.device)
    neg_root, root_map = buf[0, :, 1:-1, 1:-1], buf[1, :, 1:-1, 1:-1]
    for jumps in component_schedule(n0):
        p = par[:, 1:]
        root_map.copy_(p.view(b, hgt, wid))
        torch.sub(off, root_map, out=neg_root)
        near = _neighbourhood_max(buf, connectivity).view(2, b, n)
        # Per root: max over its pixels of (-lo, hi) of each pixel. Non-roots get nothing.
        ext = torch.full((2, b, n + 1), nothing, dtype=small, device=mask.device)
        ext = ext.scatter_reduce_(2, p.expand(2, b, n), near, "amax").long()
        lo, hi = -ext[0], ext[1]
        # keep: not a root whose smallest neighbour is itself (a non-root has lo = n + 1), or hooked
        # onto in (a); index 0 (background) always keeps 0, as lo[0] >= 1.
        keep = (lo != ids).scatter_(1, torch.where(lo < ids, lo, 0), 1)  # 1, not True: torch.jit has no bool Scalar
        # minimum(lo, par) is lo for the (a)-roots and par for everything else.
        par = torch.where(keep, torch.minimum(lo, par), hi)  # (b): hi; isolated roots: hi = r
        for _ in range(jumps):
            par = par.gather(1, par)
    return par[:, 1:].view(b, hgt, wid)


def largest_component_box(mask: torch.Tensor, component: str = "largest",
                          connectivity: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box of the largest connected region of each mask (or of all its pixels).

    Args:
        mask: (B, H, W) bool.
        component: ``largest`` (the paper; ties go to the region that starts first in raster order,
            as skimage/scipy number regions) or ``all`` (the box of every foreground pixel, seed 001).
        connectivity: 8 (Ien001: skimage connectivity 2) or 4.

    Returns:
        boxes: (B, 4) float32 ``[x0, y0, x1, y1]`` on pixel edges of the (H, W) map;
        empty: (B,) bool, True where the mask had no pixel (its box is the whole map ``[0, 0, W, H]``).
    """
    _check("component", component, COMPONENTS)
    b, hgt, wid = mask.shape
    hgt, wid = int(hgt), int(wid)  # fixed map sizes, also under torch.jit.trace (see _hw)
    m = mask.bool()
    empty = ~m.flatten(1).any(dim=1)
    if component == "largest":
        n = hgt * wid
        lab = connected_components(m, connectivity).view(b, n)
        sizes = torch.zeros(b, n + 1, dtype=torch.int64, device=m.device)
        sizes.scatter_add_(1, lab, torch.ones_like(lab))
        sizes[:, 0].zero_()  # background (zero_, not "= 0", which builds a tensor from Python data)
        pos = torch.arange(n, device=m.device).expand(b, n)
        first = torch.full((b, n + 1), n, dtype=torch.int64, device=m.device)
        first.scatter_reduce_(1, lab, pos, reduce="amin")
        biggest = sizes.amax(dim=1, keepdim=True)
        # Among the largest regions, the one whose first pixel comes first in raster order.
        key = torch.where((sizes == biggest) & (sizes > 0), first, torch.full_like(first, n + 1))
        chosen = key.argmin(dim=1, keepdim=True)
        m = (lab == chosen).view(b, hgt, wid) & m
    rows = m.any(dim=2).to(torch.uint8)  # (B, H)
    cols = m.any(dim=1).to(torch.uint8)  # (B, W)
    # argmax returns the first maximum: the first hot row/column from either end.
    y0 = rows.argmax(dim=1)
    y1 = hgt - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = wid - cols.flip(1).argmax(dim=1)
    # An empty mask has no hot row or column: every argmax is 0, which gives the whole map [0, 0, W, H].
    return torch.stack([x0, y0, x1, y1], dim=1).float(), empty


def attention_boxes(features: torch.Tensor, tau: float = 0.7, mode: str = "max", scale: str = "minmax",
                    threshold: str = "tau", component: str = "largest",
                    size: int | tuple[int, int] | None = None, *, connectivity: int = 8,
                    return_empty: bool = False):
    """AG-CNN's attention box for each image, from the global branch's feature map.

    Args:
        features: (B, K, h, w) last conv feature map.
        tau: Eq. 4 threshold on the [0, 1] heat map.
        mode, scale: see :func:`heatmap`.
        threshold: ``tau`` or ``otsu`` (see :func:`threshold_mask`).
        component: ``largest`` or ``all`` (see :func:`largest_component_box`).
        size: the heat map is bilinearly resized to this (S or (H, W)) before thresholding, as the
            paper resizes heat maps to the input size; None (or 0) keeps the feature resolution
            (seed 001 thresholds the 7x7 map).
        connectivity: 8 or 4.
        return_empty: also return the (B,) empty-mask flags.

    Returns:
        boxes_norm: (B, 4) ``[x0, y0, x1, y1]`` in [0, 1] of the image (an empty mask gives the
            whole image ``[0, 0, 1, 1]``);
        heat: (B, H, W) the scaled (and resized) heat map;
        empty: (B,) bool, only with ``return_empty``.
    """
    with torch.no_grad():
        heat = heatmap(features, mode, scale)
        if size:
            hw = _hw(size)
            if hw != tuple(heat.shape[-2:]):
                # Bilinear interpolation is a convex combination, so the map stays in [0, 1].
                heat = F.interpolate(heat.unsqueeze(1), size=hw, mode="bilinear", align_corners=False).squeeze(1)
        mask = threshold_mask(heat, tau, threshold)
        boxes, empty = largest_component_box(mask, component, connectivity)
        boxes = normalize(boxes, heat.shape[-2], heat.shape[-1])
    return (boxes, heat, empty) if return_empty else (boxes, heat)


# --------------------------------------------------------------------------------------------
# Cropping
# --------------------------------------------------------------------------------------------
def crop_and_resize(images: torch.Tensor, boxes_norm: torch.Tensor,
                    out_size: int | tuple[int, int]) -> torch.Tensor:
    """Crop normalised boxes from images of any resolution and resize them (RoIAlign).

    Bilinear sampling at the centres of the output pixels (``aligned=True``: box coordinates are on
    pixel edges, so the box [0, 0, 1, 1] at the image's own size returns the image unchanged).
    When a box is larger than the output, each output pixel averages ceil(box/out) x ceil(box/out)
    bilinear samples over its footprint (RoIAlign's adaptive sampling ratio), which antialiases the
    downscale; when it is smaller, one sample per pixel is plain bilinear upsampling. Linear in the
    pixels, so cropping then normalising equals normalising then cropping.

    Args:
        images: (B, C, H, W); uint8 is converted to float32.
        boxes_norm: (B, 4) ``[x0, y0, x1, y1]`` in [0, 1] of each image.
        out_size: S or (H_out, W_out).

    Returns:
        (B, C, H_out, W_out), float (float32 for integer input).
    """
    if images.dim() != 4 or boxes_norm.shape != (images.shape[0], 4):
        raise ValueError(f"images (B, C, H, W) and boxes (B, 4) expected, got {tuple(images.shape)} "
                         f"and {tuple(boxes_norm.shape)}")
    x = images if images.is_floating_point() else images.float()
    b, _, hgt, wid = x.shape
    hgt, wid = int(hgt), int(wid)
    hw = _hw(out_size)
    px = denormalize(boxes_norm.to(x.device), hgt, wid)
    rois = torch.cat([torch.arange(b, device=x.device, dtype=torch.float32).view(-1, 1), px], dim=1)
    # roi_align has no bf16/fp16 CPU kernels everywhere; the crop is cheap, do it in float32.
    out = roi_align(x.float(), rois, output_size=hw, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return out.to(x.dtype)
