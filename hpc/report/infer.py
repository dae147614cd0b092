"""Run a trained model of a run on a few images, for heat-map overlays.

The model comes back through :func:`hpc.run.load_run`, exactly as ``medattn eval`` gets it, and
the network input is rendered with the loaders' own evaluation view code (:mod:`medattn.views`:
resize, centre crop, normalisation), so an overlay shows what the evaluated model saw.

Images come in as prepared pixels, (B, S, S, C) uint8 at the prepared size S: either read
from the prepared directory or decoded and resized from a PNG like ``medattn prepare`` does
(:func:`load_png`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medattn.boxes import pixel_window, source_to_view
from medattn.errors import DataError


@dataclass
class LoadedModel:
    """A run's model with what is needed to feed it."""

    method: Any
    model: Any
    cfg: Any
    spec: Any
    ds: Any  # PreparedDataset
    stage: str
    checkpoint: Path
    device: Any
    note: str = ""


@dataclass
class ImagePrediction:
    """One image through the model.

    Attributes:
        view: (h, w, C) uint8, the region of the prepared image the network saw (at the prepared
            resolution, so overlays are sharper than the network input).
        window: normalised [x0, y0, x1, y1] of ``view`` in the prepared image.
        probs: {branch: (L,) probabilities}.
        heatmap: (H, W) attention in [0, 1] over the view, or None.
        view_box: the attention box, normalised [x0, y0, x1, y1] of the view, or None.
        box: the same box, normalised in the prepared image, or None.
        crop: (s, s, C) uint8, the local branch's input (AG-CNN), or None.
    """

    view: np.ndarray
    window: np.ndarray
    probs: dict[str, np.ndarray]
    heatmap: np.ndarray | None = None
    view_box: np.ndarray | None = None
    box: np.ndarray | None = None
    crop: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(run: str | Path, data: str | Path, stage: str | None = None, checkpoint: str = "best",
               device: str = "cpu") -> LoadedModel:
    """A run's model (:func:`hpc.run.load_run`) with its prepared dataset, for overlays.

    Args:
        run: the run directory.
        data: its prepared directory (the report's test images).
        stage: the stage whose model to load (default: the last finished one).
        checkpoint: ``best`` or ``last``.
        device: torch device for inference.
    """
    from hpc.run import load_run
    from medattn.data.prepared import PreparedDataset

    lr = load_run(run, stage, checkpoint, device, data=data,
                  overrides=["runtime.device=cpu"] if str(device) == "cpu" else None)
    ds = PreparedDataset.open(data)
    return LoadedModel(lr.method, lr.model, lr.cfg, lr.spec, ds, lr.stage, lr.checkpoint, lr.device, lr.note)


def load_png(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Decode an image file to (size, size, channels) uint8 the way ``medattn prepare`` does.

    Uses the prepare code when this installation has it; otherwise the same rules with PIL:
    RGBA/RGB with R = G = B -> the R channel, other colour -> ITU-R 601 luma, 16-bit -> /257,
    LANCZOS resize.

    Raises:
        DataError: naming the file, when it is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        from medattn.data._images import ImageDecodeError, load_image
    except ImportError:
        return _load_png_pil(path, size, channels)
    try:
        return load_image(path, size, channels, expected_size=None).pixels
    except ImageDecodeError as e:
        raise DataError(path, str(e)) from None


def _load_png_pil(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(path, f"cannot decode image: {type(e).__name__}: {e}") from None
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        gray = ((a * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(gray)
    if channels == 1:
        if im.mode in ("RGBA", "RGB", "RGBX"):
            rgb = np.asarray(im)
            same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
            im = Image.fromarray(np.ascontiguousarray(rgb[..., 0])) if same else im.convert("L")
        elif im.mode != "L":
            im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def predict(lm: LoadedModel, images: np.ndarray, batch_size: int = 16) -> list[ImagePrediction]:
    """Run the model on prepared-size images: the one inference path of the report, ``viz``,
    ``predict`` and :func:`medattn.load` (the method's own ``predict``: every branch, attention).

    Args:
        lm: from :func:`load_model`, or a :class:`hpc.run.LoadedRun` (anything with ``method``,
            ``model``, ``cfg``, ``spec``, ``stage`` and ``device``).
        images: (B, S, S, C) uint8 at the prepared size of the run (``lm.spec.prepared_size``).
        batch_size: images per forward pass.

    Returns:
        One :class:`ImagePrediction` per image, in order.
    """
    import torch

    from medattn.views import render_views
    from medattn.views import ViewSpec, sample_views, view_boxes

    images = np.asarray(images)
    s, c = lm.spec.prepared_size, lm.spec.channels
    if images.ndim != 4 or images.shape[1:] != (s, s, c) or images.dtype != np.uint8:
        raise ValueError(f"images must be (B, {s}, {s}, {c}) uint8, got {images.shape} {images.dtype}")
    vspec = ViewSpec.from_config(lm.cfg.data, s, c, train=False)
    out: list[ImagePrediction] = []
    for b0 in range(0, len(images), batch_size):
        chunk = images[b0:b0 + batch_size]
        n = len(chunk)
        views = sample_views(vspec, n, None)  # evaluation view: deterministic centre crop
        x = render_views(chunk, views, vspec).to(lm.device)
        vb = view_boxes(views["window"], views["flip"])
        hires = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).contiguous().to(lm.device)
        batch = {"image": x, "view_box": torch.from_numpy(vb).to(lm.device), "hires": hires,
                 "index": torch.arange(n, device=lm.device), "valid": torch.ones(n, dtype=torch.bool, device=lm.device),
                 "labels": torch.zeros(n, lm.spec.num_classes, device=lm.device),
                 "target": torch.full((n,), -1, dtype=torch.long, device=lm.device)}
        with torch.no_grad():
            res = lm.method.predict(lm.model, batch, lm.stage)
        probs = {k: v.float().cpu().numpy() for k, v in res["probs"].items()}
        heat = res.get("heatmap")
        heat = heat.float().cpu().numpy() if heat is not None else None
        boxes = res.get("boxes")
        boxes = boxes.float().cpu().numpy() if boxes is not None else None
        vboxes = res.get("view_boxes")
        vboxes = vboxes.float().cpu().numpy() if vboxes is not None else None
        if vboxes is None and boxes is not None:
            vboxes = source_to_view(boxes, vb)  # vb: the view in the equally flipped image
        crops = _display(res["crops"], lm.spec) if res.get("crops") is not None else None
        for i in range(n):
            win = views["window"][i]
            out.append(ImagePrediction(
                view=_window_pixels(chunk[i], win), window=np.asarray(win, np.float64),
                probs={k: v[i] for k, v in probs.items()},
                heatmap=None if heat is None else np.clip(heat[i], 0.0, 1.0),
                view_box=None if vboxes is None else vboxes[i],
                box=None if boxes is None else boxes[i],
                crop=None if crops is None else crops[i]))
    return out


def _window_pixels(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """The window of a prepared image, with the loaders' pixel rounding (render_views)."""
    left, top, right, bottom = pixel_window(win, img.shape[0], img.shape[1])
    return np.ascontiguousarray(img[top:bottom, left:right])


def _display(crops, spec) -> np.ndarray:
    """Normalised network input (the local branch's crops) -> (B, h, w, C) uint8 on the 0-255 scale."""
    import torch

    c = crops.shape[1]
    mean = torch.tensor(spec.mean, device=crops.device).view(1, -1, 1, 1).expand(1, c, 1, 1)
    std = torch.tensor(spec.std, device=crops.device).view(1, -1, 1, 1).expand(1, c, 1, 1)
    out = (crops.float() * std + mean) * 255.0
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
