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

from dataclasses import dataclass

from typing import Any

import torch
from torch import nn

from medattn import losses
from medattn.attention import COMPONENTS, HEATMAP_MODES, SCALES, THRESHOLDS
# Boxes normalised to the input view -> normalised to the (equally flipped) image that contains it.
from medattn.boxes import view_to_source as map_boxes
from medattn.errors import ConfigError
from medattn.methods.base import Method
from medattn.methods.focal import FocalLoss
from medattn.published import PAPER_SPLIT, PublishedAUROC, PublishedResults, disease_column

STAGES = ("global", "local", "fusion")


@torch.no_grad()
def init_fusion_head(model, how: str) -> None:
    """Set ``model.fusion`` (Linear on [Pool5_g, Pool5_l]) from the branches' heads.

    ``branches``: fusion logits = (logits_g + logits_l) / 2 before any fusion training (each
    branch head is a Linear on its own Pool5, and dropout is off in evaluation); ``global``:
    fusion logits = logits_g; ``random``: leave the default init (the paper's literal head).
    """
    if how == "random":
        return
    g, loc, f = model.global_branch.fc, model.local_branch.fc, model.fusion
    cg = g.weight.shape[1]
    if how == "branches":
        f.weight[:, :cg] = g.weight / 2
        f.weight[:, cg:] = loc.weight / 2
        f.bias.copy_((g.bias + loc.bias) / 2)
    elif how == "global":
        f.weight[:, :cg] = g.weight
        f.weight[:, cg:] = 0.0
        f.bias.copy_(g.bias)
    else:
        raise ConfigError(f"config key 'agcnn.fusion_init': expected random, branches or global, got {how!r}")


@dataclass
class AGCNNConfig:
    """AG-CNN (Guan et al. 2018), methods.md section 0."""

    tau: float = 0.7  # mask threshold on the [0,1]-scaled heat map (Eq. 4)
    heatmap: str = "max"  # max (Eq. 3: max_k |f_k|) | l1 | l2 | sum (Ien001's code)
    scale: str = "minmax"  # minmax | max (the paper leaves it open)
    threshold: str = "tau"  # tau | otsu (Ien001's code)
    component: str = "largest"  # largest (paper) | all (seed 001's notebook)
    heatmap_size: int = 0  # 0 = the input size (the paper resizes heat maps to the input)
    crop_source: str = "input"  # input (the 224 view) | prepared (the higher-resolution image)
    local_backbone: str = ""  # "" = model.backbone
    # How the fusion head starts (docs/methods/agcnn.md, "Fusion below global"): random (the
    # paper's literal FC on [Pool5_g, Pool5_l], PyTorch's default init) | branches (W = [W_g, W_l] / 2,
    # b = (b_g + b_l) / 2: starts as the mean of the two branches' logits) | global (W = [W_g, 0],
    # b = b_g: starts as the global branch, medattn's default). With branches/global the starting
    # head is validated first and kept unless a fusion epoch beats it (select_initial).
    fusion_init: str = "global"


# --------------------------------------------------------------------------------------------
# What the paper reported (the report sets it beside a run): Guan et al. 2018, "Diagnose like a
# Radiologist" (arXiv 1801.09927v1), Table I, read from the PDF in Ien001/AG-CNN (methods.md §0).
# --------------------------------------------------------------------------------------------
# Sec. IV-A: "randomly shuffle the dataset" into 70/10/20, with no word on patients: unstated. The
# paper presets read it as by image (--split image-random); the research notes list AG-CNN with the
# patient-level random splits (chestxray14.md §4; its author only says "not the official split").
AGCNN_PROTOCOL = "unstated"
AGCNN_READING = "image-random"
AGCNN_READING_NOTE = ("Sec. IV-A 'randomly shuffle the dataset' 70/10/20 does not say image or patient; the paper "
                      "presets read it as by image, the research notes list AG-CNN with the patient-level random "
                      "splits (chestxray14.md §4)")
AGCNN_SOURCE = "Guan et al. 2018, arXiv 1801.09927v1, Table I"
# The AG-CNN rows of Table I (the fusion branch).
AGCNN_R50 = PublishedAUROC(
    key="agcnn_r50", name="AG-CNN ResNet-50",
    per_class=disease_column((0.844, 0.937, 0.904, 0.753, 0.893, 0.827, 0.776, 0.919, 0.842, 0.919, 0.941,
                              0.857, 0.836, 0.903)),
    mean=0.868, split=PAPER_SPLIT, protocol=AGCNN_PROTOCOL, reading=AGCNN_READING, reading_note=AGCNN_READING_NOTE,
    source=AGCNN_SOURCE + " (AG-CNN, fusion branch)")
AGCNN_D121 = PublishedAUROC(
    key="agcnn_d121", name="AG-CNN DenseNet-121",
    per_class=disease_column((0.853, 0.939, 0.903, 0.754, 0.902, 0.828, 0.774, 0.921, 0.842, 0.924, 0.932,
                              0.864, 0.837, 0.921)),
    mean=0.871, split=PAPER_SPLIT, protocol=AGCNN_PROTOCOL, reading=AGCNN_READING, reading_note=AGCNN_READING_NOTE,
    source=AGCNN_SOURCE + " (AG-CNN, fusion branch)")
# Table I, mean AUROC over the 14 diseases per branch.
AGCNN_PUBLISHED = PublishedResults(
    name="AG-CNN", table="Table I", auroc=(AGCNN_R50, AGCNN_D121),
    branch_means={"ResNet-50": {"global": 0.841, "local": 0.817, "fusion": 0.868},
                  "DenseNet-121": {"global": 0.840, "local": 0.810, "fusion": 0.871}},
    source=AGCNN_SOURCE, protocol=AGCNN_PROTOCOL)


class AGCNNMethod(FocalLoss, Method):
    name = "agcnn"
    stage_order = STAGES
    sections = {"agcnn": AGCNNConfig, "focal": losses.FocalConfig}
    choices = {"agcnn.heatmap": HEATMAP_MODES, "agcnn.scale": SCALES, "agcnn.threshold": THRESHOLDS,
               "agcnn.component": COMPONENTS, "agcnn.crop_source": ("input", "prepared"),
               "agcnn.fusion_init": ("random", "branches", "global")}
    sweep_aliases = {"tau": ("attention threshold tau", "AG-CNN's attention threshold (agcnn.tau)")}
    published = AGCNN_PUBLISHED
    branch_labels = {"global": "global branch (whole image)", "local": "local branch (the attention crop)",
                     "fusion": "fusion head (global + local)"}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        a = cfg.agcnn
        if not 0.0 < a.tau < 1.0:
            raise ConfigError(f"config key 'agcnn.tau' must be in (0, 1), got {a.tau}")
        if a.local_backbone:
            from medattn.models.factory import check_backbone

            check_backbone(a.local_backbone, "agcnn.local_backbone")
        if a.heatmap_size < 0:
            raise ConfigError(f"config key 'agcnn.heatmap_size' must be >= 0 (0 = the input size), got {a.heatmap_size}")

    @classmethod
    def alias_settings(cls, alias, value):
        if alias == "tau":
            return [("agcnn.tau", value)]
        return super().alias_settings(alias, value)

    @classmethod
    def key_effect(cls, cfg, key, loss_stages=None):
        # The global stage never looks at the attention settings; the local branch's backbone is
        # built (and trained nowhere else) from the global stage on, so that key affects all.
        if key == "agcnn.fusion_init":
            return (["fusion"], "") if "fusion" in cfg.stage_names() else (
                [], f"{key} only acts in the fusion stage; this config has only {', '.join(cfg.stage_names())}")
        if key.startswith("agcnn.") and key != "agcnn.local_backbone":
            later = [s for s in cfg.stage_names() if s != "global"]
            if not later:
                return [], (f"{key} only acts in the local and fusion stages; this config has only "
                            f"{', '.join(cfg.stage_names())}")
            return later, ""
        return super().key_effect(cfg, key, loss_stages)

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

    def init_stage(self, model, stage: str) -> None:
        """Fusion stage: start the fusion head from the trained branch heads (``agcnn.fusion_init``)."""
        if stage == "fusion":
            init_fusion_head(model, self.cfg.agcnn.fusion_init)

    def select_initial(self, stage: str) -> bool:
        # A fusion head that starts as a branch (or the branches' mean) is a model in its own right:
        # the stage keeps it unless an epoch beats it on validation. The paper's random head is not.
        return stage == "fusion" and self.cfg.agcnn.fusion_init != "random"

    FUSION_START = {"global": "global head", "branches": "mean of the global and local heads",
                    "random": "randomly initialised fusion head"}

    def stage_start(self, stage: str) -> dict[str, Any]:
        if stage != "fusion":
            return {}
        how = self.cfg.agcnn.fusion_init
        out = {"fusion_init": how, "start": self.FUSION_START.get(how, how), "chosen_by": {"agcnn.fusion_init": how}}
        if how == "global":
            out["same_as_branch"] = "global"  # the fusion head starts as a copy of the global head
        return out

    heatmap_description = "max_k |f_k| of the global branch, scaled to [0, 1]"
    crop_description = "the crop the local branch sees"

    def needs_hires(self, stage: str) -> bool:
        return self.cfg.agcnn.crop_source == "prepared" and stage != "global"

    # ------------------------------------------------------------------ the attention path
    # Defined once, here: training, evaluation, the report, inference and the tests all run it.
    def attend(self, features: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global feature map -> (boxes (B, 4) normalised in the input view, heat map in [0, 1],
        empty (B,): no pixel passed the threshold, the box is the whole view)."""
        from medattn.attention import attention_boxes

        a = self.cfg.agcnn
        return attention_boxes(features.detach().float(), tau=a.tau, mode=a.heatmap, scale=a.scale,
                               threshold=a.threshold, component=a.component,
                               size=a.heatmap_size or input_size, return_empty=True)

    def crop(self, batch: dict[str, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """The local branch's input: each view box cut from the network input (``crop_source=input``)
        or, at full resolution, from the prepared image (``prepared``: ``batch["hires"]``, uint8 and
        flipped like the view, with ``batch["view_box"]``, where the view sits in it), resized to the
        input size and normalised as the loaders normalise."""
        from medattn.attention import crop_and_resize

        x = batch["image"]
        size = x.shape[-1]
        with torch.no_grad():
            if self.cfg.agcnn.crop_source == "prepared":
                if "hires" not in batch:
                    raise ConfigError("agcnn.crop_source=prepared but the loader gave no prepared image")
                hb = map_boxes(boxes, batch["view_box"].to(boxes))
                crops = self.normalize_uint8(crop_and_resize(batch["hires"].float(), hb, size))
            else:
                crops = crop_and_resize(x.detach().float(), boxes, size)
        return crops.to(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) and x.is_cuda else crops

    def forward(self, model, batch: dict[str, torch.Tensor], stage: str, attention: bool = True) -> dict[str, Any]:
        """The whole pipeline up to ``stage``: global branch -> attention box -> crop -> local branch
        -> fusion. Returns the logits of each branch up to ``stage`` and, with ``attention``,
        ``boxes``, ``heatmap``, ``empty`` (and ``crops`` after the global stage). The attention and
        the crop carry no gradient; frozen branches (parameters without ``requires_grad``) build
        no graph, so training a stage through this function costs nothing extra."""
        x = batch["image"]
        logits_g, feats, pooled_g = model.forward_global(x)
        out: dict[str, Any] = {"global": logits_g}
        if stage == "global" and not attention:
            return out
        boxes, heat, empty = self.attend(feats, x.shape[-1])
        out.update(boxes=boxes, heatmap=heat, empty=empty)
        if stage == "global":
            return out
        crops = self.crop(batch, boxes)
        out["crops"] = crops
        out["local"], pooled_l = model.forward_local(crops)
        if stage == "fusion":
            out["fusion"] = model.forward_fusion(pooled_g, pooled_l)
        return out

    # ------------------------------------------------------------------ training
    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        """BCE over the 15 outputs (Eq. 2), or focal loss when ``stages.<stage>.loss=focal``."""
        return self.loss(stage)(logits, labels=y)

    def training_loss(self, model, batch, stage, epoch):
        out = self.forward(model, batch, stage, attention=stage != "global")
        loss = self.loss_fn(out[stage], batch["labels"], stage)
        logs = {"loss": loss.detach()}
        if stage == "local":
            b = out["boxes"]
            logs["crop_area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean().detach()
        return loss, logs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, model, batch, stage) -> dict[str, Any]:
        out = self.forward(model, batch, stage)
        res: dict[str, Any] = {"probs": {b: self.to_probs(out[b]) for b in self.branches(stage)},
                               "boxes": map_boxes(out["boxes"], batch["view_box"].to(out["boxes"])),
                               "view_boxes": out["boxes"], "heatmap": out["heatmap"]}
        if "crops" in out:
            res["crops"] = out["crops"]
        return res
