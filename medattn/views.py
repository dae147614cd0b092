"""The network's view of a prepared image: which window is cropped, flipped, rotated, and how
pixels are normalised. The model's preprocessing, so it belongs to the science layer (as timm's
``pretrained_cfg`` does): the loaders (hpc.loader), evaluation, the report and ``predict`` all
take it from here.

All random decisions are drawn here, in NumPy, from a generator seeded by (seed, epoch, step,
rank), and handed to the pixel code as plain numbers. So the DALI pipeline and the PyTorch
fallback apply the *same* augmentation to the *same* samples, a resumed run redraws exactly
the augmentations it would have drawn, and the window is known exactly — AG-CNN needs it to map
an attention box from the network input back onto the higher-resolution prepared image.

Windows are normalised ``[x0, y0, x1, y1]`` in the coordinates of the *unflipped* prepared
image (the conventions of :mod:`medattn.boxes`). "Resize to R, then crop C at position p" is the window
``[p_x (R-C)/R, p_y (R-C)/R, p_x (R-C)/R + C/R, p_y (R-C)/R + C/R]`` resized to C×C.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medattn.boxes import mirror, pixel_window
from medattn.config_schema import DataConfig

# ImageNet statistics; for one-channel X-rays the RGB means/stds are averaged, which is what a
# gray image replicated to RGB sees after a conv1 whose RGB kernels were summed.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    src_size: int  # prepared image size S
    resize: int  # R
    crop: int  # C (network input)
    mode: str  # random | random_resized | center | none
    hflip: bool
    rotate_deg: float
    brightness: float
    contrast: float
    scale: tuple[float, float]
    mean: tuple[float, ...]  # on the 0..1 scale
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, data: DataConfig, src_size: int, channels: int, train: bool,
                    crop: int | None = None) -> "ViewSpec":
        if data.normalize == "imagenet":
            mean = _IMAGENET_MEAN if channels == 3 else (sum(_IMAGENET_MEAN) / 3,)
            std = _IMAGENET_STD if channels == 3 else (sum(_IMAGENET_STD) / 3,)
        elif data.normalize == "half":
            mean, std = (0.5,) * channels, (0.5,) * channels
        elif data.normalize == "mean":
            # AG-CNN's "subtract the ImageNet mean" only, read on the 0..1 pixel scale (std 1).
            mean = _IMAGENET_MEAN if channels == 3 else (sum(_IMAGENET_MEAN) / 3,)
            std = (1.0,) * channels
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        c = crop or data.image_size
        r = data.resize * c // data.image_size if crop else data.resize
        if train:
            return cls(src_size, r, c, data.train_crop, data.hflip, data.rotate_deg, data.brightness,
                       data.contrast, tuple(data.random_resized_scale), mean, std)
        mode = "none" if data.train_crop == "none" else "center"
        return cls(src_size, r, c, mode, False, 0.0, 0.0, 0.0, (1.0, 1.0), mean, std)

    @property
    def augments(self) -> bool:
        return self.rotate_deg > 0 or self.brightness > 0 or self.contrast > 0


def view_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, int(epoch), int(step), int(rank), 0x71E3])))


def sample_views(spec: ViewSpec, n: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Per-sample view parameters: window (n,4), flip (n,), angle (n,), brightness/contrast (n,)."""
    r, c = spec.resize, spec.crop
    if spec.mode == "none":
        win = np.tile(np.array([0, 0, 1, 1], np.float32), (n, 1))
    elif spec.mode == "center" or rng is None:
        off = (r - c) / (2 * r)
        win = np.tile(np.array([off, off, off + c / r, off + c / r], np.float32), (n, 1))
    elif spec.mode == "random":
        # Integer crop positions in the resized image, as torchvision's RandomCrop draws them.
        px = rng.integers(0, r - c + 1, size=n) / r
        py = rng.integers(0, r - c + 1, size=n) / r
        win = np.stack([px, py, px + c / r, py + c / r], 1).astype(np.float32)
    elif spec.mode == "random_resized":
        win = _random_resized_windows(rng, n, spec.scale)
    else:
        raise ValueError(f"unknown crop mode {spec.mode!r}")
    flip = rng.random(n) < 0.5 if (rng is not None and spec.hflip) else np.zeros(n, bool)
    if rng is not None and spec.rotate_deg > 0:
        angle = rng.uniform(-spec.rotate_deg, spec.rotate_deg, n).astype(np.float32)
    else:
        angle = np.zeros(n, np.float32)
    bright = (1 + rng.uniform(-spec.brightness, spec.brightness, n)).astype(np.float32) \
        if (rng is not None and spec.brightness > 0) else np.ones(n, np.float32)
    contrast = (1 + rng.uniform(-spec.contrast, spec.contrast, n)).astype(np.float32) \
        if (rng is not None and spec.contrast > 0) else np.ones(n, np.float32)
    return {"window": win, "flip": flip, "angle": angle, "brightness": bright, "contrast": contrast}


def _random_resized_windows(rng: np.random.Generator, n: int, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crops (torchvision RandomResizedCrop's rule), on a unit square."""
    out = np.zeros((n, 4), np.float32)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        for _ in range(10):
            area = rng.uniform(*scale)
            ar = math.exp(rng.uniform(*log_r))
            w, h = math.sqrt(area * ar), math.sqrt(area / ar)
            if 0 < w <= 1 and 0 < h <= 1:
                x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
                out[i] = (x0, y0, x0 + w, y0 + h)
                break
        else:
            out[i] = (0, 0, 1, 1)
    return out


def view_boxes(window: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Where the network input sits inside the (equally flipped) prepared image.

    The hires image handed to the model is flipped like the view, so a window [x0, x1] of the
    unflipped image becomes [1 - x1, 1 - x0] in the flipped one.
    """
    return mirror(window, flip)


def render_views(images: np.ndarray, views: dict[str, np.ndarray], spec: ViewSpec):
    """(B,S,S,C) uint8 + view parameters -> (B,C,crop,crop) float32 tensor, normalised: the pixel
    work of the PyTorch loader, also used for evaluation views outside a loader (report, predict).

    torch is imported here, not at the top: the loader's worker processes import this module for
    the view parameters alone.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # B,C,S,S
    b, c, s, _ = x.shape
    out = torch.empty((b, c, spec.crop, spec.crop), dtype=torch.float32)
    win = views["window"]
    for i in range(b):
        left, top, right, bottom = pixel_window(win[i], s, s)
        patch = x[i:i + 1, :, top:bottom, left:right]
        patch = F.interpolate(patch, size=(spec.crop, spec.crop), mode="bilinear", align_corners=False,
                              antialias=True)
        if views["flip"][i]:
            patch = patch.flip(-1)
        out[i] = patch[0]
    if spec.rotate_deg > 0:
        from torchvision.transforms.v2 import functional as TF

        for i in range(b):
            out[i] = TF.rotate(out[i], float(views["angle"][i]), fill=0.0)
    if spec.brightness > 0 or spec.contrast > 0:
        # DALI's brightness_contrast: out = brightness * (in - 0.5*max) * contrast + 0.5*max (on 0..255)
        bri = torch.from_numpy(views["brightness"]).view(b, 1, 1, 1)
        con = torch.from_numpy(views["contrast"]).view(b, 1, 1, 1)
        out = (bri * ((out - 127.5) * con + 127.5)).clamp(0, 255)
    return normalize(out, spec.mean, spec.std)


# --------------------------------------------------------------------------------------------
# Normalisation: the one definition of the network input's pixel scale (loaders, methods, the
# lung model, predict, export). DALI's crop_mirror_normalize applies the same map on its side.
# --------------------------------------------------------------------------------------------
def _channel_stats(v, x):
    """``mean``/``std`` as a (1, C, 1, 1) float32 tensor on ``x``'s device (a tensor is used as
    given: callers on a GPU keep theirs, a tensor built from Python numbers is a blocking copy)."""
    import torch

    if isinstance(v, torch.Tensor):
        return v
    return torch.tensor(tuple(v), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)


def normalize(x, mean, std):
    """Pixels on the 0-255 scale (uint8, or float after resizing) -> network input.

    ``(x / 255 - mean) / std`` per channel, ``mean``/``std`` on the 0..1 scale (``ViewSpec`` /
    ``DataSpec``: sequences, or (1, C, 1, 1) tensors). ``x`` is a (B, C, H, W) tensor; the result
    is float32.
    """
    return (x.float() / 255.0 - _channel_stats(mean, x)) / _channel_stats(std, x)


def denormalize(x, mean, std):
    """The inverse of :func:`normalize`: network input -> float pixels on the 0-255 scale (not
    rounded or clipped; for display, ``.clamp(0, 255).round()``)."""
    return (x.float() * _channel_stats(std, x) + _channel_stats(mean, x)) * 255.0
