"""The colour-histogram retrieval baseline of re-ID, the bar a learned model has to clear on the synthetic
person split (tests/test_world_difficulty.py bounds it, tests/test_learning.py beats it).

Each image is described by grey-world-normalised joint RGB histograms (4 bins a channel) of the upper
and lower half of its central region (where the person stands), Hellinger-mapped; query and gallery are
ranked by squared Euclidean distance under the Market protocol (reidforge.shared.metrics.rank_metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from reidforge.data.readers import IndexedShards, decode
from reidforge.shared.metrics import rank_metrics

BINS = 4

Sample = tuple[torch.Tensor, int, int]  # (uint8 CHW RGB image, pid, camid)


def colour_descriptor(image: torch.Tensor) -> np.ndarray:
    """The descriptor of one uint8 CHW RGB image."""
    image = image.permute(1, 2, 0).numpy().astype(np.float64)
    h, w = image.shape[:2]
    image = image[h // 8: 7 * h // 8, w // 4: 3 * w // 4]
    image *= image.mean() / np.maximum(image.mean(axis=(0, 1)), 1.0)  # undo the camera's colour cast
    q = np.clip(image * BINS / 256, 0, BINS - 1).astype(np.int64)
    codes = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]
    half = len(codes) // 2
    hists = [np.bincount(part.ravel(), minlength=BINS**3) / part.size for part in (codes[:half], codes[half:])]
    return np.sqrt(np.concatenate(hists))


def source_samples(source) -> Iterator[Sample]:
    """The samples of a record source (e.g. a split of ``reidforge.data.synthetic.build_sources``)."""
    for i in range(len(source)):
        meta = source.meta(i)
        yield decode(source.image(i)[0]), meta["pid"], meta["camid"]


def shard_samples(split_dir: str | Path) -> Iterator[Sample]:
    """The samples of a written split, in index order: the images and labels the engine evaluates on."""
    shards = IndexedShards(split_dir)
    for i in range(len(shards)):
        s = shards[i]
        yield s["image"], s["pid"], s["camid"]


def describe(samples: Iterable[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors, pids and camids of ``samples``."""
    feats, pids, camids = [], [], []
    for image, pid, camid in samples:
        feats.append(colour_descriptor(image))
        pids.append(pid)
        camids.append(camid)
    return np.stack(feats), np.array(pids), np.array(camids)


def colour_histogram_metrics(query: Iterable[Sample], gallery: Iterable[Sample]) -> dict[str, object]:
    """rank_metrics of the colour-histogram ranking of ``query`` against ``gallery``."""
    qf, qp, qc = describe(query)
    gf, gp, gc = describe(gallery)
    dist = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)
    return rank_metrics(dist, qp, gp, qc, gc)
