"""Losses shared by the methods (each method adds its own terms on top), and the one factory of a
stage's classification loss (:class:`ClassificationLoss`, from ``stages.<stage>.loss`` and the
``focal`` section)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class FocalConfig:
    """The ``focal`` config section (methods whose stages may use ``loss: focal`` own it)."""

    alpha: float = 1.0
    gamma: float = 2.0
    class_alpha: list[float] = field(default_factory=list)  # optional per-class alpha


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over batch and classes (AG-CNN Eq. 2)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def focal(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
          class_alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss as seed 004 defines it: alpha * (1 - p_t)^gamma * BCE, p_t = exp(-BCE), mean.

    ``class_alpha`` (L,) optionally replaces the scalar alpha per class (applied to positives,
    1 - alpha to negatives, as in Lin et al.); the published setting is scalar alpha = 1.
    """
    logits, labels = logits.float(), labels.float()
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    w = (1 - p_t) ** gamma if gamma != 0 else torch.ones_like(ce)
    if class_alpha is not None:
        a = class_alpha.to(ce).view(1, -1)
        w = w * (labels * a + (1 - labels) * (1 - a))
    else:
        w = w * alpha
    return (w * ce).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target)


LOSS_NAMES = ("bce", "focal", "ce")


class ClassificationLoss:
    """One stage's classification loss: ``bce`` (multi-hot labels), ``focal`` (multi-hot labels,
    with the ``focal`` section's alpha, gamma and optional per-class alpha) or ``ce`` (class
    indices). Call it as ``loss(logits, labels=..., target=...)``.

    The per-class alpha is made once per device, not on every step: a tensor built from a Python
    list is a blocking host-to-device copy on CUDA.
    """

    def __init__(self, kind: str, focal_cfg: FocalConfig | None = None):
        if kind not in LOSS_NAMES:
            raise ValueError(f"loss {kind!r} is not one of {', '.join(LOSS_NAMES)}")
        if kind == "focal" and focal_cfg is None:
            raise ValueError("focal loss needs the focal config section")
        self.kind = kind
        self.focal_cfg = focal_cfg
        self._class_alpha: torch.Tensor | None = None

    def _alpha_on(self, device: torch.device) -> torch.Tensor | None:
        ca = self.focal_cfg.class_alpha if self.focal_cfg is not None else None
        if not ca:
            return None
        if self._class_alpha is None or self._class_alpha.device != device:
            self._class_alpha = torch.tensor(ca, dtype=torch.float32).to(device)
        return self._class_alpha

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor | None = None,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "ce":
            return cross_entropy(logits, target)
        if self.kind == "focal":
            f = self.focal_cfg
            return focal(logits, labels, f.alpha, f.gamma, self._alpha_on(logits.device))
        return bce(logits, labels)
