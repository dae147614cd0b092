"""A toy method that lives outside the product: a small CNN backbone with a CBAM-like attention
block (channel attention from pooled features, then a spatial map), registered from here only.
tests/test_add_method.py builds, trains and uses it through the public APIs, which proves that a
method needs no edit of any product file (docs/architecture.md, "Adding a method").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medattn.methods import register_method
from medattn.methods.base import Method
from medattn.models import ClassifierModel, register_model

NAME = "toy_cbam"


@register_model("toy_cnn")
def toy_cnn(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
            width: int = 8) -> ClassifierModel:
    return ToyCNN(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate, width=width)


class ToyCNN(ClassifierModel):
    """Two strided convolutions: a backbone registered from outside medattn/models."""

    feature_stride = 4

    def __init__(self, *, num_classes: int, in_chans: int, pool: str, drop_rate: float, width: int):
        super().__init__(num_features=width, num_classes=num_classes, in_chans=in_chans, pool=pool,
                         drop_rate=drop_rate)
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def gradcam_layer(self) -> nn.Module:
        return self.body[-1]


@dataclass
class ToyCBAMConfig:
    reduction: int = 2  # channel-attention bottleneck
    kernel: int = 3  # spatial-attention convolution


class CBAM(nn.Module):
    """Channel then spatial attention on a feature map (the shape of Woo et al.'s block)."""

    def __init__(self, channels: int, reduction: int, kernel: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ca = torch.sigmoid(self.mlp(f.mean((2, 3))) + self.mlp(f.amax((2, 3))))[:, :, None, None]
        f = f * ca
        sa = torch.sigmoid(self.spatial(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)))
        return f * sa, sa[:, 0]


class ToyCBAMNet(nn.Module):
    def __init__(self, backbone: ClassifierModel, cfg: ToyCBAMConfig):
        super().__init__()
        self.backbone = backbone
        self.cbam = CBAM(backbone.num_features, cfg.reduction, cfg.kernel)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, sa = self.cbam(self.backbone.forward_features(x))
        return self.backbone.forward_head(f), sa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


@register_method
class ToyCBAMMethod(Method):
    name = NAME
    stage_order = ("train",)
    sections = {NAME: ToyCBAMConfig}
    choices = {f"{NAME}.kernel": (3, 5, 7)}
    branch_labels = {"main": "CBAM head"}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.toy_cbam.reduction < 1:
            from medattn.errors import ConfigError

            raise ConfigError(f"config key '{NAME}.reduction' must be >= 1, got {cfg.toy_cbam.reduction}")

    def build_model(self) -> nn.Module:
        from medattn.models import create_model

        m = self.cfg.model
        backbone = create_model(m.backbone, num_classes=self.num_classes, in_chans=self.spec.channels,
                                weights=m.weights, pool=m.pool, drop_rate=m.drop_rate)
        return ToyCBAMNet(backbone, self.cfg.toy_cbam)

    def training_loss(self, model, batch, stage, epoch):
        logits, _ = model.forward_all(batch["image"])
        loss = self.loss(stage)(logits, labels=batch["labels"], target=batch["target"])
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        logits, sa = model.forward_all(batch["image"])
        lo = sa.amin((1, 2), keepdim=True)
        hi = sa.amax((1, 2), keepdim=True)
        return {"probs": {"main": self.to_probs(logits)}, "heatmap": (sa - lo) / (hi - lo).clamp_min(1e-8)}
