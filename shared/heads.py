"""Pooling and embedding heads shared by the re-ID models.

- :class:`GeM`: generalised-mean pooling (Radenović et al., TPAMI 2019), p learnable, p=1 is average.
- :class:`BNNeck`: the BoT neck (Luo et al., CVPRW 2019, §3.5): the pooled feature feeds the triplet
  loss, a BatchNorm1d whose bias is frozen at zero gives the inference feature, and a bias-free
  linear classifier on the BN feature feeds the ID loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling over H and W: (mean(x^p))^(1/p), with x clamped at ``eps``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


def build_pooling(kind: str) -> nn.Module:
    """``"avg"`` or ``"gem"`` pooling to an (N, C) feature."""
    if kind == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if kind == "gem":
        return GeM()
    raise ValueError(f"unknown pooling {kind!r}; valid: avg, gem")


class BNNeck(nn.Module):
    """Feature -> (BN feature, logits). ``num_classes=0`` builds the neck without a classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)  # BoT: a frozen zero shift keeps the BN feature centred
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bn = self.bn(feature)
        return bn, (self.classifier(bn) if self.classifier is not None else None)
