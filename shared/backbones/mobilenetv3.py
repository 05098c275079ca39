"""MobileNetV3-Small/Large (Howard et al., ICCV 2019), torchvision's, as the coursework baseline.

The EEEM071 coursework (Aricatt, "EEEM071 Coursework Report", §2.1) starts from the course's starter
code, which wraps torchvision's ``mobilenet_v3_small`` and replaces its whole ImageNet classifier
(Linear-Hardswish-Dropout-Linear) with its own head on the pooled 576-d vector. This backbone is
therefore torchvision's ``features`` (ending in the 1x1 conv to 576 / 960 channels + BN + Hardswish),
built without weights; a torchvision ImageNet state dict loads onto it by key (``classifier.*`` is
reported unexpected). Output stride 32.
Deviation: none beyond dropping ``avgpool`` and ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenetv3

from reidforge.shared.backbones import BACKBONES


class MobileNetV3Backbone(nn.Module):
    """torchvision MobileNetV3 features: (N, 3, H, W) -> (N, 576 or 960, H/32, W/32)."""

    def __init__(self, size: str):
        super().__init__()
        builders = {"small": mobilenetv3.mobilenet_v3_small, "large": mobilenetv3.mobilenet_v3_large}
        if size not in builders:
            raise ValueError(f"unsupported MobileNetV3 size {size!r}; valid: small, large")
        self.features = builders[size](weights=None).features
        self.out_channels = self.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@BACKBONES.register()
def mobilenetv3_small() -> MobileNetV3Backbone:
    return MobileNetV3Backbone("small")


@BACKBONES.register()
def mobilenetv3_large() -> MobileNetV3Backbone:
    return MobileNetV3Backbone("large")
