"""Lung segmentation (method ``lungseg``): the lung model behind seed 002's lung boxes, trained
and scored through the same runtime as the classifiers.

Data: a prepared directory made with ``medattn prepare ... --masks DIR`` holds, besides the
images, every lung mask as pixels (``PREP/masks/lung.npy``, see medattn/data/_masks.py). The
loader delivers the image views (crop window and flip per sample); this method cuts the same
window out of the stored mask on the device (``affine_grid``/``grid_sample``), so masks follow
every crop and flip exactly. Rotation is refused (the loaders do not report the angle).

Loss: BCE, soft Dice, or their sum (``lungseg.loss``). Validation and ``medattn eval`` report
per-image Dice and IoU of the thresholded mask (``val/dice``, ``val/iou``; per_image.csv);
images without a mask are left out.

Lung boxes: ``medattn prepare ... --lung-model RUN`` runs :func:`predict_lung_boxes` once over
all prepared images: threshold the predicted mask, box = the bounding box of all lung pixels (the
union of all contours, as the published ``box()`` does), normalised; None when nothing is found
(the Grad-CAM loss then uses the whole image, as published).
"""
from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

# the lung box of a mask: normalised [x, y, w, h] of its pixels (None if empty)
from medattn.boxes import mask_xywh as box_of_mask
from medattn.errors import ConfigError, DataError
from medattn.methods.base import Method


@dataclass
class LungSegConfig:
    """Lung segmentation (image/mask pairs) for seed 002's lung boxes."""

    arch: str = "unet"  # unet | fcn_resnet50 | deeplabv3_resnet50 | deeplabv3_mobilenet_v3_large | lraspp_mobilenet_v3_large
    base_width: int = 64  # unet: channels of the first level (64 = Ronneberger et al.)
    depth: int = 4  # unet: number of down-sampling steps
    loss: str = "bce_dice"  # bce | dice | bce_dice
    threshold: float = 0.5  # probability threshold of the predicted mask


class LungSegMethod(Method):
    name = "lungseg"
    sections = {"lungseg": LungSegConfig}
    choices = {"lungseg.arch": ("unet", "fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                                "lraspp_mobilenet_v3_large"),
               "lungseg.loss": ("bce", "dice", "bce_dice")}

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if c.data.rotate_deg > 0:
            raise ConfigError("lungseg: data.rotate_deg must be 0 (the loaders do not report the rotation, so "
                              "the mask could not follow it)")
        if not 0.0 < c.lungseg.threshold < 1.0:
            raise ConfigError(f"config key 'lungseg.threshold' must be in (0, 1), got {c.lungseg.threshold}")
        self._store = None

    # ------------------------------------------------------------------ data
    def store(self):
        from medattn.data._masks import MaskStore

        if self._store is None:
            store = MaskStore.open(self.spec.root) if self.spec.root else None
            if store is None:
                raise ConfigError(f"lungseg: the prepared data {self.spec.root or '(unknown)'} has no lung masks; "
                                  "prepare image/mask pairs with `medattn prepare ... --masks DIR`")
            self._store = store
        return self._store

    def target_masks(self, batch: dict[str, torch.Tensor], height: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored masks of the batch, cut to each sample's view: (B, 1, H, W) 0/1 and known (B,)."""
        store = self.store()
        dev = batch["image"].device
        idx = batch["index"].detach().cpu().numpy()
        m = torch.from_numpy(store.read(idx)).to(dev).float().unsqueeze(1)  # (B, 1, S, S)
        known = torch.from_numpy(store.known(idx)).to(dev)
        b, s = m.shape[0], m.shape[-1]
        win = batch.get("window")
        win = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=dev).expand(b, 4) if win is None else win.to(dev).float()
        # Area-average first when the view shrinks the mask (as the image views are antialiased).
        k = int((win[:, 2] - win[:, 0]).min().item() * s // width)
        while k > 1 and s % k:
            k -= 1
        if k > 1:
            m = F.avg_pool2d(m, k)
        flip = batch.get("flip")
        sign = torch.ones(b, device=dev) if flip is None else 1.0 - 2.0 * flip.to(dev).float()
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = (win[:, 2] - win[:, 0]) * sign
        theta[:, 0, 2] = win[:, 0] + win[:, 2] - 1
        theta[:, 1, 1] = win[:, 3] - win[:, 1]
        theta[:, 1, 2] = win[:, 1] + win[:, 3] - 1
        grid = F.affine_grid(theta, [b, 1, height, width], align_corners=False)
        view = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (view >= 0.5).float(), known

    # ------------------------------------------------------------------ model
    def build_model(self):
        from medattn.models.unet import build_segmentation_model

        s = self.cfg.lungseg
        return build_segmentation_model(s.arch, in_chans=self.spec.channels, base_width=s.base_width, depth=s.depth)

    # ------------------------------------------------------------------ steps
    def training_loss(self, model, batch, stage, epoch):
        x = batch["image"]
        logits = model(x).float()
        y, known = self.target_masks(batch, *x.shape[-2:])
        w = known.float().view(-1, 1, 1, 1)
        n = w.sum().clamp_min(1.0)
        kind = self.cfg.lungseg.loss
        bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean(dim=(1, 2, 3)).sum() / n
        p = torch.sigmoid(logits)
        inter = (p * y).flatten(1).sum(1)
        soft_dice = (2 * inter + 1.0) / (p.flatten(1).sum(1) + y.flatten(1).sum(1) + 1.0)
        dice_loss = ((1 - soft_dice) * known.float()).sum() / n
        loss = {"bce": bce, "dice": dice_loss, "bce_dice": bce + dice_loss}[kind]
        return loss, {"loss": loss.detach(), "bce": bce.detach(), "dice_loss": dice_loss.detach()}

    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        x = batch["image"]
        prob = torch.sigmoid(model(x).float())
        out: dict[str, Any] = {"probs": {}, "heatmap": prob[:, 0]}
        if "index" in batch and "window" in batch:
            y, known = self.target_masks(batch, *x.shape[-2:])
            dice, iou = mask_scores(prob >= self.cfg.lungseg.threshold, y > 0.5)
            nan = torch.full_like(dice, float("nan"))
            out["extras"] = {"dice": torch.where(known, dice, nan), "iou": torch.where(known, iou, nan)}
        return out


def mask_scores(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice 2|P∩G|/(|P|+|G|) and IoU |P∩G|/|P∪G| of boolean masks (B, ...); both are
    1 when prediction and truth are empty."""
    p, t = pred.flatten(1).float(), truth.flatten(1).float()
    inter = (p * t).sum(1)
    ps, ts = p.sum(1), t.sum(1)
    union = ps + ts - inter
    empty = (ps + ts) == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (ps + ts).clamp_min(1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice, iou


# ---------------------------------------------------------------------------------------------
# Using a trained model (medattn prepare --lung-model)
# ---------------------------------------------------------------------------------------------
class LungSegmenter:
    """A trained lungseg model, ready to segment prepared images.

    Args:
        checkpoint: a checkpoint file of a lungseg run (``medattn prepare --lung-model RUN`` picks
            the run's best one).
        device: torch device (default: CUDA if available, else CPU).
    """

    def __init__(self, checkpoint: str | Path, device: str | torch.device | None = None):
        from medattn.config import load_config
        from medattn.safeload import UnreadableFileError, UnsafeFileError, load_plain

        self.path = Path(checkpoint)
        if self.path.is_dir():
            raise DataError(self.path, "a run directory, not a checkpoint file: `medattn prepare --lung-model RUN` "
                                       "picks a run's checkpoint")
        if not self.path.is_file():
            raise DataError(self.path, "--lung-model: no such run directory or checkpoint")

        try:
            # weights_only: a lung model handed over by someone else cannot run code on loading.
            state = load_plain(self.path)
        except UnsafeFileError as e:
            raise DataError(self.path, f"refused: {e}") from None
        except (UnreadableFileError, OSError) as e:
            raise DataError(self.path, f"unreadable checkpoint: {e}") from None
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise DataError(self.path, "not a medattn checkpoint (no 'model'/'config' entries)")
        cfg = load_config(None, data=state["config"])
        if cfg.method != "lungseg":
            raise DataError(self.path, f"--lung-model needs a lungseg run, this one is method {cfg.method!r}")
        self.cfg = cfg
        self.state = state["model"]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = None
        self.in_chans = 0

    def _build(self, in_chans: int) -> None:
        """Build the network for ``in_chans``-channel images (known only when images arrive)."""
        from medattn.methods import DataSpec, build
        from medattn.views import ViewSpec  # the loaders' normalisation, as DataSpec uses it

        # The model as training built it (the method registry), for this many channels.
        size = self.cfg.data.image_size
        _, model = build(self.cfg, DataSpec(("lung",), ("lung",), "segmentation", in_chans, size))
        try:
            model.load_state_dict(self.state)
        except RuntimeError as e:
            raise DataError(self.path, f"the lung model does not fit {in_chans}-channel images: {e}") from None
        self.model = model.to(self.device).eval()
        self.in_chans = in_chans
        v = ViewSpec.from_config(self.cfg.data, self.cfg.data.image_size, in_chans, train=False)
        self.stats = (v.mean, v.std)

    def masks(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, C) uint8 prepared images -> (B, S, S) bool lung masks at the prepared size.

        The whole image is resized to ``data.image_size`` (the model's training input size),
        normalised as in training, segmented, and the probability map resized back.
        """
        if self.model is None or self.in_chans != images.shape[-1]:
            self._build(int(images.shape[-1]))
        from medattn.views import normalize

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        s = x.shape[-1]
        size = self.cfg.data.image_size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = normalize(x, *self.stats)  # as in training
        with torch.no_grad():
            prob = torch.sigmoid(self.model(x).float())
        prob = F.interpolate(prob, size=(s, s), mode="bilinear", align_corners=False)
        return (prob[:, 0] >= self.cfg.lungseg.threshold).cpu().numpy()


def predict_lung_boxes(read_batch: Callable[[np.ndarray], np.ndarray], n: int, checkpoint: str | Path,
                       batch_size: int = 32, device: str | None = None) -> list[list[float] | None]:
    """Lung box of each of ``n`` prepared images, from a trained lungseg model.

    Args:
        read_batch: indices -> (B, S, S, C) uint8 prepared images.
        n: number of images (indices 0..n-1).
        checkpoint: a lungseg checkpoint file.
        batch_size: images per forward pass.
        device: torch device (default CUDA if available).
    """
    seg = LungSegmenter(checkpoint, device)
    out: list[list[float] | None] = []
    for a in range(0, n, batch_size):
        idx = np.arange(a, min(n, a + batch_size))
        for m in seg.masks(read_batch(idx)):
            out.append(box_of_mask(m))
    return out
