"""Re-ID models (the seed models and their baselines), built by name: ``build_model(name, num_classes, **options)``.

Each model is a :class:`reidforge.finetune.models.base.ReIDModel` in its own file, named as its paper names it,
registered in ``MODELS``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reidforge.finetune.models.base import ReIDModel
from reidforge.shared.registry import Registry
from reidforge.shared.weights import WeightsError, read_checkpoint, read_export_metadata

MODELS: Registry[ReIDModel] = Registry("model")


def build_model(name: str, num_classes: int, **options: Any) -> ReIDModel:
    return MODELS.build(name, num_classes, **options)


def class_keys(name: str, **options: Any) -> dict[str, tuple[int, int]]:
    """The state-dict keys of model ``name`` whose shape follows the number of classes (its classifiers), each
    with (the dimension that counts classes, its size at one class); built on the meta device (names and
    shapes only, no memory)."""
    with torch.device("meta"):
        one, two = (build_model(name, n, **options).state_dict() for n in (1, 2))
    out = {}
    for key, value in one.items():
        if value.shape != two[key].shape:
            dim = next(i for i, (a, b) in enumerate(zip(value.shape, two[key].shape)) if a != b)
            out[key] = (dim, int(value.shape[dim]))
    return out


def infer_num_classes(keys: Mapping[str, tuple[int, int]], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The class count at which the classifier ``keys`` (:func:`class_keys`) take the ``shapes`` a file has for
    them (keyed by the model's names); 1 when the file has none (the classifier plays no part in evaluation)."""
    for key, (dim, at_one) in keys.items():
        if key in shapes and len(shapes[key]) > dim:
            return max(int(shapes[key][dim]) - at_one + 1, 1)
    return 1


def load_exact(module: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` onto ``module`` exactly: every key of its state dict, no other, each at its shape;
    else one ``WeightsError`` line (``where`` names the file and what it should hold)."""
    expected = module.state_dict()
    problems = ([f"missing {k}" for k in expected if k not in tensors]
                + [f"unexpected {k}" for k in tensors if k not in expected]
                + [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in tensors and tensors[k].shape != v.shape])
    if problems:
        raise WeightsError(f"{where} ({len(problems)} differences, first: {problems[0]})")
    module.load_state_dict(dict(tensors))


def load_exported_model(path: str | Path) -> tuple[ReIDModel, dict[str, Any]]:
    """Rebuild a fine-tuned model from its safetensors export (architecture and options in the header)."""
    meta = read_export_metadata(path)
    if meta.get("kind", "model") != "model" or "num_classes" not in meta or "architecture" not in meta:
        raise WeightsError(f"{path}: not a fine-tuned model export (kind {meta.get('kind', 'model')!r}, "
                           f"architecture {meta.get('architecture')!r}, num_classes {meta.get('num_classes')!r})")
    model = build_model(meta["architecture"], meta["num_classes"], **meta.get("options", {}))
    load_exact(model, read_checkpoint(path).tensors,
               f"{path}: does not match its own architecture {meta['architecture']!r}")
    return model.eval(), meta


# Every module of this package registers its builders on import: a new file is all a new family needs.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
