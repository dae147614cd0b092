"""WS-DAN with counterfactual attention (CAL) and channel attention: DualAttendMed's network
(seed 000, methods.md section 000; ``models/cal.py`` of DualAttendMed, ``fgvc/models/cal.py`` of CAL)::

    F  = backbone.forward_features(x)                  # (B, C, h, w); ResNet-152, layer4 stride 1: 2048x14x14
    F', w = channel_attention(F)                       # w = sigmoid(MLP(GAP F) + MLP(GMP F)), F' = w * F
    A  = attentions(F')                                # (B, M, h, w), M = 32
    X  = BAP(F', A)                                    # (B, M*C), signed sqrt, L2 norm
    p  = fc(100 X)                                     # Linear(M*C -> K, no bias)
    p_aux = p - fc(100 BAP(F', A_cf))                  # A_cf ~ U(0, 2) (train) or 1 (eval): CAL's effect

Two attention heads (``attention=``): ``conv`` is DualAttendMed's ``Conv2d(C, M, 1)`` with bias and
no normalisation or ReLU (maps are unbounded and can be negative); ``bn_relu`` is CAL/WS-DAN's
BasicConv2d: 1x1 conv without bias, BatchNorm (eps 1e-3), ReLU.

The channel attention is DualAttendMed's addition (CAL and WS-DAN have none): ``channel_attention=False``
builds CAL's network, F' = F and channel weights of ones.

``model(x)`` returns the raw logits ``p`` (so a plain classifier loop can drive it);
``model.forward_all(x)`` returns everything a training step needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from medattn.attention_wsdan import bilinear_attention_pooling, counterfactual_maps
from medattn.errors import ConfigError
from medattn.models.base import ClassifierModel
from medattn.models.factory import create_model

ATTENTIONS = ("conv", "bn_relu")


class ChannelAttention(nn.Module):
    """w = sigmoid(MLP(GAP(F)) + MLP(GMP(F))); MLP = Linear(C, C/r, no bias) -> ReLU -> Linear(C/r, C, no bias)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if reduction < 1 or channels // reduction < 1:
            raise ConfigError(f"dualattendmed.reduction={reduction} must be in [1, {channels}] for {channels} channels")
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels, bias=False))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> (w * F, w (B, C))."""
        w = torch.sigmoid(self.mlp(f.mean(dim=(2, 3))) + self.mlp(f.amax(dim=(2, 3))))
        return f * w[:, :, None, None], w


class BasicConv2d(nn.Sequential):
    """CAL/WS-DAN's attention head: 1x1 conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, kernel_size=1, bias=False), nn.BatchNorm2d(cout, eps=0.001),
                         nn.ReLU(inplace=True))


class WSDANOutput(NamedTuple):
    logits: torch.Tensor  # (B, K) p = fc(scale * X)
    aux_logits: torch.Tensor  # (B, K) p - p_cf
    features: torch.Tensor  # (B, M*C) X
    maps: torch.Tensor  # (B, M, h, w) A
    channel_weights: torch.Tensor  # (B, C)


class WSDAN(nn.Module):
    """Backbone -> channel attention -> M attention maps -> BAP -> Linear on ``feature_scale * X``.

    Args:
        backbone: a :class:`ClassifierModel` trunk (its head is not used).
        num_classes: outputs K.
        num_maps: M.
        reduction: channel-attention reduction r.
        attention: ``conv`` (DualAttendMed) or ``bn_relu`` (CAL).
        feature_scale: X is multiplied by this before the classifier (100 in CAL/DualAttendMed).
        channel_attention: DualAttendMed's channel attention on F (False: CAL, none).
    """

    def __init__(self, backbone: ClassifierModel, num_classes: int, *, num_maps: int = 32, reduction: int = 16,
                 attention: str = "bn_relu", feature_scale: float = 100.0, channel_attention: bool = True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"attention head {attention!r} is not one of {', '.join(ATTENTIONS)}")
        if num_classes < 1:
            raise ConfigError(f"DualAttendMed needs num_classes >= 1, got {num_classes}")
        if num_maps < 1:
            raise ConfigError(f"dualattendmed.num_maps={num_maps} must be >= 1")
        if getattr(backbone, "map_channels", backbone.num_features) != backbone.num_features:
            # BAP pools the feature map itself: a backbone whose pooled vector is an MLP's output
            # (seed 002's vgg16) has no map of num_features channels
            raise ConfigError(f"DualAttendMed needs a backbone whose pooled vector is its pooled feature map; "
                              f"{getattr(backbone, 'arch', type(backbone).__name__)!r} ends in an MLP (use vgg16_bn)")
        self.backbone = backbone
        c = backbone.num_features
        self.num_features = c
        self.num_maps = num_maps
        self.num_classes = num_classes
        self.in_chans = backbone.in_chans
        self.feature_scale = float(feature_scale)
        self.attention_kind = attention
        self.channel_attention = ChannelAttention(c, reduction) if channel_attention else None
        self.attentions = nn.Conv2d(c, num_maps, kernel_size=1) if attention == "conv" else BasicConv2d(c, num_maps)
        self.fc = nn.Linear(num_maps * c, num_classes, bias=False)

    @property
    def feature_dim(self) -> int:
        """M * C, the length of X (and of each feature centre)."""
        return self.num_maps * self.num_features

    @property
    def feature_stride(self) -> int:
        return self.backbone.feature_stride

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (F' (B, C, h, w), channel weights (B, C))."""
        f = self.backbone.forward_features(x)
        if self.channel_attention is None:  # CAL: the attention maps read F itself
            return f, f.new_ones(f.shape[:2])
        return self.channel_attention(f)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """X (B, M*C) -> fc(feature_scale * X)."""
        return self.fc(features.to(self.fc.weight.dtype) * self.feature_scale)

    def forward_all(self, x: torch.Tensor, counterfactual: bool = True) -> WSDANOutput:
        """Everything one step needs; the counterfactual maps are U(0, 2) in train mode, ones in eval.

        ``counterfactual=False`` skips the counterfactual pass (``aux_logits`` is then ``logits``).
        """
        f, w = self.forward_features(x)
        a = self.attentions(f)
        feats = bilinear_attention_pooling(f, a)
        logits = self.logits_from_features(feats)
        if counterfactual:
            cf = bilinear_attention_pooling(f, counterfactual_maps(a.detach(), self.training))
            aux = logits - self.logits_from_features(cf)
        else:
            aux = logits
        return WSDANOutput(logits, aux, feats, a, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x, counterfactual=False).logits


def _is_torchvision_file(weights: str, arch: str) -> bool:
    from medattn.models.weights import imagenet_files

    name = Path(weights).name
    return any(f.filename == name and f.arch == arch for f in imagenet_files())


def build_wsdan(cfg_model, *, num_classes: int, in_chans: int, num_maps: int, reduction: int, attention: str,
                layer4_stride: int = 1, feature_scale: float = 100.0, channel_attention: bool = True) -> WSDAN:
    """DualAttendMed's network from ``cfg.model`` (backbone, weights) and the method's options.

    ``model.weights``: ``imagenet``/``imagenet_v2``/``none`` or torchvision's ImageNet file
    initialise the backbone (the rest starts from its own initialisation); any other path must be
    a whole WSDAN state dict (or a medattn checkpoint of this method).

    Args:
        cfg_model: ``cfg.model`` (ModelConfig).
        num_classes, in_chans: outputs and input channels.
        num_maps, reduction, attention, feature_scale, channel_attention: see :class:`WSDAN`.
        layer4_stride: passed to the backbone builder when it is not 2 (ResNets: 1 gives output
            stride 16, 14x14 features at 224, as DualAttendMed/CAL).
    """
    weights = str(cfg_model.weights)
    arch = cfg_model.backbone
    backbone_weights = weights if weights in ("none", "imagenet", "imagenet_v2") or _is_torchvision_file(
        weights, arch) else "none"
    kw = {"layer4_stride": layer4_stride} if layer4_stride != 2 else {}
    backbone = create_model(arch, num_classes=0, in_chans=in_chans, weights=backbone_weights, **kw)
    model = WSDAN(backbone, num_classes, num_maps=num_maps, reduction=reduction, attention=attention,
                  feature_scale=feature_scale, channel_attention=channel_attention)
    if backbone_weights != weights:
        from medattn.models.weights import load_weights

        load_weights(model, weights, arch="wsdan")
    return model
