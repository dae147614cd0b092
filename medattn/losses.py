"""Losses shared by the methods (each method adds its own terms on top)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
