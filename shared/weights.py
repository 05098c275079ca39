"""Loading weights from local files onto a model, with a report of what matched.

Sources: our own safetensors exports (pretraining, fine-tuning), or a torchvision / timm / IBN-Net
state dict saved as ``.pth``/``.pt``/``.bin``. Nothing is ever downloaded, and nothing is unpickled
beyond tensors: ``.pth`` files load with ``torch.load(weights_only=True)``.

Keys are matched after stripping wrapper prefixes (``module.`` from DataParallel/DDP, ``model.``,
``backbone.``, ``state_dict`` nesting) and an optional ``prefix`` to load a backbone file into a model's
sub-module. Tensors whose shapes differ (a classifier for another number of classes) are skipped and
reported, never loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


class WeightsError(ValueError):
    """A weights file that cannot be used, described in one line."""


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same key, other shape

    def summary(self) -> str:
        lines = [f"{self.path}: loaded {self.loaded} tensors, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) the metadata header of a local weights file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = _header(path)
        return load_file(str(path)), metadata
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise WeightsError(f"{path}: not loadable as plain tensors ({str(e).splitlines()[0]})") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return obj, {}


def _candidates(key: str) -> list[str]:
    """``key`` as it is, then with each leading wrapper prefix removed in turn."""
    names = [key]
    while any(names[-1].startswith(p) for p in WRAPPER_PREFIXES):
        names.append(next(names[-1][len(p):] for p in WRAPPER_PREFIXES if names[-1].startswith(p)))
    return names


def load_weights(model: nn.Module, path: str | Path, prefix: str = "", verbose: bool = True) -> LoadReport:
    """Copy every tensor of ``path`` whose (stripped) key and shape match ``model``; report the rest.

    ``prefix`` is prepended to the file's keys (e.g. ``"backbone."`` to load a backbone export into
    a full re-ID model). Raises when nothing at all matches, which is always a wrong file.
    """
    tensors, _ = read_state_dict(path)
    target = model.state_dict()
    report = LoadReport(str(path))
    matched: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        # The file's key as it is wins; wrapper prefixes are stripped only when that finds no match.
        name = next((prefix + k for k in _candidates(key) if prefix + k in target), prefix + _candidates(key)[-1])
        if name not in target:
            report.unexpected.append(key)
        elif target[name].shape != value.shape:
            report.mismatched.append(f"{name} {tuple(value.shape)} vs {tuple(target[name].shape)}")
        else:
            matched[name] = value
    if not matched:
        raise WeightsError(f"{path}: no tensor matches the model (first file key: {next(iter(tensors), None)})")
    model.load_state_dict(matched, strict=False)
    report.loaded = len(matched)
    report.missing = [k for k in target if k not in matched]
    if verbose:
        print(report.summary())
    return report


METADATA_KEY = "reidforge"


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state as safetensors with ``metadata`` (JSON) in the header, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    os.replace(tmp, path)


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an export carries (architecture, input size, mean/std, feature dim, provenance)."""
    if Path(path).suffix != ".safetensors":
        raise WeightsError(f"{path}: exports are .safetensors files")
    header = _header(path)
    if METADATA_KEY not in header:
        raise WeightsError(f"{path}: not a reidforge export (no '{METADATA_KEY}' metadata)")
    return json.loads(header[METADATA_KEY])


def _header(path: str | Path) -> dict[str, str]:
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
