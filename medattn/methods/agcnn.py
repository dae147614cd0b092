"""AG-CNN (Guan et al. 2018, "Diagnose like a Radiologist"), as the paper specifies it
(docs/methods/agcnn.md; /research methods.md section 0):

* global branch: backbone -> global max pooling (Pool5) -> FC(15), BCE over 15 outputs;
* heat map H(x, y) = max_k |f_k(x, y)| over the last conv features, scaled to [0, 1] and
  resized to the input (Eq. 3); mask H > tau (Eq. 4, tau = 0.7); largest connected region; its
  bounding box; crop and resize to the input size (from the input view, or from the
  higher-resolution prepared image with ``agcnn.crop_source=prepared``);
* local branch: same architecture, its own weights, trained on the crops;
* fusion: FC(15) on [Pool5_global, Pool5_local];
* three stages G -> L -> F, each earlier branch frozen; each stage starts from the previous
  stage's best-validation checkpoint. Mean AUROC is over the 14 diseases.

Options reproduce the public codes' departures from the paper (seed 003's channel sum and Otsu
threshold, seed 001's union of all mask cells): ``agcnn.heatmap=sum``, ``agcnn.threshold=otsu``,
``agcnn.component=all``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medattn import losses
from medattn.errors import ConfigError
from medattn.methods.base import Method

STAGES = ("global", "local", "fusion")


def map_boxes(boxes: torch.Tensor, view_box: torch.Tensor) -> torch.Tensor:
    """Boxes normalised to the input view -> normalised to the image that contains the view."""
    x0, y0, x1, y1 = view_box.unbind(-1)
    w, h = (x1 - x0).unsqueeze(-1), (y1 - y0).unsqueeze(-1)
    off = torch.stack([x0, y0, x0, y0], -1)
    scale = torch.cat([w, h, w, h], -1)
    return off + boxes * scale


class AGCNNMethod(Method):
    name = "agcnn"
    stage_order = STAGES

    def validate(self) -> None:
        super().validate()
        for name, st in self.cfg.stages.items():
            if st.loss not in ("bce", "focal"):
                raise ConfigError(f"config key 'stages.{name}.loss': AG-CNN trains with bce or focal, not {st.loss!r}")
        if self.cfg.stage_names()[:1] != ["global"]:
            if "global" not in self.cfg.stage_names():
                raise ConfigError("AG-CNN needs the 'global' stage first (it produces the attention)")

    def build_model(self) -> nn.Module:
        from medattn.models.agcnn import build_agcnn

        return build_agcnn(self.cfg.model, self.cfg.agcnn, num_classes=self.num_classes,
                           in_chans=self.spec.channels)

    def trainable_modules(self, model, stage):
        return {"global": [model.global_branch], "local": [model.local_branch],
                "fusion": [model.fusion]}[stage]

    def branches(self, stage: str) -> list[str]:
        return list(STAGES[: STAGES.index(stage) + 1])

    def needs_hires(self, stage: str) -> bool:
        return self.cfg.agcnn.crop_source == "prepared" and stage != "global"

    # ------------------------------------------------------------------ attention
    def _attention(self, features: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from medattn.attention import attention_boxes

        a = self.cfg.agcnn
        return attention_boxes(features.float(), tau=a.tau, mode=a.heatmap, scale=a.scale,
                               threshold=a.threshold, component=a.component,
                               size=a.heatmap_size or input_size)

    def _crops(self, batch: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        from medattn.attention import crop_and_resize

        x = batch["image"]
        size = x.shape[-1]
        if self.cfg.agcnn.crop_source == "prepared":
            if "hires" not in batch:
                raise ConfigError("agcnn.crop_source=prepared but the loader gave no prepared image")
            hb = map_boxes(boxes, batch["view_box"].to(boxes))
            crops = crop_and_resize(batch["hires"].float(), hb, size)
            crops = self.normalize_uint8(crops)  # same normalisation as the loader's views
        else:
            crops = crop_and_resize(x.float(), boxes, size)
        return crops.to(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) and x.is_cuda else crops

    def _global(self, model, x):
        logits, feats, pooled = model.forward_global(x)
        return logits, feats, pooled

    # ------------------------------------------------------------------ training
    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        """BCE over the 15 outputs (Eq. 2), or focal loss when ``stages.<stage>.loss=focal``."""
        if self.cfg.stages[stage].loss == "focal":
            f = self.cfg.focal
            ca = torch.tensor(f.class_alpha) if f.class_alpha else None
            return losses.focal(logits, y, f.alpha, f.gamma, ca)
        return losses.bce(logits, y)

    def training_loss(self, model, batch, stage, epoch):
        x, y = batch["image"], batch["labels"]
        if stage == "global":
            logits, _, _ = self._global(model, x)
            loss = self.loss_fn(logits, y, stage)
            return loss, {"loss": loss.detach()}
        with torch.no_grad():
            _, feats, pooled_g = self._global(model, x)
            boxes, _ = self._attention(feats, x.shape[-1])
            crops = self._crops(batch, boxes)
        if stage == "local":
            logits, _ = model.forward_local(crops)
            loss = self.loss_fn(logits, y, stage)
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()
            return loss, {"loss": loss.detach(), "crop_area": area.detach()}
        with torch.no_grad():
            _, pooled_l = model.forward_local(crops)
        logits = model.forward_fusion(pooled_g, pooled_l)
        loss = self.loss_fn(logits, y, stage)
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        x = batch["image"]
        logits_g, feats, pooled_g = self._global(model, x)
        boxes, heat = self._attention(feats, x.shape[-1])
        out: dict[str, Any] = {"probs": {"global": self.to_probs(logits_g)},
                               "boxes": map_boxes(boxes, batch["view_box"].to(boxes)),
                               "view_boxes": boxes, "heatmap": heat}
        if stage in ("local", "fusion"):
            crops = self._crops(batch, boxes)
            logits_l, pooled_l = model.forward_local(crops)
            out["probs"]["local"] = self.to_probs(logits_l)
            if stage == "fusion":
                out["probs"]["fusion"] = self.to_probs(model.forward_fusion(pooled_g, pooled_l))
        return out
