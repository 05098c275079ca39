"""ResNet-18/50/101 (He et al., CVPR 2016) and ResNet-IBN-a (Pan et al., ECCV 2018, IBN-Net §3.2).

The networks are torchvision's, built without weights and without the classifier, so that a local
torchvision ImageNet state dict loads onto them unchanged (see ``reidforge.shared.weights``). Options:

- ``last_stride=1`` removes the last down-sampling (layer4's first block: the 3x3 conv of a
  bottleneck, or the first conv of a basic block, and the shortcut's 1x1 conv), doubling the output
  resolution, as the BoT baseline does (Luo et al., CVPRW 2019, §3.4).
- IBN-a (``resnet50_ibn_a``, ``resnet101_ibn_a``): in every bottleneck of layer1..layer3, the first BN
  is replaced by an Instance Norm (affine) on the first half of the channels and a BN on the rest;
  layer4 keeps plain BN. The submodules are named ``IN`` and ``BN`` as in the IBN-Net release, so its
  checkpoints load by key. Parameter counts equal the plain network's.

The backbone exposes torchvision's ``conv1, bn1, relu, maxpool, layer1..layer4``; :meth:`stem` runs the
first four, so that multi-branch models can share the trunk up to any layer.
Deviation: none beyond dropping ``avgpool`` and ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet

from reidforge.shared.backbones import BACKBONES


class IBN(nn.Module):
    """Instance Norm on the first half of the channels, Batch Norm on the rest (IBN-a)."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet trunk: (N, 3, H, W) -> (N, out_channels, H/32 or H/16, ...)."""

    def __init__(self, depth: int, last_stride: int = 2, ibn: bool = False):
        super().__init__()
        builders = {18: resnet.resnet18, 50: resnet.resnet50, 101: resnet.resnet101}
        if depth not in builders:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: 18, 50, 101")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        net = builders[depth](weights=None)
        if ibn:
            if depth == 18:
                raise ValueError("IBN-a is defined for bottleneck ResNets (50, 101)")
            for layer in (net.layer1, net.layer2, net.layer3):
                for block in layer:
                    block.bn1 = IBN(block.bn1.num_features)
        if last_stride == 1:
            first = net.layer4[0]
            (first.conv2 if isinstance(first, resnet.Bottleneck) else first.conv1).stride = (1, 1)
            first.downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 512 if depth == 18 else 2048

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


@BACKBONES.register()
def resnet18(last_stride: int = 2) -> ResNetBackbone:
    return ResNetBackbone(18, last_stride)


@BACKBONES.register()
def resnet50(last_stride: int = 2) -> ResNetBackbone:
    return ResNetBackbone(50, last_stride)


@BACKBONES.register()
def resnet101(last_stride: int = 2) -> ResNetBackbone:
    return ResNetBackbone(101, last_stride)


@BACKBONES.register()
def resnet50_ibn_a(last_stride: int = 2) -> ResNetBackbone:
    return ResNetBackbone(50, last_stride, ibn=True)


@BACKBONES.register()
def resnet101_ibn_a(last_stride: int = 2) -> ResNetBackbone:
    return ResNetBackbone(101, last_stride, ibn=True)
