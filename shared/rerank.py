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

Nothing here is N x N. D0 is symmetric, so one float32 pass over its blocks on and above the diagonal
serves rows and columns at once: a GEMM per block, on centred features with the squared norms folded in
as two extra columns so that it yields D0 directly, gives each row's maximum, its k + _MARGIN smallest
values (k = max(k1+1, k2); a partial sort on the diagonal block, then only entries below the row's
current threshold are merged) and the Q x G block of D0. The neighbour lists are then made exact: eps_i
bounds the float32 error in row i, so where the float32 gap at a prefix length the algorithm uses
(k1+1, round(k1/2)+1, k2) exceeds 2 eps_i the prefix is the exact set already; elsewhere the candidates
in the blurred window are re-ranked by float64 distances with the index tie-break, and a row whose
window runs past its candidates is computed whole in float64. V is a scipy CSR matrix with at most
(k1+1)(round(k1/2)+2) stored values per row, in practice about k1 (and a few times that after query
expansion). The Jaccard term is computed for the Q x G block only, in query chunks, by walking V's
column index; jaccard is 1 wherever nothing is shared, so the blend is dense and the correction sparse.
Memory therefore grows with N * k plus the Q x G result, not with N^2.

Deviations from the port, all deliberate:

- inputs are features, not distance matrices: the sparse form needs distances for pairs it picks, and a
  precomputed N x N matrix is what it avoids. The original distance is the squared Euclidean distance of
  the features as given; L2-normalise them first for the cosine ranking (squared L2 = 2 - 2 cos).
- neighbour sets are those of float64 distances with ties broken by index (the ports' unstable argsort
  leaves ties arbitrary). Distance values keep the float32 GEMM's rounding, a few 1e-7 of the row
  maximum (about two float32 ulps of D): the Q x G block of D, the row maxima, and V's weights for
  members of a row's candidate list; the blend where nothing is shared (jaccard = 1) is float32
  arithmetic; the other weights, the Jaccard sums and their blend are float64 (the ports use float32
  throughout, or float16 for V);
- the result is float32, which keeps an MSMT17-sized result (11,659 x 82,161) at 3.8 GB.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import ArrayLike

_BLOCK_ELEMENTS = 1 << 24  # float32 distances per block of the neighbour pass (64 MB, 2048 x 8192)
_MARGIN = 8  # candidates kept per row beyond the k needed, so that a blurred boundary is settled among them
_PAIR_CHUNK = 1 << 10  # pairs whose distances are computed at once (small enough to stay in cache)
_TRIPLE_CHUNK = 1 << 21  # (query, shared item, gallery) terms of the Jaccard sum handled at once
_RESULT_CHUNK = 1 << 22  # Q x G float64 working values at once
_CACHE_ELEMENTS = 1 << 18  # float32 distances scanned together while they are in cache (1 MB)
_UNIT = 2.0**-24  # float32 unit roundoff


def _features(q_feats: ArrayLike, g_feats: ArrayLike) -> tuple[np.ndarray, int]:
    """The joint feature matrix (queries first; float32 or float64 as given) and the number of queries."""
    q, g = np.asarray(q_feats), np.asarray(g_feats)
    for name, x in (("q_feats", q), ("g_feats", g)):
        if x.ndim != 2 or not len(x):
            raise ValueError(f"{name} must be a non-empty 2-D feature array, got shape {x.shape}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats and g_feats differ in feature size: {q.shape[1]} vs {g.shape[1]}")
    x = np.concatenate([q, g]).astype(np.result_type(q.dtype, g.dtype, np.float32), copy=False)
    if not np.isfinite(x).all():
        raise ValueError("q_feats and g_feats must be finite")
    return x, len(q)


def _pair_dists(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Float64 squared Euclidean distances of the pairs (rows[t], cols[t]) as sums of squared differences
    (exact wherever the features are small integers), in chunks."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), _PAIR_CHUNK):
        diff = np.subtract(x[rows[s:s + _PAIR_CHUNK]], x[cols[s:s + _PAIR_CHUNK]], dtype=np.float64)
        out[s:s + _PAIR_CHUNK] = np.einsum("ij,ij->i", diff, diff)
    return out


def _exact_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Float64 squared Euclidean distances from the features ``rows`` to all (len(rows) x N), clipped at 0."""
    a = x[rows].astype(np.float64)
    sq_a = np.einsum("ij,ij->i", a, a)
    out = np.empty((len(rows), len(x)))
    for c0 in range(0, len(x), _PAIR_CHUNK):
        b = x[c0:c0 + _PAIR_CHUNK].astype(np.float64)
        out[:, c0:c0 + _PAIR_CHUNK] = sq_a[:, None] + np.einsum("ij,ij->i", b, b) - 2 * a @ b.T
    return np.maximum(out, 0, out=out)


def _mirror_upper(block: np.ndarray) -> None:
    """Copy a square block's upper triangle onto its lower one, so that a pair's float32 distance is the
    one computed with the lower index on the left wherever the pair falls (float32 rounding is not
    symmetric), and results do not depend on the block size."""
    tile = 64  # transposed copies in cache-sized tiles
    for i0 in range(0, len(block), tile):
        i1 = min(i0 + tile, len(block))
        for j0 in range(0, i0, tile):
            block[i0:i1, j0:j0 + tile] = block[j0:j0 + tile, i0:i1].T
        rows, cols = np.tril_indices(i1 - i0, -1)
        block[i0 + rows, i0 + cols] = block[i0 + cols, i0 + rows]


class _Candidates:
    """Per row of D0, the ``take`` smallest approximate values seen so far (unordered) and the largest."""

    def __init__(self, n: int, take: int) -> None:
        self.vals = np.full((n, take), np.inf, np.float32)
        self.idx = np.zeros((n, take), np.int64)
        self.far = np.full(n, -np.inf, np.float32)

    def first(self, block: np.ndarray, r0: int) -> None:
        """Start the rows r0.. from their (mirrored, so symmetric) diagonal block."""
        rows = slice(r0, r0 + len(block))
        self.far[rows] = block.max(axis=1)
        take = self.vals.shape[1]
        if len(block) < take:  # too narrow to fill the rows: everything enters
            row, col = np.divmod(np.arange(block.size), len(block))
            self._merge(r0, len(block), row, col, block[row, col], r0)
            return
        vals, part = torch.topk(torch.from_numpy(block), take, dim=1, largest=False, sorted=False)
        self.vals[rows], self.idx[rows] = vals.numpy(), r0 + part.numpy()

    def offer(self, block: np.ndarray, r0: int, c0: int) -> None:
        """Merge an off-diagonal block (rows r0.., columns c0..) into its rows and, through symmetry, into
        its columns' rows, a few rows of the block at a time so that the scans run in cache."""
        n_rows, n_cols = block.shape
        tau_r = self.vals[r0:r0 + n_rows].max(axis=1)  # the take-th smallest so far; larger values cannot enter
        tau_c = self.vals[c0:c0 + n_cols].max(axis=1)
        col_max = np.full(n_cols, -np.inf, np.float32)
        hits_r, hits_c = [], []
        step = max(1, _CACHE_ELEMENTS // n_cols)
        masks = np.empty((step, n_cols), bool)
        for s in range(0, n_rows, step):
            part = block[s:s + step]
            mask = masks[:len(part)]
            far = self.far[r0 + s:r0 + s + len(part)]
            np.maximum(far, part.max(axis=1), out=far)
            np.maximum(col_max, part.max(axis=0), out=col_max)
            hits_r.append(np.flatnonzero(np.less_equal(part, tau_r[s:s + step, None], out=mask)) + s * n_cols)
            hits_c.append(np.flatnonzero(np.less_equal(part, tau_c[None, :], out=mask)) + s * n_cols)
        np.maximum(self.far[c0:c0 + n_cols], col_max, out=self.far[c0:c0 + n_cols])
        row, col = np.divmod(np.concatenate(hits_r), n_cols)
        self._merge(r0, n_rows, row, col, block[row, col], c0)
        row, col = np.divmod(np.concatenate(hits_c), n_cols)
        by_col = np.argsort(col, kind="stable")  # the columns' rows are merged in row order
        row, col = row[by_col], col[by_col]
        self._merge(c0, n_cols, col, row, block[row, col], r0)

    def _merge(self, r0: int, n_rows: int, row: np.ndarray, col: np.ndarray, val: np.ndarray, c0: int) -> None:
        """Merge entries (rows r0 + row, sorted; columns c0 + col; values val) into the running candidates."""
        if not row.size:
            return
        take = self.vals.shape[1]
        counts = np.bincount(row, minlength=n_rows)
        hit = np.flatnonzero(counts)
        slot = np.zeros(n_rows, np.int64)
        slot[hit] = np.arange(len(hit))
        width = take + int(counts.max())
        pad_v = np.full((len(hit), width), np.inf, np.float32)
        pad_i = np.zeros((len(hit), width), np.int64)
        pad_v[:, :take], pad_i[:, :take] = self.vals[r0 + hit], self.idx[r0 + hit]
        at = take + np.arange(len(row)) - (np.cumsum(counts) - counts)[row]
        pad_v[slot[row], at] = val
        pad_i[slot[row], at] = c0 + col
        keep = np.argpartition(pad_v, take - 1, axis=1)[:, :take]
        self.vals[r0 + hit] = np.take_along_axis(pad_v, keep, 1)
        self.idx[r0 + hit] = np.take_along_axis(pad_i, keep, 1)


def _neighbours(x: np.ndarray, num_q: int, sizes: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, max(sizes) + _MARGIN neighbour candidates by D (N x take) whose prefixes of every length
    in ``sizes`` are the exact sets (float64 distances, index tie-break); their D0 values; the row maxima
    of D0; the Q x G block of D0 (float32, not clipped).

    One float32 pass over the blocks of D0 on and above the diagonal (a GEMM per block, on centred
    features with the squared norms folded in as two extra columns) keeps each row's ``take`` smallest
    values and its largest. With eps_i bounding the float32 error in row i, a prefix whose float32 gap to
    the next candidate exceeds 2 eps_i is exact as it stands; otherwise the window of candidates that may
    cross it is re-ranked by float64 distances, or, if the window runs past the candidates, the whole row
    is computed in float64.
    """
    n, dim = x.shape
    k = max(sizes)
    # distances are shift-invariant, and centred features keep the float32 error small
    mean = x.mean(axis=0, dtype=np.float64)
    sq = np.empty(n)
    left = np.empty((n, dim + 2), np.float32)
    right = np.empty((n, dim + 2), np.float32)
    for s in range(0, n, _PAIR_CHUNK):
        xc = x[s:s + _PAIR_CHUNK] - mean
        sq[s:s + _PAIR_CHUNK] = np.einsum("ij,ij->i", xc, xc)
        left[s:s + _PAIR_CHUNK, :dim] = xc
    np.multiply(left[:, :dim], -2, out=right[:, :dim])
    left[:, dim], left[:, dim + 1] = sq, 1
    right[:, dim], right[:, dim + 1] = 1, sq
    # |float32 D0 - D0| in row i: a (dim + 2)-term float32 dot product of inputs rounded to float32
    eps = 2 * (dim + 8) * _UNIT * (sq + sq.max())
    take = min(k + _MARGIN, n)
    step = max(1, math.isqrt(_BLOCK_ELEMENTS // 4))  # rows of a block; off the diagonal 4x as many columns
    buffer = np.empty(min(_BLOCK_ELEMENTS, step * n), np.float32)
    cand = _Candidates(n, take)
    dist = np.empty((num_q, n - num_q), np.float32)
    # no block straddles the query/gallery boundary, so query-by-gallery blocks go straight into the result
    starts = sorted({*range(0, num_q, step), *range(num_q, n, step)})
    ends = starts[1:] + [n]
    # the diagonal first, so that each row starts with a partial sort
    blocks = [(r0, r1, r0, r1) for r0, r1 in zip(starts, ends)]
    for r0, r1 in zip(starts, ends):
        for lo, hi in ((r1, num_q), (max(r1, num_q), n)):
            blocks += [(r0, r1, c0, min(c0 + 4 * step, hi)) for c0 in range(lo, hi, 4 * step)]
    for r0, r1, c0, c1 in blocks:
        if r1 <= num_q <= c0:
            out = dist[r0:r1, c0 - num_q:c1 - num_q]
        else:
            out = buffer[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        block = np.matmul(left[r0:r1], right[c0:c1].T, out=out)
        if c0 == r0:
            _mirror_upper(block)
            cand.first(block, r0)
        else:
            cand.offer(block, r0, c0)
    row_max = np.maximum(cand.far, 0).astype(np.float64)
    if not row_max.all():
        raise ValueError("q_feats and g_feats are all the same vector: D cannot be normalised")

    order = np.argsort(cand.vals, axis=1, kind="stable")
    idx = np.take_along_axis(cand.idx, order, 1)
    d0 = np.take_along_axis(cand.vals, order, 1).astype(np.float64)
    # per row, the window of positions whose float32 order may differ from the exact one at a boundary:
    # before it every candidate is certainly in, from its end on certainly out of every prefix
    lo, hi = np.full(n, take), np.zeros(n, np.int64)
    for p in sizes:
        if p < n:
            blurred = d0[:, p] - d0[:, p - 1] <= 2 * eps
            first = (d0 < (d0[:, p] - 2 * eps)[:, None]).sum(axis=1)
            end = (d0 <= (d0[:, p - 1] + 2 * eps)[:, None]).sum(axis=1)
            lo = np.where(blurred, np.minimum(lo, first), lo)
            hi = np.where(blurred, np.maximum(hi, end), hi)
    full = np.flatnonzero((hi >= take) & (take < n))
    part = np.flatnonzero((hi > 0) & ((hi < take) | (take == n)))
    np.maximum(d0, 0, out=d0)
    d0[idx == np.arange(n)[:, None]] = 0  # exact for a point and itself
    if part.size:  # re-rank each window by exact values
        size = hi[part] - lo[part]
        rows = np.repeat(part, size)
        pos = np.arange(len(rows)) + np.repeat(lo[part] - (np.cumsum(size) - size), size)
        cols = idx[rows, pos]
        exact = _pair_dists(x, rows, cols)
        o = np.lexsort((cols, exact / row_max[rows], rows))
        idx[rows, pos], d0[rows, pos] = cols[o], exact[o]
    per_chunk = max(1, _BLOCK_ELEMENTS // (2 * n))  # float64 rows of the size of a float32 block
    for s in range(0, len(full), per_chunk):
        rows = full[s:s + per_chunk]
        exact = _exact_rows(x, rows)
        o = np.argsort(exact / row_max[rows, None], axis=1, kind="stable")[:, :take]
        idx[rows], d0[rows] = o, np.take_along_axis(exact, o, 1)
    return idx, d0, row_max, dist


def _pattern(cols: np.ndarray, n: int) -> sp.csr_matrix:
    """N x N 0/1 matrix with row i set at ``cols[i]``."""
    per_row = cols.shape[1]
    return sp.csr_matrix((np.ones(cols.size), cols.ravel(), np.arange(0, cols.size + 1, per_row)), shape=(n, n))


def _reciprocal(knn: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k): the first k+1 neighbours of i that have i among their first k+1, as a 0/1 matrix."""
    forward = _pattern(knn[:, :k + 1], len(knn))
    return forward.multiply(forward.T).tocsr()


def _k_reciprocal_weights(x: np.ndarray, knn: np.ndarray, knn_d0: np.ndarray, row_max: np.ndarray,
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
    # members among the row's neighbours have their distance already; the rest are computed
    known = (np.arange(n)[:, None] * n + knn).ravel()
    by_key = np.argsort(known)
    wanted = rows * n + expanded.indices
    at = np.minimum(np.searchsorted(known, wanted, sorter=by_key), len(known) - 1)
    found = known[by_key[at]] == wanted
    d0 = np.empty(len(rows))
    d0[found] = knn_d0.ravel()[by_key[at[found]]]
    d0[~found] = _pair_dists(x, rows[~found], expanded.indices[~found])
    weight = np.exp(-d0 / row_max[rows])
    weight /= np.bincount(rows, weights=weight, minlength=n)[rows]
    return sp.csr_matrix((weight, expanded.indices.copy(), expanded.indptr.copy()), shape=(n, n))


def _blend_jaccard(v: sp.csr_matrix, num_q: int, dist: np.ndarray, row_max: np.ndarray, lambda_value: float) -> None:
    """Overwrite ``dist`` (Q x G block of D0) with (1 - lambda) * jaccard + lambda * D."""
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
        touched = np.zeros(len(shared), bool)
        touched[key] = True  # a boolean scan is cheaper than one over the float64 sums
        nz = np.flatnonzero(touched)
        block = dist[q0:q1]
        flat = block.reshape(-1)  # a view: dist is C-contiguous
        scale = lambda_value / row_max[q0:q1]
        d_nz = np.maximum(flat[nz], 0) * scale[nz // num_g]
        s_nz = shared[nz]
        # jaccard is 1 where nothing is shared, most of the block: the blend there is an affine map of D0,
        # done in place in float32; the shared entries are blended in float64
        np.maximum(block, 0, out=block)
        block *= scale[:, None].astype(np.float32)
        block += np.float32(1 - lambda_value)
        flat[nz] = d_nz + (1 - lambda_value) * (1 - s_nz / (2 - s_nz))
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
    n = len(x)
    sizes = tuple(min(s, n) for s in (k1 + 1, int(np.around(k1 / 2)) + 1, k2))
    knn, knn_d0, row_max, dist = _neighbours(x, num_q, sizes)
    v = _k_reciprocal_weights(x, knn, knn_d0, row_max, k1)
    if k2 != 1:
        expansion = knn[:, :k2]
        v = _pattern(expansion, len(x)) @ v
        v.data /= expansion.shape[1]
    _blend_jaccard(v, num_q, dist, row_max, lambda_value)
    return dist
