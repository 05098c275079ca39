"""reidforge: self-supervised pretraining and fine-tuning for person and vehicle re-identification.

The repository's stage folders install as this package's subpackages (``data/`` as ``reidforge.data``, and
``shared/``, ``pretrain/``, ``finetune/`` alike), so installing it puts only ``reidforge`` on ``sys.path``.
The three things a script does most, each in one line::

    import reidforge
    features = reidforge.FeatureExtractor("runs/bot_tiny/model_final.safetensors")("photos/")
    summary = reidforge.train("launch/configs/bot_tiny.yaml", "epochs=2", "optim.lr=1e-4")
    metrics = reidforge.evaluate_features("runs/bot_tiny/features.safetensors")

Names are imported on first use, so ``import reidforge`` stays cheap and the stages keep their layering.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FeatureExtractor": "reidforge.finetune.extractor",
    "load_model": "reidforge.finetune.deploy",
    "evaluate_features": "reidforge.finetune.evaluate",
    "load_config": "reidforge.shared.config",
    "ConfigError": "reidforge.shared.config",
    "WeightsError": "reidforge.shared.weights",
}
__all__ = ["__version__", "train", "pretrain", *_EXPORTS]


def train(recipe: str | Path, *overrides: str, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune from a recipe with ``key=value`` overrides, as ``finetune/train.py --config recipe ...`` does
    (``log.txt`` in the run directory included); returns the run's summary."""
    from reidforge.finetune.engine import TrainConfig, train as run

    return _run(TrainConfig, run, recipe, overrides, resume, overwrite)


def pretrain(recipe: str | Path, *overrides: str, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """SpCL pretraining from a recipe with ``key=value`` overrides, as ``pretrain/spcl.py`` does."""
    from reidforge.pretrain.spcl import SpCLConfig, pretrain as run

    return _run(SpCLConfig, run, recipe, overrides, resume, overwrite)


_pretrain = pretrain  # importing reidforge.pretrain.* rebinds the name to the package, which calls this


def _run(schema: type, run: Any, recipe: str | Path, overrides: Sequence[str], resume: bool,
         overwrite: bool) -> dict[str, Any]:
    from reidforge.shared.config import is_main_process, load_config
    from reidforge.shared.runlog import output_log

    cfg = load_config(schema, recipe, overrides)
    with output_log(is_main_process()):
        return run(cfg, resume, overwrite)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reidforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
