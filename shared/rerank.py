"""k-reciprocal re-ranking (Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), computed sparsely.

This is the original algorithm of the authors' Python port (the defaults k1=20, k2=6, lambda=0.3 are the
ones every toolkit uses), over the joint set of the N = Q + G query and gallery features:

1. D0 = squared Euclidean distances, once (torchreid feeds already-squared distances to a port that
   squares again, so its D is proportional to d^4; that is not reproduced). Row i of D is D0's row i
   divided by its maximum (the port's column-max normalisation followed by a transpose). Neighbours are
   ranked by D, ties by index.
2. R(i, k1) = the members of i's first k1+1 neighbours (i included) that have i among their own first
   k1+1.
3. For each c in R(i, k1), R(c, round(k1/2)) (NumPy's round-half-to-even, as in the port) is merged in
   when more than 2/3 of it lies in R(i, k1), the comparison written as the port writes it.
4. V[i, j] = exp(-D[i, j]) normalised over the expanded set, 0 elsewhere.
5. When k2 != 1, row i of V becomes the mean of V's rows over i's first k2 neighbours.
6. For each query q and gallery item g: s = sum_j min(V[q, j], V[g, j]), jaccard = 1 - s / (2 - s).
7. Result = (1 - lambda) * jaccard + lambda * D, on the Q x G block.

Nothing here is N x N. One pass over row blocks of D0 (a GEMM per block) gives each row's maximum, its
first max(k1+1, k2) neighbours (``torch.topk`` plus an exact stable re-sort, with a full-row stable sort
for the rare row whose neighbour boundary falls inside a run of tied distances) and the Q x G block of D.
V is a scipy CSR matrix with at most (k1+1)(round(k1/2)+2) stored values per row, in practice about k1
(and a few times that after query expansion); the distances it needs outside each row's neighbour list
(members merged in from a neighbour's set) are computed pair by pair. The Jaccard term is computed for the Q x G block only, in query chunks, by walking V's column
index. Memory therefore grows with N * k plus the Q x G result, not with N^2.

Deviations from the port, all deliberate:

- inputs are features, not distance matrices: the sparse form needs distances for pairs it picks, and a
  precomputed N x N matrix is what it avoids. The original distance is the squared Euclidean distance of
  the features as given; L2-normalise them first for the cosine ranking (squared L2 = 2 - 2 cos).
- arithmetic is float64 throughout (the ports use float32, or float16 for V); ties are broken by index
  (the ports' unstable argsort leaves them arbitrary);
- the result is float32, which keeps an MSMT17-sized result (11,659 x 82,161) at 3.8 GB.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import ArrayLike

_BLOCK_ELEMENTS = 1 << 24  # float64 distances per row block of the neighbour pass (128 MB)
_PAIR_CHUNK = 1 << 13  # pairs whose distances are computed at once (two gathered arrays of that many features)
_TRIPLE_CHUNK = 1 << 21  # (query, shared item, gallery) terms of the Jaccard sum handled at once
_RESULT_CHUNK = 1 << 22  # Q x G float64 working values at once


def _features(q_feats: ArrayLike, g_feats: ArrayLike) -> tuple[np.ndarray, int]:
    """The joint float64 feature matrix (queries first) and the number of queries."""
    q, g = np.asarray(q_feats), np.asarray(g_feats)
    for name, x in (("q_feats", q), ("g_feats", g)):
        if x.ndim != 2 or not len(x):
            raise ValueError(f"{name} must be a non-empty 2-D feature array, got shape {x.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats and g_feats differ in feature size: {q.shape[1]} vs {g.shape[1]}")
    x = np.concatenate([q, g]).astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("q_feats and g_feats must be finite")
    return x, len(q)


def _sq_dists(a: np.ndarray, sq_a: np.ndarray, b: np.ndarray, sq_b: np.ndarray) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` and ``b`` (float64, clipped at 0). torch runs the
    GEMM so that it shares a thread pool with the ``topk`` that follows (NumPy's BLAS threads would
    spin against torch's)."""
    d = torch.from_numpy(sq_a)[:, None] + torch.from_numpy(sq_b)[None, :]
    return d.addmm_(torch.from_numpy(a), torch.from_numpy(b).T, alpha=-2).clamp_(min=0)


def _neighbours(x: np.ndarray, sq: np.ndarray, num_q: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over row blocks of D0: (N x k first neighbours by D with index tie-break, row maxima,
    Q x G block of D as float32)."""
    n = len(x)
    knn = np.empty((n, k), np.int64)
    row_max = np.empty(n)
    dist = np.empty((num_q, n - num_q), np.float32)
    take = min(k + 1, n)  # one more than needed tells whether a tie straddles the boundary
    step = max(1, _BLOCK_ELEMENTS // n)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        d0_t = _sq_dists(x[r0:r1], sq[r0:r1], x, sq)
        d0 = d0_t.numpy()
        m = d0.max(axis=1)
        if not m.all():
            raise ValueError("q_feats and g_feats are all the same vector: D cannot be normalised")
        row_max[r0:r1] = m
        if r0 < num_q:
            dist[r0:min(r1, num_q)] = d0[:num_q - r0, num_q:] / m[:num_q - r0, None]
        vals, idx = torch.topk(d0_t, take, dim=1, largest=False, sorted=True)
        vals, idx = vals.numpy() / m[:, None], idx.numpy()
        order = np.lexsort((idx, vals))
        vals, idx = np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)
        knn[r0:r1] = idx[:, :k]
        if take > k:
            for r in np.flatnonzero(vals[:, k - 1] == vals[:, k]):
                knn[r0 + r] = np.argsort(d0[r] / m[r], kind="stable")[:k]
    return knn, row_max, dist


def _pattern(cols: np.ndarray, n: int) -> sp.csr_matrix:
    """N x N 0/1 matrix with row i set at ``cols[i]``."""
    per_row = cols.shape[1]
    return sp.csr_matrix((np.ones(cols.size), cols.ravel(), np.arange(0, cols.size + 1, per_row)), shape=(n, n))


def _reciprocal(knn: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k): the first k+1 neighbours of i that have i among their first k+1, as a 0/1 matrix."""
    forward = _pattern(knn[:, :k + 1], len(knn))
    return forward.multiply(forward.T).tocsr()


def _pair_dists(x: np.ndarray, sq: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of the pairs (rows[t], cols[t]), in chunks."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), _PAIR_CHUNK):
        r, c = rows[s:s + _PAIR_CHUNK], cols[s:s + _PAIR_CHUNK]
        out[s:s + _PAIR_CHUNK] = sq[r] + sq[c] - 2 * np.einsum("ij,ij->i", x[r], x[c])
    return np.maximum(out, 0, out=out)


def _k_reciprocal_weights(x: np.ndarray, sq: np.ndarray, knn: np.ndarray, row_max: np.ndarray,
                          k1: int) -> sp.csr_matrix:
    """V before query expansion (steps 2-4): Gaussian weights over each expanded k-reciprocal set."""
    n = len(x)
    recip = _reciprocal(knn, k1)
    recip_half = _reciprocal(knn, int(np.around(k1 / 2)))
    # (i, c) for c in R(i, k1), valued |R(c, k1/2) ∩ R(i, k1)|
    overlap = recip.multiply(recip @ recip_half.T).tocsr()
    rows = np.repeat(np.arange(n), np.diff(overlap.indptr))
    accept = overlap.data > 2 / 3 * np.diff(recip_half.indptr)[overlap.indices]
    merged = sp.csr_matrix((np.ones(np.count_nonzero(accept)), (rows[accept], overlap.indices[accept])), shape=(n, n))
    expanded = (recip + merged @ recip_half).tocsr()
    expanded.sum_duplicates()  # one entry per member, columns sorted
    rows = np.repeat(np.arange(n), np.diff(expanded.indptr))
    weight = np.exp(-_pair_dists(x, sq, rows, expanded.indices) / row_max[rows])
    weight /= np.bincount(rows, weights=weight, minlength=n)[rows]
    return sp.csr_matrix((weight, expanded.indices.copy(), expanded.indptr.copy()), shape=(n, n))


def _blend_jaccard(v: sp.csr_matrix, num_q: int, dist: np.ndarray, lambda_value: float) -> None:
    """Overwrite ``dist`` (Q x G block of D) with (1 - lambda) * jaccard + lambda * D."""
    num_g = dist.shape[1]
    vq = v[:num_q].tocsr()
    vq.sort_indices()
    vg = v[num_q:].tocsc()  # column j -> the gallery rows that use item j
    col_len = np.diff(vg.indptr)
    # terms of each query's sum over its support; chunks of queries are cut to a bounded number of terms
    q_rows = np.repeat(np.arange(num_q), np.diff(vq.indptr))
    terms = np.cumsum(np.bincount(q_rows, weights=col_len[vq.indices], minlength=num_q))
    max_rows = max(1, _RESULT_CHUNK // num_g)
    q0 = 0
    while q0 < num_q:
        budget = (terms[q0 - 1] if q0 else 0) + _TRIPLE_CHUNK
        q1 = max(q0 + 1, min(int(np.searchsorted(terms, budget, side="right")), q0 + max_rows))
        s, e = vq.indptr[q0], vq.indptr[q1]
        items, a = vq.indices[s:e], vq.data[s:e]
        lens = col_len[items]
        first = np.cumsum(lens) - lens
        at = np.repeat(vg.indptr[items] - first, lens) + np.arange(int(lens.sum()))
        key = np.repeat(q_rows[s:e] - q0, lens) * num_g + vg.indices[at]
        shared = np.bincount(key, weights=np.minimum(np.repeat(a, lens), vg.data[at]), minlength=(q1 - q0) * num_g)
        jaccard = 1 - shared / (2 - shared)
        original = dist[q0:q1].astype(np.float64)
        dist[q0:q1] = jaccard.reshape(q1 - q0, num_g) * (1 - lambda_value) + original * lambda_value
        q0 = q1


def re_rank(q_feats: ArrayLike, g_feats: ArrayLike, k1: int = 20, k2: int = 6,
            lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranked Q x G distances (float32) for query and gallery features (Q x d, G x d).

    Same results as the dense original to float32 precision (see the module docstring for the definition
    and its deviations), with memory growing with N * k1 instead of N^2.
    """
    x, num_q = _features(q_feats, g_feats)
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    sq = np.einsum("ij,ij->i", x, x)
    knn, row_max, dist = _neighbours(x, sq, num_q, min(max(k1 + 1, k2), len(x)))
    v = _k_reciprocal_weights(x, sq, knn, row_max, k1)
    if k2 != 1:
        expansion = knn[:, :k2]
        v = _pattern(expansion, len(x)) @ v
        v.data /= expansion.shape[1]
    _blend_jaccard(v, num_q, dist, lambda_value)
    return dist
