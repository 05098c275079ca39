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
from shared.weights import WeightsError, read_checkpoint, read_export_metadata

MODELS: Registry[ReIDModel] = Registry("model")


def build_model(name: str, num_classes: int, **options: Any) -> ReIDModel:
    return MODELS.build(name, num_classes, **options)


def load_exported_model(path: str | Path) -> tuple[ReIDModel, dict[str, Any]]:
    """Rebuild a fine-tuned model from its safetensors export (architecture and options in the header)."""
    meta = read_export_metadata(path)
    model = build_model(meta["architecture"], meta["num_classes"], **meta.get("options", {}))
    tensors = read_checkpoint(path).tensors
    expected = model.state_dict()
    # Exact: every key of the architecture, no other, each at its shape.
    problems = ([f"missing {k}" for k in expected if k not in tensors]
                + [f"unexpected {k}" for k in tensors if k not in expected]
                + [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in tensors and tensors[k].shape != v.shape])
    if problems:
        raise WeightsError(f"{path}: does not match its own architecture {meta['architecture']!r} "
                           f"({len(problems)} differences, first: {problems[0]})")
    model.load_state_dict(tensors)
    return model.eval(), meta


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
