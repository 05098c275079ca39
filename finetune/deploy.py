"""The deployed feature pipeline, shared by the ONNX export and the search command.

``FeaturePipeline``: a uint8 RGB batch (N, 3, H, W) of any height and width -> bilinear resize to the
model's input size (antialiased, as ``reidforge.data.transforms`` resizes test images) -> ``Normalize`` with the
export's mean/std -> the model in eval mode -> float32 (N, D) features. ``finetune/export_onnx.py``
exports exactly this module, so the torch reference and the ONNX graph cannot drift apart.

Models that embed camera or view ids (MBR-4B and LKA-ReID built with ``n_cams``/``n_views`` > 0: LAI)
take them as int64 (N,) inputs named ``camids`` / ``viewids``; ``id_counts`` reads the ones a model
needs, and how many ids each has, from those two attributes.

``load_model`` is the one way ``finetune/evaluate.py``, ``export_onnx.py`` and ``search.py`` open a weights
file (``--weights FILE``, with ``--model NAME --model-options JSON --allow-partial`` for foreign files,
:func:`add_model_arguments`). It returns the model in eval mode and its metadata (architecture, options,
input size, mean/std, and the notes to print), from:

1. our fine-tune exports (``model_*.safetensors``): rebuilt from their header, exactly (every key, no other);
2. our training checkpoints: ``<run>/checkpoints/epoch-N/model.safetensors`` (accelerate's ``save_state``,
   ``shared/checkpoints.py``), or that directory: the model's name and options, input size and mean/std
   come from the run's ``config.yaml`` (``finetune/engine.py`` writes it two levels up), the class count
   from the classifier's shape; loaded exactly;
3. our pre-training backbone exports (``backbone_final.safetensors``, ``kind: backbone``, written by the
   SpCL stage): the backbone and its pooling (the export's ``pooling`` and ``gem_p``; for older exports,
   ``encoder.pooling`` of the run's ``config.yaml`` beside the file, else ``avg``, SpCL's default), so the features are the pooled backbone output with
   neither SpCL's BatchNorm1d nor a classifier, as the CFS scoring embeds; the backbone loaded exactly;
4. foreign checkpoints (torchreid, FastReID, the DM-OSNet authors', SpCL / cluster-contrast-reid,
   reid-strong-baseline, ImageNet files) onto the model the user names: a registered model (its own eval
   feature) or a registered backbone (its pooled feature, ``pooling`` option ``avg``/``gem``), through the
   strict ``reidforge.shared.weights.load_pretrained``. Every trunk tensor must come from the file, and so must
   every head tensor the eval feature uses (the BNNeck BN, OSNet's fc, GeM's p: all but the classifiers,
   which are loaded where the file has them, at the file's class count): else one error line, unless
   ``--allow-partial``. One exception: a BNNeck model whose file has no BNNeck BN (an ImageNet or torchreid
   file under ``--model bot_resnet50``) is evaluated on its backbone's pooled output, and the note says so;
5. ``timm:<name>``: any timm architecture (``reidforge.shared.backbones.timm_any``), no classifier, random init
   (never downloaded), its weights from the file (a timm state dict), features timm's pooled output.

Input size (``--input-size H W``, ``ModelSource.input_size``): forms 1-3 record the size they were trained
at, which ``--input-size`` may repeat but not change (a model evaluated at another size is not the model
the file describes: its BN statistics, MBR's position tensors; the ONNX and results metadata would then
contradict the file). A foreign file records none: it runs at ``--input-size`` when given (a torchreid
OSNet at 256x128, a FastReID model at 384x128), else at the model's own size (a registered model's
``input_size``, 256x128 for a backbone, timm's config); a note says which. A given size is tried on a
blank image first, so a size the model cannot take is one line before any image is read; timm
architectures with a fixed size are built for it (``timm_any``).

``load_embedder`` opens a model as a numpy-in, numpy-out ``Embedder``: a ``.safetensors`` file (or a
checkpoint directory) through ``load_model`` and ``FeaturePipeline`` in torch, a ``.onnx`` export through
onnxruntime (the graph holds the preprocessing). Both take the same uint8 batches.

Deviation: the resize runs in float32 and is not rounded back to uint8 as the training pipeline's is;
an image already at the input size passes through unchanged, which is how ``finetune/search.py`` feeds
it (host-side resize with the training pipeline's test transform, then batching).
"""

from __future__ import annotations

import argparse
import json
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from reidforge.data.transforms import Normalize, TransformConfig
from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.models import MODELS, build_model, class_keys, infer_num_classes, load_exact, load_exported_model
from reidforge.finetune.models.base import BNNeckModel
from reidforge.shared.backbones import BACKBONES, PooledBackbone, build_backbone
from reidforge.shared.backbones.timm_any import TIMM_PREFIX, build_timm_pooled
from reidforge.shared.checkpoint_layouts import head_candidates
from reidforge.shared.config import ConfigError, load_config
from reidforge.shared.heads import build_pooling
from reidforge.shared.weights import (METADATA_KEY, WeightsError, load_pretrained, read_checkpoint, read_export_metadata,
                            read_header)

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


CHECKPOINT_FILE = "model.safetensors"  # accelerate's save_state: the model's state dict in a checkpoint directory
RUN_CONFIG = "config.yaml"
PARTIAL = "--allow-partial"
POOLINGS = ("avg", "gem")  # reidforge.shared.heads.build_pooling


def input_size_of(value: Any, flag: str = "input_size") -> tuple[int, int]:
    """(height, width) from two positive whole numbers (ints, or their digits as the command line gives them);
    anything else is a ``ConfigError`` naming ``flag``."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]

    def whole(item: Any) -> int | None:
        if isinstance(item, str):
            return int(item) if item.strip().lstrip("+-").isdigit() else None
        return int(item) if isinstance(item, numbers.Integral) and not isinstance(item, bool) else None

    sizes = [whole(item) for item in items]
    if len(sizes) != 2 or None in sizes or min(sizes) < 1:
        shown = " ".join(str(item) for item in items)
        raise ConfigError(f"{flag} {shown}: expected two positive integers, the height and width in pixels "
                          "(e.g. 256 128)")
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class ModelSource:
    """How to read a weights file: ``name`` None for our own files (they name their model), else the model of
    a foreign file: a registered model, a registered backbone or ``timm:<architecture>``. ``input_size``
    (height, width): the size a foreign file's model runs at (default: the model's own); our files record
    theirs, which it may only repeat."""

    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    allow_partial: bool = False
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            object.__setattr__(self, "input_size", input_size_of(self.input_size))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-options``, ``--allow-partial`` and ``--input-size``: the model of a foreign
    ``--weights`` file."""
    parser.add_argument("--model", help="the model of a foreign checkpoint (torchreid, FastReID, ImageNet ...): a "
                        f"registered model, a registered backbone (pooled feature) or {TIMM_PREFIX}<architecture>; "
                        "our exports and training checkpoints name their own")
    parser.add_argument("--model-options", help='JSON object of the model\'s options, e.g. \'{"variant": "osnet_x0_25"}\'')
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept a foreign file that leaves tensors the features need at their init")
    # Read as text and checked by model_source, so a bad value is one line naming the flag, as for the others.
    parser.add_argument("--input-size", nargs=2, metavar=("H", "W"),
                        help="height and width a foreign file's model runs at (default: the model's own, e.g. "
                             "256 128 for OSNet, 224 224 for most timm models); our files record theirs")


def model_source(args: argparse.Namespace) -> ModelSource:
    """The :class:`ModelSource` of parsed :func:`add_model_arguments`; a bad combination is a ``ConfigError``."""
    size = None if args.input_size is None else input_size_of(args.input_size, "--input-size")
    if args.model is None:
        given = [flag for flag, value in (("--model-options", args.model_options), (PARTIAL, args.allow_partial))
                 if value]
        if given:
            raise ConfigError(f"{given[0]} goes with --model (our exports and checkpoints load exactly, with their "
                              "own options)")
        return ModelSource(input_size=size)
    options: Any = {}
    if args.model_options is not None:
        try:
            options = json.loads(args.model_options)
        except ValueError as e:
            raise ConfigError(f"--model-options {args.model_options!r}: not JSON ({e})") from None
        if not isinstance(options, dict):
            raise ConfigError(f"--model-options {args.model_options!r}: expected a JSON object")
    return ModelSource(args.model, options, args.allow_partial, size)


def resolve_weights(path: str | Path) -> Path:
    """The weights file: ``path``, or the ``model.safetensors`` of a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_FILE).is_file():
            raise WeightsError(f"{path}: a directory without {CHECKPOINT_FILE} (not a training checkpoint)")
        return path / CHECKPOINT_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    return path


def load_model(path: str | Path, source: ModelSource = ModelSource()) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a weights file in eval mode, and its metadata (see the module docstring): ``architecture``,
    ``options``, ``input_size``, ``mean``, ``std``, ``feature_dim``, ``source`` (which of the five forms),
    ``file`` (the file read) and ``notes`` (lines to show the user). One ``WeightsError`` / ``ConfigError``
    line for anything unusable, before any image is read."""
    file = resolve_weights(path)
    try:
        # A torch file (.pth, .tar ...) has no header: only safetensors files can be ours.
        if file.suffix == ".safetensors" and METADATA_KEY in read_header(file):
            meta = read_export_metadata(file)
            kind = meta.get("kind", "model")
            if source.name is not None:
                raise ConfigError(f"--model {source.name}: {file} is a reidforge {kind} export of "
                                  f"{meta.get('architecture')!r}, which names its own model: drop --model")
            _recorded_size(file, f"reidforge {kind} export", meta.get("input_size"), source.input_size)
            model, meta = (_backbone_export(file, meta, source.input_size) if kind == "backbone"
                           else _model_export(file))
        elif source.name is not None:
            model, meta = _foreign(file, source)
        else:
            model, meta = _training_checkpoint(file, source.input_size)
        model.eval()
    except (WeightsError, ConfigError):
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # metadata that describes no buildable model
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{file}: not a usable model ({first})") from None
    return model, {"file": str(file), **meta}


def _meta(architecture: str, options: dict[str, Any], input_size: Sequence[int], mean: Sequence[float],
          std: Sequence[float], feature_dim: int, source: str, notes: list[str]) -> dict[str, Any]:
    return {"architecture": architecture, "options": options, "input_size": [int(v) for v in input_size],
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "feature_dim": int(feature_dim),
            "source": source, "notes": notes}


def _recorded_size(file: Path, what: str, recorded: Sequence[int] | None, given: tuple[int, int] | None) -> None:
    """Our files record the size they were trained at, part of the model as much as its weights (the BN
    statistics, MBR's and LKA-ReID's position tensors): ``--input-size`` may repeat it, not change it."""
    if given is not None and recorded is not None and tuple(int(v) for v in recorded) != given:
        raise ConfigError(f"--input-size {given[0]} {given[1]}: {file} is a {what} trained at {recorded[0]} "
                          f"{recorded[1]}, which it records: drop --input-size")


def _runs_at(model: nn.Module, size: tuple[int, int], name: str) -> None:
    """One forward pass of a blank image at ``size``, so that a size the model cannot take (a ViT's fixed
    patch grid, MBR's position tensors, a map strided down to nothing) fails here, before any image is read."""
    ids = {"camids": torch.zeros(1, dtype=torch.long), "viewids": torch.zeros(1, dtype=torch.long)}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *size), **ids)
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--input-size {size[0]} {size[1]}: {name} does not run at that size ({first})") from None


def _model_export(file: Path) -> tuple[nn.Module, dict[str, Any]]:
    model, meta = load_exported_model(file)
    return model, {**meta, "source": "reidforge model export", "notes": []}


def _backbone_export(file: Path, meta: dict[str, Any], input_size: tuple[int, int] | None
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """A pre-training backbone export: the backbone (exact) and the run's pooling, at the input size it records
    (an export without one: ``input_size``, else the default crop)."""
    if "architecture" not in meta:
        raise WeightsError(f"{file}: a backbone export whose metadata names no architecture")
    options = meta.get("options", {})
    backbone = build_backbone(meta["architecture"], **options)
    load_exact(backbone, read_checkpoint(file).tensors, f"{file}: does not match its own backbone "
                                                       f"{meta['architecture']!r}")
    config = file.parent / RUN_CONFIG
    pooling, origin = meta.get("pooling"), "its metadata"
    if pooling is None:  # exports written before the pooling was recorded: the run's config beside the file,
        # whose key was still encoder.pooling (model.pooling in runs since, whose exports record it)
        pooling = _read_yaml(config).get("encoder", {}).get("pooling") if config.is_file() else None
        origin = f"encoder.pooling of {config}" if pooling else f"SpCL's default: no {RUN_CONFIG} beside it names one"
    if (pooling or "avg") not in POOLINGS:
        raise WeightsError(f"{file}: pooling {pooling!r} in its metadata is none of {', '.join(POOLINGS)}")
    notes = [f"{file}: pooled backbone output ({pooling or 'avg'} pooling, from {origin}), without SpCL's "
             "BatchNorm1d head"]
    pool = build_pooling(pooling or "avg")
    if pooling == "gem":
        if isinstance(meta.get("gem_p"), (int, float)):
            pool.p.data.fill_(float(meta["gem_p"]))
        else:
            notes.append(f"{file}: the export does not carry GeM's trained p: pooling with p = {pool.p.detach().item():g} "
                         "(its init)")
    model = PooledBackbone(backbone, pool, backbone.out_channels)
    t = TransformConfig()
    return model, _meta(meta["architecture"], options, meta.get("input_size", input_size or [t.height, t.width]),
                        meta.get("mean", t.mean), meta.get("std", t.std), model.feature_dim,
                        "reidforge backbone export", notes)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not a readable config ({str(e).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def _training_checkpoint(file: Path, input_size: tuple[int, int] | None) -> tuple[nn.Module, dict[str, Any]]:
    """``<run>/checkpoints/epoch-N/model.safetensors`` with the run's config.yaml: loaded exactly."""
    config = next((p / RUN_CONFIG for p in list(file.parents)[:3] if (p / RUN_CONFIG).is_file()), None)
    if file.suffix != ".safetensors" or config is None:
        raise WeightsError(f"{file}: neither a reidforge export nor a training checkpoint with its run's {RUN_CONFIG} "
                           "above it: for a foreign checkpoint, name its model with --model NAME")
    try:
        cfg = load_config(TrainConfig, config, translate=True)  # a run of an earlier version reads as today's
    except ConfigError as e:
        raise ConfigError(f"{config}: not a fine-tuning run's config, which {file} needs ({e})") from None
    t = cfg.data.transform
    _recorded_size(file, f"reidforge training checkpoint (its {config})", (t.height, t.width), input_size)
    name, options = cfg.model.name, dict(cfg.model.options)
    tensors = read_checkpoint(file).tensors
    num_classes = infer_num_classes(class_keys(name, **options), {k: tuple(v.shape) for k, v in tensors.items()})
    model = build_model(name, num_classes, **options)
    load_exact(model, tensors, f"{file}: does not match {name!r} with options {options} of {config}")
    note = f"{file}: training checkpoint of {name} ({num_classes} classes), config {config}"
    return model, _meta(name, options, [t.height, t.width], t.mean, t.std, model.feature_dim,
                        "reidforge training checkpoint", [note])


def _foreign(file: Path, source: ModelSource) -> tuple[nn.Module, dict[str, Any]]:
    """A foreign file onto the named model, strictly (see the module docstring)."""
    name, options = source.name, dict(source.options)
    t = TransformConfig()
    size, mean, std = (t.height, t.width), t.mean, t.std
    origin = "the default person crop"
    classes: dict[str, tuple[int, int]] = {}
    if name.startswith(TIMM_PREFIX):
        model: nn.Module = build_timm_pooled(name[len(TIMM_PREFIX):], source.input_size, **options)
        size, mean, std, options = model.input_size, model.mean, model.std, dict(model.options)
        origin = "its img_size option" if "img_size" in source.options else "its timm config"
        what = "timm's pooled output (num_classes=0)"
    elif name in MODELS:
        classes = class_keys(name, **options)
        ckpt = read_checkpoint(file)
        shapes = {k: tuple(v.shape) for k, v in ckpt.tensors.items()}
        theirs = {**{k: k for k in classes}, **head_candidates(list(shapes), shapes)}
        model = build_model(name, infer_num_classes(classes, {k: shapes[f] for k, f in theirs.items()
                                                              if k in classes and f in shapes}), **options)
        size, origin = model.input_size, f"{name}'s own"
        what = f"{name}'s own eval feature"
    elif name in BACKBONES:
        pooling = options.pop("pooling", "avg")
        if pooling not in POOLINGS:
            raise ConfigError(f"--model-options pooling {pooling!r}: valid: {', '.join(POOLINGS)}")
        backbone = build_backbone(name, **options)
        model = PooledBackbone(backbone, build_pooling(pooling), backbone.out_channels)
        options["pooling"] = pooling
        what = f"the backbone's pooled output ({pooling} pooling)"
    else:
        raise ConfigError(f"--model {name!r}: not a registered model ({', '.join(MODELS.names())}), backbone "
                          f"({', '.join(BACKBONES.names())}) or {TIMM_PREFIX}<timm architecture>")
    built_for_size = "img_size" in options and "img_size" not in source.options  # by build_timm_pooled
    if source.input_size is not None:
        size, origin = source.input_size, "--input-size"
        if built_for_size:
            origin += ", the architecture built for it with timm's img_size"
        _runs_at(model, size, name)
    else:
        origin += "; --input-size H W gives the size the file was trained at"
    try:
        report = load_pretrained(model, file, source.allow_partial, partial_option=PARTIAL)
    except WeightsError as e:
        if built_for_size:
            raise WeightsError(f"{e} (the architecture was built for --input-size {size[0]} {size[1]} with timm's "
                               "img_size: a file trained at another size needs that size, or --model-options "
                               '\'{"dynamic_img_size": true}\' to resample its position embedding)') from None
        raise
    notes = [report.line()]
    trunk = model.trunk_keys()
    needed = [k for k in model.state_dict() if k not in trunk and k not in classes
              and not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in report.head_loaded]
    if missing and isinstance(model, BNNeckModel) and all(k.startswith("neck.bn.") for k in missing):
        model = PooledBackbone(model.backbone, model.pool, model.feature_dim)
        what = (f"the backbone's pooled output: the file has no BNNeck BN ({', '.join(missing)} not in it), so "
                f"not {name}'s BN-neck feature")
    elif missing and not source.allow_partial:
        raise WeightsError(f"{file} [{report.layout}]: {len(missing)} of the {len(needed)} head tensors {name}'s "
                           f"features use are not in the file and would stay at their init (first: "
                           f"{', '.join(missing[:3])}); {PARTIAL} accepts it")
    elif missing:
        what += f", with {len(missing)} head tensors at their init ({PARTIAL}: first {missing[0]})"
    notes.append(f"features: {what}")
    notes.append(f"input size {size[0]}x{size[1]} ({origin})")
    return model, _meta(name, options, size, mean, std, model.feature_dim, "foreign checkpoint", notes)


def load_pipeline(path: str | Path, source: ModelSource = ModelSource()) -> tuple[FeaturePipeline, dict[str, Any]]:
    """The pipeline of a weights file (:func:`load_model`) and its metadata; ``WeightsError`` otherwise."""
    model, meta = load_model(path, source)
    return FeaturePipeline(model, meta["input_size"], meta["mean"], meta["std"]), meta


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


def load_embedder(path: str | Path, device: torch.device | str = "cpu", source: ModelSource = ModelSource(),
                  note: Callable[[str], None] = print) -> Embedder:
    """A ``.onnx`` export through onnxruntime, or any file :func:`load_model` reads through torch (on
    ``device``); its notes go to ``note``."""
    path = Path(path)
    if path.suffix == ".onnx":
        if source.name is not None:
            raise ConfigError(f"--model {source.name}: {path} is an ONNX export, which holds its own model")
        if not path.is_file():
            raise WeightsError(f"{path}: no such file")
        embedder = OnnxEmbedder(path, ["CPUExecutionProvider"] if torch.device(device).type == "cpu" else None)
        _recorded_size(path, "reidforge ONNX export", embedder.input_size, source.input_size)
        return embedder
    pipeline, meta = load_pipeline(path, source)
    for line in meta["notes"]:
        note(f"note: {line}")
    return TorchEmbedder(pipeline, device)
