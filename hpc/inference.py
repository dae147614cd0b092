"""The inference floor: a trained model back from a run, and a run (or the model being trained)
turned into predictions. Everything that *uses* a model stands on this module and nothing else:
``medattn eval`` and the trainer's validation (:func:`run_inference` over a split, gathered on
rank 0), ``predict`` / :func:`medattn.load`, ``export``, ``report``, ``viz`` and the trainer's
TensorBoard heat maps (:func:`predict_images` on prepared-size pixels, the method's own
``predict``: every branch, attention, crops).

- :class:`LoadedModel` is the one loaded-model type: :func:`load_model` rebuilds it from a run
  (config -> method -> model -> checkpoint), :meth:`LoadedModel.in_training` wraps the trainer's
  live model.
- :func:`read_pixels` is the one way an image file or array becomes prepared-size pixels
  (:mod:`medattn.data.imagefiles`, the rules ``medattn prepare`` follows).
- The network input is rendered by the loaders' own evaluation view code (:mod:`medattn.views`:
  window, resize, normalisation), so what is predicted or drawn is what the evaluated model saw.

Each rank's split predictions are collected in a :class:`medattn.metrics.Accumulator` (on the
device, one host transfer at the end) and gathered on rank 0 (:mod:`hpc.distributed`), where the
padding that gives every rank the same number of batches is already dropped and the predictions
are put back in sample order.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc import distributed, faults
from hpc.checkpoint import load as load_checkpoint_file
from hpc.run import Run
from medattn.boxes import pixel_window, source_to_view
from medattn.errors import DataError
from medattn.methods.base import Method
from medattn.metrics import Accumulator, Predictions

__all__ = ["ImagePrediction", "LoadedModel", "Predictions", "autocast_ctx", "load_model", "predict_images",
           "read_pixels", "run_inference"]


# ---------------------------------------------------------------------------------------------
# a trained model back
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for inference (``model`` in eval mode on ``device``) and what feeds it.

    ``run`` is None for the trainer's live model (:meth:`in_training`); otherwise the run the
    checkpoint ``checkpoint`` came from.
    """

    run: Run | None
    cfg: Any
    spec: Any  # medattn.methods.DataSpec
    method: Any
    model: Any
    stage: str
    checkpoint: Path | None
    device: Any
    note: str = ""
    data: str | None = None  # the prepared directory, when one was used
    info: dict | None = None  # the checkpoint's inference record (hpc.checkpoint.inference_record)
    # The split the checkpoint was trained on ({name, seed, hash}; None: an older checkpoint).
    trained_split: dict | None = None

    @classmethod
    def in_training(cls, method: Any, model: Any, cfg: Any, spec: Any, stage: str, device: Any) -> "LoadedModel":
        """The trainer's own model (no run directory read, no checkpoint loaded)."""
        return cls(None, cfg, spec, method, model, stage, None, device)


def load_model(run_dir: str | os.PathLike | Run, stage: str | None = None, checkpoint: str = "best",
               device: Any = "cpu", data: str | os.PathLike | None = None,
               overrides: list[str] | None = None) -> LoadedModel:
    """Rebuild a run's method and model and load a checkpoint: config -> method -> model -> weights.

    Args:
        run_dir: the run directory (or a :class:`hpc.run.Run`).
        stage: whose model (default: the last finished stage; see :meth:`Run.pick_checkpoint`).
        checkpoint: ``best`` or ``last``.
        device: torch device.
        data: the prepared directory; by default the checkpoint's own record of labels and
            preprocessing, else the prepared directory the run trained on.
        overrides: runtime overrides applied to the saved config.
    """
    from hpc.distributed import apply_runtime_flags
    from medattn.methods import DataSpec, build

    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    cfg = run.config(overrides)
    stage, path, note = run.pick_checkpoint(stage, checkpoint, cfg.stage_names())
    dev = torch.device(device)
    state = load_checkpoint_file(path, dev)
    data_dir = str(data) if data else None
    if data_dir is None and state.get("spec"):
        spec = DataSpec.from_dict(state["spec"])
    else:
        data_dir = data_dir or run.data_path()
        if data_dir is None:
            raise DataError(run.provenance_path, "cannot tell which prepared data the run used; pass --data")
        from medattn.data.prepared import PreparedDataset

        spec = DataSpec.from_dataset(PreparedDataset.open(data_dir), cfg)
    method, model = build(cfg, spec)
    # Evaluation as training runs: channels_last (inputs are converted the same way) and cuDNN's
    # algorithm search for the fixed shapes.
    model = apply_runtime_flags(model.to(dev), cfg, dev)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise DataError(path, f"checkpoint does not fit the run's model: {str(e).splitlines()[0]}") from None
    method.load_extra_state(state.get("method", {}))
    model.eval()
    return LoadedModel(run, cfg, spec, method, model, stage, path, dev, note, data_dir, state.get("inference"),
                       (state.get("spec") or {}).get("split"))


# ---------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------
def read_pixels(image: Any, size: int, channels: int) -> np.ndarray:
    """An image file (PNG, JPEG, DICOM) or an in-memory image -> the (size, size, channels) uint8
    array ``medattn prepare`` would have stored (:mod:`medattn.data.imagefiles`).

    Raises:
        ImageFileError (a DataError): an unreadable file, named.
        ValueError: an array of another shape or dtype.
    """
    from medattn.data.imagefiles import image_from_array, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image, size, channels)
    return image_from_array(image, size, channels)


# ---------------------------------------------------------------------------------------------
# a model on images
# ---------------------------------------------------------------------------------------------
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


def predict_images(lm: LoadedModel, images: np.ndarray, batch_size: int = 16) -> list[ImagePrediction]:
    """Run the model on prepared-size images: the one inference path of the report, ``viz``,
    ``predict`` and :func:`medattn.load` (the method's own ``predict``: every branch, attention).

    Args:
        lm: the model (:func:`load_model`, :meth:`LoadedModel.in_training`).
        images: (B, S, S, C) uint8 at the prepared size of the run (``lm.spec.prepared_size``).
        batch_size: images per forward pass.

    Returns:
        One :class:`ImagePrediction` per image, in order.
    """
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
    from medattn.views import denormalize

    out = denormalize(crops, spec.mean, spec.std)
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# a model over a split (validation, ``medattn eval``)
# ---------------------------------------------------------------------------------------------
def autocast_ctx(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_inference(method: Method, model: torch.nn.Module, loader, stage: str, device: torch.device,
                  precision: str = "fp32", channels_last: bool = False,
                  max_batches: int | None = None, progress=None) -> Predictions | None:
    """Predict on this rank's share; returns the gathered Predictions on rank 0, None elsewhere.
    ``progress``: a :class:`medattn.progress.Progress` counting batches (``medattn eval``)."""
    was_training = model.training
    model.eval()
    acc = Accumulator()
    for k, batch in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        if channels_last and device.type == "cuda":
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            out = method.predict(model, batch, stage)
        if k == 0:
            faults.point("validation")
        acc.add(batch["index"], out["probs"], batch["valid"], out.get("boxes"), out.get("extras"))
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    parts = distributed.all_gather_object(acc.part())
    if not distributed.current().is_primary:
        return None
    return Accumulator.merge(parts)
