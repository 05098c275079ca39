"""Retrieval evaluation: features from a model, query x gallery distances, and the ranking metrics.

``extract_features`` runs any model that follows the re-ID contract (eval mode returns the feature) over
batches shaped like the data readers' (``image`` uint8, ``camid``, ``viewid``, ``index``), optionally
adding the feature of the horizontally flipped image (flip test, as FastReID's ``TEST.FLIP``).
``evaluate`` turns query and gallery features into the Market-protocol metrics, with optional
k-reciprocal re-ranking; ``evaluate_draws`` averages VehicleID's query/gallery draws; ``top_k`` gives
the ranked gallery columns a retrieval submission lists (AI City track 2: the top 100 per query).
Distances: ``cosine`` (1 - cos, FastReID's default) or ``euclidean`` (squared L2 on raw features,
torchreid's); on L2-normalised features they rank identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidforge.shared.metrics import rank_metrics, vehicleid_metrics


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str,
                     normalize: Callable[[torch.Tensor], torch.Tensor], flip: bool = False,
                     progress: Callable[[Iterable], Iterable] = iter) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), dataset indices (N,)) in the order the batches came."""
    was_training = model.training
    model.eval()
    feats, indices = [], []
    for batch in progress(batches):
        if "image" not in batch:  # every sample of the batch was bad (counted by the caller's tally)
            continue
        images = normalize(batch["image"].to(device, non_blocking=True))
        meta = {"camids": batch["camid"].to(device), "viewids": batch["viewid"].to(device)}
        f = model(images, **meta)
        if flip:
            f = f + model(images.flip(-1), **meta)
        feats.append(f.float().cpu())
        indices.append(batch["index"].cpu())
    model.train(was_training)
    if not feats:
        raise ValueError("no batch delivered a sample: nothing to extract features from")
    return torch.cat(feats), torch.cat(indices)


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "cosine", chunk: int = 4096) -> np.ndarray:
    """Query x gallery distances as float32, computed in query chunks."""
    if metric == "cosine":
        qf, gf = F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
        rows = [1 - qf[i:i + chunk] @ gf.T for i in range(0, len(qf), chunk)]
    elif metric == "euclidean":
        qf, gf = qf.float(), gf.float()
        rows = [torch.cdist(qf[i:i + chunk], gf).pow(2) for i in range(0, len(qf), chunk)]
    else:
        raise ValueError(f"unknown distance {metric!r}; valid: cosine, euclidean")
    return torch.cat(rows).numpy()


def distance_matrix(qf: torch.Tensor, gf: torch.Tensor, metric: str = "cosine",
                    rerank: tuple[int, int, float] | None = None) -> np.ndarray:
    """Query x gallery distances (float32): :func:`pairwise_distance`, or k-reciprocal re-ranked ones when
    ``rerank`` = (k1, k2, lambda) is given (Zhong et al. CVPR'17; defaults (20, 6, 0.3), FNC's (75, 10, 0.1))."""
    if rerank is None:
        return pairwise_distance(qf, gf, metric)
    from reidforge.shared.rerank import re_rank

    if metric == "cosine":  # re-ranking works on Euclidean geometry: give it unit vectors
        qf, gf = F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
    k1, k2, lambda_value = rerank
    return re_rank(qf.numpy(), gf.numpy(), k1=k1, k2=k2, lambda_value=lambda_value)


def evaluate(qf: torch.Tensor, gf: torch.Tensor, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
             g_camids: np.ndarray, metric: str = "cosine", rerank: tuple[int, int, float] | None = None,
             max_rank: int = 50) -> dict[str, Any]:
    """Market-protocol metrics (mAP, mINP, CMC) of query features against gallery features (``rerank``: see
    :func:`distance_matrix`)."""
    distmat = distance_matrix(qf, gf, metric, rerank)
    return rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)


def evaluate_draws(feats: torch.Tensor, pids: np.ndarray, draws: Iterable[tuple[np.ndarray, np.ndarray]],
                   metric: str = "cosine", rerank: tuple[int, int, float] | None = None, max_rank: int = 50,
                   ap: str = "standard") -> dict[str, Any]:
    """VehicleID-protocol metrics: ``draws`` gives (query rows, gallery rows) of ``feats``/``pids`` per draw;
    each draw is ranked (and re-ranked) on its own and :func:`reidforge.shared.metrics.vehicleid_metrics` averages
    them. One draw's distance matrix is held at a time."""
    pids = np.asarray(pids)
    return vehicleid_metrics(((distance_matrix(feats[q], feats[g], metric, rerank), pids[q], pids[g])
                              for q, g in draws), max_rank=max_rank, ap=ap)


def top_k(distmat: np.ndarray, k: int = 100, chunk: int = 1024) -> np.ndarray:
    """Per query, the gallery columns of the ``k`` smallest distances in ranked order (ties by column)."""
    k = min(k, distmat.shape[1])
    return np.concatenate([np.argsort(distmat[i:i + chunk], axis=1, kind="stable")[:, :k]
                           for i in range(0, len(distmat), chunk)]) if len(distmat) else np.zeros((0, k), np.int64)
