"""AG-CNN (Guan et al. 2018): global branch -> attention crop -> local branch -> fusion.

Two :class:`ClassifierModel` branches with unshared weights (the same or different backbones)
and a fusion Linear on their concatenated Pool5 vectors::

    logits_g, f_g, pool_g = model.forward_global(x)          # x: (B, C, S, S) network input
    boxes, heat, empty    = model.attend(f_g, x.shape[-2:])   # (B, 4) in [0,1] of x
    crops                 = model.crop(x, boxes, hires, view_boxes, view_flipped)
    logits_l, pool_l      = model.forward_local(crops)
    logits_f              = model.forward_fusion(pool_g, pool_l)

``forward`` runs all of it and returns a dict. The paper trains the three parts in stages
(G, then L with G frozen, then F with both frozen); :meth:`AGCNN.stage_module` names the part
each stage trains. Freezing and ``eval()`` are the trainer's job.

Crops from a higher-resolution image (``agcnn.crop_source=prepared``): pass ``hires`` (B, C, H, W),
the image the view ``x`` was cut from, in the same intensity space as ``x`` (normalise it the same
way; cropping is linear, so normalising before or after the crop is the same), and ``view_boxes``
(B, 4): where ``x`` sits inside ``hires``, normalised [x0, y0, x1, y1], plus ``view_flipped`` (B,)
for views mirrored left-right. The attention box found in ``x`` is mapped into ``hires``
(:func:`medattn.attention.map_boxes_to_source`), cropped there at full resolution, resized to x's
size, and mirrored back where the view was mirrored, so the local branch sees the same
orientation as the global one.
"""
from __future__ import annotations

import torch
from torch import nn

from medattn.attention import COMPONENTS, HEATMAP_MODES, SCALES, THRESHOLDS, attention_boxes, crop_and_resize, \
    map_boxes_to_source
from medattn.errors import ConfigError
from medattn.models.base import ClassifierModel
from medattn.models.registry import create_model

CROP_SOURCES = ("input", "prepared")
STAGES = ("global", "local", "fusion")


class AGCNN(nn.Module):
    """Attention-guided CNN: global branch, local branch, fusion head.

    Args:
        global_branch, local_branch: two ClassifierModels (unshared weights) with heads.
        num_classes: outputs of the fusion head (the branches' heads have their own).
        tau: mask threshold on the [0, 1] heat map (Eq. 4).
        heatmap: max | l1 | l2 | sum (see :func:`medattn.attention.heatmap`).
        scale: minmax | max.
        threshold: tau | otsu.
        component: largest | all.
        heatmap_size: heat maps are resized to this before thresholding; 0 = the input size (paper).
        crop_source: input | prepared; informs the caller whether to pass ``hires`` to forward.
    """

    def __init__(self, global_branch: ClassifierModel, local_branch: ClassifierModel, num_classes: int, *,
                 tau: float = 0.7, heatmap: str = "max", scale: str = "minmax", threshold: str = "tau",
                 component: str = "largest", heatmap_size: int = 0, crop_source: str = "input"):
        super().__init__()
        if global_branch is local_branch:
            raise ValueError("AG-CNN's branches must not share weights: pass two separate models")
        for key, value, allowed in (("heatmap", heatmap, HEATMAP_MODES), ("scale", scale, SCALES),
                                    ("threshold", threshold, THRESHOLDS), ("component", component, COMPONENTS),
                                    ("crop_source", crop_source, CROP_SOURCES)):
            if value not in allowed:
                raise ConfigError(f"agcnn.{key}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= tau < 1.0:
            raise ConfigError(f"agcnn.tau={tau} must be in [0, 1): the heat map is scaled to [0, 1]")
        if heatmap_size < 0:
            raise ConfigError(f"agcnn.heatmap_size={heatmap_size} must be >= 0 (0 = the input size)")
        if num_classes < 1:
            raise ConfigError(f"AG-CNN needs num_classes >= 1, got {num_classes}")
        self.global_branch = global_branch
        self.local_branch = local_branch
        self.num_classes = num_classes
        self.fusion = nn.Linear(global_branch.num_features + local_branch.num_features, num_classes)
        self.tau, self.heatmap, self.scale = tau, heatmap, scale
        self.threshold, self.component = threshold, component
        self.heatmap_size, self.crop_source = heatmap_size, crop_source

    @property
    def needs_hires(self) -> bool:
        """True when the config asks for crops from the prepared (higher-resolution) image."""
        return self.crop_source == "prepared"

    def stage_module(self, stage: str) -> nn.Module:
        """The part a training stage trains: ``global``, ``local`` or ``fusion``."""
        if stage not in STAGES:
            raise ConfigError(f"AG-CNN stage {stage!r} is not one of {', '.join(STAGES)}")
        return {"global": self.global_branch, "local": self.local_branch, "fusion": self.fusion}[stage]

    # ------------------------------------------------------------------ parts
    def forward_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (logits (B, K), last feature map (B, C, h, w), Pool5 (B, C))."""
        g = self.global_branch
        features = g.forward_features(x)
        pooled = g.forward_head(features, pre_logits=True)
        return g.logits_from_pooled(pooled), features, pooled

    def attend(self, features: torch.Tensor, input_size: tuple[int, int]):
        """Global feature map -> (boxes (B, 4) normalised in the input, heat map, empty flags (B,))."""
        size = (self.heatmap_size, self.heatmap_size) if self.heatmap_size else tuple(input_size)
        return attention_boxes(features.detach(), tau=self.tau, mode=self.heatmap, scale=self.scale,
                               threshold=self.threshold, component=self.component, size=size,
                               return_empty=True)

    def crop(self, x: torch.Tensor, boxes: torch.Tensor, hires: torch.Tensor | None = None,
             view_boxes: torch.Tensor | None = None, view_flipped: torch.Tensor | None = None) -> torch.Tensor:
        """Local-branch input: the box cut from ``x`` (or from ``hires``), resized to x's size."""
        out = tuple(x.shape[-2:])
        with torch.no_grad():
            if hires is None:
                return crop_and_resize(x.detach(), boxes, out).to(x.dtype)
            b = x.shape[0]
            if hires.shape[0] != b or hires.shape[1] != x.shape[1]:
                raise ValueError(f"hires {tuple(hires.shape)} must have x's batch and channels {tuple(x.shape[:2])}")
            if view_boxes is None:
                view_boxes = torch.tensor([0.0, 0.0, 1.0, 1.0], device=x.device).expand(b, 4)
            src = map_boxes_to_source(boxes, view_boxes, view_flipped)
            crops = crop_and_resize(hires, src, out)
            if view_flipped is not None:
                fl = view_flipped.to(crops.device).bool().view(-1, 1, 1, 1)
                crops = torch.where(fl, crops.flip(-1), crops)
            return crops.to(x.dtype)

    def forward_local(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops -> (logits (B, K), Pool5 (B, C))."""
        loc = self.local_branch
        pooled = loc.forward_head(loc.forward_features(crops), pre_logits=True)
        return loc.logits_from_pooled(pooled), pooled

    def forward_fusion(self, pooled_g: torch.Tensor, pooled_l: torch.Tensor) -> torch.Tensor:
        """Concatenated Pool5 vectors -> fusion logits (B, K)."""
        return self.fusion(torch.cat([pooled_g, pooled_l], dim=1))

    def forward(self, x: torch.Tensor, hires: torch.Tensor | None = None, view_boxes: torch.Tensor | None = None,
                view_flipped: torch.Tensor | None = None, *, return_crops: bool = False) -> dict[str, torch.Tensor]:
        """Run G -> attention box -> crop -> L -> F.

        Args:
            x: (B, C, S, S) network input.
            hires: optional (B, C, H, W) image ``x`` was cut from, same intensity space as ``x``.
            view_boxes: (B, 4) normalised region of ``hires`` shown by ``x`` (default: all of it).
            view_flipped: (B,) bool, ``x`` is ``hires``'s region mirrored left-right.
            return_crops: also return the local branch's input.

        Returns:
            dict with ``global``, ``local``, ``fusion`` logits (B, K); ``boxes`` (B, 4) normalised in
            x's coordinates; ``heatmap`` (B, S', S') in [0, 1]; ``empty`` (B,) bool, True where no
            heat-map pixel passed the threshold (the crop is then the whole image); ``crops``.
        """
        logits_g, features, pooled_g = self.forward_global(x)
        boxes, heat, empty = self.attend(features, tuple(x.shape[-2:]))
        crops = self.crop(x, boxes, hires, view_boxes, view_flipped)
        logits_l, pooled_l = self.forward_local(crops)
        out = {"global": logits_g, "local": logits_l, "fusion": self.forward_fusion(pooled_g, pooled_l),
               "boxes": boxes, "heatmap": heat, "empty": empty}
        if return_crops:
            out["crops"] = crops
        return out


def build_agcnn(cfg_model, cfg_agcnn, num_classes: int, in_chans: int = 1) -> AGCNN:
    """AG-CNN from ``cfg.model`` (ModelConfig) and ``cfg.agcnn`` (AGCNNConfig).

    Both branches start from ``model.weights``; the local branch uses ``agcnn.local_backbone``
    (default: ``model.backbone``). A weights *path* fits one architecture, so it cannot initialise
    a local branch of another backbone (ConfigError).
    """
    if num_classes < 1:
        raise ConfigError(f"AG-CNN needs num_classes >= 1 (model.num_classes or the dataset's labels), "
                          f"got {num_classes}")
    g_arch = cfg_model.backbone
    l_arch = cfg_agcnn.local_backbone or g_arch
    weights = str(cfg_model.weights)
    common = dict(num_classes=num_classes, in_chans=in_chans, pool=cfg_model.pool, drop_rate=cfg_model.drop_rate)
    if l_arch != g_arch and weights not in ("none", "imagenet", "imagenet_v2"):
        raise ConfigError(f"model.weights={weights!r} is a file for {g_arch}; agcnn.local_backbone={l_arch!r} "
                          "is another architecture, so it cannot start from it (use imagenet or none)")
    global_branch = create_model(g_arch, weights=weights, **common)
    local_branch = create_model(l_arch, weights=weights, **common)
    return AGCNN(global_branch, local_branch, num_classes, tau=cfg_agcnn.tau, heatmap=cfg_agcnn.heatmap,
                 scale=cfg_agcnn.scale, threshold=cfg_agcnn.threshold, component=cfg_agcnn.component,
                 heatmap_size=cfg_agcnn.heatmap_size, crop_source=cfg_agcnn.crop_source)
