"""OSNet, the omni-scale network (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification",
ICCV 2019, §3), laid out as torchreid's ``osnet.py`` so that its state dicts load by key.

- Stem: 7x7/2 conv 3->c0 + BN + ReLU, 3x3/2 max-pool.
- conv2, conv3, conv4: two omni-scale residual blocks each (:class:`OSBlock`); conv2 and conv3 end with a
  transition (1x1 conv + BN + ReLU, 2x2/2 average pool), conv4 keeps the resolution.
- conv5: 1x1 conv + BN + ReLU. Widths (c0..c3) are (64, 256, 384, 512) times the width multiplier.
- IBN variant (``osnet_ibn_x1_0``): the stem's BN becomes an affine Instance Norm and every conv2 block
  ends with an affine Instance Norm before its ReLU.

An :class:`OSBlock` reduces to mid = cout/4 channels, runs four streams of 1, 2, 3 and 4 Lite 3x3 units
(receptive fields 3, 5, 7, 9), weights each stream with one shared unified aggregation gate (§3.2), sums
them and expands back with a linear 1x1 conv before the residual add. ``widest_streams`` lets a network
swap the 4-unit stream of a stage for another module (DM-OSNet puts its DL-MHSA there).

At 256x128 the map sizes are conv2 64x32, conv3 32x16, conv4/conv5 16x8 (output stride 16).

Deviations from torchreid: the fc-512 embedding and the classifier are not part of the backbone; the
OSNet re-ID model (``finetune/models/osnet.py``) adds them. Nothing else differs: parameter names,
initialisation (Kaiming fan-out convs, unit BN) and forward are torchreid's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reidforge.shared.backbones import BACKBONES

# Builds the module that replaces the 4-unit (9x9) stream of a block, given the block's mid width.
StreamFactory = Callable[[int], nn.Module]

BASE_CHANNELS = (64, 256, 384, 512)


class ConvNorm(nn.Module):
    """Bias-free conv, then BN (or affine Instance Norm), then an optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 relu: bool = True, instance_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.InstanceNorm2d(cout, affine=True) if instance_norm else nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class LightConv3x3(nn.Module):
    """Lite 3x3: pointwise 1x1 (no norm in between), depthwise 3x3, BN, ReLU (§3.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """Unified aggregation gate: x * sigmoid(fc2(relu(fc1(GAP(x))))), reduction 16 (§3.2)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_activation(self.fc2(self.relu(self.fc1(self.global_avgpool(x)))))


class OSBlock(nn.Module):
    """Omni-scale residual bottleneck; ``widest`` replaces the 4-unit stream when given."""

    def __init__(self, cin: int, cout: int, instance_norm: bool = False, widest: StreamFactory | None = None):
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvNorm(cin, mid)
        self.conv2a = LightConv3x3(mid)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid) for _ in range(3)))
        self.conv2d = widest(mid) if widest is not None else nn.Sequential(*(LightConv3x3(mid) for _ in range(4)))
        self.gate = ChannelGate(mid)  # one gate shared by the four streams
        self.conv3 = ConvNorm(mid, cout, relu=False)
        self.downsample = ConvNorm(cin, cout, relu=False) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = sum(self.gate(stream(x1)) for stream in (self.conv2a, self.conv2b, self.conv2c, self.conv2d))
        out = self.conv3(x2) + (self.downsample(x) if self.downsample is not None else x)
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class OSNet(nn.Module):
    """OSNet trunk: (N, 3, H, W) -> (N, out_channels, H/16, W/16).

    ``widest_streams`` holds one entry per stage (conv2, conv3, conv4): ``None`` keeps the 4-unit Lite 3x3
    stream, a factory replaces it in both blocks of that stage.
    """

    def __init__(self, width: float = 1.0, ibn: bool = False,
                 widest_streams: Sequence[StreamFactory | None] = (None, None, None)):
        super().__init__()
        if len(widest_streams) != 3:
            raise ValueError(f"widest_streams needs one entry per stage (conv2, conv3, conv4), "
                             f"got {len(widest_streams)}")
        c0, c1, c2, c3 = (int(c * width) for c in BASE_CHANNELS)
        self.conv1 = ConvNorm(3, c0, 7, stride=2, padding=3, instance_norm=ibn)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = self._stage(c0, c1, reduce=True, instance_norm=ibn, widest=widest_streams[0])
        self.conv3 = self._stage(c1, c2, reduce=True, instance_norm=False, widest=widest_streams[1])
        self.conv4 = self._stage(c2, c3, reduce=False, instance_norm=False, widest=widest_streams[2])
        self.conv5 = ConvNorm(c3, c3)
        self.out_channels = c3
        self._init_params()

    @staticmethod
    def _stage(cin: int, cout: int, reduce: bool, instance_norm: bool,
               widest: StreamFactory | None) -> nn.Sequential:
        layers: list[nn.Module] = [OSBlock(cin, cout, instance_norm, widest),
                                   OSBlock(cout, cout, instance_norm, widest)]
        if reduce:
            layers.append(nn.Sequential(ConvNorm(cout, cout), nn.AvgPool2d(2, stride=2)))
        return nn.Sequential(*layers)

    def _init_params(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))


@BACKBONES.register()
def osnet_x1_0() -> OSNet:
    return OSNet(1.0)


@BACKBONES.register()
def osnet_x0_75() -> OSNet:
    return OSNet(0.75)


@BACKBONES.register()
def osnet_x0_5() -> OSNet:
    return OSNet(0.5)


@BACKBONES.register()
def osnet_x0_25() -> OSNet:
    return OSNet(0.25)


@BACKBONES.register()
def osnet_ibn_x1_0() -> OSNet:
    return OSNet(1.0, ibn=True)
