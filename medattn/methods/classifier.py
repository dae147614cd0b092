"""A plain multi-label (or single-label) classifier on any registered backbone.

Each stage trains the whole network with its own loss (``stages.<name>.loss``: bce | focal | ce)
and starts from the previous stage's best checkpoint — which is exactly seed 004's recipe
(VGG16-BN + LKA: stage 1 BCE, stage 2 focal loss) and a CheXNet-style baseline.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medattn import losses
from medattn.methods.base import Method
from medattn.methods.focal import FocalLoss


class ClassifierMethod(FocalLoss, Method):
    name = "classifier"
    sections = {"focal": losses.FocalConfig}

    def build_model(self) -> nn.Module:
        from medattn.models import create_model

        m = self.cfg.model
        return create_model(m.backbone, num_classes=self.num_classes, in_chans=self.spec.channels,
                            weights=m.weights, pool=m.pool, drop_rate=m.drop_rate)

    def loss_kind(self, stage: str) -> str:
        """Cross-entropy for a single-label task; otherwise ``stages.<stage>.loss``."""
        return "ce" if self.spec.task == "singlelabel" else self.cfg.stages[stage].loss

    def loss_fn(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        return self.loss(stage)(logits, labels=batch["labels"], target=batch["target"])

    def training_loss(self, model, batch, stage, epoch):
        logits = model(batch["image"])
        loss = self.loss_fn(logits, batch, stage)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        logits = model(batch["image"])
        return {"probs": {"main": self.to_probs(logits)}}
