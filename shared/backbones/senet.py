"""SE-ResNeXt-50/101 32x4d (Hu et al., CVPR 2018, SENet Table 1; Xie et al., CVPR 2017, ResNeXt), from timm.

Layout (models.md §4): 7x7/2 stem and 3x3/2 max-pool, stages [3, 4, 6, 3] (50) or [3, 4, 23, 3] (101),
bottleneck inner width 2x planes with a 32-group 3x3 conv, an SE unit (reduction 16) on each block's
output before the residual add, 1x1 strided shortcut + BN. The network is built with
``timm.create_model(..., pretrained=False, num_classes=0, global_pool="")``; weights come only from a
local file through ``reidforge.shared.weights``.

Two layouts of the same network, both 25,510,896 parameters for the 50-layer trunk (models.md §4;
46,906,416 for 101):

- ``legacy=False`` (default): timm's ``seresnext{50,101}_32x4d``, module names ``conv1, bn1, act1,
  maxpool, layer1..4`` (timm checkpoints load by key). Its stem max-pool pads by 1 where the Cadene
  original uses ``ceil_mode``; the output shapes are identical at 256x128, 256x256 and 224x224.
- ``legacy=True``: timm's ``legacy_seresnext{50,101}_32x4d``, the Cadene layout of
  reid-strong-baseline (``layer0.conv1`` ..., ``se_module.fc1``), so its ImageNet and re-ID
  checkpoints load by key.

The timm layout is built with ``zero_init_last=False``: timm's default zeroes the last BN of every
block, which leaves the residual branches without gradient on a first step from scratch; with it off,
both layouts start alike (all BN weights 1, as torchvision's ResNets). Loaded weights override it.

``last_stride=1`` sets the stride of layer4's first block (its grouped 3x3 conv and its shortcut conv)
to 1, as BoT does (Luo et al., CVPRW 2019, §3.4). :meth:`stem` runs everything before layer1, so that
multi-branch models can share the trunk up to any layer.
Deviations: the pooling and the classifier are dropped; the default (timm) layout differs from the
Cadene reference of models.md §4 by its stem max-pool padding (above), which ``legacy=True`` avoids.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from reidforge.shared.backbones import BACKBONES


class SEResNeXtBackbone(nn.Module):
    """An SE-ResNeXt 32x4d trunk: (N, 3, H, W) -> (N, 2048, H/32 or H/16, ...)."""

    def __init__(self, depth: int, last_stride: int = 2, legacy: bool = False):
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"unsupported SE-ResNeXt depth {depth}; valid: 50, 101")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        if legacy:
            net = timm.create_model(f"legacy_seresnext{depth}_32x4d", pretrained=False, num_classes=0, global_pool="")
        else:  # every BN weight starts at 1, as in the legacy layout and torchvision's ResNets
            net = timm.create_model(f"seresnext{depth}_32x4d", pretrained=False, num_classes=0, global_pool="",
                                    zero_init_last=False)
        if last_stride == 1:
            first = net.layer4[0]
            first.conv2.stride = (1, 1)
            first.downsample[0].stride = (1, 1)
        # The submodules keep timm's names, so that either layout's checkpoints load by key.
        self._stem_names = ("layer0", "pool0") if legacy else ("conv1", "bn1", "act1", "maxpool")
        for stem_name in self._stem_names:
            setattr(self, stem_name, getattr(net, stem_name))
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 2048

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        for stem_name in self._stem_names:
            x = getattr(self, stem_name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


@BACKBONES.register()
def seresnext50_32x4d(last_stride: int = 2, legacy: bool = False) -> SEResNeXtBackbone:
    return SEResNeXtBackbone(50, last_stride, legacy)


@BACKBONES.register()
def seresnext101_32x4d(last_stride: int = 2, legacy: bool = False) -> SEResNeXtBackbone:
    return SEResNeXtBackbone(101, last_stride, legacy)
