"""The one contract every medattn classifier follows (after timm's model interface).

A :class:`ClassifierModel` is a convolutional trunk plus a head::

    features = model.forward_features(x)          # (B, C, h, w): the last conv feature map
    logits   = model.forward_head(features)       # (B, K): global pool -> dropout -> Linear
    pooled   = model.forward_head(features, pre_logits=True)   # (B, C): "Pool5" in AG-CNN
    maps     = model.attention_maps(features)     # (B, A, h, w), non-negative

so that methods (AG-CNN, Grad-CAM losses, attention crops) can reach inside any backbone the
same way, and one parametrised test checks the contract over the whole registry.
"""
from __future__ import annotations

import torch
from torch import nn

from medattn.errors import ConfigError

POOLS = ("max", "avg")


class GlobalPool2d(nn.Module):
    """Global max or average pooling to (B, C).

    Args:
        kind: ``max`` (AG-CNN's Pool5: the paper's branches use global max pooling) or ``avg``.
    """

    def __init__(self, kind: str = "max"):
        super().__init__()
        if kind not in POOLS:
            raise ConfigError(f"model.pool={kind!r} is not one of {', '.join(POOLS)}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3)) if self.kind == "max" else x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return self.kind


class ClassifierModel(nn.Module):
    """Base class: a conv trunk (``forward_features``) and a pool -> dropout -> Linear head.

    Subclasses build the trunk, call ``super().__init__(...)`` with the trunk's channel count and
    implement :meth:`forward_features` and :meth:`gradcam_layer`.

    Attributes:
        arch: the registry name (``resnet50``, ...).
        num_classes: outputs of the head; 0 after ``reset_classifier(0)`` (forward = pooled features).
        num_features: size of the pooled vector; for every backbone but ``vgg16`` (whose pooled
            vector is its 4096-d MLP output) also the channels C of the last feature map.
        map_channels: channels of the last feature map (a property; = num_features unless a
            subclass says otherwise).
        in_chans: input channels (1 for X-rays, 3 for RGB).
        feature_stride: input pixels per feature-map cell (32, or 16 with ``layer4_stride=1``).
        global_pool, drop, fc: the head.

    Args:
        num_features: channels of the trunk's output.
        num_classes: head outputs (0 = no head).
        in_chans: input channels.
        pool: ``max`` or ``avg`` global pooling.
        drop_rate: dropout probability before the Linear layer.
    """

    arch: str = ""
    feature_stride: int = 32

    def __init__(self, *, num_features: int, num_classes: int, in_chans: int, pool: str = "max",
                 drop_rate: float = 0.0):
        super().__init__()
        if num_classes < 0:
            raise ConfigError(f"model.num_classes={num_classes} must be >= 0")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate={drop_rate} must be in [0, 1)")
        self.num_features = num_features
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = GlobalPool2d(pool)
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ the contract
    @property
    def map_channels(self) -> int:
        return self.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, h, w), the last conv feature map."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or the pooled (B, C) vector when ``pre_logits``.

        The pooled vector is taken *before* dropout: it is what AG-CNN's fusion branch concatenates.
        """
        pooled = self.global_pool(features)
        return pooled if pre_logits else self.logits_from_pooled(pooled)

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, num_classes) logits (dropout, then the Linear layer)."""
        return self.fc(self.drop(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_maps(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, A, h, w) non-negative attention maps.

        A plain backbone has one map: AG-CNN's heat map max_k |f_k| (Eq. 3), unscaled; scaling
        to [0, 1] is :func:`medattn.attention.heatmap`'s job. Attention models override this.
        """
        return features.detach().abs().amax(dim=1, keepdim=True)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the Linear head by a fresh one with ``num_classes`` outputs (0 = no head)."""
        if num_classes < 0:
            raise ConfigError(f"num_classes={num_classes} must be >= 0")
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.fc = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                   if num_classes > 0 else nn.Identity())

    def gradcam_layer(self) -> nn.Module:
        """The default Grad-CAM target module (its forward output is the activation used)."""
        raise NotImplementedError
