"""torchvision backbones behind the :class:`ClassifierModel` contract.

Registered: ``resnet18``, ``resnet50``, ``resnet152``, ``densenet121``, ``vgg16_bn``.
Module and parameter names inside the trunk are torchvision's (``conv1``, ``layer4``,
``features.denseblock4``, ``features.40``), so torchvision's ImageNet files load without renaming;
only the head is ours (``fc``: global pool -> dropout -> Linear).

Feature maps at a 224 input: ResNet-18 512x7x7, ResNet-50/152 2048x7x7 (2048x14x14 with
``layer4_stride=1``), DenseNet-121 1024x7x7, VGG16-BN 512x7x7 (after pool5).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from medattn.errors import ConfigError
from medattn.models.base import ClassifierModel
from medattn.models.registry import register_model


def _stem_conv(in_chans: int, out: int, kernel: int, stride: int, padding: int, bias: bool) -> nn.Conv2d:
    # PyTorch's default conv initialisation (std ~0.08 for a 1-channel 7x7 stem), not
    # torchvision's kaiming-normal fan_out (std 0.025). BatchNorm follows the stem, so only the
    # weights' scale relative to the SGD step changes: at the small scale the stem's effective
    # step is ~10x larger, and from random init the demo trained worse and less reproducibly
    # (ResNet-18, synthetic set, same seed: test mean AUROC 0.76 vs 0.83). Pretrained weights
    # replace it anyway (RGB kernels summed, see medattn.models.weights).
    return nn.Conv2d(in_chans, out, kernel, stride=stride, padding=padding, bias=bias)


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
class ResNet(ClassifierModel):
    """torchvision ResNet trunk (conv1 .. layer4) with the medattn head.

    Args:
        depth: 18, 50 or 152.
        layer4_stride: 2 (torchvision) or 1: layer4 keeps layer3's resolution, output stride 16
            (14x14 at 224), as in CAL/WS-DAN and DualAttendMed. Plain stride 1, no dilation:
            the pretrained 3x3 kernels are applied unchanged to a denser grid.
    """

    def __init__(self, depth: int, *, num_classes: int, in_chans: int = 1, pool: str = "max",
                 drop_rate: float = 0.0, layer4_stride: int = 2):
        ctor = {18: tvm.resnet18, 50: tvm.resnet50, 152: tvm.resnet152}[depth]
        tv = ctor(weights=None)
        super().__init__(num_features=tv.fc.in_features, num_classes=num_classes, in_chans=in_chans,
                         pool=pool, drop_rate=drop_rate)
        self.conv1 = tv.conv1 if in_chans == 3 else _stem_conv(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        if layer4_stride not in (1, 2):
            raise ConfigError(f"layer4_stride={layer4_stride} must be 1 or 2")
        if layer4_stride == 1:
            first = self.layer4[0]
            # The stride sits in the first block's 3x3 conv (conv2 in a Bottleneck, "ResNet v1.5";
            # conv1 in a BasicBlock) and in its 1x1 downsample conv.
            strided = first.conv2 if isinstance(first, tvm.resnet.Bottleneck) else first.conv1
            strided.stride = (1, 1)
            first.downsample[0].stride = (1, 1)
            self.feature_stride = 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def gradcam_layer(self) -> nn.Module:
        return self.layer4[-1]


@register_model("resnet18")
def resnet18(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
             layer4_stride: int = 2) -> ResNet:
    return ResNet(18, num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate,
                  layer4_stride=layer4_stride)


@register_model("resnet50")
def resnet50(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
             layer4_stride: int = 2) -> ResNet:
    return ResNet(50, num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate,
                  layer4_stride=layer4_stride)


@register_model("resnet152")
def resnet152(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
              layer4_stride: int = 2) -> ResNet:
    return ResNet(152, num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate,
                  layer4_stride=layer4_stride)


# --------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------
class DenseNet(ClassifierModel):
    """torchvision DenseNet-121 trunk (``features``: conv0 .. norm5, then ReLU).

    ``forward_features`` returns relu(norm5(...)) as torchvision's classifier sees it.
    ``gradcam_layer`` is ``features.norm5`` (pre-ReLU; the ReLU here is not in-place, so a
    hook on norm5 sees its true output).

    Args:
        memory_efficient: torchvision's checkpointed dense layers (less memory, ~20% slower).
    """

    def __init__(self, *, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        tv = tvm.densenet121(weights=None, memory_efficient=memory_efficient)
        super().__init__(num_features=tv.classifier.in_features, num_classes=num_classes,
                         in_chans=in_chans, pool=pool, drop_rate=drop_rate)
        self.features = tv.features
        if in_chans != 3:
            self.features.conv0 = _stem_conv(in_chans, 64, 7, 2, 3, bias=False)
        self.final_act = nn.ReLU(inplace=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.features(x))

    def gradcam_layer(self) -> nn.Module:
        return self.features.norm5


@register_model("densenet121")
def densenet121(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0,
                memory_efficient: bool = False) -> DenseNet:
    return DenseNet(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate,
                    memory_efficient=memory_efficient)


# --------------------------------------------------------------------------------------------
# VGG16-BN
# --------------------------------------------------------------------------------------------
# Channels per 3x3 conv, "M" = 2x2 max pool (VGG configuration D).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_layers(in_chans: int, batch_norm: bool) -> list[nn.Module]:
    """VGG16's conv trunk with torchvision's layer indices (so its ImageNet files load), He init.

    ``batch_norm``: vgg16_bn's Conv-BN-ReLU blocks (in-place ReLU). Without it, plain VGG16's
    Conv-ReLU with ReLUs that are *not* in-place, so the last conv's output (seed 002's Grad-CAM
    layer, ``features.28``) survives the forward."""
    layers: list[nn.Module] = []
    c = in_chans
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(c, v, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU()]
        c = v
    return layers


class VGG(ClassifierModel):
    """VGG16-BN trunk (``features``, torchvision's layer indices, ending with pool5).

    torchvision's 4096-4096 MLP classifier is not built: the head is global pool -> dropout ->
    Linear(512), as in seed 004's VGG16-BN (GAP -> Dropout(0.5) -> Linear). Built directly rather
    than from ``torchvision.models.vgg16_bn`` so that no 120M-parameter MLP is allocated and thrown away.
    """

    def __init__(self, *, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0):
        super().__init__(num_features=512, num_classes=num_classes, in_chans=in_chans, pool=pool,
                         drop_rate=drop_rate)
        layers = _vgg16_layers(in_chans, batch_norm=True)
        self.features = nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def gradcam_layer(self) -> nn.Module:
        # The last conv (features.40); it is followed by BatchNorm, so no in-place op overwrites it.
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1]


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes: int, in_chans: int = 1, pool: str = "max", drop_rate: float = 0.0) -> VGG:
    return VGG(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate)



# --------------------------------------------------------------------------------------------
# VGG16 (no BN) with torchvision's 4096-4096 classifier: seed 002's published VGG16
# --------------------------------------------------------------------------------------------
class VGG16MLP(ClassifierModel):
    """torchvision's ``vgg16`` as seed 002 uses it (``VGG16_Weights.DEFAULT``, ``classifier[-1]``
    replaced): conv trunk without BatchNorm -> AdaptiveAvgPool(7) -> flatten -> Linear(25088, 4096)
    -> ReLU -> Dropout(0.5) -> Linear(4096, 4096) -> ReLU -> Dropout(0.5) -> Linear(4096, K).

    The two hidden Linear layers are ``classifier.0`` and ``classifier.3`` (torchvision's names, so
    the ImageNet file initialises them); the last Linear is medattn's head ``fc`` (fresh). The
    "pooled" vector of the contract is the 4096-d output of the second hidden layer. The ReLUs are
    not in-place, so the last conv's output (``features.28``, seed 002's Grad-CAM layer) survives.
    ``pool`` is ignored: the MLP needs torchvision's 7x7 average pool.
    """

    def __init__(self, *, num_classes: int, in_chans: int = 1, pool: str = "avg", drop_rate: float = 0.5):
        super().__init__(num_features=4096, num_classes=num_classes, in_chans=in_chans, pool="avg", drop_rate=0.0)
        layers = _vgg16_layers(in_chans, batch_norm=False)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(), nn.Dropout(drop_rate),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(drop_rate))
        for m in self.classifier:
            if isinstance(m, nn.Linear):  # torchvision's init of its VGG classifier
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def map_channels(self) -> int:
        return 512

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.classifier(torch.flatten(self.avgpool(features), 1))
        return pooled if pre_logits else self.logits_from_pooled(pooled)

    def gradcam_layer(self) -> nn.Module:
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1]  # features.28


@register_model("vgg16")
def vgg16(*, num_classes: int, in_chans: int = 1, pool: str = "avg", drop_rate: float = 0.5) -> VGG16MLP:
    return VGG16MLP(num_classes=num_classes, in_chans=in_chans, pool=pool, drop_rate=drop_rate)
