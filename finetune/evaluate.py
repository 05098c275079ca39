"""Evaluate an exported re-ID model on a query and a gallery split, with pictures on request.

    python finetune/evaluate.py --weights runs/bot_tiny/model_best.safetensors \
        --query runs/demo/shards/synthetic_person/query --gallery runs/demo/shards/synthetic_person/gallery \
        [--flip] [--rerank] [--ap standard|trapezoid] [--pictures ranked,cmc,gradcam] [--out DIR]

Writes ``results.md`` and ``results.json`` (mAP, mINP, CMC) to ``--out`` (default: beside the weights),
and the requested pictures: ``ranked.png`` (query + top-k, green = same identity, red = another,
grey = junk), ``cmc.png`` and ``gradcam.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data.shards import ShardError
from data.transforms import Normalize, TransformConfig
from finetune.engine import DataConfig, embed_split
from finetune.models import load_exported_model
from shared.config import ConfigError
from shared.io import atomic_write_json
from shared.metrics import AP_FLAVOURS, rank_metrics
from shared.retrieval import pairwise_distance
from shared.table import format_table
from shared.visualize import cam_overlay, cmc_curve, grad_cam, ranked_grid
from shared.weights import WeightsError

PICTURES = ("ranked", "cmc", "gradcam")


def _images(dataset, indices) -> list[np.ndarray]:
    """Display copies (HxWx3 uint8) of split samples, at the model's input size."""
    return [dataset[int(i)]["image"].permute(1, 2, 0).numpy() for i in indices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="a model_*.safetensors export")
    parser.add_argument("--query", required=True, help="query split directory")
    parser.add_argument("--gallery", required=True, help="gallery split directory")
    parser.add_argument("--flip", action="store_true", help="add the flipped image's feature")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    parser.add_argument("--ap", choices=AP_FLAVOURS, default="standard")
    parser.add_argument("--distance", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--pictures", default="", help=f"comma-separated: {', '.join(PICTURES)}")
    parser.add_argument("--num-queries", type=int, default=6, help="queries shown in the pictures")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output directory (default: the weights' directory)")
    args = parser.parse_args(argv)
    pictures = [p for p in args.pictures.split(",") if p]
    if unknown := [p for p in pictures if p not in PICTURES]:
        parser.error(f"unknown picture(s) {', '.join(unknown)}; valid: {', '.join(PICTURES)}")
    try:
        model, meta = load_exported_model(args.weights)
        transform = TransformConfig(height=meta["input_size"][0], width=meta["input_size"][1], mean=meta["mean"],
                                    std=meta["std"])
        data = DataConfig(transform=transform, workers=args.workers, test_batch_size=args.batch_size)
        normalize = Normalize(transform.mean, transform.std)
        qf, qi, query = embed_split(model, args.query, data, normalize, "cpu", args.flip)
        gf, gi, gallery = embed_split(model, args.gallery, data, normalize, "cpu", args.flip)
    except (ShardError, WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    qi, gi = qi.numpy(), gi.numpy()
    q_pids, g_pids, q_cams, g_cams = query.pids[qi], gallery.pids[gi], query.camids[qi], gallery.camids[gi]
    if args.rerank:
        from shared.rerank import re_rank

        unit = [torch.nn.functional.normalize(f, dim=1).numpy() for f in (qf, gf)]
        distmat = re_rank(*unit) if args.distance == "cosine" else re_rank(qf.numpy(), gf.numpy())
    else:
        distmat = pairwise_distance(qf, gf, args.distance)
    metrics = rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, ap=args.ap)

    out = args.out or args.weights.parent
    out.mkdir(parents=True, exist_ok=True)
    ranks = [r for r in (1, 5, 10, 20) if r <= len(metrics["cmc"])]
    row = [meta["architecture"], len(qi), len(gi), round(metrics["mAP"], 4), round(metrics["mINP"], 4),
           *[round(float(metrics["cmc"][r - 1]), 4) for r in ranks]]
    table = format_table(["model", "queries", "gallery", "mAP", "mINP", *[f"R{r}" for r in ranks]], [row])
    (out / "results.md").write_text(table + "\n")
    atomic_write_json(out / "results.json", {
        "weights": str(args.weights), "query": args.query, "gallery": args.gallery, "flip": args.flip,
        "rerank": args.rerank, "ap": args.ap, "mAP": metrics["mAP"], "mINP": metrics["mINP"],
        "cmc": [float(c) for c in metrics["cmc"]], "num_valid_queries": metrics["num_valid_queries"]})
    shown = np.linspace(0, len(qi) - 1, min(args.num_queries, len(qi))).astype(int)
    if "ranked" in pictures:
        ranked = np.argsort(distmat[shown], axis=1, kind="stable")[:, :args.topk]
        ranked_grid(_images(query, qi[shown]), _GalleryImages(gallery, gi), ranked, q_pids[shown], g_pids,
                    q_cams[shown], g_cams, out / "ranked.png")
    if "cmc" in pictures:
        cmc_curve({meta["architecture"]: metrics["cmc"]}, out / "cmc.png")
    if "gradcam" in pictures:
        samples = [query[int(i)] for i in qi[shown]]
        batch = normalize(torch.stack([s["image"] for s in samples]))
        meta_ids = {"camids": torch.tensor([s["camid"] for s in samples]),
                    "viewids": torch.tensor([max(s["viewid"], 0) for s in samples])}
        maps = grad_cam(model, model.cam_layer(), batch, **meta_ids)
        cam_overlay([s["image"].permute(1, 2, 0).numpy() for s in samples], maps, out / "gradcam.png")
    print(table)
    print(f"results and pictures in {out}")
    return 0


class _GalleryImages:
    """Gallery images by ranked position, decoded only when a picture shows them."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def __getitem__(self, position: int) -> np.ndarray:
        return _images(self.dataset, [self.indices[position]])[0]


if __name__ == "__main__":
    sys.exit(main())
