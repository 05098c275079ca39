"""Any timm architecture as a feature extractor: ``build_timm_pooled(name, **options)`` (``--model timm:<name>``).

timm (huggingface/pytorch-image-models, ``timm/models/_factory.py`` ``create_model``) builds the network
with ``pretrained=False``, so nothing is downloaded (the weights come from a local file through
``reidforge.shared.weights.load_pretrained``), and ``num_classes=0``, which makes the classifier an identity: the
forward returns timm's own pooled feature, (N, ``num_features``) (``forward_head(pre_logits=True)``: the
global pooling of a CNN, the class token or pooled tokens after the final norm of a ViT). Unlike the
registered backbones it returns no feature map, so it is pooled by nothing further.
:func:`timm_data_config` gives the input size, mean and std of the architecture's default config
(``timm.data.resolve_model_data_config``).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.data import resolve_model_data_config
from torch import nn

from reidforge.shared.config import ConfigError

TIMM_PREFIX = "timm:"


def build_timm_pooled(name: str, **options: Any) -> nn.Module:
    """timm's ``name`` with no classifier and random init; ``options`` go to ``timm.create_model``."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm architecture {name!r} (timm {timm.__version__}; "
                          "timm.list_models() lists them)")
    reserved = sorted({"pretrained", "num_classes", "pretrained_cfg_overlay", "checkpoint_path"} & options.keys())
    if reserved:
        raise ConfigError(f"{TIMM_PREFIX}{name}: option {reserved[0]!r} is fixed here (no download, no classifier; "
                          "the weights come from --weights)")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **options)
    except (TypeError, ValueError, AssertionError) as e:  # an option the architecture does not take
        raise ConfigError(f"{TIMM_PREFIX}{name} with options {options}: {str(e).splitlines()[0]}") from None


def timm_data_config(model: nn.Module) -> tuple[tuple[int, int], list[float], list[float]]:
    """(height, width), mean and std of ``model``'s default data config."""
    config = resolve_model_data_config(model)
    _, height, width = config["input_size"]
    return (int(height), int(width)), [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
