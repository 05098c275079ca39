"""CFS, the Catastrophic Forgetting Score (Luo et al., "Self-Supervised Pre-training for Transformer-Based
Person Re-Identification", arXiv:2111.12084, 2021): rank the images of a pre-training pool by how close
they are to the downstream re-ID data, and keep the best fraction.

Two models share one backbone architecture: A, a generic pre-trained backbone, and B, the same backbone
after supervised re-ID fine-tuning. Each image ``x`` of a shard split is embedded by both (the pooled
backbone feature, i.e. the global feature before any BNNeck) and scored

    CFS(x) = <f_A(x), f_B(x)> / (||f_A(x)|| * ||f_B(x)||)

the cosine similarity of the two L2-normalised features, in [-1, 1]. The fine-tuning kept its features
of images near the re-ID domain and "forgot" the others, so the ranking is by descending CFS: best
(least forgotten) first, and selection keeps the first ``ceil(keep * n)``.

Source of the formula: the authors' scoring script (posted in TransReID-SSL issue #3) runs the two
models over LUPerson and is cut off before its last lines, so the score is the natural reading of a
two-model comparison, not checked against an equation of the CFS paper. The direction is the one
DM-OSNet §3.3 (citing the CFS paper as [8]) describes: LUPerson "sorted by the CFS in descending order", the top 50 % kept as the images with high
scores.

Outputs, written atomically beside the shards (or in ``--out``):

- ``cfs_ranking.txt``: one sample key per line, best first, the format that the LUPerson adapter's
  ``--cfs`` option reads (``data/datasets/luperson.py``) and :func:`cfs_keep_indices` reads;
- ``cfs_scores.npy``: float32 scores aligned with the split's sample ``index`` (NaN for an image the
  pass could not read), saved without pickle;
- ``cfs_summary.json``: both models, the formula, the transform, counts and score quantiles.

Selection at training time: :func:`cfs_keep_indices` turns our ranking or a released ``CFS_list.pkl``
(image names such as ``34_01_0341_00001865.jpg``, read with the LUPerson adapter's refusing unpickler)
into the sorted sample indices of a split to keep, with the adapter's rule: the first
``ceil(keep * n)`` of the ``n`` ranked images that the split holds.

A and B are read by ``reidforge.shared.weights.load_pretrained``, the loader of the fine-tune and pretrain stages:
any layout it detects (torchvision, timm, Cadene, IBN-Net, torchreid, FastReID, the DM-OSNet authors',
SpCL, OpenUnReID, our exports), strict unless ``--allow-partial``; the detected layout and the match
counts go into the summary.

    python pretrain/cfs.py score SPLIT_DIR --arch osnet_x1_0 --pretrained A.pth --finetuned model_final.safetensors
    python pretrain/cfs.py select SPLIT_DIR [--ranking CFS_list.pkl] [--keep 0.5] [--out kept.npy]

Deviations from the paper's setting:

- the formula is a reading of the authors' truncated script, not checked against the paper's own equation;
- any registered backbone (``reidforge.shared.backbones``) with global average (or GeM) pooling stands in for the
  ViT-S/16 global token; the paper's A is a 20-epoch DINO pre-training on LUPerson, its B that model
  fine-tuned on Market-1501 + MSMT17; which checkpoints to use is the caller's choice;
- images are read from a shard split (not an ``ImageFolder`` over ``LUP/images``), resized to the input
  size of B's export metadata (else A's, else 256x128, or ``--size``) with no augmentation, as the
  paper's Resize(256, 128); each model is normalised with the mean/std of its own export metadata
  (else ImageNet's, or ``--mean/--std`` for both);
- an image that cannot be read is counted, scored NaN and left out of the ranking (so the adapter drops
  it); a non-finite score ranks last; ties keep split order; an all-zero feature scores 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reidforge.data.datasets.luperson import read_ranking
from reidforge.data.readers import SampleTally, StreamingShards, collate, split_keys
from reidforge.data.shards import ShardError, check_writable_dir, load_manifest, split_location
from reidforge.data.source import DatasetError
from reidforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, TransformConfig, build_transforms
from reidforge.shared.backbones import PooledBackbone, build_backbone
from reidforge.shared.checkpoint_layouts import GEM_P
from reidforge.shared.config import ConfigError
from reidforge.shared.heads import build_pooling
from reidforge.shared.io import atomic_open, atomic_write_json
from reidforge.shared.progress import Progress, progress_settings
from reidforge.shared.weights import MatchReport, WeightsError, load_pretrained, read_export_metadata

RANKING = "cfs_ranking.txt"
SCORES = "cfs_scores.npy"
SUMMARY = "cfs_summary.json"
FORMULA = "CFS(x) = <f_A(x), f_B(x)> / (|f_A(x)| |f_B(x)|), ranked descending (best first)"
DEFAULT_SIZE = (256, 128)
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


class CFSError(ValueError):
    """A CFS input that cannot be used, described in one line."""


def catastrophic_forgetting_score(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of two (N, D) feature batches: the CFS of each image, in [-1, 1]."""
    if feat_a.shape != feat_b.shape or feat_a.dim() != 2:
        raise CFSError(f"CFS needs two (N, D) feature batches of one shape, got {tuple(feat_a.shape)} and "
                       f"{tuple(feat_b.shape)}")
    a, b = F.normalize(feat_a.float(), dim=1), F.normalize(feat_b.float(), dim=1)
    # Rounding can push the product of unit vectors just past 1.
    return (a * b).sum(dim=1).clamp(-1.0, 1.0)


class Embedder(PooledBackbone):
    """uint8 NCHW batch -> normalised with its weights' mean/std -> backbone -> pooled (N, C) feature."""

    def __init__(self, backbone: nn.Module, pooling: str = "avg", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__(backbone, build_pooling(pooling), backbone.out_channels)
        self.normalize = Normalize(list(mean), list(std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.normalize(images))


def load_embedder(path: str | Path, arch: str, options: dict[str, Any] | None = None, pooling: str = "avg",
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  allow_partial: bool = False) -> tuple[Embedder, MatchReport]:
    """``build_backbone(arch, **options)`` + pooling with the weights of ``path``, in any layout that
    ``reidforge.shared.weights.load_pretrained`` detects (an ImageNet or released backbone, a training checkpoint, our
    exports), and GeM's p where the file has one. A backbone tensor the file leaves at its init is a
    :class:`WeightsError` unless ``allow_partial``: a half-loaded model would score noise."""
    path = Path(path)
    if not path.is_file():
        raise CFSError(f"weights file not found: {path}")
    options = dict(options or {})
    try:
        backbone = build_backbone(arch, **options)
    except ConfigError as e:  # an option the backbone does not take, named with the ones it does
        raise CFSError(str(e)) from None
    try:
        model = Embedder(backbone, pooling, mean, std)
    except ValueError as e:
        raise CFSError(str(e)) from None
    report = load_pretrained(model, path, allow_partial, partial_option="--allow-partial")
    if pooling == "gem" and "pool.p" not in report.head_loaded:
        print(f"note: {path} holds no GeM exponent (pool.p): using p = {model.pool.p.detach().item():g}")
    exponent = next((k for k in report.unused if k in ("pool.p", *GEM_P)), None)
    if exponent is not None:
        print(f"note: the model in {path} pools with GeM ({exponent}) but the scoring pools with {pooling!r}")
    return model, report


def _export_metadata(path: Path) -> dict[str, Any]:
    """The reidforge metadata of an export; {} for a file that carries none (a torchvision .pth)."""
    if path.suffix != ".safetensors":
        return {}
    try:
        return read_export_metadata(path)
    except WeightsError:  # a plain safetensors state dict, without our metadata
        return {}
    except json.JSONDecodeError as e:
        raise CFSError(f"{path}: unreadable reidforge metadata ({e})") from None
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise WeightsError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _checked_size(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise CFSError(f"{where} = {value!r}: expected [height, width], two positive ints")
    return int(value[0]), int(value[1])


def _checked_stats(value: Any, where: str, positive: bool) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or (positive and min(value) <= 0)):
        raise CFSError(f"{where} = {value!r}: expected 3 finite numbers (RGB){', all > 0' if positive else ''}")
    return [float(v) for v in value]


def _stats(given: Sequence[float] | None, meta: dict[str, Any], name: str, path: Path,
           default: Sequence[float]) -> list[float]:
    """The command line's mean or std, else the export's, else ImageNet's."""
    if given is not None:
        return _checked_stats(list(given), f"--{name}", name == "std")
    if name in meta:
        return _checked_stats(meta[name], f"{path}: metadata '{name}'", name == "std")
    return list(default)


@dataclass
class ScoreConfig:
    """What :func:`score_split` needs; sizes and statistics left None come from the exports' metadata."""

    split_dir: str | Path  # a directory or a URL prefix (data/shards.py is_url)
    pretrained: Path  # A
    finetuned: Path  # B
    arch: str
    options: dict[str, Any] = field(default_factory=dict)  # build_backbone options, shared by A and B
    pooling: str = "avg"
    allow_partial: bool = False  # accept files that leave some backbone tensors at their init
    size: tuple[int, int] | None = None
    mean: list[float] | None = None  # for both models
    std: list[float] | None = None
    batch_size: int = 256
    workers: int = 2
    device: str | None = None  # None: cuda when present
    max_bad_fraction: float = 0.01
    out_dir: Path | None = None  # None: the split directory
    progress: bool = True


@torch.inference_mode()
def score_pass(model_a: nn.Module, model_b: nn.Module, split_dir: str | Path, size: tuple[int, int], *,
               batch_size: int = 256, workers: int = 2, device: torch.device | str = "cpu",
               max_bad_fraction: float = 0.01, progress: bool = True
               ) -> tuple[np.ndarray, list[str | None], SampleTally]:
    """One streamed pass of both models over a split (uint8 batches in, features out).

    Returns (scores float32 by sample index, NaN where the pass lost the image; each index's key, None
    where lost; the tally of lost samples). reidforge.shared.retrieval.extract_features serves one model and no
    keys, so the pass is its own loop.
    """
    device = torch.device(device)
    dataset = StreamingShards(split_dir, build_transforms(TransformConfig(height=size[0], width=size[1]), train=False))
    n = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    tally = SampleTally(n, max_bad_fraction, f"CFS scoring of {split_dir}")
    scores = np.full(n, np.nan, np.float32)
    keys: list[str | None] = [None] * n
    model_a.eval().to(device)
    model_b.eval().to(device)
    with Progress(n, "CFS", "score", unit="img", enabled=progress) as bar:
        for batch in loader:
            tally.update(batch)
            bar.update(len(batch.get("index", ())) + sum(p.lost for p in batch["problems"]))
            if "index" not in batch:  # every sample of the batch was lost (counted above)
                continue
            images = batch["image"].to(device, non_blocking=True)
            index = batch["index"].numpy()
            scores[index] = catastrophic_forgetting_score(model_a(images), model_b(images)).cpu().numpy()
            for i, key in zip(index.tolist(), batch["key"]):
                keys[i] = key
    return scores, keys, tally


def ranking_order(scores: np.ndarray, delivered: np.ndarray) -> np.ndarray:
    """Indices of the delivered samples, best (highest CFS) first; non-finite scores last, ties in index order."""
    candidates = np.flatnonzero(delivered)
    values = scores[candidates].astype(np.float64)
    return candidates[np.argsort(np.where(np.isfinite(values), -values, np.inf), kind="stable")]


def write_results(out_dir: str | Path, scores: np.ndarray, keys: Sequence[str | None],
                  summary: dict[str, Any]) -> dict[str, Any]:
    """Write the ranking, the scores and the summary (with counts and quantiles added) atomically."""
    out_dir = Path(out_dir)
    delivered = np.array([k is not None for k in keys], bool)
    order = ranking_order(scores, delivered)
    finite = scores[np.isfinite(scores)]
    summary = {**summary, "formula": FORMULA, "num_samples": len(keys), "scored": int(delivered.sum()),
               "lost": int((~delivered).sum()), "non_finite": int(delivered.sum() - len(finite)),
               "mean": float(finite.mean()) if len(finite) else None,
               "quantiles": {f"q{q:g}": float(np.quantile(finite, q)) for q in QUANTILES} if len(finite) else {}}
    with atomic_open(out_dir / RANKING, "w") as f:
        f.write("".join(f"{keys[i]}\n" for i in order))
    with atomic_open(out_dir / SCORES, "wb") as f:
        np.save(f, scores.astype(np.float32), allow_pickle=False)
    atomic_write_json(out_dir / SUMMARY, summary)
    return summary


def score_split(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every image of ``cfg.split_dir`` with A and B, write the outputs, return the summary."""
    split_dir = split_location(cfg.split_dir)  # a local directory, or a URL prefix scored by streaming
    manifest = load_manifest(split_dir)
    if cfg.out_dir is None and isinstance(split_dir, str):
        raise CFSError(f"{split_dir}: a URL split needs an output directory for its ranking (--out)")
    out_dir = check_writable_dir(cfg.out_dir or split_dir)
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise CFSError(f"batch size must be >= 1 and workers >= 0, got {cfg.batch_size} and {cfg.workers}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise CFSError(f"max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    paths = {"A": Path(cfg.pretrained), "B": Path(cfg.finetuned)}
    for role, path in paths.items():
        if not path.is_file():
            raise CFSError(f"weights file of model {role} not found: {path}")
    meta = {role: _export_metadata(path) for role, path in paths.items()}
    size = (_checked_size(list(cfg.size), "--size") if cfg.size is not None
            else next((_checked_size(meta[r]["input_size"], f"{paths[r]}: metadata 'input_size'")
                       for r in ("B", "A") if "input_size" in meta[r]), DEFAULT_SIZE))
    if cfg.size is None and all("input_size" in m for m in meta.values()) and meta["A"]["input_size"] != list(size):
        print(f"note: A was exported at {meta['A']['input_size']}, B at {list(size)}: both score at B's size")
    stats = {role: {"mean": _stats(cfg.mean, meta[role], "mean", path, IMAGENET_MEAN),
                    "std": _stats(cfg.std, meta[role], "std", path, IMAGENET_STD)} for role, path in paths.items()}
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CFSError(f"--device {cfg.device!r}: {str(e).splitlines()[0]}") from None

    models, described = {}, {}
    for role, path in paths.items():
        models[role], report = load_embedder(path, cfg.arch, cfg.options, cfg.pooling, **stats[role],
                                             allow_partial=cfg.allow_partial)
        print(f"model {role}: {report.line()}")
        described[role] = {"path": str(path), "layout": report.layout, "trunk_loaded": len(report.trunk_loaded),
                           "trunk_missing": report.trunk_missing, "head_loaded": len(report.head_loaded),
                           "unused": len(report.unused), **stats[role], "export": meta[role]}
    scores, keys, tally = score_pass(models["A"], models["B"], split_dir, size, batch_size=cfg.batch_size,
                                     workers=cfg.workers, device=device, max_bad_fraction=cfg.max_bad_fraction,
                                     progress=cfg.progress)
    if tally.lost:
        print(tally.summary())
    out_dir.mkdir(exist_ok=True)
    summary = {"split": str(split_dir), "split_fingerprint": manifest.get("fingerprint"), "arch": cfg.arch,
               "options": cfg.options, "pooling": cfg.pooling, "input_size": list(size), "models": described}
    return write_results(out_dir, scores, keys, summary)


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # sorted sample indices of the split to keep
    ranked: int  # samples of the split that the ranking ranks
    unknown: int  # ranking entries that are not in the split (ignored)
    total: int  # samples in the split


def select_ranked(split_dir: str | Path, ranking: str | Path | None = None, keep: float = 0.5) -> Selection:
    """The best ``ceil(keep * n)`` of the ``n`` split samples that ``ranking`` ranks, with the counts.

    ``ranking``: our ``cfs_ranking.txt`` (the split's own when None), a text file with one key or image
    name per line, or a released ``CFS_list.pkl``, all best first, parsed by the LUPerson adapter.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise CFSError(f"keep must be in (0, 1], got {keep!r}")
    split_dir = split_location(split_dir)
    load_manifest(split_dir)  # a wrong split directory fails before the ranking is parsed
    if ranking is None and isinstance(split_dir, str):
        raise CFSError(f"{split_dir}: a URL split has no ranking file of its own; give the ranking")
    path = Path(ranking) if ranking is not None else split_dir / RANKING
    if not path.is_file():
        raise CFSError(f"CFS ranking not found: {path}" + ("" if ranking is not None else
                                                            " (score the split first: pretrain/cfs.py score)"))
    names = read_ranking(path)
    if not names:
        raise CFSError(f"{path}: the ranking is empty")
    if len(set(names)) != len(names):
        raise CFSError(f"{path}: ranks some image more than once")
    keys = split_keys(split_dir)
    position = {key: i for i, key in enumerate(keys)}
    ranked = np.array([position[name] for name in names if name in position], np.int64)
    if len(ranked) == 0:
        raise CFSError(f"{path}: ranks none of the {len(keys):,} samples of {split_dir} (its keys look like "
                       f"{keys[0]!r}, the ranking's like {names[0]!r})")
    # Rounded first, as the LUPerson adapter does: 0.3 * 10 is 3.0000000000000004, whose ceiling is 4.
    count = math.ceil(round(keep * len(ranked), 6))
    if count == 0:
        raise CFSError(f"keep {keep!r} of the {len(ranked):,} samples of {split_dir} that {path} ranks keeps none")
    kept = ranked[:count]
    return Selection(np.sort(kept), len(ranked), len(names) - len(ranked), len(keys))


def cfs_keep_indices(split_dir: str | Path, ranking: str | Path | None = None, keep: float = 0.5) -> np.ndarray:
    """Sorted indices of the split's samples to keep (see :func:`select_ranked`); ranking entries that the
    split does not hold are ignored, with a warning that counts them."""
    selection = select_ranked(split_dir, ranking, keep)
    if selection.unknown:
        warnings.warn(f"CFS: {selection.unknown:,} entries of the ranking {ranking or RANKING} are not in "
                      f"{split_dir}; ignored", stacklevel=2)
    return selection.indices


def _json_options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return options


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfs.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score and rank every image of a split")
    p.add_argument("split_dir", help="the shard split to score: a directory (e.g. shards/luperson/pool) or a URL prefix")
    p.add_argument("--arch", required=True, help="backbone name shared by A and B (reidforge.shared.backbones)")
    p.add_argument("--options", type=_json_options, default={},
                   help='backbone options as JSON, e.g. \'{"last_stride": 1}\'')
    p.add_argument("--pretrained", required=True, type=Path, help="A: the generic pre-trained weights")
    p.add_argument("--finetuned", required=True, type=Path,
                   help="B: A after re-ID fine-tuning (e.g. model_final.safetensors)")
    p.add_argument("--pooling", choices=("avg", "gem"), default="avg")
    p.add_argument("--allow-partial", type=_boolean, nargs="?", const=True, default=False, metavar="true|false",
                   help="accept weights that leave some backbone tensors at their init (default: an error)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the exports')")
    p.add_argument("--mean", type=float, nargs=3, help="RGB mean for both models (default: each export's)")
    p.add_argument("--std", type=float, nargs=3, help="RGB std for both models (default: each export's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="abort when more images are unreadable")
    p.add_argument("--out", type=Path, help="output directory (default: the split directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p = sub.add_parser("select", help="the sample indices of a split that a ranking keeps")
    p.add_argument("split_dir")
    p.add_argument("--ranking", type=Path,
                   help=f"cfs_ranking.txt, a key list or CFS_list.pkl (default: SPLIT_DIR/{RANKING})")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of the ranked samples to keep (default 0.5)")
    p.add_argument("--out", type=Path, help="write the kept indices here as .npy")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "score":
            progress_settings()  # a bad REIDFORGE_PROGRESS stops here, before any model loads
            summary = score_split(ScoreConfig(
                split_dir=args.split_dir, pretrained=args.pretrained, finetuned=args.finetuned, arch=args.arch,
                options=args.options, pooling=args.pooling, allow_partial=args.allow_partial, size=args.size,
                mean=args.mean, std=args.std, batch_size=args.batch_size, workers=args.workers, device=args.device,
                max_bad_fraction=args.max_bad_fraction, out_dir=args.out, progress=not args.no_progress))
            quantiles = summary["quantiles"]
            print(f"{summary['scored']:,} images scored ({summary['lost']:,} lost); CFS median "
                  f"{quantiles.get('q0.5', float('nan')):.4f}, range [{quantiles.get('q0', float('nan')):.4f}, "
                  f"{quantiles.get('q1', float('nan')):.4f}]; ranking in {Path(args.out or args.split_dir) / RANKING}")
        else:
            selection = select_ranked(args.split_dir, args.ranking, args.keep)
            if args.out is not None:
                with atomic_open(args.out, "wb") as f:
                    np.save(f, selection.indices, allow_pickle=False)
            print(f"keep {len(selection.indices):,} of the {selection.ranked:,} ranked samples "
                  f"({selection.total:,} in the split, {selection.unknown:,} ranking entries not in it)")
    except (CFSError, ShardError, WeightsError, DatasetError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
