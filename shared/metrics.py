"""Ranking metrics for re-ID retrieval: CMC, mAP and mINP under the Market-1501 protocol.

For each query the gallery is sorted by ascending distance with a stable sort (ties keep gallery
order, so results are reproducible), gallery items with the query's pid *and* camid are removed
(junk), and pid-0 distractors stay as negatives. A query without any remaining positive is skipped
in every average. AP is the standard non-interpolated form: (1/R) * sum_k rel_k * precision@k.
INP = R / rank of the last positive (Ye et al., TPAMI 2021). Arithmetic is float64.
"""

from __future__ import annotations

import numpy as np


def rank_metrics(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                 g_camids: np.ndarray, max_rank: int = 50) -> dict[str, object]:
    """Return ``{"mAP", "mINP", "cmc" (array of max_rank), "num_valid_queries"}`` for a query x gallery distance matrix."""
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if (len(q_pids), len(g_pids)) != (num_q, num_g):
        raise ValueError(f"distmat is {num_q}x{num_g} but there are {len(q_pids)} query and {len(g_pids)} gallery pids")
    max_rank = min(max_rank, num_g)
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for q in range(num_q):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        rel = (g_pids[order] == q_pids[q])[keep]
        num_rel = rel.sum()
        if num_rel == 0:
            continue
        hits = np.cumsum(rel)
        ranks = np.flatnonzero(rel) + 1
        aps.append(float(np.sum(hits[rel] / ranks)) / num_rel)
        inps.append(num_rel / ranks[-1])
        cmc_sum[ranks[0] - 1:] += 1  # empty when the first hit is beyond max_rank
    if not aps:
        raise ValueError("no query has a positive gallery match in another camera")
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc_sum / len(aps),
            "num_valid_queries": len(aps)}
