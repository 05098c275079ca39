"""Export a re-ID model to ONNX with its preprocessing, and check the graph against torch.

    python finetune/export_onnx.py --weights runs/bot_tiny/model_final.safetensors \
        [--out runs/bot_tiny/model_final.onnx] [--opset 18] [--tolerance 1e-4]
    python finetune/export_onnx.py --weights model.pth.tar-150 --model osnet [--model-options JSON] --out osnet.onnx

``--weights`` takes every file ``finetune/evaluate.py`` takes (``reidforge.finetune.deploy.load_model``: our exports,
training checkpoints, foreign checkpoints with ``--model``); the graph computes the same features.

The graph is ``reidforge.finetune.deploy.FeaturePipeline``: input ``images``, uint8 RGB (N, 3, H, W) with N, H and W
all dynamic; it resizes to the export's input size (bilinear, antialiased), normalises with the export's
mean/std and runs the model in eval mode; output ``features``, float32 (N, D). Models that embed camera
or view ids (LAI) also take ``camids`` and/or ``viewids``, int64 (N,); the others have no such input.
The model's metadata_props hold ``architecture``, ``input_size``, ``mean``, ``std``, ``feature_dim``,
``options``, ``id_inputs`` (JSON values), ``weights`` (the source file's name), ``weights_sha256`` and
``source`` (how the file was read: export, training checkpoint, foreign checkpoint).

Before the file is written, onnxruntime runs the serialised graph on uint8 batches of three sizes and
batch sizes (the input size, a larger and a smaller odd size) with random ids, beside the torch
pipeline on the same batches: a max |feature difference| above 1e-4 (``--tolerance``) is an error (exit
status 1, as for a failed export; 2 for a missing or unusable weights file) and nothing is written. The
measured figures are printed; ``export_onnx`` returns them. The bound is absolute, which suits features
of order 1: features in the hundreds (an untrained ResNet-50 with random BN statistics reaches ~900)
differ by more from float32 rounding alone (~1e-7 of their size), so the message gives their scale.

Choices:

- The torch.export-based exporter (``dynamo=True``, which needs onnxscript). The TorchScript exporter
  (``dynamo=False``) has no export for the antialiased resize (``aten::_upsample_bilinear2d_aa``) nor for
  adaptive average pooling to a size that does not divide the input (LKA-ReID's HCA).
- LAI models check their ids with Python control flow on tensor values, which ``torch.export.export``
  cannot trace; they go through ``torch.export.draft_export``, which takes the branch that the example's
  valid ids take, as a tracer would. The range check is then not part of the graph (out-of-range ids
  are the caller's to avoid), and this path is slower (tens of seconds on a CPU).
- Opset 18 or later: the antialiased resize is ONNX ``Resize`` with ``antialias=1`` (opset 18).
- One self-contained file (weights inline): protobuf caps it at 2 GB, several times the largest
  registered model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.export import Dim

from reidforge.data.shards import sha256_file
from reidforge.finetune.deploy import (FeaturePipeline, ModelSource, OnnxEmbedder, TorchEmbedder, add_model_arguments,
                             load_pipeline, model_source, resolve_weights)
from reidforge.shared.config import ConfigError
from reidforge.shared.io import atomic_open
from reidforge.shared.weights import WeightsError

PARITY_TOLERANCE = 1e-4
MIN_OPSET = 18
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that could not be made or that failed its parity check, in one line."""


def parity_batches(input_size: tuple[int, int], id_counts: dict[str, int], seed: int = 0
                   ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Random uint8 batches at the input size, a larger and a smaller odd size (2, 3 and 1 images)."""
    rng = np.random.default_rng(seed)
    h, w = input_size
    sizes = [(2, h, w), (3, h * 3 // 2 + 5, w * 3 // 2 + 3), (1, h // 2 + 1, w // 2 + 1)]
    return [(rng.integers(0, 256, (n, 3, sh, sw), dtype=np.uint8),
             {name: rng.integers(0, count, n, dtype=np.int64) for name, count in id_counts.items()})
            for n, sh, sw in sizes]


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for the duration."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def to_onnx(pipeline: FeaturePipeline, opset: int, metadata: dict[str, str]) -> bytes:
    """The serialised ONNX model of ``pipeline``, dynamic in N, H, W, with ``metadata`` as metadata_props."""
    h, w = pipeline.input_size
    images = torch.randint(0, 256, (2, 3, h + 16, w + 8), dtype=torch.uint8)
    ids = {name: torch.zeros(2, dtype=torch.long) for name in pipeline.id_inputs}  # id 0 is valid for every LAI
    batch, height, width = Dim("batch", min=1), Dim("height", min=1), Dim("width", min=1)
    shapes = {"images": {0: batch, 2: height, 3: width}, **{name: {0: batch} for name in ids}}
    if ids:
        # draft_export logs the specialised id check as a soundness warning, pages of it: the parity check
        # (with random valid ids) is what vouches for the graph.
        with _quiet("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes"):
            program = torch.export.draft_export(pipeline.eval(), (images,), ids, dynamic_shapes=shapes)
    else:
        program = torch.export.export(pipeline.eval(), (images,), dynamic_shapes=shapes, strict=False)
    onnx_program = torch.onnx.export(program, (images,), kwargs=ids, dynamo=True, opset_version=opset,
                                     input_names=["images", *ids], output_names=["features"], verbose=False)
    shape = onnx_program.model.graph.inputs[0].shape  # the exporter names the dynamic axes s0, s1, ...
    onnx_program.rename_axes({shape[0]: "batch", shape[2]: "height", shape[3]: "width"})
    proto = onnx_program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def export_onnx(weights: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = PARITY_TOLERANCE, source: ModelSource = ModelSource()) -> dict[str, Any]:
    """Export ``weights`` (any file ``reidforge.finetune.deploy.load_model`` reads with ``source``) to ``out``
    (default: beside the weights file, ``.onnx``).

    Returns the output path, the graph's inputs, the feature width, the export time and the parity
    figures (max |Δ| per batch and overall, and the largest |feature| for scale). Raises
    ``WeightsError`` for an unusable weights file, ``ConfigError`` for a bad opset or output directory,
    and ``ExportError`` when the export fails or its features differ from torch's by more than
    ``tolerance``; nothing is written then.
    """
    weights = resolve_weights(weights)
    out = Path(out) if out is not None else weights.with_suffix(".onnx")
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: the antialiased resize needs opset {MIN_OPSET} or later")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: not a directory")
    if out.resolve() == weights.resolve():
        raise ConfigError(f"{out}: the output would overwrite the weights")
    pipeline, meta = load_pipeline(weights, source)
    for line in meta["notes"]:
        print(f"note: {line}")
    batches = parity_batches(pipeline.input_size, pipeline.id_counts)
    reference = TorchEmbedder(pipeline, "cpu")
    try:
        expected = [reference(images, ids) for images, ids in batches]
    except (RuntimeError, ValueError) as e:  # e.g. an input size the model's layers do not accept
        raise ExportError(f"{weights}: the model fails at input size {pipeline.input_size} "
                          f"({str(e).strip().splitlines()[0]})") from None
    metadata = {
        "architecture": meta["architecture"], "weights": weights.name, "weights_sha256": sha256_file(weights),
        "input_size": list(pipeline.input_size), "mean": list(meta["mean"]), "std": list(meta["std"]),
        "feature_dim": int(expected[0].shape[1]), "options": meta.get("options", {}),
        "id_inputs": list(pipeline.id_inputs), "source": meta["source"],
    }
    start = time.perf_counter()
    try:
        data = to_onnx(pipeline, opset, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    except Exception as e:  # the exporters raise many types, with pages of context: keep the first line
        raise ExportError(f"{weights}: ONNX export failed ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
                          ) from None
    export_seconds = time.perf_counter() - start
    session = OnnxEmbedder(data, ["CPUExecutionProvider"])
    per_size = {}
    for (images, ids), want in zip(batches, expected):
        got = session(images, ids)
        if got.shape != want.shape:
            raise ExportError(f"{weights}: ONNX features are {got.shape}, torch's {want.shape}")
        per_size[f"{images.shape[0]}x{images.shape[2]}x{images.shape[3]}"] = float(np.abs(got - want).max())
    max_abs_diff = max(per_size.values())
    max_abs_feature = float(max(np.abs(f).max() for f in expected))
    if not max_abs_diff <= tolerance:  # also catches NaN
        raise ExportError(f"{weights}: ONNX features differ from torch's by max |delta| {max_abs_diff:.3g} "
                          f"> {tolerance:g} (features up to {max_abs_feature:.3g}); {out} not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        f.write(data)
    return {"out": str(out), "architecture": meta["architecture"], "inputs": ["images", *pipeline.id_inputs],
            "feature_dim": metadata["feature_dim"], "input_size": list(pipeline.input_size),
            "export_seconds": export_seconds, "parity": per_size, "max_abs_diff": max_abs_diff,
            "tolerance": tolerance, "max_abs_feature": max_abs_feature}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="our export, a training checkpoint (file or directory), or a foreign file with --model")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, help="the .onnx file (default: the weights' path with .onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                        help="largest max |feature difference| accepted (default %(default)g)")
    args = parser.parse_args(argv)
    try:
        result = export_onnx(args.weights, args.out, args.opset, args.tolerance, model_source(args))
    except (WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{k} {v:.2e}" for k, v in result["parity"].items())
    print(f"exported {result['out']}: {result['architecture']}, inputs {', '.join(result['inputs'])}, "
          f"features N x {result['feature_dim']}, in {result['export_seconds']:.1f} s")
    print(f"parity onnxruntime vs torch, max |delta| on the feature: {result['max_abs_diff']:.2e} "
          f"(tolerance {result['tolerance']:g}; features up to {result['max_abs_feature']:.3g}; "
          f"per batch NxHxW: {sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
