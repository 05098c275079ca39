"""Dense reference for pretrain/knn.py and pretrain/clustering.py: SpCL's clustering step as its code does
it, on N x N arrays.

``dense_jaccard`` is ``compute_jaccard_distance`` with dense V, dense query expansion, the
inverted index from column scans and the dense min-sum loop; ``dense_spcl_labels`` is the self-paced step
of examples/spcl_train_usl.py with three dense DBSCANs and the N x N label-equality IoUs.
The definitions the sparse version fixes are taken over, so that results can be compared exactly:
neighbours ranked by float64 cosine similarity with ties by index (a stable argsort; the reference uses
faiss float32 L2 with arbitrary ties), float64 V (``dtype``; the reference keeps float32), softmax as
exp(-d) / sum, float64 distances rounded to 12 decimals (so that exact-arithmetic ties at eps count as
neighbours whatever the order of the sums), and float64 IoUs. ``canonical`` renumbers SpCL's labels the way the sparse version
reports them. Peak memory is about three N x N arrays of ``dtype`` plus the label matrices
(``iou_block`` rows of them at a time).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import DBSCAN

KNN_BLOCK = 1024  # rows of the float64 similarity matrix ranked at once


def dense_knn(x: np.ndarray, k: int) -> np.ndarray:
    """initial_rank: each row's k most similar rows (float64 cosine, ties by index), self included."""
    x64 = x.astype(np.float64)
    ranks = np.empty((len(x), k), np.int64)
    for r0 in range(0, len(x), KNN_BLOCK):
        sims = x64[r0:r0 + KNN_BLOCK] @ x64.T
        ranks[r0:r0 + KNN_BLOCK] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ranks


def k_reciprocal_neigh(initial_rank: np.ndarray, i: int, k1: int) -> np.ndarray:
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    return forward_k_neigh_index[fi]


def dense_jaccard(features: np.ndarray, k1: int = 30, k2: int = 6, dtype: type = np.float64,
                  initial_rank: np.ndarray | None = None) -> np.ndarray:
    """compute_jaccard_distance(features, k1, k2) as an N x N ``dtype`` array (``initial_rank``:
    dense_knn(features, k1), when already computed)."""
    x = features.astype(np.float64)
    n = len(x)
    if initial_rank is None:
        initial_rank = dense_knn(x, k1)  # k = k1 columns, as the reference's faiss search
    nn_k1 = [k_reciprocal_neigh(initial_rank, i, k1) for i in range(n)]
    nn_k1_half = [k_reciprocal_neigh(initial_rank, i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n), dtype)
    for i in range(n):
        k_reciprocal_index = nn_k1[i]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_k_reciprocal_index = nn_k1_half[candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                    candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        dist = 2 - 2 * (x[k_reciprocal_expansion_index] @ x[i])
        weight = np.exp(-dist)
        v[i, k_reciprocal_expansion_index] = weight / weight.sum()
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe
    del initial_rank
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(n)]
    jaccard_dist = np.zeros((n, n), dtype)
    for i in range(n):
        temp_min = np.zeros(n, dtype)
        ind_non_zero = np.where(v[i, :] != 0)[0]
        for j in ind_non_zero:
            temp_min[inv_index[j]] += np.minimum(v[i, j], v[inv_index[j], j])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    del inv_index, v
    jaccard_dist[jaccard_dist < 0] = 0
    if jaccard_dist.dtype == np.float64:  # the tie rule of the sparse version (float32 is left as SpCL has it)
        np.round(jaccard_dist, 12, out=jaccard_dist)
    return jaccard_dist


def generate_pseudo_labels(cluster_id: np.ndarray) -> np.ndarray:
    """SpCL: clusters keep their DBSCAN id, each noise point gets num_ids, num_ids + 1, ... in order."""
    num = len(set(cluster_id)) - (1 if -1 in cluster_id else 0)
    labels, outliers = [], 0
    for cid in cluster_id:
        if cid != -1:
            labels.append(cid)
        else:
            labels.append(num + outliers)
            outliers += 1
    return np.array(labels, np.int64)


def _r_iou(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """1 - sum(min(label_sim, label_sim_b)) / sum(max(...)) per row, N x N label matrices in row blocks."""
    out = np.empty(len(a))
    for r0 in range(0, len(a), block):
        sim_a = (a[r0:r0 + block, None] == a[None, :]).astype(np.float64)
        sim_b = (b[r0:r0 + block, None] == b[None, :]).astype(np.float64)
        out[r0:r0 + block] = 1 - np.minimum(sim_a, sim_b).sum(-1) / np.maximum(sim_a, sim_b).sum(-1)
    return out


def dense_spcl_labels(jaccard: np.ndarray, eps: float = 0.6, eps_gap: float = 0.02, min_samples: int = 4,
                      indep_thres: float | None = None, quantile: float = 0.9,
                      iou_block: int | None = None) -> tuple[np.ndarray, float]:
    """SpCL's pseudo labels (its numbering) and the independence threshold (computed when not given)."""
    n = len(jaccard)
    runs = [DBSCAN(eps=e, min_samples=min_samples, metric="precomputed").fit_predict(jaccard)
            for e in (eps, eps - eps_gap, eps + eps_gap)]
    pseudo_labels, pseudo_labels_tight, pseudo_labels_loose = (generate_pseudo_labels(r) for r in runs)
    block = iou_block or n
    r_comp = _r_iou(pseudo_labels, pseudo_labels_tight, block)
    r_indep = _r_iou(pseudo_labels, pseudo_labels_loose, block)
    cluster_r_comp: dict[int, list[float]] = {}
    cluster_r_indep: dict[int, list[float]] = {}
    cluster_img_num: dict[int, int] = {}
    for comp, indep, label in zip(r_comp, r_indep, pseudo_labels):
        cluster_r_comp.setdefault(int(label), []).append(comp)
        cluster_r_indep.setdefault(int(label), []).append(indep)
        cluster_img_num[int(label)] = cluster_img_num.get(int(label), 0) + 1
    cluster_r_comp_min = [min(cluster_r_comp[i]) for i in sorted(cluster_r_comp)]
    cluster_r_indep_min = [min(cluster_r_indep[i]) for i in sorted(cluster_r_indep)]
    noins = [iou for iou, num in zip(cluster_r_indep_min, sorted(cluster_img_num)) if cluster_img_num[num] > 1]
    if indep_thres is None:
        indep_thres = float(np.sort(noins)[min(len(noins) - 1, np.round(len(noins) * quantile).astype("int"))])
    labels = pseudo_labels.copy()
    outliers = 0
    for i, label in enumerate(pseudo_labels):
        indep_score = cluster_r_indep_min[label]
        comp_score = r_comp[i]
        if not (indep_score <= indep_thres and comp_score <= cluster_r_comp_min[label]):
            labels[i] = len(cluster_r_indep_min) + outliers
            outliers += 1
    return labels, indep_thres


def canonical(labels: np.ndarray, drop_outliers: bool = False) -> np.ndarray:
    """Groups of >= 2 members numbered 0.. by first member, then singletons in index order (or -1)."""
    first_seen: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        first_seen.setdefault(label, i)
        counts[label] = counts.get(label, 0) + 1
    clusters = sorted((first_seen[g], g) for g in counts if counts[g] >= 2)
    number = {g: c for c, (_, g) in enumerate(clusters)}
    out = np.empty(len(labels), np.int64)
    next_single = len(clusters)
    for i, label in enumerate(labels.tolist()):
        if label in number:
            out[i] = number[label]
        elif drop_outliers:
            out[i] = -1
        else:
            out[i] = next_single
            next_single += 1
    return out
