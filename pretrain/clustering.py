"""SpCL's per-epoch clustering step, sparse: k-reciprocal Jaccard distances, DBSCAN, self-paced criteria.

Ge, Zhu, Chen, Zhao and Li, "Self-paced Contrastive Learning with Hybrid Memory for Domain Adaptive
Object Re-ID", NeurIPS 2020: §3.2 (self-paced learning with the reliability criteria R_indep and R_comp,
Eqs. 6-7) as implemented in examples/spcl_train_usl.py; the Jaccard distance of Zhong, Zheng, Cao and
Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017 (§3.2-3.5), as
implemented in SpCL's ``compute_jaccard_distance``; both computed here without any N x N array.

The Jaccard distance (``jaccard_distance``), over N L2-normalised features:

1. kNN table, k1 columns per row, self included (the reference slices ``[:k1+1]`` of a k1-column faiss
   result, so it sees k1 columns). Neighbours are ranked by float64 cosine similarity, ties by index
   (``pretrain/knn.py``: certified exact, or approximate with ``knn``).
2. R(i, p) = the members j of row i's first p columns that have i among their own first p columns, for
   p = k1 and p = round(k1/2) + 1 (NumPy rounding; capped at k1, the table's width).
3. Expansion: R(c, round(k1/2)) of each c in R(i, k1) is merged in when |R(c, .) ∩ R(i, k1)| >
   2/3 |R(c, .)|, the comparison written as the reference writes it.
4. V[i, j] = softmax(-d) over the expanded set, d = 2 - 2 cos.
5. When k2 != 1, row i of V becomes the mean of V's rows over i's first min(k2, k1) columns.
6. m_ij = sum_l min(V[i, l], V[j, l]); d_ij = max(0, 1 - m_ij / (2 - m_ij)).

Nothing is N x N. R(i, p) is the kNN pattern's first p columns times its transpose, entry by entry; the
expansion test is a product of N x N 0/1 CSR matrices with about k1 entries per row, in chunks of rows;
V and its query expansion are CSR matrices (a few times k1 entries per row). The min-sums are computed
only for pairs that share support, by a compiled walk (numba, ``_walk``) of V's column index from each
entry (i, l) to the rows j > i of column l: one float64 accumulator per j, each pair's terms added in
ascending l as the reference's running ``temp_min`` does.
The graph keeps only some of them: the pairs with d <= ``max_distance`` (DBSCAN: the three runs of an
epoch share one graph stored up to eps + gap), or each row's ``nearest`` smallest distances plus the
entries mirrored from the other rows' (HDBSCAN, below), so it grows with N, not with the pairs sharing
support, whose number grows like N^2 on hard features (near-duplicates, collapsed early features);
``max_distance=None`` without ``nearest`` keeps them all, on request. Pairs not stored are implicitly at
distance 1. Memory grows with N times the support size (measured ~2-3 kB per image at k1 = 30 on
synthetic re-ID features, plus the features and the search's buffers), time with N times the squared
support size.

The returned CSR matrix is what sklearn's DBSCAN(metric="precomputed") needs to give the labels of the
dense matrix. In sklearn's sparse precomputed mode only stored entries are neighbours (``<= eps``, as in
the dense mode) and explicit zeros count. Its ``fit`` (1.9.1, installed here) copies the matrix and sets
the diagonal to ``X.diagonal()``, which would turn a missing diagonal into an explicit zero; the diagonal
is stored explicitly anyway: 0 (the dense value is 1 - m/(2 - m) with m = sum_l V[i, l] = 1 up to
rounding, ~1e-16), or 1 where row i of the expanded V is empty (possible only with k2 = 1 and more than k1
exact duplicates; the dense value is then 1 too, and the point is not its own neighbour in either). Rows
are stored sorted by distance, ties by column, so that sklearn's ``sort_graph_by_row_values`` (a Python
loop over rows otherwise) has nothing to do. DBSCAN's labels depend only on each point's neighbour set
(border points go to the first cluster, in order of lowest core index, that reaches them), so identical
neighbour sets give identical labels.

Exactness. Neighbour sets and the ``<= eps`` decisions are discrete, so rounding can flip them.
(a) Ranking: certified against a dense float64 reference (``pretrain/knn.py``) up to float64 summation
order, which flips a neighbour only between similarities within ~1e-15 of each other that are not
exactly equal.
(b) The Jaccard values agree with a dense float64 evaluation to ~1e-15 (the weights' sums and the
similarities are summed in another order). That matters at exact-arithmetic ties, which are structural:
two images whose query expansions share four of their six rows (and nothing else) have m = 2/3, d = 0.5
exactly, computed as 0.5 +- 1e-16 depending on the order of the sums, and eps = 0.5 is a common choice.
So distances are rounded to 12 decimals, in the dense reference of the tests too: a tie at a decimal
eps then counts as a neighbour (<= eps, as exact arithmetic says) in both. Only distinct values within
~1e-12 of eps and of each other could still be decided differently.
The approximate searches (``int8``, ``ivf``, ``hnsw``) make no such promise: their recall against
brute-force search on 2,000 sampled queries is reported in ``ClusterResult.stats["knn_recall"]``.

The self-paced step (``SelfPacedClustering``, as in spcl_train_usl.py): DBSCAN at eps, eps - gap, eps + gap
on the same graph; noise becomes singleton ids (clusters first, then noise in index order, as SpCL's
``generate_pseudo_labels``); per sample R_comp = 1 - |C∩T|/|C∪T| and R_indep = 1 - |C∩L|/|C∪L| from the
label contingencies in O(N) (|C∩T| = n_ct from np.unique over label pairs, |C∪T| = n_c + n_t - n_ct);
per cluster the minimum of each; the independence threshold at the first call is the element
min(n - 1, round(q n)) of the sorted cluster R_indep over the n non-singleton clusters, q = 0.9, and is
frozen afterwards (``state_dict``); sample i keeps its cluster iff the cluster's R_indep <= threshold
and R_comp(i) equals the cluster's minimum (the members of its most compact tight sub-cluster).

Deviations from the reference code, all deliberate:

- Neighbours are ranked by exact (certified float64) similarity with ties by index; the reference
  ranks by faiss float32 L2 distances with arbitrary tie order.
- V, its query expansion and the Jaccard sums are float64 (the reference: float32, or float16), and the
  softmax is exp(-d) / sum exp(-d) without the max shift (d lies in [0, 4], nothing overflows). The graph
  holds float64 distances rounded to 12 decimals (see (b) above; the reference leaves ties to float32
  rounding).
- R_comp / R_indep are float64 from exact integer counts (the reference: float32 from N x N float
  label-equality matrices, which could merge IoUs closer than ~2^-24; irrelevant below ~4,000 images
  per cluster). Distinct count ratios never collide in float64 below ~10^7 images.
- If the first call has no non-singleton cluster the threshold is not set (the reference indexes an
  empty array) and nothing is filtered; it is set at the first call that has one.
- Final labels are renumbered: clusters that keep >= 2 members get 0..K-1 by their first member's index,
  then every other image its own id K, K+1, ... in index order (the reference leaves gaps and keeps
  1-member clusters under their old id; the partition is the same). ``drop_outliers`` gives them -1
  instead (cluster-contrast's choice, Dai et al. 2021) and is off by default.
- k2 > k1 uses k1 rows for the query expansion: the reference's table has k1 columns.
- The exact search is a blocked brute-force scan, float32 on CPU and float16 with float32 sums on CUDA
  (``knn_device``), certified either way (``pretrain/knn.py``); the reference always takes faiss's GPU
  search when it has one. ``knn="int8"``, ``"ivf"`` and ``"hnsw"`` are approximate (not in the
  reference).
- DBSCAN runs single-threaded (the reference: n_jobs=-1; labels do not depend on it).
- ``method="hdbscan"`` is a method change (no reference uses it). The hdbscan package's
  precomputed mode needs a dense matrix or a connected sparse graph with >= min_samples stored entries
  per row; sklearn's HDBSCAN has the same requirements. So a minimum spanning tree is built here from
  the Jaccard graph bounded to each image's ``hdbscan_neighbours`` (k) smallest distances plus the
  entries mirrored from the other images' (at most 2 N k entries): core distance = the min_samples-th
  smallest distance besides the point itself, 1 when fewer are stored (the implicit value; the hdbscan
  package computes it so on a dense matrix); mutual reachability max(core_i, core_j, d_ij) on stored
  pairs; scipy's MST per connected component (a zero weight stored as the smallest subnormal float,
  below every other weight, because scipy and the hdbscan package read a stored 0 as no edge; 1 / w
  overflows to the infinite lambda the package gives a zero); the components joined by edges of weight
  1, which is what every missing pair weighs in the dense mutual-reachability graph. That tree goes to
  the package's public ``HDBSCAN(metric="precomputed", min_samples=1)`` as a sparse graph: with
  min_samples = 1 a point's core distance is its lightest edge, so every edge's mutual reachability is
  its own weight and the package's MST is the tree itself (its sparse path loops in Python over the
  2(N - 1) entries: ~55 us per image here). The package orders the edges by numpy's default sort, which
  is unstable and CPU-dependent, and which of two tied edges merges first changes the condensed tree
  (ARI 0.93 between two tie orders on 3,000 synthetic features, min_samples 4), so ties are broken
  first, in the stable order of the MST's edges: each weight is raised to at least one ulp above the one
  before, so the k-th of k tied weights moves by about k ulps (2.2e-16 k relative), and lambdas and
  excess-of-mass stabilities by as little.
  What HDBSCAN sees against the dense matrix: the core distances are exact (min_samples <= k is
  required: a row's k smallest are all stored, everything mirrored into it is no smaller); a pair is
  left out only when it is beyond the k-th smallest distance of both its rows, so every pair below
  tau = the smallest k-th distance of the rows with k stored (``stats["graph_complete_below"]``, 1 when
  no row is full) is stored, and every merge the hierarchy makes below tau is the dense one's (Kruskal
  takes the same edges in the same order). Above tau a pair left out weighs 1 instead of its d in
  (tau, 1], so clusters that the dense hierarchy joins there may join later or only at 1, which can
  change the condensed tree's stabilities and so the selected clusters; with k >= N - 1 the graph is
  complete and the tree is the dense one's. Mutual reachability is full of ties (each edge carries a
  core distance), so the MST is not unique even then: the clusters equal the package's on the dense
  matrix, but a few points hanging on tied edges may be labelled differently (as two valid dense MSTs
  would); with min_samples = 1 and no tie among the tree's positive weights the labels are the
  package's. The self-paced criteria are not applied: they are defined through DBSCAN's eps (tight and
  loose runs at eps -/+ gap), which HDBSCAN does not have; its own excess-of-mass selection already
  keeps the persistent clusters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse import csgraph
from sklearn.cluster import DBSCAN

from reidforge.pretrain.knn import DEVICES, INDICES, IVF_NPROBE, check_features, check_k, check_search, knn_table
from reidforge.shared.config import bounded, choice

_ROW_CHUNK = 1 << 14  # rows whose expanded k-reciprocal sets are built at once
_SIM_CHUNK = 1 << 9  # pairs whose float64 similarities are computed at once
_DECIMALS = 12  # Jaccard distances are rounded to this many decimals: exact-arithmetic ties at eps count in
_SPCL_LOOSE_EPS = 0.62  # SpCL's eps + eps_gap (0.6 + 0.02): the largest distance its three DBSCANs read


@dataclass
class ClusterConfig:
    """Clustering hyper-parameters; the defaults are SpCL's."""

    method: str = choice("dbscan", "hdbscan")
    eps: float = bounded(0.6, 0, None, lo_open=True)
    eps_gap: float = bounded(0.02, 0)  # tight = eps - gap, loose = eps + gap
    min_samples: int = bounded(4, 1)
    k1: int = bounded(30, 1)
    k2: int = bounded(6, 1)
    knn: str = choice("exact", "int8", "ivf", "hnsw", "auto")  # kNN search (pretrain/knn.py); auto: exact on CUDA, int8 on CPU
    knn_device: str = choice("auto", "cpu", "cuda")  # where the exact/int8 scan runs; auto = CUDA when available
    ivf_nprobe: int = bounded(IVF_NPROBE, 1)  # knn=ivf: lists each point probes (of sqrt(nprobe N)); more = higher recall, slower
    independence_quantile: float = bounded(0.9, 0, 1)  # SpCL: threshold fixed at the first clustering
    self_paced: bool = True  # False = plain DBSCAN labels (no reliability criteria)
    drop_outliers: bool = False  # cluster-contrast style: un-clustered -> label -1 instead of singleton ids
    hdbscan_min_cluster_size: int = bounded(4, 2)
    hdbscan_cluster_selection: str = choice("eom", "leaf")
    hdbscan_neighbours: int = bounded(30, 1)  # method=hdbscan: each image's smallest distances kept (>= min_samples)


@dataclass
class ClusterResult:
    labels: np.ndarray  # (N,) int64: clusters 0..K-1, then each un-clustered image its own id (or -1)
    num_clusters: int  # K: clusters with >= 2 members after the criteria
    num_outliers: int  # un-clustered images
    stats: dict[str, float]


def _pair_sims(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Float64 inner products of the pairs (rows[t], cols[t]), _SIM_CHUNK pairs at a time; symmetric
    in the pair."""
    table = torch.from_numpy(x)
    out = np.empty(len(rows))
    for s in range(0, len(rows), _SIM_CHUNK):
        a, b = (torch.index_select(table, 0, torch.from_numpy(ends[s:s + _SIM_CHUNK])) for ends in (rows, cols))
        out[s:s + _SIM_CHUNK] = (a.double() * b.double()).sum(1).numpy()
    return out


def _index_type(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _pattern(cols: np.ndarray, n: int, dtype: type = np.int32) -> sp.csr_matrix:
    """N x N 0/1 matrix with row i set at ``cols[i]`` (no duplicates within a row), in the given order."""
    per_row = cols.shape[1]
    return sp.csr_matrix((np.ones(cols.size, dtype), cols.ravel().astype(_index_type(n)),
                          np.arange(0, cols.size + 1, per_row)), shape=(n, n))


def _reciprocal(ids: np.ndarray, p: int) -> sp.csr_matrix:
    """R(i, p) as a 0/1 matrix: the first p columns of row i that have i among their own first p."""
    first = _pattern(ids[:, :p], len(ids))
    out = first.multiply(first.T).tocsr()
    out.sort_indices()
    return out


@dataclass
class ReciprocalSets:
    """R(i, k1) and R(i, round(k1/2) + 1) of every row (step 2) as 0/1 CSR matrices, from the whole kNN
    table: what the expansion (step 3) of any block of rows reads."""

    full: sp.csr_matrix
    half: sp.csr_matrix
    half_t: sp.csr_matrix  # half's transpose, rows = columns of half
    half_len: np.ndarray  # |R(c, round(k1/2) + 1)| per row c

    @classmethod
    def of(cls, ids: np.ndarray, k1: int) -> ReciprocalSets:
        half = _reciprocal(ids, min(k1, int(np.around(k1 / 2)) + 1))
        return cls(_reciprocal(ids, k1), half, half.T.tocsr(), np.diff(half.indptr))


def expanded_rows(sets: ReciprocalSets, sims: np.ndarray, ids: np.ndarray, r0: int,
                  pair_sims: Callable[[np.ndarray, np.ndarray], np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows r0 .. r0 + len(ids) of V before query expansion (steps 3-4), from those rows of the kNN table
    (``sims``, ``ids``): their weights, column indices (ascending per row) and row lengths.
    ``pair_sims(rows, cols)`` gives the float64 similarities of the members not in the table."""
    n, r1 = sets.full.shape[0], r0 + len(ids)
    # the kNN rows sorted by id: members found there have their similarity already
    by_id = np.argsort(ids, axis=1)
    ids_by_id, sims_by_id = np.take_along_axis(ids, by_id, 1), np.take_along_axis(sims, by_id, 1)
    block = sets.full[r0:r1]
    # (i, c) for c in R(i, k1), valued |R(c, k1/2) ∩ R(i, k1)|
    overlap = block.multiply(block @ sets.half_t).tocsr()
    local = np.repeat(np.arange(r1 - r0), np.diff(overlap.indptr))
    accept = overlap.data > 2 / 3 * sets.half_len[overlap.indices]
    merged = sp.csr_matrix((np.ones(np.count_nonzero(accept), np.int32), (local[accept], overlap.indices[accept])),
                           shape=(r1 - r0, n))
    expanded = (block + merged @ sets.half).tocsr()
    expanded.sum_duplicates()  # one entry per member, columns sorted
    local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(expanded.indptr))
    cols = expanded.indices.astype(np.int64)
    known = (np.arange(r1 - r0, dtype=np.int64)[:, None] * n + ids_by_id).ravel()  # sorted
    wanted = local * n + cols
    at = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
    found = known[at] == wanted
    s = np.empty(len(cols))
    s[found] = sims_by_id.ravel()[at[found]]
    s[~found] = pair_sims(r0 + local[~found], cols[~found])
    weight = np.exp(-(2 - 2 * s))
    weight /= np.bincount(local, weights=weight, minlength=r1 - r0)[local]
    return weight, expanded.indices, np.diff(expanded.indptr)


def stack_rows(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> sp.csr_matrix:
    """Consecutive row blocks (data, indices, row lengths) as one CSR matrix with ``n`` columns."""
    lens = np.concatenate([p[2] for p in parts])
    indptr = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return sp.csr_matrix((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), indptr),
                         shape=(len(lens), n))


def _expanded_weights(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, k1: int) -> sp.csr_matrix:
    """V before query expansion (steps 2-4): softmax(-d) over each expanded k-reciprocal set, in chunks of
    rows so that the pairwise products of the k-reciprocal sets stay small."""
    n = len(x)
    sets = ReciprocalSets.of(ids, k1)
    return stack_rows([expanded_rows(sets, sims[r0:r0 + _ROW_CHUNK], ids[r0:r0 + _ROW_CHUNK], r0,
                                     lambda rows, cols: _pair_sims(x, rows, cols)) for r0 in range(0, n, _ROW_CHUNK)], n)


@numba.njit(cache=True)
def _offer(heap_d: np.ndarray, heap_j: np.ndarray, size: np.ndarray, row: int, d: float, col: int) -> None:
    """Offer (d, col) to the ``heap_d.shape[1]`` smallest (d, col) of ``row``: a max-heap per row, its root
    the largest kept, so the result is the same set whatever the order of the offers."""
    hd, hj, k = heap_d[row], heap_j[row], heap_d.shape[1]
    if size[row] < k:
        at = size[row]
        size[row] += 1
        while at > 0:  # sift up past the parents below (d, col)
            up = (at - 1) // 2
            if hd[up] > d or (hd[up] == d and hj[up] > col):
                break
            hd[at], hj[at] = hd[up], hj[up]
            at = up
    elif d < hd[0] or (d == hd[0] and col < hj[0]):
        at = 0
        while 2 * at + 1 < k:  # sift down past the children above (d, col)
            down = 2 * at + 1
            if down + 1 < k and (hd[down + 1] > hd[down] or (hd[down + 1] == hd[down] and hj[down + 1] > hj[down])):
                down += 1
            if hd[down] < d or (hd[down] == d and hj[down] < col):
                break
            hd[at], hj[at] = hd[down], hj[down]
            at = down
    else:
        return
    hd[at], hj[at] = d, col


@numba.njit(cache=True)
def jaccard_of(m: float, scale: float) -> float:
    """d = max(0, 1 - m / (2 - m)) of a min-sum m, rounded as np.round(d, decimals) does (rint(d scale) / scale):
    the one definition of both walks, the single-process one and the ranks' (``distributed_clustering``)."""
    d = 1.0 - m / (2.0 - m)
    return np.rint((d if d >= 0.0 else 0.0) * scale) / scale


@numba.njit(cache=True)
def _walk(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, col_ptr: np.ndarray, col_rows: np.ndarray,
          col_data: np.ndarray, first: np.ndarray, max_distance: float, nearest: int,
          scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The min-sum walk of ``_shared_pairs`` (CSR arrays of v, its CSC arrays, the CSC slot of each CSR
    entry); d rounded as np.round(d, decimals) does, rint(d scale) / scale. ``nearest`` 0: the pairs
    (i, j > i, d <= max_distance), rows ascending, each row's in the order its walk first reaches them
    (ascending l, then ascending j); else every row's heap entries as (min, max, d), and the smallest root
    of the full heaps (inf when none is full)."""
    n = len(indptr) - 1
    acc = np.zeros(n)
    last = np.full(n, -1, np.int64)  # the row whose walk last touched j: acc[j] is that row's
    touched = np.empty(n, np.int64)
    heaps = n if nearest > 0 else 0
    heap_d = np.empty((heaps, max(nearest, 1)))
    heap_j = np.empty((heaps, max(nearest, 1)), np.int64)
    size = np.zeros(heaps, np.int64)
    out_i, out_j, out_d = np.empty(1024, np.int64), np.empty(1024, np.int64), np.empty(1024)
    count = 0
    for i in range(n):
        t = 0
        for e in range(indptr[i], indptr[i + 1]):
            v_il = data[e]
            for f in range(first[e] + 1, col_ptr[indices[e] + 1]):  # the rows j > i of column l
                j = col_rows[f]
                if last[j] != i:
                    last[j], acc[j], touched[t] = i, 0.0, j
                    t += 1
                acc[j] += min(v_il, col_data[f])
        for s in range(t):
            j = touched[s]
            d = jaccard_of(acc[j], scale)
            if d > max_distance:
                continue
            if nearest > 0:
                _offer(heap_d, heap_j, size, i, d, j)
                _offer(heap_d, heap_j, size, j, d, i)
                continue
            if count == len(out_d):  # grow by doubling
                out_i = np.concatenate((out_i, np.empty_like(out_i)))
                out_j = np.concatenate((out_j, np.empty_like(out_j)))
                out_d = np.concatenate((out_d, np.empty_like(out_d)))
            out_i[count], out_j[count], out_d[count] = i, j, d
            count += 1
    complete_below = np.inf
    if nearest > 0:
        out_i, out_j, out_d = np.empty(size.sum(), np.int64), np.empty(size.sum(), np.int64), np.empty(size.sum())
        for r in range(n):
            for s in range(size[r]):
                c = heap_j[r, s]
                out_i[count], out_j[count], out_d[count] = min(r, c), max(r, c), heap_d[r, s]
                count += 1
            if size[r] == nearest:
                complete_below = min(complete_below, heap_d[r, 0])
    return out_i[:count], out_j[:count], out_d[:count], complete_below


def _shared_pairs(v: sp.csr_matrix, max_distance: float | None,
                  nearest: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(i, j, d_ij) for pairs j > i whose rows of ``v`` (canonical CSR: sorted indices, no duplicates)
    share support, d_ij = max(0, 1 - m/(2 - m)), m = sum_l min(v_il, v_jl) summed in ascending l, rounded
    to _DECIMALS decimals: those with d_ij <= ``max_distance`` (all when None), rows ascending, each
    row's pairs in the order the walk first reaches them (its entries (i, l) in ascending l, then the
    rows j of column l ascending); with ``nearest`` only those among the ``nearest`` smallest (d, column)
    of row i or of row j, in (i, j) order. Also the smallest d_ij of a full row's kept ones (a pair left
    out is at least that far; inf when no row is full or without ``nearest``).

    Walks v's column index from each entry (i, l) to the rows j > i of column l (module docstring).
    """
    index = np.int64
    # scipy's CSR -> CSC transpose is a counting sort: rows ascending within each column, the same slots
    # for v and for the positions of v's entries
    v_cols = v.tocsc()
    slot = sp.csr_matrix((np.arange(v.nnz, dtype=index), v.indices, v.indptr), shape=v.shape).tocsc().data
    first = np.empty(v.nnz, index)  # per entry (i, l) of v, its place in column l: the rows after it are > i
    first[slot] = np.arange(v.nnz, dtype=index)
    del slot
    # one signature for the compiled walk: int64 indices, float64 values (no copy where they are already)
    arrays = [a.astype(index, copy=False) for a in (v.indptr, v.indices, v_cols.indptr, v_cols.indices)]
    rows, cols, d, complete_below = _walk(
        arrays[0], arrays[1], v.data.astype(np.float64, copy=False), arrays[2], arrays[3],
        v_cols.data.astype(np.float64, copy=False), first, np.inf if max_distance is None else float(max_distance),
        nearest or 0, 10.0**_DECIMALS)
    if nearest:  # a pair kept by both of its rows comes twice; np.unique sorts by (i, j)
        _, at = np.unique(rows * v.shape[0] + cols, return_index=True)
        rows, cols, d = rows[at], cols[at], d[at]
    return rows, cols, d, complete_below


def _jaccard(x: np.ndarray, k1: int, k2: int, index: str, max_distance: float | None, stats: dict[str, float],
             nprobe: int = IVF_NPROBE, nearest: int | None = None, device: str = "auto") -> sp.csr_matrix:
    n = len(x)
    sims, ids = knn_table(x, k1, index, stats, nprobe, device)
    start = time.perf_counter()
    v = _expanded_weights(x, sims, ids, k1)
    if k2 != 1:
        expansion = ids[:, :min(k2, k1)]
        v = (_pattern(expansion, n, np.float64) @ v).tocsr()  # sums in rank order, as np.mean over rows
        v.data /= expansion.shape[1]
        v.sort_indices()
    del sims, ids
    stats["v_nnz_per_row"] = v.nnz / n
    rows, cols, d, complete_below = _shared_pairs(v, max_distance, nearest)
    if nearest:
        stats["graph_complete_below"] = min(complete_below, 1.0)
    # the diagonal: 0, or 1 where the row of v is empty (then nothing is shared with itself either)
    diag = np.where(np.diff(v.indptr) > 0, 0.0, 1.0)
    del v
    graph = symmetric_graph(rows, cols, d, diag)
    stats["jaccard_s"] = time.perf_counter() - start
    stats["graph_nnz_per_row"] = graph.nnz / n
    return graph


def symmetric_graph(rows: np.ndarray, cols: np.ndarray, d: np.ndarray, diag: np.ndarray) -> sp.csr_matrix:
    """The N x N CSR graph of the pairs (rows[t], cols[t], d[t]), i != j, each pair given once, stored in
    both directions, plus the diagonal ``diag`` (N,); rows sorted by distance, ties by column."""
    n = len(diag)
    every = np.arange(n, dtype=np.int64)
    rows, cols = np.concatenate([rows, cols, every]), np.concatenate([cols, rows, every])
    d = np.concatenate([d, d, diag])
    order = np.lexsort((cols, d, rows))  # rows sorted by distance, ties by column
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix((d[order], cols[order], indptr), shape=(n, n))


def jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6, index: str = "exact",
                     max_distance: float | None = _SPCL_LOOSE_EPS, nprobe: int = IVF_NPROBE, *,
                     nearest: int | None = None, device: str = "auto") -> sp.csr_matrix:
    """SpCL's k-reciprocal Jaccard distance of L2-normalised features (N x D) as an N x N CSR matrix: the
    pairs sharing support at distance <= ``max_distance`` (by default SpCL's loose eps, 0.62) and, with
    ``nearest``, only each row's ``nearest`` smallest plus the entries mirrored from the other rows', plus
    the diagonal; pairs not stored are at distance 1. ``max_distance=None`` without ``nearest`` stores
    every pair sharing support, which can grow like N^2. Rows are sorted by distance, ties by column.
    ``index``, ``nprobe`` and ``device`` are the kNN search's (``knn_search``). See the module docstring."""
    check_search(index, nprobe, device)  # the arguments first: checking the features reads them all
    if k2 < 1:
        raise ValueError(f"k2 must be >= 1, got k2={k2}")
    if max_distance is not None and not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0 or None, got max_distance={max_distance}")
    if nearest is not None and nearest < 1:
        raise ValueError(f"nearest must be >= 1 or None, got nearest={nearest}")
    x = check_features(features)
    check_k(k1, len(x))
    return _jaccard(x, k1, k2, index, max_distance, {}, nprobe, nearest, device)


def _with_singletons(labels: np.ndarray) -> np.ndarray:
    """DBSCAN labels with each noise point (-1) given its own id after the clusters, in index order."""
    out = labels.astype(np.int64)
    noise = out < 0
    out[noise] = (out.max() + 1 if (~noise).any() else 0) + np.arange(np.count_nonzero(noise))
    return out


def _r_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample, 1 - |A∩B| / |A∪B| of its clusters A (in ``a``) and B (in ``b``), from contingencies."""
    _, pair, inter = np.unique(a * (b.max() + 1) + b, return_inverse=True, return_counts=True)
    inter = inter[pair]
    return 1 - inter / (np.bincount(a)[a] + np.bincount(b)[b] - inter)


def _renumber(groups: np.ndarray, drop_outliers: bool) -> tuple[np.ndarray, int, int]:
    """Groups of >= 2 members -> 0..K-1 by first member; the rest -> K, K+1, ... in index order (or -1)."""
    _, first, inverse, counts = np.unique(groups, return_index=True, return_inverse=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    rank = np.full(len(counts), -1, np.int64)
    rank[multi[np.argsort(first[multi])]] = np.arange(len(multi))
    labels = rank[inverse]
    single = labels < 0
    if not drop_outliers:
        labels[single] = len(multi) + np.arange(np.count_nonzero(single))
    return labels, len(multi), int(np.count_nonzero(single))


def _hdbscan_labels(graph: sp.csr_matrix, min_samples: int, min_cluster_size: int, selection: str) -> np.ndarray:
    """HDBSCAN labels (noise -1) of the bounded Jaccard graph, through its minimum spanning tree (module
    docstring)."""
    import hdbscan  # only this method needs it

    n = graph.shape[0]
    lens = np.diff(graph.indptr)
    m = min(min_samples, n - 1)
    # rows are sorted by distance with the diagonal first: entry m is the m-th other point
    core = np.where(lens > m, graph.data[np.minimum(graph.indptr[:-1] + m, graph.nnz - 1)], 1.0)
    rows = np.repeat(np.arange(n), lens)
    upper = graph.indices > rows
    r, c = rows[upper], graph.indices[upper]
    reach = np.maximum(np.maximum(core[r], core[c]), graph.data[upper])
    # scipy and the hdbscan package read a stored 0 as no edge: zeros become the smallest subnormal, below
    # every other weight, whose 1 / w overflows to the infinite lambda the package gives a zero distance
    reach = np.maximum(reach, np.nextafter(0.0, 1.0))
    forest = csgraph.minimum_spanning_tree(sp.csr_matrix((reach, (r, c)), shape=(n, n))).tocoo()
    num, comp = csgraph.connected_components(forest, directed=False)
    heads = np.unique(comp, return_index=True)[1]  # one point per component, joined in a chain at weight 1
    r, c = np.r_[forest.row, heads[:-1]], np.r_[forest.col, heads[1:]]
    w = np.r_[forest.data, np.ones(num - 1)]
    order = np.argsort(w, kind="stable")
    r, c = r[order], c[order]
    # the package sorts the edges again, unstably (numpy's default sort, CPU-dependent), and which tied
    # edge merges first changes the condensed tree: ties are broken in this stable order instead, each
    # weight raised to at least one ulp above the one before (non-negative floats are ordered as their
    # bit patterns, and bit pattern + 1 is the next float)
    step = np.arange(len(w))
    w = (np.maximum.accumulate(w[order].view(np.int64) - step) + step).view(np.float64)
    # on a tree with min_samples=1 a point's core distance is its lightest edge, so every edge's mutual
    # reachability is its own weight and the package's MST is this tree
    tree = sp.csr_matrix((np.r_[w, w], (np.r_[r, c], np.r_[c, r])), shape=(n, n))
    return hdbscan.HDBSCAN(metric="precomputed", min_samples=1, min_cluster_size=min_cluster_size,
                           cluster_selection_method=selection).fit(tree).labels_.astype(np.int64)


class SelfPacedClustering:
    """SpCL's clustering step (module docstring); call once per epoch on the memory features."""

    def __init__(self, cfg: ClusterConfig) -> None:
        checks = [
            (cfg.method in ("dbscan", "hdbscan"), f"method must be dbscan or hdbscan, got {cfg.method!r}"),
            (cfg.knn in INDICES, f"knn must be one of {', '.join(INDICES)}, got {cfg.knn!r}"),
            (cfg.knn_device in DEVICES, f"knn_device must be one of {', '.join(DEVICES)}, got {cfg.knn_device!r}"),
            (cfg.knn_device != "cuda" or torch.cuda.is_available(),
             "knn_device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)"),
            (cfg.eps_gap >= 0, f"eps_gap must be >= 0, got {cfg.eps_gap}"),
            (cfg.eps - cfg.eps_gap > 0, f"eps - eps_gap must be > 0, got eps={cfg.eps}, eps_gap={cfg.eps_gap}"),
            # pairs without shared support are at distance 1 and never stored
            (cfg.eps + cfg.eps_gap < 1, f"eps + eps_gap must be < 1, got eps={cfg.eps}, eps_gap={cfg.eps_gap}"),
            (cfg.min_samples >= 1, f"min_samples must be >= 1, got {cfg.min_samples}"),
            (cfg.k1 >= 1 and cfg.k2 >= 1, f"k1 and k2 must be >= 1, got k1={cfg.k1}, k2={cfg.k2}"),
            (cfg.ivf_nprobe >= 1, f"ivf_nprobe must be >= 1, got {cfg.ivf_nprobe}"),
            (0 < cfg.independence_quantile <= 1,
             f"independence_quantile must be in (0, 1], got {cfg.independence_quantile}"),
            (cfg.hdbscan_min_cluster_size >= 2,
             f"hdbscan_min_cluster_size must be >= 2, got {cfg.hdbscan_min_cluster_size}"),
            (cfg.hdbscan_cluster_selection in ("eom", "leaf"),
             f"hdbscan_cluster_selection must be eom or leaf, got {cfg.hdbscan_cluster_selection!r}"),
            # the core distance of a point is its min_samples-th smallest distance: it must be stored
            (cfg.method != "hdbscan" or cfg.hdbscan_neighbours >= cfg.min_samples,
             f"hdbscan_neighbours must be >= min_samples, got hdbscan_neighbours={cfg.hdbscan_neighbours}, "
             f"min_samples={cfg.min_samples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.cfg = dataclasses.replace(cfg)
        self.indep_threshold: float | None = None

    def state_dict(self) -> dict:
        return {"indep_threshold": self.indep_threshold}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"indep_threshold"}:
            raise ValueError(f"state must have exactly the key 'indep_threshold', got {sorted(state)}")
        value = state["indep_threshold"]
        self.indep_threshold = None if value is None else float(value)

    def _self_paced(self, graph: sp.csr_matrix, stats: dict[str, float]) -> np.ndarray:
        cfg = self.cfg
        runs = [_with_singletons(DBSCAN(eps=eps, min_samples=cfg.min_samples, metric="precomputed").fit(graph).labels_)
                for eps in (cfg.eps, cfg.eps - cfg.eps_gap, cfg.eps + cfg.eps_gap)]
        labels, tight, loose = runs
        start = time.perf_counter()
        r_comp, r_indep = _r_iou(labels, tight), _r_iou(labels, loose)
        num = labels.max() + 1
        cluster_comp, cluster_indep = np.full(num, np.inf), np.full(num, np.inf)
        np.minimum.at(cluster_comp, labels, r_comp)
        np.minimum.at(cluster_indep, labels, r_indep)
        sizes = np.bincount(labels)
        indep = np.sort(cluster_indep[sizes > 1])  # non-singleton clusters only
        stats["dbscan_clusters"] = float(len(indep))
        if self.indep_threshold is None and len(indep):
            at = min(len(indep) - 1, int(np.round(len(indep) * cfg.independence_quantile)))
            self.indep_threshold = float(indep[at])
        if self.indep_threshold is None:
            keep = np.ones(len(labels), bool)
        else:
            stats["indep_threshold"] = self.indep_threshold
            independent = cluster_indep[labels] <= self.indep_threshold
            compact = r_comp <= cluster_comp[labels]
            keep = independent & compact
            clustered = sizes[labels] > 1
            # each criterion's own removals (an image may fail both): which of the two is doing the work
            stats["rejected_by_independence"] = float(np.count_nonzero(~independent & clustered))
            stats["rejected_by_compactness"] = float(np.count_nonzero(~compact & clustered))
        stats["rejected_by_criteria"] = float(np.count_nonzero(~keep & (sizes[labels] > 1)))
        stats["criteria_s"] = time.perf_counter() - start
        return np.where(keep, labels, num + np.arange(len(labels)))

    def graph_bounds(self) -> tuple[float | None, int | None]:
        """(max_distance, nearest) of the Jaccard graph this clustering reads (``jaccard_distance``)."""
        cfg = self.cfg
        if cfg.method == "hdbscan":  # every distance, each row's nearest few: at most 2 N hdbscan_neighbours
            return None, cfg.hdbscan_neighbours
        return (cfg.eps + cfg.eps_gap if cfg.self_paced else cfg.eps), None  # the largest eps DBSCAN runs at

    def __call__(self, features: np.ndarray) -> ClusterResult:
        cfg = self.cfg
        start = time.perf_counter()
        x = check_features(features)
        check_k(cfg.k1, len(x))
        stats: dict[str, float] = {"n": float(len(x))}
        max_distance, nearest = self.graph_bounds()
        graph = _jaccard(x, cfg.k1, cfg.k2, cfg.knn, max_distance, stats, cfg.ivf_nprobe, nearest, cfg.knn_device)
        return self.cluster_graph(graph, stats, start)

    def cluster_graph(self, graph: sp.csr_matrix, stats: dict[str, float], start: float) -> ClusterResult:
        """Labels from the Jaccard graph (``graph_bounds``) of the features, their statistics added to
        ``stats``; ``start`` is when the clustering began (``total_s``)."""
        cfg, n = self.cfg, graph.shape[0]
        cluster_start = time.perf_counter()
        if cfg.method == "hdbscan":
            groups = _with_singletons(_hdbscan_labels(graph, cfg.min_samples, cfg.hdbscan_min_cluster_size,
                                                      cfg.hdbscan_cluster_selection))
        elif cfg.self_paced:
            groups = self._self_paced(graph, stats)
        else:
            groups = _with_singletons(DBSCAN(eps=cfg.eps, min_samples=cfg.min_samples,
                                             metric="precomputed").fit(graph).labels_)
        del graph
        labels, num_clusters, num_outliers = _renumber(groups, cfg.drop_outliers)
        sizes = np.bincount(labels[labels >= 0])[:num_clusters] if num_clusters else np.zeros(1)
        stats.update(cluster_s=time.perf_counter() - cluster_start, total_s=time.perf_counter() - start,
                     num_clusters=float(num_clusters), num_outliers=float(num_outliers),
                     fraction_clustered=1 - num_outliers / n, mean_cluster_size=float(sizes.mean()),
                     max_cluster_size=float(sizes.max()))
        return ClusterResult(labels=labels, num_clusters=num_clusters, num_outliers=num_outliers, stats=stats)
