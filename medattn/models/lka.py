"""VGG16-BN with Large Kernel Attention after blocks 3, 4 and 5 (seed 004; methods.md section 004).

LKA(dim) (Guo et al., Visual Attention Network): attn = PW1x1(DW7x7,dilation 3(DW5x5(u))), out =
attn * u. The depthwise convs have groups = dim; all three convs have a bias; no activation, no
normalisation, no residual. Each block sits after a VGG block's last ReLU and **before** the
following max-pool, so at 224 the LKAs see 256x56x56, 512x28x28 and 512x14x14.

The trunk is medattn's ``vgg16_bn`` (torchvision's ``features`` indices, so the ImageNet file
loads unchanged); the LKAs live beside it in ``lka`` (``lka.b3``, ``lka.b4``, ``lka.b5``) and run at
the pools 23, 33 and 43. The head is the published one: global average pooling -> Dropout(0.5)
-> Linear(512 -> K) (pass ``pool="avg", drop_rate=0.5``). With 3 input channels and K = 14 it
has 15,418,702 trainable parameters, the number the stage-1 notebook prints.
"""
from __future__ import annotations

import torch
from torch import nn

from medattn.errors import ConfigError
from medattn.models.backbones import VGG
from medattn.models.registry import register_model

# VGG block -> index of the max-pool that ends it in torchvision's vgg16_bn ``features``.
POOL_AFTER_BLOCK = {1: 6, 2: 13, 3: 23, 4: 33, 5: 43}
BLOCK_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


class LKA(nn.Module):
    """Large kernel attention: a 21x21 receptive field from DW5x5 -> DW7x7 (dilation 3) -> 1x1."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, dilation=3, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class VGGLKA(VGG):
    """VGG16-BN trunk with LKA before the pools of ``blocks`` (default 3, 4, 5).

    Args:
        blocks: VGG blocks (1-5) followed by an LKA.
        (others as :class:`medattn.models.backbones.VGG`)
    """

    imagenet_arch = "vgg16_bn"  # its ImageNet file initialises the trunk; the LKAs start random

    def __init__(self, *, num_classes: int, in_chans: int = 1, pool: str = "avg", drop_rate: float = 0.5,
                 blocks: tuple[int, ...] = (3, 4, 5)):
        super().__init__(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate)
        bad = [b for b in blocks if b not in POOL_AFTER_BLOCK]
        if bad or len(set(blocks)) != len(blocks):
            raise ConfigError(f"lka.blocks={list(blocks)}: expected distinct VGG blocks among 1-5")
        self.blocks = tuple(sorted(blocks))
        self.lka = nn.ModuleDict({f"b{b}": LKA(BLOCK_CHANNELS[b]) for b in self.blocks})
        self._at_pool = {POOL_AFTER_BLOCK[b]: f"b{b}" for b in self.blocks}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.features):
            name = self._at_pool.get(i)
            if name is not None:
                x = self.lka[name](x)
            x = layer(x)
        return x


@register_model("vgg16_bn_lka")
def vgg16_bn_lka(*, num_classes: int, in_chans: int = 1, pool: str = "avg", drop_rate: float = 0.5,
                 blocks: tuple[int, ...] = (3, 4, 5)) -> VGGLKA:
    return VGGLKA(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate, blocks=tuple(blocks))
