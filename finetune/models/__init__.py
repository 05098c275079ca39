"""Re-ID models (the seed models and their baselines), built by name: ``build_model(name, num_classes, **options)``.

Each model is a :class:`finetune.models.base.ReIDModel` in its own file, named as its paper names it,
registered in ``MODELS``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from finetune.models.base import ReIDModel
from shared.registry import Registry

MODELS: Registry[ReIDModel] = Registry("model")


def build_model(name: str, num_classes: int, **options: Any) -> ReIDModel:
    return MODELS.build(name, num_classes, **options)


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
