"""Evaluation protocols shared by training (``finetune/engine.py``) and ``finetune/evaluate.py``.

- A split pair is checked and expanded by ``eval_splits``: Market-1501's one query/gallery pair, or every
  ``{d}`` draw of a VehicleID build (``reidforge.shared.metrics.vehicleid_draws`` made them), whose images are embedded
  once and matched to each draw by key (``draw_features``).
- ``embed_split`` embeds a split with the test transforms; models that embed cameras or views (LAI) see only
  the samples carrying those ids (``lai_keep``), as MBR's reference code tests
  (``CustomDataSet4Veri776_withviewpont``, ``data/triplet_sampler.py``).
- A split without identity labels (CityFlow's challenge query/test) has no metrics: ``write_submission``
  ranks it into the AI City track-2 file.
- ``ranked_picture`` draws a ranked-list grid of a few queries (evaluate.py's ``ranked.png``, and the
  engine's TensorBoard picture at each evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from reidforge.data.readers import ConcatShards, IndexedShards, SampleTally, collate, split_keys
from reidforge.data.shards import ShardError, load_index, load_manifest
from reidforge.data.transforms import Normalize, build_transforms
from reidforge.finetune.models.base import ReIDModel
from reidforge.shared.config import ConfigError
from reidforge.shared.io import atomic_open
from reidforge.shared.progress import Progress
from reidforge.shared.retrieval import distance_matrix, extract_features, top_k
from reidforge.shared.visualize import ranked_grid

if TYPE_CHECKING:
    from reidforge.data.config import DataConfig


def lai_keep(train: ConcatShards, options: dict[str, Any], split: str = "data.train") -> tuple[np.ndarray, str]:
    """Which samples carry every label the model embeds (LAI: ``n_cams``/``n_views`` > 0), and a count of
    the missing ones. MBR trains and tests LAI on the VeRi images that have an orientation and counts the
    rest, train, query and gallery alike (``CustomDataSet4Veri776_withviewpont``, ``data/triplet_sampler.py``)."""
    keep = np.ones(len(train), dtype=bool)
    views = np.concatenate([part.index["viewid"] for part in train.parts]).astype(np.int64)
    missing = []
    for option, name, labels in (("n_cams", "camid", train.camids), ("n_views", "viewid", views)):
        count = int(options.get(option, 0))
        if count > 0:
            if labels.max(initial=-1) >= count:
                raise ConfigError(f"{split} has {name} {labels.max()} but model.options.{option}={count}")
            keep &= labels >= 0
            missing.append(f"{int((labels < 0).sum())} without a {name}")
    return keep, ", ".join(missing)


@torch.no_grad()
def embed_split(model: ReIDModel, split_dir: str | Path, data: DataConfig, normalize: Normalize,
                device: torch.device | str, flip: bool = False, rank: int = 0, world_size: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, IndexedShards]:
    """Features and indices of the samples ``rank, rank + world_size, ...`` of a split (test transforms),
    its progress shown by rank 0.
    A model that embeds cameras or views (LAI) sees only the samples with those ids, as MBR tests; the
    indices returned are the kept ones, so labels read through them line up."""
    dataset = IndexedShards(split_dir, build_transforms(data.transform, train=False))
    embeds = {option: int(getattr(model, option, 0)) for option in ("n_cams", "n_views")}
    keep, missing = lai_keep(ConcatShards([dataset]), embeds, str(split_dir))
    kept = np.flatnonzero(keep)
    if not len(kept):
        raise ShardError(f"{split_dir}: none of its {len(dataset)} images has the ids the model embeds ({missing})")
    if len(kept) < len(dataset) and rank == 0:
        print(f"LAI: dropped {len(dataset) - len(kept)} of {len(dataset)} images of {split_dir} without the labels "
              f"the model embeds ({missing}); {len(kept)} evaluated")
    mine = Subset(dataset, kept[rank::world_size].tolist())
    loader = DataLoader(mine, batch_size=data.test_batch_size, num_workers=data.workers, collate_fn=collate)
    tally = SampleTally(len(mine), data.max_bad_fraction, f"embedding {split_dir}")
    with Progress(len(loader), f"embedding {Path(split_dir).name}", "eval", unit="batch",
                  enabled=rank == 0) as bar:
        feats, index = extract_features(model, tally.wrap(bar.wrap(loader)), device, normalize, flip=flip)
    return feats, index, dataset


DRAW = "{d}"


def eval_splits(protocol: str, query: str, gallery: str) -> list[tuple[str, str]]:
    """The (query, gallery) split directories one evaluation ranks, checked: the pair itself (``market``),
    or every draw of a VehicleID build (``vehicleid``): ``{d}`` in both paths replaced by 0, 1, ... for as
    long as the query split exists."""
    if protocol != "vehicleid":
        if DRAW in query or DRAW in gallery:
            raise ConfigError(f"{query!r} / {gallery!r}: {DRAW} names VehicleID draws, which eval_protocol=vehicleid "
                              "(evaluate.py --protocol vehicleid) ranks")
        for path in (query, gallery):
            load_manifest(path)
        return [(query, gallery)]
    if DRAW not in query or DRAW not in gallery:
        raise ConfigError(f"eval_protocol=vehicleid: the query and gallery paths name the draws with {DRAW}, e.g. "
                          f"shards/vehicleid/query_{DRAW} and shards/vehicleid/gallery_{DRAW}; got {query!r} and "
                          f"{gallery!r}")
    pairs = []
    while (Path(query.replace(DRAW, str(len(pairs)))) / "manifest.json").is_file():
        pair = tuple(p.replace(DRAW, str(len(pairs))) for p in (query, gallery))
        for path in pair:
            load_manifest(path)
        pairs.append(pair)
    if not pairs:
        raise ShardError(f"no VehicleID draw at {query.replace(DRAW, '0')} (build one with data/build_shards.py "
                         "vehicleid)")
    return pairs


def has_labels(pair: tuple[str, str]) -> bool:
    """Whether both splits of a pair carry identity labels (CityFlow's challenge query/test do not)."""
    return all(bool((load_index(path)["pid"] >= 0).any()) for path in pair)


def draw_features(embed: Callable[[str], tuple[torch.Tensor, np.ndarray | torch.Tensor, IndexedShards]],
                  pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Features and pids of a VehicleID build's test images, each embedded once, and every draw's (query
    rows, gallery rows) into them. All draws partition the same test list, so the first draw's query and
    gallery hold every image; the others are matched to them by key (an image whose embedding was lost
    is left out of every draw)."""
    (qf, qi, query), (gf, gi, gallery) = (embed(path) for path in pairs[0])
    qi, gi = np.asarray(qi), np.asarray(gi)
    q_keys, g_keys = split_keys(query.split_dir), split_keys(gallery.split_dir)
    everything = set(q_keys) | set(g_keys)
    row = {key: r for r, key in enumerate([q_keys[i] for i in qi] + [g_keys[i] for i in gi])}
    draws = []
    for pair in pairs:
        q_keys_d, g_keys_d = (q_keys, g_keys) if pair == pairs[0] else (split_keys(p) for p in pair)
        if set(q_keys_d) | set(g_keys_d) != everything or len(q_keys_d) + len(g_keys_d) != len(everything):
            raise ShardError(f"{pair[0]} and {pair[1]} do not partition the images of {pairs[0][0]} and "
                             f"{pairs[0][1]}: not draws of one VehicleID test list")
        draws.append(tuple(np.array([row[k] for k in ks if k in row], np.int64) for ks in (q_keys_d, g_keys_d)))
    return torch.cat([qf, gf]), np.concatenate([query.pids[qi], gallery.pids[gi]]), draws


def write_submission(path: Path, qf: torch.Tensor, qi: np.ndarray | torch.Tensor, query: IndexedShards,
                     gf: torch.Tensor, gi: np.ndarray | torch.Tensor, gallery: IndexedShards, distance: str,
                     rerank: tuple[int, int, float] | None, k: int = 100) -> Path:
    """The AI City Challenge track-2 submission (as AICITY2020_DMT's ``track2.txt``): one line per query image
    in query order, the ids of its top-``k`` gallery images, nearest first, space-separated. An id is the
    number of the image's file name (CityFlow: ``000123.jpg`` -> 123, which in ``image_test`` is also the
    1-based gallery position DMT writes); a key that is not a number is written as it is."""
    for name, dataset, kept in (("query", query, qi), ("gallery", gallery, gi)):
        if len(kept) != len(dataset):
            raise ShardError(f"{dataset.split_dir}: {len(dataset) - len(kept)} {name} image(s) could not be read "
                             "or lack the camera/view ids the model embeds; a submission ranks every image")
    ids = [str(int(key)) if key.isdigit() else key for key in split_keys(gallery.split_dir)]
    ranked = top_k(distance_matrix(qf, gf, distance, rerank), k)
    with atomic_open(path, "w") as f:
        f.writelines(" ".join(ids[j] for j in row) + "\n" for row in ranked)
    return path


def display_images(dataset: IndexedShards, indices: np.ndarray | list[int]) -> list[np.ndarray]:
    """Display copies (HxWx3 uint8) of split samples, at the model's input size."""
    return [dataset[int(i)]["image"].permute(1, 2, 0).numpy() for i in indices]


class LazyImages:
    """A split's images by position in ``indices``, decoded only when a picture shows them."""

    def __init__(self, dataset: IndexedShards, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def __getitem__(self, position: int) -> np.ndarray:
        return display_images(self.dataset, [self.indices[position]])[0]


def ranked_picture(path: Path, query: IndexedShards, qi: np.ndarray, gallery: IndexedShards, gi: np.ndarray,
                   shown: np.ndarray, distances: np.ndarray, topk: int, distance_name: str) -> Path:
    """The ranked-list grid of the queries at positions ``shown`` of ``qi``; ``distances`` are their rows of
    the query x gallery distances (gallery positions as in ``gi``)."""
    ranked = np.argsort(distances, axis=1, kind="stable")[:, :topk]
    return ranked_grid(display_images(query, qi[shown]), LazyImages(gallery, gi), ranked, query.pids[qi[shown]],
                       gallery.pids[gi], query.camids[qi[shown]], gallery.camids[gi], path, distances=distances,
                       distance_name=distance_name)
