"""AG-CNN's attention ops: heat map -> mask -> largest connected region -> box -> crop.

Guan et al. 2018 (methods.md section 0): the heat map of the global branch's last conv map is
H(x, y) = max_k |f_k(x, y)| (Eq. 3), scaled to [0, 1] and resized to the input size; the mask is
H > tau (Eq. 4); the bounding box of the mask's largest connected region is cropped from the input
image and resized to the input size for the local branch.

Everything here is batched on the tensors' device, with no Python loop over the batch, and needs
no gradients (call it under ``torch.no_grad()`` or on detached features).

Box convention: ``[x0, y0, x1, y1]`` in continuous coordinates of a map of size (h, w), on pixel
*edges*: pixel (r, c) covers [c, c+1] x [r, r+1], so a single hot pixel gives ``[c, r, c+1, r+1]``
and the whole map is ``[0, 0, w, h]``. Normalised boxes divide x by w and y by h, which makes a
box valid at any resolution: the same normalised box crops the 224 input or the 512 prepared image.

Example:
    >>> feats = global_branch.forward_features(x)                       # (B, 2048, 7, 7)
    >>> boxes, heat = attention_boxes(feats, tau=0.7, size=x.shape[-1]) # (B, 4) in [0,1], (B, 224, 224)
    >>> crops = crop_and_resize(x, boxes, 224)                          # (B, C, 224, 224)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

HEATMAP_MODES = ("max", "l1", "l2", "sum")
SCALES = ("minmax", "max")
THRESHOLDS = ("tau", "otsu")
COMPONENTS = ("largest", "all")

# A map whose values vary by less than this fraction of its magnitude is treated as constant:
# float32 rounding noise must not be stretched to [0, 1] and thresholded as if it were signal.
_CONSTANT_RTOL = 1e-6


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
    k = f.shape[1]
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
def _neighbour_max(lab: torch.Tensor, connectivity: int) -> torch.Tensor:
    if connectivity == 8:
        return F.max_pool2d(lab, 3, stride=1, padding=1)
    return torch.maximum(F.max_pool2d(lab, (3, 1), stride=1, padding=(1, 0)),
                         F.max_pool2d(lab, (1, 3), stride=1, padding=(0, 1)))


def connected_components(mask: torch.Tensor, connectivity: int = 8, *, check_every: int = 4) -> torch.Tensor:
    """Label the connected components of a batch of binary masks, on the mask's device.

    Each foreground pixel starts with its own label (its raster index + 1). Every round takes the
    maximum label over the pixel's neighbourhood (max pooling), then jumps pointers: a pixel adopts
    the label of the pixel its label names (that pixel is in the same component and its label is at
    least as large), which doubles how far a label travels per round on long, thin regions. Labels
    only grow and always name a pixel of the same component, so at the fixed point every component
    carries one label, the raster index + 1 of its last pixel. Exact, not approximate.

    Args:
        mask: (B, H, W) bool (or 0/1).
        connectivity: 8 (diagonal neighbours connect; skimage ``connectivity=2``) or 4.
        check_every: rounds between convergence checks (each check syncs a GPU once).

    Returns:
        (B, H, W) int64 labels, 0 = background. Labels are not consecutive: compare partitions,
        not label values, with other implementations.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity} must be 4 or 8")
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    b, hgt, wid = mask.shape
    n = hgt * wid
    if n >= 2 ** 24:  # labels are carried in float32 (max pooling), exact up to 2^24
        raise ValueError(f"mask of {hgt}x{wid} pixels is too large for connected_components (max 2^24)")
    fg = mask.bool().unsqueeze(1)
    fgf = fg.float()
    idx = torch.arange(1, n + 1, device=mask.device, dtype=torch.float32).view(1, 1, hgt, wid)
    lab = idx * fgf
    while True:
        prev = lab
        for _ in range(check_every):
            lab = _neighbour_max(lab, connectivity) * fgf
            flat = lab.view(b, n)
            # Background pixels point at index 0 and are zeroed again by the mask.
            ptr = (flat - 1).clamp_(min=0).long()
            lab = (torch.gather(flat, 1, ptr).view(b, 1, hgt, wid)) * fgf
        if torch.equal(lab, prev):
            break
    return lab.view(b, hgt, wid).long()


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
    m = mask.bool()
    empty = ~m.flatten(1).any(dim=1)
    if component == "largest":
        n = hgt * wid
        lab = connected_components(m, connectivity).view(b, n)
        sizes = torch.zeros(b, n + 1, dtype=torch.int64, device=m.device)
        sizes.scatter_add_(1, lab, torch.ones_like(lab))
        sizes[:, 0] = 0  # background
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
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    whole = torch.tensor([0.0, 0.0, float(wid), float(hgt)], device=m.device).expand(b, 4)
    return torch.where(empty.view(-1, 1), whole, boxes), empty


def normalize_boxes(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Boxes on pixel edges of an (h, w) map -> [0, 1] (x / w, y / h)."""
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
    return boxes.float() / scale


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
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if hw != tuple(heat.shape[-2:]):
                # Bilinear interpolation is a convex combination, so the map stays in [0, 1].
                heat = F.interpolate(heat.unsqueeze(1), size=hw, mode="bilinear", align_corners=False).squeeze(1)
        mask = threshold_mask(heat, tau, threshold)
        boxes, empty = largest_component_box(mask, component, connectivity)
        boxes = normalize_boxes(boxes, heat.shape[-2], heat.shape[-1])
    return (boxes, heat, empty) if return_empty else (boxes, heat)


# --------------------------------------------------------------------------------------------
# Cropping
# --------------------------------------------------------------------------------------------
def map_boxes_to_source(boxes: torch.Tensor, view_boxes: torch.Tensor,
                        flipped: torch.Tensor | None = None) -> torch.Tensor:
    """Map normalised boxes in a network-input *view* to normalised boxes in its source image.

    The view (the augmented 224 input) shows the region ``view_boxes`` = [X0, Y0, X1, Y1]
    (normalised in the source, e.g. the 512 prepared image) resized to the input size, mirrored
    left-right where ``flipped``. A point u in [0, 1] of the view sits at X0 + u (X1 - X0) in the
    source, or at X1 - u (X1 - X0) when the view is mirrored (so x0 and x1 swap roles).

    Args:
        boxes: (B, 4) normalised boxes in view coordinates.
        view_boxes: (B, 4) normalised source region of each view.
        flipped: (B,) bool, views mirrored horizontally; None = none.

    Returns:
        (B, 4) normalised boxes in source coordinates (x0 < x1 always).
    """
    vb = view_boxes.to(boxes.device, torch.float32)
    bx = boxes.float()
    vw = vb[:, 2] - vb[:, 0]
    vh = vb[:, 3] - vb[:, 1]
    x0 = vb[:, 0] + bx[:, 0] * vw
    x1 = vb[:, 0] + bx[:, 2] * vw
    if flipped is not None:
        fl = flipped.to(boxes.device).bool()
        x0, x1 = (torch.where(fl, vb[:, 2] - bx[:, 2] * vw, x0),
                  torch.where(fl, vb[:, 2] - bx[:, 0] * vw, x1))
    y0 = vb[:, 1] + bx[:, 1] * vh
    y1 = vb[:, 1] + bx[:, 3] * vh
    return torch.stack([x0, y0, x1, y1], dim=1)


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
    hw = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    scale = torch.tensor([wid, hgt, wid, hgt], dtype=torch.float32, device=x.device)
    px = boxes_norm.to(x.device, torch.float32) * scale
    rois = torch.cat([torch.arange(b, device=x.device, dtype=torch.float32).view(-1, 1), px], dim=1)
    # roi_align has no bf16/fp16 CPU kernels everywhere; the crop is cheap, do it in float32.
    out = roi_align(x.float(), rois, output_size=hw, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return out.to(x.dtype)
