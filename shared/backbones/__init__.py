"""Backbones used by both stages, built by name: ``build_backbone(name, **options)``.

A backbone maps an (N, 3, H, W) normalised batch to an (N, C, h, w) feature map and exposes
``out_channels`` (C). Each family lives in its own file and registers its builders in ``BACKBONES``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from shared.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


def build_backbone(name: str, **options: Any) -> nn.Module:
    return BACKBONES.build(name, **options)


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
