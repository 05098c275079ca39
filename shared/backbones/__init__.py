"""Backbones used by both stages, built by name: ``build_backbone(name, **options)``.

A backbone maps an (N, 3, H, W) normalised batch to an (N, C, h, w) feature map and exposes
``out_channels`` (C). Each family lives in its own file and registers its builders in ``BACKBONES``.
:class:`PooledBackbone` is a backbone and its pooling alone, the (N, C) feature without a re-ID head
(a pre-training stage's backbone export, an ImageNet or timm network evaluated as it is).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from reidforge.shared.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


class NoFeatureMap(ValueError):
    """A model whose features come from no image-shaped map, so Grad-CAM has nothing to draw (the reason)."""


def build_backbone(name: str, **options: Any) -> nn.Module:
    return BACKBONES.build(name, **options)


class PooledBackbone(nn.Module):
    """backbone -> pooling -> the (N, ``feature_dim``) feature; the model interface of the re-ID models
    (camera/view ids accepted and unused, ``cam_layer``, ``trunk_keys`` for ``reidforge.shared.weights.load_pretrained``)."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone, self.pool, self.feature_dim = backbone, pool, feature_dim

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.backbone(images))

    def cam_layer(self) -> nn.Module:
        return self.backbone

    def trunk_keys(self) -> dict[str, str]:
        """Every backbone tensor, with its key in the backbone's own state dict (what a weights file fills)."""
        return {f"backbone.{key}": key for key in self.backbone.state_dict()}


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
