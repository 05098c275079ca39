"""Re-ID models (the seed models and their baselines), built by name: ``build_model(name, num_classes, **options)``.

Each model is a :class:`finetune.models.base.ReIDModel` in its own file, named as its paper names it,
registered in ``MODELS``.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from finetune.models.base import ReIDModel
from shared.registry import Registry
from shared.weights import WeightsError, load_weights, read_export_metadata

MODELS: Registry[ReIDModel] = Registry("model")


def build_model(name: str, num_classes: int, **options: Any) -> ReIDModel:
    return MODELS.build(name, num_classes, **options)


def load_exported_model(path: str | Path) -> tuple[ReIDModel, dict[str, Any]]:
    """Rebuild a fine-tuned model from its safetensors export (architecture and options in the header)."""
    meta = read_export_metadata(path)
    model = build_model(meta["architecture"], meta["num_classes"], **meta.get("options", {}))
    report = load_weights(model, path, verbose=False)
    if report.missing or report.mismatched:
        raise WeightsError(f"{path}: does not match its own architecture {meta['architecture']!r} "
                           f"({len(report.missing)} missing, {len(report.mismatched)} mismatched tensors)")
    return model.eval(), meta


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
