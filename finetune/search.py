"""Search a gallery folder for the images most like each query image, with a fine-tuned model.

    python finetune/search.py --weights runs/bot_tiny/model_final.safetensors (or model_best.onnx) \
        --gallery GALLERY_DIR --query QUERY_DIR_OR_IMAGE [--topk 5] [--index PATH] [--json] [--batch-size 32]
    python finetune/search.py --weights fastreid/model_final.pth --model bot_resnet50 --gallery G --query Q

``--weights`` takes every file ``finetune/evaluate.py`` takes (``reidforge.finetune.deploy.load_model``: our exports,
training checkpoints, foreign checkpoints with ``--model NAME [--model-options JSON] [--allow-partial]
[--input-size H W]``), and our ONNX exports.

Images are .jpg/.jpeg/.png/.bmp files found recursively under each folder, in sorted path order (the
query may also be one image file). Each is decoded to uint8 RGB (JPEG and PNG of any mode, 16-bit
included, by ``reidforge.data.readers.decode``; BMP by PIL; over ``MAX_IMAGE_PIXELS`` refused from the header)
and resized on the host to the
model's input size with the training pipeline's test transform (``reidforge.data.transforms``: antialiased
bilinear, rounded to uint8), so that images of any size batch together and get the features
``finetune/evaluate.py`` would give them; the model's own resize is then the identity. A ``.safetensors``
export runs through ``reidforge.finetune.deploy.FeaturePipeline`` in torch (on the GPU when there is one), an
``.onnx`` export (``finetune/export_onnx.py``) through onnxruntime on the same uint8 batches. Models that
embed camera/view ids (LAI) get id 0 for every image: folder images carry no camera metadata.

Features are L2-normalised and searched in a faiss ``IndexFlatIP``, so the score is the cosine
similarity; faiss searches on the GPUs when it has any. Output: a table (query, rank, match, similarity;
paths relative to their folders) or, with ``--json``, a list of ``{query, matches: [{rank, path,
similarity}]}``.

``--index PATH`` saves the gallery index to PATH and its description to PATH.json: the gallery files
in index order, the images skipped, and a fingerprint of the weights (sha256, and ``--model`` with its
options and ``--input-size``) and of the gallery's file list with sizes and modification times. The next
run with the same weights and an unchanged gallery reuses it ("reused" on stderr) without decoding the
whole gallery; anything else rebuilds it. The description is not trusted: its file list must be the
gallery's own (every listed image either indexed or skipped, in order), and the stored features of
``SPOT_CHECKS`` gallery images, drawn at random each run, must match those images' features (cosine >=
``SPOT_TOLERANCE``); an index that fails either check is rebuilt, with one line saying why. A forged
index must therefore plant vectors the model gives to the images themselves, or hope that none of its
planted rows is drawn.

An unreadable image is skipped with a warning naming it; a missing or empty folder, or an unusable
weights file, is a one-line error (exit status 2) before any model is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidforge.data.shards import sha256_file
from reidforge.finetune.deploy import Embedder, add_model_arguments, load_embedder, model_source, resolve_weights
from reidforge.finetune.extractor import embed_images, list_images
from reidforge.shared.config import ConfigError
from reidforge.shared.io import atomic_open, atomic_write_json
from reidforge.shared.progress import progress_settings
from reidforge.shared.table import format_table
from reidforge.shared.text import printable
from reidforge.shared.weights import WeightsError

try:
    import faiss
except ImportError:  # an optional dependency (faiss-cpu or faiss-gpu): main() says so in one line
    faiss = None

INDEX_FORMAT = 2  # bump when the description or the features change meaning, so old indexes are rebuilt
SPOT_CHECKS = 8  # gallery images re-embedded to check a reused index
SPOT_TOLERANCE = 0.999  # cosine between a stored and a fresh feature (float noise of batching is < 1e-5)


def gallery_fingerprint(weights_id: str, root: Path, paths: Sequence[Path]) -> str:
    """sha256 of the weights' identity (their sha256, and ``--model`` with its options), the index format and
    each gallery file's relative path, size and mtime."""
    files = [[p.relative_to(root).as_posix(), (s := p.stat()).st_size, s.st_mtime_ns] for p in paths]
    blob = json.dumps({"format": INDEX_FORMAT, "weights": weights_id, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_index(path: Path, fingerprint: str, gallery: Sequence[str]) -> tuple[Any, dict[str, Any]] | None:
    """The saved index and its description when both are intact, match ``fingerprint`` and list exactly
    the ``gallery`` files (relative paths, in order), else None."""
    description_path = path.with_name(path.name + ".json")
    if not (path.is_file() and description_path.is_file()):
        return None
    try:
        description = json.loads(description_path.read_text())
        if description.get("fingerprint") != fingerprint or description.get("index_sha256") != sha256_file(path):
            return None
        files, skipped = description["files"], dict(description["skipped"])
        if len(files) + len(skipped) != len(gallery) or files != [f for f in gallery if f not in skipped]:
            return None  # the description's file list is not this gallery's
        index = faiss.read_index(str(path))
        intact = index.ntotal == len(files) and index.d > 0
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):  # a damaged description or index
        return None
    return (index, description) if intact else None


def spot_check(index: Any, files: Sequence[str], root: Path, embedder: Embedder, batch_size: int) -> str | None:
    """None when the stored features of a random draw of ``SPOT_CHECKS`` indexed images match the images'
    own; else the first mismatching file, one line."""
    draw = np.random.default_rng().choice(len(files), size=min(SPOT_CHECKS, len(files)), replace=False)
    fresh, kept, _ = embed_images(embedder, [root / files[i] for i in draw], batch_size, lambda _: None,
                                  progress=False)
    for row, position in enumerate(draw):
        stored = index.reconstruct(int(position))
        if row not in kept or float(fresh[kept.index(row)] @ stored) < SPOT_TOLERANCE:
            return f"{printable(files[position])}: its stored feature is not the image's"
    return None


def save_index(index: Any, path: Path, description: dict[str, Any]) -> None:
    """The index, then its description (with the index's sha256, which ties the two files together)."""
    data = faiss.serialize_index(index).tobytes()
    with atomic_open(path, "wb") as f:
        f.write(data)
    atomic_write_json(path.with_name(path.name + ".json"),
                      {**description, "index_sha256": hashlib.sha256(data).hexdigest()})


def build_index(features: np.ndarray) -> Any:
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    return index


def search_index(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery positions), each (Q, k): on all GPUs when faiss has any."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index.search(queries, k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="a .onnx export, our .safetensors export, a training checkpoint, or a foreign file with --model")
    add_model_arguments(parser)
    parser.add_argument("--gallery", type=Path, required=True, help="folder of gallery images")
    parser.add_argument("--query", type=Path, required=True, help="folder of query images, or one image")
    parser.add_argument("--topk", type=int, default=5, help="matches per query")
    parser.add_argument("--index", type=Path, help="save the gallery index here, and reuse it while still valid")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be at least 1")

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    if faiss is None:
        warn("error: faiss is not installed (pip install faiss-cpu, or faiss-gpu)")
        return 2
    try:
        if not args.gallery.is_dir():
            raise ConfigError(f"{args.gallery}: not a folder")
        gallery_paths = list_images(args.gallery)
        query_paths = list_images(args.query)
        if args.index is not None and not args.index.parent.is_dir():
            raise ConfigError(f"{args.index.parent}: no such directory (for --index)")
        progress_settings()  # a bad REIDFORGE_PROGRESS stops here, before any model loads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        source = model_source(args)
        weights = args.weights if args.weights.suffix == ".onnx" else resolve_weights(args.weights)
        embedder = load_embedder(weights, device, source, warn)
    except (WeightsError, ConfigError) as e:
        warn(f"error: {e}")
        return 2
    if embedder.id_inputs:
        warn(f"note: {args.weights} embeds {' and '.join(embedder.id_inputs)} (LAI); "
             "folder images carry none, so every image gets id 0")

    cached = None
    if args.index is not None:
        # --input-size changes a foreign file's features (our files only accept their own size)
        weights_id = sha256_file(weights) + (json.dumps([source.name, source.options, source.input_size],
                                                        sort_keys=True) if source.name else "")
        fingerprint = gallery_fingerprint(weights_id, args.gallery, gallery_paths)
        cached = load_index(args.index, fingerprint,
                            [p.relative_to(args.gallery).as_posix() for p in gallery_paths])
        if cached is not None and (mismatch := spot_check(cached[0], cached[1]["files"], args.gallery, embedder,
                                                          args.batch_size)):
            warn(f"index: {args.index} does not match the gallery ({mismatch}); rebuilding it")
            cached = None
    if cached is not None:
        index, description = cached
        gallery_files = description["files"]
        for name, reason in description["skipped"]:
            warn(f"warning: {printable(str(args.gallery / name))}: unreadable image, skipped ({printable(reason)})")
        warn(f"index: reused {args.index} ({len(gallery_files)} gallery images)")
    else:
        features, kept, skipped = embed_images(embedder, gallery_paths, args.batch_size, warn, "embedding gallery",
                                               not args.no_progress)
        if not kept:
            warn(f"error: {args.gallery}: no readable image")
            return 2
        index = build_index(features)
        gallery_files = [gallery_paths[i].relative_to(args.gallery).as_posix() for i in kept]
        if args.index is not None:
            save_index(index, args.index, {
                "fingerprint": fingerprint, "weights": str(args.weights), "files": gallery_files,
                "skipped": [[gallery_paths[i].relative_to(args.gallery).as_posix(), r] for i, r in skipped]})
            warn(f"index: built {args.index} ({len(gallery_files)} gallery images)")

    queries, kept, _ = embed_images(embedder, query_paths, args.batch_size, warn, "embedding queries",
                                    not args.no_progress)
    if not kept:
        warn(f"error: {args.query}: no readable image")
        return 2
    k = min(args.topk, len(gallery_files))
    similarities, positions = search_index(index, queries, k)
    query_root = args.query if args.query.is_dir() else None
    results = [{"query": query_paths[i].relative_to(query_root).as_posix() if query_root else str(query_paths[i]),
                "matches": [{"rank": r + 1, "path": gallery_files[int(p)], "similarity": float(s)}
                            for r, (p, s) in enumerate(zip(pos, sim))]}
               for i, pos, sim in zip(kept, positions, similarities)]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        rows = [[printable(q["query"]), m["rank"], printable(m["path"]), round(m["similarity"], 4)]
                for q in results for m in q["matches"]]
        print(format_table(["query", "rank", "match", "similarity"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
