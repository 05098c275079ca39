"""Evaluate a re-ID model file on a query and a gallery split, with pictures on request.

    python finetune/evaluate.py --weights runs/bot_tiny/model_final.safetensors \
        --query runs/demo/shards/synthetic_person/query --gallery runs/demo/shards/synthetic_person/gallery \
        [--flip-test] [--rerank [--rerank-k1 20 --rerank-k2 6 --rerank-lambda 0.3]] [--ap standard|trapezoid] \
        [--pictures ranked,cmc,gradcam] [--device cuda|cpu] [--out DIR] [--save-features FILE]
    python finetune/evaluate.py --weights W --protocol vehicleid \
        --query shards/vehicleid/query_{d} --gallery shards/vehicleid/gallery_{d}
    python finetune/evaluate.py --weights fastreid/model_final.pth --model bot_resnet50 --query Q --gallery G
    python finetune/evaluate.py --weights resnet18.safetensors --model timm:resnet18 --query Q --gallery G

``--weights``: our export (``model_*.safetensors``, ``backbone_*.safetensors``), a training checkpoint
(``<run>/checkpoints/epoch-N/model.safetensors`` or its directory), or a foreign checkpoint (torchreid,
FastReID, the DM-OSNet authors', SpCL, ImageNet, timm) with ``--model NAME [--model-options JSON]
[--allow-partial] [--input-size H W]``: ``reidforge.finetune.deploy.load_model`` says how each is read, at
which input size, and which feature it gives.

Protocols: ``market`` (default) ranks one query/gallery pair (Market-1501 rules: same identity and
camera is junk). ``vehicleid`` ranks every draw of a VehicleID build (``{d}`` = 0, 1, ... for as long
as ``query_<d>`` exists; ``data/build_shards.py vehicleid`` writes 10) and reports the mean and the
per-draw mAP and CMC; each test image is embedded once, whatever the number of draws.

Writes ``results.md`` and ``results.json`` (mAP, mINP, CMC) to ``--out`` (default: beside the weights),
and the requested pictures (of the first draw under ``vehicleid``): ``ranked.png`` (query + top-k,
green = same identity, red = another, grey = junk), ``cmc.png`` and ``gradcam.png`` (at the last feature
map before the pooling, named in the title: the model's ``cam_layer``; a timm ViT's tokens entering its
last block, laid out on the patch grid; a model without such a map gets a note instead of a picture).
``results.json`` records the input size the images were resized to.

A query or gallery split without identity labels (CityFlow-ReID's challenge_query/challenge_gallery:
the AI City Challenge withholds them) has no metrics; it is ranked into ``track2.txt``, the track-2
submission (one line per query, its top-100 gallery image ids), to score on the challenge server.
A model that embeds camera or view ids (MBR-4B and LKA-ReID with LAI) is evaluated on the images that
carry them: the others are dropped and counted per split, as MBR's test sets drop the VeRi images without
an orientation (``CustomDataSet4Veri776_withviewpont``, data/triplet_sampler.py).
Re-ranking: ``--rerank`` with k1/k2/lambda (defaults 20/6/0.3, Zhong et al. CVPR'17; FNC's are 75/10/0.1).
Runs on the GPU when there is one (``--device``).

``--save-features FILE`` (``market`` protocol) writes the ranked features as safetensors: tensors
``query_features``/``gallery_features`` (float32, N x D, after ``--flip-test`` when given), ``query_pids``,
``gallery_pids``, ``query_camids``, ``gallery_camids`` (int64); header metadata ``query_keys`` and
``gallery_keys`` (JSON lists of the samples' shard keys, row order) and ``settings`` (JSON: weights,
model, options, input size, splits, flip). :func:`evaluate_features` ranks such a file into the metrics the
command reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reidforge.data.readers import split_keys
from reidforge.data.config import DataConfig
from reidforge.data.shards import ShardError
from reidforge.data.transforms import Normalize, TransformConfig
from reidforge.finetune.deploy import add_model_arguments, load_model, model_source
from reidforge.finetune.protocols import draw_features, embed_split, eval_splits, has_labels, ranked_picture, write_submission
from reidforge.shared.backbones import NoFeatureMap
from reidforge.shared.config import ConfigError
from reidforge.shared.io import atomic_write_json
from reidforge.shared.metrics import AP_FLAVOURS, rank_metrics
from reidforge.shared.progress import progress_options, progress_settings
from reidforge.shared.retrieval import distance_matrix, evaluate_draws
from reidforge.shared.table import Percent, format_table
from reidforge.shared.visualize import cam_overlay, cmc_curve, grad_cam, layer_name
from reidforge.shared.weights import WeightsError, read_header

PICTURES = ("ranked", "cmc", "gradcam")
SUBMISSION_TOP = 100  # AI City Challenge track 2: the top 100 gallery images per query
FEATURE_TENSORS = tuple(f"{split}_{what}" for split in ("query", "gallery") for what in ("features", "pids", "camids"))


def _device(name: str | None) -> torch.device:
    """``name``, or cuda when present and else the CPU; a device this machine lacks is a one-line error."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="our export, a training checkpoint (file or directory), or a foreign file with --model")
    add_model_arguments(parser)
    parser.add_argument("--query", required=True, help="query split directory (vehicleid: a pattern with {d})")
    parser.add_argument("--gallery", required=True, help="gallery split directory (vehicleid: a pattern with {d})")
    parser.add_argument("--protocol", choices=("market", "vehicleid"), default="market",
                        help="market: one query/gallery pair; vehicleid: every draw, averaged")
    parser.add_argument("--flip-test", "--flip", dest="flip", action="store_true",
                        help="add the flipped image's feature, as training's flip_test does (--flip is accepted too)")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking with the k1/k2/lambda below")
    parser.add_argument("--rerank-k1", type=int, default=20, help="k1 (default 20; FNC: 75)")
    parser.add_argument("--rerank-k2", type=int, default=6, help="k2 (default 6; FNC: 10)")
    parser.add_argument("--rerank-lambda", type=float, default=0.3, help="lambda (default 0.3; FNC: 0.1)")
    parser.add_argument("--ap", choices=AP_FLAVOURS, default="standard")
    parser.add_argument("--distance", choices=("cosine", "euclidean"), default="cosine")
    parser.add_argument("--pictures", default="", help=f"comma-separated: {', '.join(PICTURES)}")
    parser.add_argument("--num-queries", type=int, default=6, help="queries shown in the pictures")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--out", type=Path, help="output directory (default: the weights' directory)")
    parser.add_argument("--save-features", type=Path, help="write the query/gallery features here (.safetensors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    pictures = [p for p in args.pictures.split(",") if p]
    if unknown := [p for p in pictures if p not in PICTURES]:
        parser.error(f"unknown picture(s) {', '.join(unknown)}; valid: {', '.join(PICTURES)}")
    rerank = (args.rerank_k1, args.rerank_k2, args.rerank_lambda) if args.rerank else None
    if rerank and (args.rerank_k1 < 1 or args.rerank_k2 < 1 or not 0 <= args.rerank_lambda <= 1):
        parser.error(f"--rerank-k1 and --rerank-k2 must be >= 1 and --rerank-lambda in [0, 1], got {rerank}")
    try:
        device = _device(args.device)
        progress_settings()  # a bad REIDFORGE_PROGRESS stops here, before any model loads
        pairs = eval_splits(args.protocol, args.query, args.gallery)
        labelled = has_labels(pairs[0])
        if pictures and not labelled:
            raise ConfigError(f"--pictures: {args.query} / {args.gallery} have no identity labels to colour them by")
        if args.save_features is not None:
            if args.protocol != "market":
                raise ConfigError(f"--save-features: saves one query/gallery pair (--protocol market), not the "
                                  f"draws of --protocol {args.protocol}")
            if args.save_features.suffix != ".safetensors":
                raise ConfigError(f"--save-features {args.save_features}: expected a .safetensors file")
        source = model_source(args)
        model, meta = load_model(args.weights, source)
        for line in meta["notes"]:
            print(f"note: {line}")
        model.to(device)
        transform = TransformConfig(height=meta["input_size"][0], width=meta["input_size"][1], mean=meta["mean"],
                                    std=meta["std"])
        data = DataConfig(transform=transform, workers=args.workers, test_batch_size=args.batch_size)
        normalize = Normalize(transform.mean, transform.std).to(device)
        embedded: dict[str, tuple] = {}

        def embed(path: str) -> tuple:
            if path not in embedded:
                with progress_options(not args.no_progress):
                    embedded[path] = embed_split(model, path, data, normalize, device, args.flip)
            return embedded[path]

        out = args.out or Path(meta["file"]).parent
        out.mkdir(parents=True, exist_ok=True)
        if args.protocol == "vehicleid":
            feats, pids, draws = draw_features(embed, pairs)
        (qf, qi, query), (gf, gi, gallery) = embed(pairs[0][0]), embed(pairs[0][1])
        if args.save_features is not None:
            save_features(args.save_features, (qf, qi, query), (gf, gi, gallery),
                          {"weights": str(args.weights), "model": meta["architecture"], "options": meta["options"],
                           "input_size": meta["input_size"], "query": pairs[0][0], "gallery": pairs[0][1],
                           "flip": args.flip})
        if not labelled:
            path = write_submission(out / "track2.txt", qf, qi, query, gf, gi, gallery, args.distance, rerank,
                                    SUBMISSION_TOP)
    except (ShardError, WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {"weights": str(args.weights), "query": args.query, "gallery": args.gallery,
                "protocol": args.protocol, "flip": args.flip, "ap": args.ap, "distance": args.distance,
                "rerank": dict(zip(("k1", "k2", "lambda"), rerank)) if rerank else None, "device": str(device),
                "model": meta["architecture"], "model_source": meta["source"], "input_size": meta["input_size"]}
    if not labelled:
        atomic_write_json(out / "results.json", {**settings, "submission": str(path), "queries": len(qi),
                                                 "gallery": len(gi), "top": SUBMISSION_TOP})
        print(f"{args.query} / {args.gallery} carry no identity labels (a challenge split such as CityFlow-ReID's), "
              f"so there are no metrics: ranked {len(qi)} queries against {len(gi)} gallery images into {path} "
              f"(AI City track-2 format: one line per query, its top-{SUBMISSION_TOP} gallery image ids); "
              "score it on the challenge server")
        return 0

    qi, gi = qi.numpy(), gi.numpy()
    q_pids, g_pids, q_cams, g_cams = query.pids[qi], gallery.pids[gi], query.camids[qi], gallery.camids[gi]
    distmat = None
    if args.protocol == "vehicleid":
        metrics = evaluate_draws(feats, pids, draws, args.distance, rerank, ap=args.ap)
        ranks = [r for r in (1, 5, 10, 20) if r <= len(metrics["cmc"])]
        per_draw = [{"draw": d, "query": q_dir, "gallery": g_dir, "queries": len(q), "gallery_images": len(g),
                     "mAP": float(m), **{f"R{r}": float(cmc[r - 1]) for r in ranks}}
                    for d, ((q_dir, g_dir), (q, g), m, cmc)
                    in enumerate(zip(pairs, draws, metrics["mAP_per_draw"], metrics["cmc_per_draw"]))]
        rows = [[f"draw {r['draw']}", r["queries"], r["gallery_images"], Percent(r["mAP"]),
                 *[Percent(r[f"R{k}"]) for k in ranks]] for r in per_draw]
        rows.append([f"mean of {len(draws)}", "", "", Percent(metrics["mAP"]),
                     *[Percent(metrics["cmc"][r - 1]) for r in ranks]])
        table = format_table([meta["architecture"], "queries", "gallery", "mAP (%)", *[f"R{r} (%)" for r in ranks]],
                             rows)
        extra = {"draws": len(draws), "per_draw": per_draw}
    else:
        distmat, metrics = market_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, args.distance, rerank, args.ap)
        ranks = [r for r in (1, 5, 10, 20) if r <= len(metrics["cmc"])]
        row = [meta["architecture"], len(qi), len(gi), Percent(metrics["mAP"]), Percent(metrics["mINP"]),
               *[Percent(metrics["cmc"][r - 1]) for r in ranks]]
        table = format_table(["model", "queries", "gallery", "mAP (%)", "mINP (%)", *[f"R{r} (%)" for r in ranks]],
                             [row])
        extra = {"num_valid_queries": metrics["num_valid_queries"]}
    (out / "results.md").write_text(table + "\n")
    atomic_write_json(out / "results.json", {**settings, "mAP": metrics["mAP"], "mINP": metrics["mINP"],
                                             "cmc": [float(c) for c in metrics["cmc"]], **extra})
    shown = np.linspace(0, len(qi) - 1, min(args.num_queries, len(qi))).astype(int)
    if "ranked" in pictures:
        if distmat is None:  # the first draw's distances, for its picture
            distmat = distance_matrix(qf, gf, args.distance, rerank)
        ranked_picture(out / "ranked.png", query, qi, gallery, gi, shown, np.asarray(distmat[shown]), args.topk,
                       f"{args.distance} distance{' (re-ranked)' if rerank else ''}")
    if "cmc" in pictures:
        cmc_curve({meta["architecture"]: metrics["cmc"]}, out / "cmc.png")
    if "gradcam" in pictures:
        samples = [query[int(i)] for i in qi[shown]]
        batch = normalize(torch.stack([s["image"] for s in samples]).to(device))
        meta_ids = {"camids": torch.tensor([s["camid"] for s in samples], device=device),
                    "viewids": torch.tensor([max(s["viewid"], 0) for s in samples], device=device)}
        try:
            layer = model.cam_layer()
        except NoFeatureMap as e:
            print(f"note: no gradcam.png: {e}")
        else:
            # token layers (a timm ViT's) say how they lay out as a map
            maps = grad_cam(model, layer, batch, getattr(model, "cam_reshape", None), **meta_ids).cpu()
            cam_overlay([s["image"].permute(1, 2, 0).numpy() for s in samples], maps, out / "gradcam.png",
                        layer=layer_name(model, layer))
    print(table)
    print(f"results and pictures in {out}")
    return 0


def market_metrics(qf: torch.Tensor, gf: torch.Tensor, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
                   g_cams: np.ndarray, distance: str = "cosine", rerank: tuple[int, int, float] | None = None,
                   ap: str = "standard") -> tuple[np.ndarray, dict]:
    """The query x gallery distances and the Market-1501 metrics (mAP, mINP, CMC) of one pair."""
    distmat = distance_matrix(qf, gf, distance, rerank)
    return distmat, rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, ap=ap)


def save_features(path: Path, query: tuple, gallery: tuple, settings: dict) -> None:
    """``--save-features``: each split's (features, kept indices, dataset) as the module docstring says."""
    tensors, metadata = {}, {"settings": json.dumps(settings)}
    for split, (feats, index, dataset) in (("query", query), ("gallery", gallery)):
        rows = index.numpy()
        keys = split_keys(dataset.split_dir)
        tensors[f"{split}_features"] = feats.float().contiguous()
        tensors[f"{split}_pids"] = torch.from_numpy(dataset.pids[rows].astype(np.int64))
        tensors[f"{split}_camids"] = torch.from_numpy(dataset.camids[rows].astype(np.int64))
        metadata[f"{split}_keys"] = json.dumps([keys[i] for i in rows.tolist()])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def evaluate_features(path: str | Path, distance: str = "cosine", rerank: tuple[int, int, float] | None = None,
                      ap: str = "standard") -> dict:
    """The metrics of a ``--save-features`` file as ``results.json`` holds them (those the command reports for
    the same settings), with its ``query_keys`` and ``gallery_keys``; ``WeightsError`` for a file that is not one."""
    header = read_header(path)
    tensors = load_file(str(path))
    if missing := [k for k in FEATURE_TENSORS if k not in tensors] + [
            k for k in ("query_keys", "gallery_keys") if k not in header]:
        raise WeightsError(f"{path}: not a --save-features file (no {missing[0]})")
    if (tensors["query_pids"] < 0).all() or (tensors["gallery_pids"] < 0).all():
        raise WeightsError(f"{path}: the saved splits carry no identity labels, so there are no metrics")
    _, metrics = market_metrics(tensors["query_features"], tensors["gallery_features"],
                                *(tensors[k].numpy() for k in ("query_pids", "gallery_pids", "query_camids",
                                                                "gallery_camids")), distance, rerank, ap)
    return {"mAP": float(metrics["mAP"]), "mINP": float(metrics["mINP"]), "cmc": [float(c) for c in metrics["cmc"]],
            "num_valid_queries": metrics["num_valid_queries"], "query_keys": json.loads(header["query_keys"]),
            "gallery_keys": json.loads(header["gallery_keys"])}


if __name__ == "__main__":
    sys.exit(main())
