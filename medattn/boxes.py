"""Boxes: their two formats, and every conversion between formats, units and views, defined once.

Conventions (all of medattn follows them):

* **Formats.** ``"xyxy"`` is ``[x0, y0, x1, y1]``, the top-left and bottom-right corners; it is
  what the code computes with (attention boxes, crops, windows, overlays). ``"xywh"`` is
  ``[x, y, w, h]``, (x, y) the top-left corner; it is what NIH's ``BBox_List_2017.csv`` and the
  prepared manifest store (ground-truth boxes, lung boxes). x runs to the right, y down, the
  origin is the top-left corner of the image.
* **Pixel edges.** In pixels, coordinates are continuous and lie on pixel *edges*: pixel (row r,
  column c) covers [c, c+1] x [r, r+1], so a single pixel is ``[c, r, c+1, r+1]`` and a whole
  (H, W) map is ``[0, 0, W, H]``.
* **Normalised coordinates** divide x by the width and y by the height, so one normalised box
  is valid at any resolution: the same box crops the 224 network input or the 512 prepared
  image. The manifest, the attention boxes and the views' windows are all normalised.
* **Views.** The network sees a *view* of the prepared (source) image: the region ``window``
  (normalised xyxy in the *unflipped* source) resized to the input size, mirrored left-right
  where ``flip``. A point u in [0, 1] of the view sits at ``X0 + u (X1 - X0)`` of the source, or
  at ``X1 - u (X1 - X0)`` when the view is mirrored, so x0 and x1 swap roles
  (:func:`view_to_source`, :func:`source_to_view`). Methods that crop from the prepared image
  get it flipped like the view; there the view sits at ``view_box`` =
  ``mirror(window, flip)`` (:func:`mirror`) and no flip is left to undo.

The conversions work on numpy arrays and on torch tensors alike (shape (..., 4); the same
operations in the same order, so an array and a tensor of one dtype give the same numbers). On
tensors they stay on the tensors' device and never wait for it: no ``.item()``, no tensor built
from Python numbers (``torch.tensor([w, h, w, h], device=...)`` would be a blocking
host-to-device copy on every call), only arithmetic with Python scalars. torch is imported only
when a tensor is passed: the loaders' worker processes import this module (through
:mod:`medattn.views`) for numpy alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("xywh", "xyxy")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _stack(parts: Sequence[Any], like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.stack(list(parts), dim=-1)
    return np.stack(parts, axis=-1)


def _where(cond: Any, a: Any, b: Any) -> Any:
    if _is_torch(cond):
        import torch

        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def _at_least(x: Any, lo: float) -> Any:
    return x.clamp_min(lo) if _is_torch(x) else np.maximum(x, lo)


def _corners(b: Any) -> tuple[Any, Any, Any, Any]:
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def _as_mask(flipped: Any, like: Any) -> Any:
    if _is_torch(like):
        import torch

        return flipped.to(device=like.device, dtype=torch.bool)
    return np.asarray(flipped, dtype=bool)


# ---------------------------------------------------------------------------------- formats
def xywh_to_xyxy(boxes: Any) -> Any:
    """``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (numpy or torch, shape (..., 4))."""
    x, y, w, h = _corners(boxes)
    return _stack([x, y, x + w, y + h], boxes)


def xyxy_to_xywh(boxes: Any) -> Any:
    """``[x0, y0, x1, y1]`` -> ``[x0, y0, x1 - x0, y1 - y0]`` (numpy or torch, shape (..., 4))."""
    x0, y0, x1, y1 = _corners(boxes)
    return _stack([x0, y0, x1 - x0, y1 - y0], boxes)


def to_xyxy(boxes: Any, fmt: str) -> np.ndarray:
    """Boxes (..., 4) in ``fmt`` (``"xywh"`` or ``"xyxy"``) as a float64 numpy array in xyxy,
    checked: for metrics and figures, which take boxes from users and files.

    Raises ValueError for an unknown format, a last axis other than 4, non-finite values or a
    negative width/height. Torch tensors are copied to the CPU.
    """
    if fmt not in FORMATS:
        raise ValueError(f"box format {fmt!r} is not one of {FORMATS}")
    if hasattr(boxes, "detach") and hasattr(boxes, "cpu"):
        boxes = boxes.detach().cpu().numpy()
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"boxes: cannot be read as a numeric array ({e})") from None
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes: expected shape (..., 4), got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes: non-finite coordinate")
    if fmt == "xywh":
        b = xywh_to_xyxy(b)
    if np.any(b[..., 2:] < b[..., :2]):
        raise ValueError(f"boxes: negative width or height (format {fmt!r})")
    return b


def records_xyxy(records: Sequence[Mapping[str, Any]], classes: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """Manifest boxes (dicts ``label, x, y, w, h``, normalised xywh) -> (k, 4) float64 xyxy and
    their labels, keeping only ``classes`` when given (in the records' order)."""
    keep = [r for r in records if classes is None or r["label"] in classes]
    xywh = np.array([[r["x"], r["y"], r["w"], r["h"]] for r in keep], dtype=np.float64).reshape(-1, 4)
    return xywh_to_xyxy(xywh), [str(r["label"]) for r in keep]


# ---------------------------------------------------------------------------------- geometry
def area(boxes: Any, *, fmt: str) -> np.ndarray:
    """Area of each box (..., 4) -> (...)."""
    b = to_xyxy(boxes, fmt)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def intersection(a: Any, b: Any, *, fmt: str) -> np.ndarray:
    """Intersection area |A ∩ B| of box pairs; shapes broadcast like numpy ((N,1,4) vs (1,M,4)
    gives an N x M matrix)."""
    p, g = to_xyxy(a, fmt), to_xyxy(b, fmt)
    w = np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0])
    h = np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


# ---------------------------------------------------------------------------------- units
def scale(boxes: Any, sx: float, sy: float, divide: bool = False) -> Any:
    """Boxes (..., 4) with x times ``sx`` and y times ``sy`` (or divided by them); xyxy or xywh
    alike (columns 0 and 2 scale with x, 1 and 3 with y in both formats).

    A tensor comes back as a new float32 tensor on its device (in-place arithmetic with Python
    scalars on a copy: no host sync); an array as a new float64 array.
    """
    if _is_torch(boxes):
        import torch

        out = boxes.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    else:
        out = np.array(boxes, dtype=np.float64, copy=True)
    xy = out.reshape(*out.shape[:-1], 2, 2)  # (..., corner, x/y), a view of out
    x, y = xy[..., 0], xy[..., 1]  # views: the in-place operators below write into out
    if divide:
        x /= sx
        y /= sy
    else:
        x *= sx
        y *= sy
    return out


def normalize(boxes: Any, h: int, w: int) -> Any:
    """Boxes (xyxy or xywh) on pixel edges of an (h, w) map -> normalised (x / w, y / h)."""
    return scale(boxes, float(w), float(h), divide=True)


def denormalize(boxes: Any, h: int, w: int) -> Any:
    """Normalised boxes (xyxy or xywh) -> pixel edges of an (h, w) map (x * w, y * h)."""
    return scale(boxes, float(w), float(h))


def pixel_window(box: Any, h: int, w: int) -> tuple[int, int, int, int]:
    """The pixels ``(left, top, right, bottom)`` (rows ``top:bottom``, columns ``left:right``)
    that a normalised xyxy window covers in an (h, w) image: edges rounded to the nearest pixel
    edge, at least one pixel each way. The loaders' rule for cutting a view (and the report's,
    to show the same pixels)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = int(round(x0 * w)), int(round(y0 * h))
    return left, top, max(left + 1, int(round(x1 * w))), max(top + 1, int(round(y1 * h)))


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel-edge xyxy box ``(x0, y0, x1, y1)`` of the nonzero pixels of an (H, W) mask, or None
    for an empty mask. (Batched and sync-free on tensors: ``attention.largest_component_box``.)"""
    m = np.asarray(mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_xywh(mask: np.ndarray) -> list[float] | None:
    """Normalised ``[x, y, w, h]`` of the nonzero pixels of an (H, W) mask (a lung box), or None
    for an empty mask. Width and height are taken in whole pixels before dividing."""
    b = mask_bounds(mask)
    if b is None:
        return None
    h, w = np.asarray(mask).shape[:2]
    return normalize(xyxy_to_xywh(np.asarray(b, dtype=np.int64)), h, w).tolist()


# ---------------------------------------------------------------------------------- views
def mirror(boxes: Any, flipped: Any) -> Any:
    """Normalised xyxy boxes mirrored left-right where ``flipped`` (x -> 1 - x, so x0 and x1 swap
    roles); e.g. a view's window in the unflipped image -> in the flipped one."""
    x0, y0, x1, y1 = _corners(boxes)
    f = _as_mask(flipped, boxes)
    return _stack([_where(f, 1 - x1, x0), y0, _where(f, 1 - x0, x1), y1], boxes)


def view_to_source(boxes: Any, view_box: Any, flipped: Any = None) -> Any:
    """Normalised boxes in a view -> normalised boxes in its source image.

    Args:
        boxes: (B, 4) normalised xyxy in the view.
        view_box: (B, 4) (or (4,)) the view's region in the source, normalised xyxy.
        flipped: (B,) bool, views mirrored left-right (``view_box`` is then the window in the
            unflipped source); None: none is, or the source is flipped like the view.

    Returns:
        (B, 4) normalised xyxy in the source (x0 <= x1 always); float32 on the boxes' device for
        tensors.
    """
    if _is_torch(boxes):
        import torch

        vb, bx = view_box.to(boxes.device, torch.float32), boxes.float()
    else:
        vb, bx = np.asarray(view_box), np.asarray(boxes)
    vx0, vy0, vx1, vy1 = _corners(vb)
    vw, vh = vx1 - vx0, vy1 - vy0
    x0 = vx0 + bx[..., 0] * vw
    x1 = vx0 + bx[..., 2] * vw
    if flipped is not None:
        f = _as_mask(flipped, bx)
        x0, x1 = _where(f, vx1 - bx[..., 2] * vw, x0), _where(f, vx1 - bx[..., 0] * vw, x1)
    y0 = vy0 + bx[..., 1] * vh
    y1 = vy0 + bx[..., 3] * vh
    return _stack([x0, y0, x1, y1], bx)


def source_to_view(boxes: Any, window: Any = None, flipped: Any = None) -> Any:
    """Normalised boxes in a source image -> normalised in a view of it (the inverse of
    :func:`view_to_source`); the result may leave [0, 1] where a box sticks out of the view.

    Args:
        boxes: (..., 4) normalised xyxy in the source.
        window: (..., 4) (or (4,)) the view's region in the source, normalised xyxy; None = the
            whole image. A window narrower than 1e-6 is taken as 1e-6 wide (no division by 0).
        flipped: bool mask, the view is mirrored left-right (``window`` is then in the unflipped
            source); None = not mirrored.

    Returns:
        Boxes of the same type, dtype and device (tensors: pass float ones).
    """
    x0, y0, x1, y1 = _corners(boxes)
    if window is not None:
        w = window.to(boxes) if _is_torch(boxes) else np.asarray(window)
        wx0, wy0, wx1, wy1 = _corners(w)
        sx, sy = _at_least(wx1 - wx0, 1e-6), _at_least(wy1 - wy0, 1e-6)
        x0, x1 = (x0 - wx0) / sx, (x1 - wx0) / sx
        y0, y1 = (y0 - wy0) / sy, (y1 - wy0) / sy
    out = _stack([x0, y0, x1, y1], boxes)
    return out if flipped is None else mirror(out, flipped)
