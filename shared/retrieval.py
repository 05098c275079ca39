"""Retrieval evaluation: features from a model, query x gallery distances, and the ranking metrics.

``extract_features`` runs any model that follows the re-ID contract (eval mode returns the feature) over
batches shaped like the data readers' (``image`` uint8, ``camid``, ``viewid``, ``index``), optionally
adding the feature of the horizontally flipped image (flip test, as FastReID's ``TEST.FLIP``).
``evaluate`` turns query and gallery features into the Market-protocol metrics, with optional
k-reciprocal re-ranking. Distances: ``cosine`` (1 - cos, FastReID's default) or ``euclidean`` (squared
L2 on raw features, torchreid's); on L2-normalised features they rank identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.metrics import rank_metrics


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


def evaluate(qf: torch.Tensor, gf: torch.Tensor, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
             g_camids: np.ndarray, metric: str = "cosine", rerank: tuple[int, int, float] | None = None,
             max_rank: int = 50) -> dict[str, Any]:
    """Market-protocol metrics (mAP, mINP, CMC) of query features against gallery features.

    ``rerank`` = (k1, k2, lambda) applies k-reciprocal re-ranking (Zhong et al. CVPR'17; defaults
    (20, 6, 0.3), FNC's (75, 10, 0.1)).
    """
    if rerank is not None:
        from shared.rerank import re_rank

        if metric == "cosine":  # re-ranking works on Euclidean geometry: give it unit vectors
            qf, gf = F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
        k1, k2, lambda_value = rerank
        distmat = re_rank(qf.numpy(), gf.numpy(), k1=k1, k2=k2, lambda_value=lambda_value)
    else:
        distmat = pairwise_distance(qf, gf, metric)
    return rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
