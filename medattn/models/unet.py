"""Lung segmentation networks: a U-Net (Ronneberger et al. 2015, the architecture seed 002's
lung model uses) and torchvision's segmentation models behind one interface.

Every model maps (B, C, H, W) to (B, 1, H, W) lung logits, for any H, W (the U-Net pads odd
sizes internally), so it can be trained at one size and run at another.

    >>> m = build_segmentation_model("unet", in_chans=1, base_width=8, depth=3)
    >>> m(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 1, 64, 64])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medattn.errors import ConfigError

TORCHVISION_ARCHS = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                     "lraspp_mobilenet_v3_large")


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    # conv-BN-ReLU twice, padded so the output keeps the input size (the original U-Net used
    # unpadded convs and cropping; padding is the common modern form and keeps masks aligned).
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: ``depth`` 2x down-samplings with ``base_width * 2**level`` channels, transposed-conv
    up-sampling, skip connections, and a 1x1 conv to one lung logit per pixel.

    Args:
        in_chans: input channels (1 for X-rays).
        base_width: channels at the first level (64 in the paper).
        depth: number of down-sampling steps (4 in the paper).
    """

    def __init__(self, in_chans: int = 1, base_width: int = 64, depth: int = 4):
        super().__init__()
        if depth < 1 or base_width < 1:
            raise ConfigError(f"lungseg: depth ({depth}) and base_width ({base_width}) must be >= 1")
        widths = [base_width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_chans, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(depth)))
        self.dec = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2 ** self.depth
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:  # pad to a multiple of 2**depth (edge values), crop back at the end
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)[..., :h, :w]


class _TorchvisionSeg(nn.Module):
    """A torchvision segmentation model with one output class; gray inputs are repeated to RGB."""

    def __init__(self, arch: str, in_chans: int):
        super().__init__()
        from torchvision.models import segmentation as seg

        kw = {"weights": None, "weights_backbone": None, "num_classes": 1}
        if arch.startswith(("fcn", "deeplabv3")):
            kw["aux_loss"] = False
        self.net = getattr(seg, arch)(**kw)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)["out"]


def build_segmentation_model(arch: str = "unet", *, in_chans: int = 1, base_width: int = 64,
                             depth: int = 4) -> nn.Module:
    """A lung segmentation network: ``unet`` or one of :data:`TORCHVISION_ARCHS` (random init).

    Args:
        arch: the architecture.
        in_chans: 1 or 3.
        base_width, depth: U-Net only.
    """
    if arch == "unet":
        return UNet(in_chans, base_width, depth)
    if arch in TORCHVISION_ARCHS:
        return _TorchvisionSeg(arch, in_chans)
    raise ConfigError(f"lungseg.arch={arch!r}: expected unet or one of {', '.join(TORCHVISION_ARCHS)}")
