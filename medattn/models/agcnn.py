"""AG-CNN's network (Guan et al. 2018): a global branch, a local branch and a fusion head.

Two :class:`ClassifierModel` branches with unshared weights (the same or different backbones)
and a fusion Linear on their concatenated Pool5 vectors::

    logits_g, f_g, pool_g = model.forward_global(x)          # x: (B, C, S, S) network input
    logits_l, pool_l      = model.forward_local(crops)       # the attention crops of x
    logits_f              = model.forward_fusion(pool_g, pool_l)
    logits_g, logits_l, logits_f = model(x, crops)

This is the architecture only. The attention that turns ``f_g`` into the crops (heat map,
threshold, largest region, box, crop and resize) is the method's science and is defined once,
in :class:`medattn.methods.agcnn.AGCNNMethod` (``attend``, ``crop``, ``forward``), which training,
evaluation, the report and the tests all run.
"""
from __future__ import annotations

import torch
from torch import nn

from medattn.errors import ConfigError
from medattn.models.base import ClassifierModel
from medattn.models.factory import create_model


class AGCNN(nn.Module):
    """Attention-guided CNN's modules: ``global_branch``, ``local_branch``, ``fusion``.

    Args:
        global_branch, local_branch: two ClassifierModels (unshared weights) with heads.
        num_classes: outputs of the fusion head (the branches' heads have their own).
    """

    def __init__(self, global_branch: ClassifierModel, local_branch: ClassifierModel, num_classes: int):
        super().__init__()
        if global_branch is local_branch:
            raise ValueError("AG-CNN's branches must not share weights: pass two separate models")
        if num_classes < 1:
            raise ConfigError(f"AG-CNN needs num_classes >= 1, got {num_classes}")
        self.global_branch = global_branch
        self.local_branch = local_branch
        self.num_classes = num_classes
        self.fusion = nn.Linear(global_branch.num_features + local_branch.num_features, num_classes)

    def forward_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (logits (B, K), last feature map (B, C, h, w), Pool5 (B, C))."""
        g = self.global_branch
        features = g.forward_features(x)
        pooled = g.forward_head(features, pre_logits=True)
        return g.logits_from_pooled(pooled), features, pooled

    def forward_local(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops -> (logits (B, K), Pool5 (B, C))."""
        loc = self.local_branch
        pooled = loc.forward_head(loc.forward_features(crops), pre_logits=True)
        return loc.logits_from_pooled(pooled), pooled

    def forward_fusion(self, pooled_g: torch.Tensor, pooled_l: torch.Tensor) -> torch.Tensor:
        """Concatenated Pool5 vectors -> fusion logits (B, K)."""
        return self.fusion(torch.cat([pooled_g, pooled_l], dim=1))

    def forward(self, x: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global, local, fusion) logits of images ``x`` and their attention ``crops``."""
        logits_g, _, pooled_g = self.forward_global(x)
        logits_l, pooled_l = self.forward_local(crops)
        return logits_g, logits_l, self.forward_fusion(pooled_g, pooled_l)


def build_agcnn(cfg_model, cfg_agcnn, num_classes: int, in_chans: int = 1) -> AGCNN:
    """AG-CNN from ``cfg.model`` (ModelConfig) and ``cfg.agcnn`` (the method's section).

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
    return AGCNN(global_branch, local_branch, num_classes)
