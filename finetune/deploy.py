"""The deployed feature pipeline, shared by the ONNX export and the search command.

``FeaturePipeline``: a uint8 RGB batch (N, 3, H, W) of any height and width -> bilinear resize to the
model's input size (antialiased, as ``data.transforms`` resizes test images) -> ``Normalize`` with the
export's mean/std -> the model in eval mode -> float32 (N, D) features. ``finetune/export_onnx.py``
exports exactly this module, so the torch reference and the ONNX graph cannot drift apart.

Models that embed camera or view ids (MBR-4B and LKA-ReID built with ``n_cams``/``n_views`` > 0: LAI)
take them as int64 (N,) inputs named ``camids`` / ``viewids``; ``id_counts`` reads the ones a model
needs, and how many ids each has, from those two attributes.

``load_embedder`` opens either form of a model as a numpy-in, numpy-out ``Embedder``: a
``model_*.safetensors`` export runs through ``FeaturePipeline`` in torch, a ``.onnx`` export through
onnxruntime (the graph holds the preprocessing). Both take the same uint8 batches.

Deviation: the resize runs in float32 and is not rounded back to uint8 as the training pipeline's is;
an image already at the input size passes through unchanged, which is how ``finetune/search.py`` feeds
it (host-side resize with the training pipeline's test transform, then batching).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from data.transforms import Normalize
from finetune.models import load_exported_model
from shared.config import ConfigError
from shared.weights import WeightsError

ID_INPUTS = (("camids", "n_cams"), ("viewids", "n_views"))
# ONNX metadata_props keys whose values are JSON (the rest are plain strings).
JSON_METADATA = ("input_size", "mean", "std", "feature_dim", "options", "id_inputs")


def id_counts(model: nn.Module) -> dict[str, int]:
    """The id inputs the model's forward needs (``camids`` when it embeds cameras, ``viewids`` views), with
    the number of valid ids of each."""
    return {name: int(getattr(model, count)) for name, count in ID_INPUTS if getattr(model, count, 0) > 0}


class FeaturePipeline(nn.Module):
    """uint8 (N, 3, H, W) of any H, W -> resize -> normalise -> model (eval) -> float32 (N, D)."""

    def __init__(self, model: nn.Module, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.normalize = Normalize(list(mean), list(std))
        self.id_counts = id_counts(model)
        self.id_inputs = tuple(self.id_counts)

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> torch.Tensor:
        # Always resize (a same-size resize is the identity): a branch on the shape would fix H, W on export.
        x = F.interpolate(images.float(), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.model(self.normalize(x), camids=camids, viewids=viewids).float()


def load_pipeline(path: str | Path) -> tuple[FeaturePipeline, dict[str, Any]]:
    """The pipeline of a ``model_*.safetensors`` export and the export's metadata; ``WeightsError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        model, meta = load_exported_model(path)
        pipeline = FeaturePipeline(model, meta["input_size"], meta["mean"], meta["std"])
    except WeightsError:
        raise
    except (SafetensorError, ConfigError, KeyError, TypeError, ValueError, RuntimeError) as e:
        # A truncated or foreign file, or metadata that does not describe a registered model.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not a usable model export ({first})") from None
    return pipeline, meta


class Embedder(Protocol):
    input_size: tuple[int, int]
    id_inputs: tuple[str, ...]

    def __call__(self, images: np.ndarray, ids: dict[str, np.ndarray] | None = None) -> np.ndarray: ...


class TorchEmbedder:
    """A ``FeaturePipeline`` behind the numpy interface (uint8 (N, 3, H, W) -> float32 (N, D))."""

    def __init__(self, pipeline: FeaturePipeline, device: torch.device | str = "cpu"):
        self.pipeline = pipeline.to(device).eval()
        self.device = torch.device(device)
        self.input_size = pipeline.input_size
        self.id_inputs = pipeline.id_inputs

    @torch.no_grad()
    def __call__(self, images: np.ndarray, ids: dict[str, np.ndarray] | None = None) -> np.ndarray:
        ids = {k: torch.from_numpy(v).to(self.device) for k, v in (ids or {}).items()}
        return self.pipeline(torch.from_numpy(images).to(self.device), **ids).cpu().numpy()


class OnnxEmbedder:
    """An exported ONNX graph (file or serialised bytes) run by onnxruntime."""

    def __init__(self, model: str | Path | bytes, providers: Sequence[str] | None = None):
        name = "<in memory>" if isinstance(model, bytes) else str(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as the torch path
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=list(providers))
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable or invalid graphs
            raise WeightsError(f"{name}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        try:
            self.metadata = onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
            self.input_size = (int(self.metadata["input_size"][0]), int(self.metadata["input_size"][1]))
        except (KeyError, ValueError, TypeError, IndexError):
            raise WeightsError(f"{name}: not a reidforge ONNX export (no readable input_size metadata)") from None
        self.id_inputs = tuple(i.name for i in self.session.get_inputs() if i.name != "images")

    def __call__(self, images: np.ndarray, ids: dict[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = {"images": np.ascontiguousarray(images, dtype=np.uint8)}
        feeds.update({k: np.asarray(v, dtype=np.int64) for k, v in (ids or {}).items()})
        return self.session.run(["features"], feeds)[0]


def onnx_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX metadata_props as written by the export, JSON values decoded."""
    return {k: json.loads(v) if k in JSON_METADATA else v for k, v in props.items()}


def load_embedder(path: str | Path, device: torch.device | str = "cpu") -> Embedder:
    """A ``.safetensors`` export through torch (on ``device``) or an ``.onnx`` export through onnxruntime."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, ["CPUExecutionProvider"] if torch.device(device).type == "cpu" else None)
    if path.suffix == ".safetensors":
        return TorchEmbedder(load_pipeline(path)[0], device)
    raise WeightsError(f"{path}: expected a .safetensors or .onnx model export")
