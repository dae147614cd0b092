"""Run a trained model of a run on a few images, for heat-map overlays.

This is the report's one bridge to the runtime: it rebuilds the method and model exactly as
``medattn eval`` does (hpc/evaluate.py) and renders the network input with the loaders' own
evaluation view code (``hpc.loader``: resize, centre crop, normalisation), so an overlay shows
what the evaluated model saw. The ``hpc`` imports are local to the functions (``medattn`` stays
importable without the runtime), like the CLI's lazy command imports.

Images come in as prepared pixels, (B, S, S, C) uint8 at the prepared size S: either read
from the prepared directory or decoded and resized from a PNG like ``medattn prepare`` does
(:func:`load_png`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medattn.errors import DataError, MedattnError


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


def pick_checkpoint(run: Path, stage_names: list[str], state: dict[str, Any], stage: str | None = None,
                    kind: str = "best") -> tuple[str, Path, str]:
    """(stage, checkpoint path, note): the best checkpoint of the last finished stage by default.

    A run with no finished stage falls back to the newest stage that has a checkpoint (its
    epochs so far), and says so in the note.

    Raises:
        DataError: no usable checkpoint (naming the path expected).
    """
    st = state.get("stages", {})
    if stage is not None:
        if stage not in stage_names:
            raise MedattnError(f"--stage {stage!r} is not a stage of this run ({', '.join(stage_names)})")
        path = run / "ckpt" / stage / f"{kind}.pt"
        if not path.is_file():
            raise DataError(path, f"checkpoint missing (stage {stage!r} has not produced one yet)")
        return stage, path, "" if st.get(stage, {}).get("done") else f"stage {stage} has not finished"
    done = [s for s in stage_names if st.get(s, {}).get("done")]
    if done:
        path = run / "ckpt" / done[-1] / f"{kind}.pt"
        if path.is_file():
            return done[-1], path, ""
    for s in reversed(stage_names):
        for k in (kind, "last"):
            path = run / "ckpt" / s / f"{k}.pt"
            if path.is_file():
                return s, path, f"stage {s} has not finished: the overlays use its {k} checkpoint so far"
    raise DataError(run / "ckpt", "no checkpoint yet: the run has not finished an epoch")


def load_model(run: str | Path, data: str | Path, stage: str | None = None, checkpoint: str = "best",
               device: str = "cpu") -> LoadedModel:
    """Rebuild a run's method and model and load its checkpoint.

    Args:
        run: the run directory.
        data: its prepared directory (for the label names, image size and normalisation).
        stage: the stage whose model to load (default: the last finished one).
        checkpoint: ``best`` or ``last``.
        device: torch device for inference.
    """
    import json

    import torch

    from hpc.checkpoint import load as load_ckpt
    from medattn.config import load_saved_config
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method

    run = Path(run)
    cfg = load_saved_config(run / "config.yaml", ["runtime.device=cpu"] if device == "cpu" else None)
    state_path = run / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"stages": {}}
    stage, path, note = pick_checkpoint(run, cfg.stage_names(), state, stage, checkpoint)
    ds = PreparedDataset.open(data)
    spec = DataSpec.from_dataset(ds, cfg)
    method = create_method(cfg, spec)
    dev = torch.device(device)
    model = method.build_model().to(dev)
    st = load_ckpt(path, dev)
    try:
        model.load_state_dict(st["model"])
    except (KeyError, RuntimeError) as e:
        raise DataError(path, f"checkpoint does not fit the run's model: {str(e).splitlines()[0]}") from None
    method.load_extra_state(st.get("method", {}))
    model.eval()
    return LoadedModel(method, model, cfg, spec, ds, stage, path, dev, note)


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
    """Run the model on prepared-size images.

    Args:
        lm: from :func:`load_model`.
        images: (B, S, S, C) uint8 at the prepared size of ``lm.ds``.
        batch_size: images per forward pass.

    Returns:
        One :class:`ImagePrediction` per image, in order.
    """
    import torch

    from hpc.loader.torch_loader import render_views
    from hpc.loader.views import ViewSpec, sample_views, view_boxes

    images = np.asarray(images)
    s, c = lm.ds.image_size, lm.ds.channels
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
            vboxes = _to_view(boxes, vb)
        crops = _agcnn_crops(lm, batch, vboxes) if vboxes is not None and lm.cfg.method == "agcnn" else None
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


def _to_view(boxes: np.ndarray, vb: np.ndarray) -> np.ndarray:
    w = (vb[:, 2] - vb[:, 0])[:, None]
    h = (vb[:, 3] - vb[:, 1])[:, None]
    off = np.stack([vb[:, 0], vb[:, 1], vb[:, 0], vb[:, 1]], 1)
    return (boxes - off) / np.concatenate([w, h, w, h], 1)


def _window_pixels(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """The window of a prepared image, with the loaders' pixel rounding (render_views)."""
    s = img.shape[0]
    x0, y0, x1, y1 = (float(v) for v in win)
    left, top = int(round(x0 * s)), int(round(y0 * s))
    right, bottom = max(left + 1, int(round(x1 * s))), max(top + 1, int(round(y1 * s)))
    return np.ascontiguousarray(img[top:bottom, left:right])


def _agcnn_crops(lm: LoadedModel, batch: dict[str, Any], vboxes: np.ndarray) -> np.ndarray:
    """The local branch's input, as AGCNNMethod crops it (from the view, or from the prepared
    image with ``agcnn.crop_source=prepared``), back on the 0-255 scale for display."""
    import torch

    from medattn.attention import crop_and_resize, map_boxes_to_source

    x = batch["image"]
    size = x.shape[-1]
    bx = torch.from_numpy(np.asarray(vboxes, np.float32)).to(x.device)
    if lm.cfg.agcnn.crop_source == "prepared":
        src = map_boxes_to_source(bx, batch["view_box"])
        crops = crop_and_resize(batch["hires"].float(), src, size)
    else:
        crops = crop_and_resize(x.float(), bx, size)
        c = crops.shape[1]
        mean = torch.tensor(lm.spec.mean, device=x.device).view(1, -1, 1, 1).expand(1, c, 1, 1)
        std = torch.tensor(lm.spec.std, device=x.device).view(1, -1, 1, 1).expand(1, c, 1, 1)
        crops = (crops * std + mean) * 255.0
    return crops.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
