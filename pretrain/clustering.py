"""SpCL's per-epoch clustering step, sparse: k-reciprocal Jaccard distances, DBSCAN, self-paced criteria.

Ge, Zhu, Chen, Zhao and Li, "Self-paced Contrastive Learning with Hybrid Memory for Domain Adaptive
Object Re-ID", NeurIPS 2020: §3.2 (self-paced learning with the reliability criteria R_indep and R_comp,
Eqs. 6-7) as implemented in examples/spcl_train_usl.py; the Jaccard distance of Zhong, Zheng, Cao and
Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017 (§3.2-3.5), as
implemented in SpCL's ``compute_jaccard_distance``; both computed here without any N x N array.

The Jaccard distance (``jaccard_distance``), over N L2-normalised features:

1. kNN table, k1 columns per row, self included (the reference slices ``[:k1+1]`` of a k1-column faiss
   result, so it sees k1 columns). Neighbours are ranked by float64 cosine similarity, ties by index.
2. R(i, p) = the members j of row i's first p columns that have i among their own first p columns, for
   p = k1 and p = round(k1/2) + 1 (NumPy rounding; capped at k1, the table's width).
3. Expansion: R(c, round(k1/2)) of each c in R(i, k1) is merged in when |R(c, .) ∩ R(i, k1)| >
   2/3 |R(c, .)|, the comparison written as the reference writes it.
4. V[i, j] = softmax(-d) over the expanded set, d = 2 - 2 cos.
5. When k2 != 1, row i of V becomes the mean of V's rows over i's first min(k2, k1) columns.
6. m_ij = sum_l min(V[i, l], V[j, l]); d_ij = max(0, 1 - m_ij / (2 - m_ij)).

Nothing is N x N. The kNN table comes from a blocked brute-force scan (``knn_search``; faiss on GPU);
R(i, p) is the kNN pattern's first p columns times its transpose, entry by entry; the expansion test is a
product of N x N 0/1 CSR matrices with about k1 entries per row, in chunks of rows; V and its query
expansion are CSR matrices (a few times k1 entries per row). The min-sums are computed only for pairs that
share support, by walking V's column index from each entry (i, l) to the rows j > i of column l, chunk by
chunk: a chunk's pairs get compact ids through a stamp array (no sort) and one bincount sums each pair's
terms in ascending l, as the reference's running ``temp_min`` does; only pairs with d <= ``max_distance``
are kept, then mirrored. Pairs sharing no support are not stored and are implicitly at distance 1, so the
three DBSCAN runs of an epoch share one graph stored up to eps + gap. Memory grows with N times the
support size (measured ~2-3 kB per image at k1 = 30 on synthetic re-ID features, plus the features and the
search's buffers), time with N times the squared support size.

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
(a) Ranking: the search computes float32 inner products. On CPU it is a symmetric scan over blocks of
2,048 rows (``_blocked_top``: torch GEMMs, each block pair serving the rows of both blocks, so half the
products of a full scan, and only entries above a per-row floor kept); on GPU faiss's brute force. Each
row's k1 + 8 candidates are re-ranked by float64 similarities (sums of float64 products of the float32
features) with the index tie-break. A row is certified exact when its k1-th float64 similarity exceeds the
smallest float32 candidate similarity by more than the float32 error bound gamma_D = D u / (1 - D u), u =
2^-24 (valid for any summation order, hence for BLAS); otherwise it is searched again with k1 + 120
candidates, then computed whole in float64. What remains against a dense float64 reference is float64
summation order (~1e-16): it flips a neighbour only between similarities within ~1e-15 of each other that
are not exactly equal; exact ties (duplicates, dyadic features) are exact in both and resolved by index.
(b) The Jaccard values agree with a dense float64 evaluation to ~1e-15 (the weights' sums and the
similarities are summed in another order). That matters at exact-arithmetic ties, which are structural:
two images whose query expansions share four of their six rows (and nothing else) have m = 2/3, d = 0.5
exactly, computed as 0.5 +- 1e-16 depending on the order of the sums, and eps = 0.5 is a common choice.
So distances are rounded to 12 decimals, in the dense reference of the tests too: a tie at a decimal
eps then counts as a neighbour (<= eps, as exact arithmetic says) in both. Only distinct values within
~1e-12 of eps and of each other could still be decided differently.
The other searches (``int8``, ``ivf``, ``hnsw``) make no such promise: their recall against brute-force
search on 500 queries is reported in ``ClusterResult.stats["knn_recall"]``.

``knn="int8"`` is the same blocked scan on int8 features, q = round(x / s) with one scale s = max |x| / 127
for all rows (so products compare as integers along rows and columns), through exact int32 GEMMs
(``torch._int_mm``, VNNI kernels on x86): about 4x the float32 rate on the 2-core CPU here. Its k1 + 8
candidates get the same float64 re-ranking, so only the candidate set can differ from the exact one.
Rounding moves a similarity by at most |x| |r_y| + |r_x| |y| + |r_x| |r_y| (r = x - s q; |r| ~ 0.01 at
2048-d), typically by ~1e-4: a neighbour is missed only where the exact top k1 and the int8 top k1 + 8
disagree beyond that. That bound is too coarse to certify rows whose k1-th neighbour sits in the dense
floor of unrelated similarities, so nothing is certified. On the bench's 32,621 x 2048 features: 99.998 %
of the exact table (recall@30 1.0 on the 500 sampled queries) and labels identical to the dense
reference's.

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
- The exact search is the blocked float32 scan on CPU and faiss's brute force on GPU when
  ``faiss.get_num_gpus() > 0`` (as the reference always does), assuming its default full-fp32 GEMM;
  ``int8`` takes the GPU search too (it is a CPU speed path). ``knn="int8"``, ``"ivf"`` and ``"hnsw"``
  are approximate (not in the reference). ``ivf`` is IVF-Flat with faiss k-means lists (sqrt(nprobe N)
  of them, 40 training points per list, 10 iterations), each point probing ``ivf_nprobe`` lists (8 by
  default), scanned list by list with one GEMM per list instead of faiss's per-query scan (measured on
  the 2-core CPU here: ~2.4 G multiply-adds/s for faiss's IndexIVFFlat scan, ~6 for the list GEMMs), and
  symmetrically: a pair is scored when either point probes the other's list, which raises the recall of
  mutual neighbours, the ones k-reciprocal sets are made of. The scan costs ~sqrt(nprobe) N^1.5.
  Recall@30 against brute force on the bench's synthetic features at nprobe 8: 0.79 at 50k, 0.69 at
  200k, 0.54 at 1M (the far, noise-level neighbours are the ones missed); labels at 50k: ARI 0.90
  against exact kNN. ``hnsw`` is faiss's IndexHNSWFlat (M 32, efConstruction 80, efSearch 128); its
  build is slow on CPU (~1 min per 100k at 512-d here).
- DBSCAN runs single-threaded (the reference: n_jobs=-1; labels do not depend on it).
- ``method="hdbscan"`` is a method change (no reference uses it). The hdbscan package's
  precomputed mode needs a dense matrix or a connected sparse graph with >= min_samples stored entries
  per row; sklearn's HDBSCAN has the same requirements. So the dense-equivalent minimum spanning tree is
  built here from the full Jaccard graph (every pair sharing support, ``max_distance=None``): core
  distance = the min_samples-th smallest distance besides the point itself, 1 when fewer are stored
  (the implicit value; the hdbscan package computes it so on a dense matrix); mutual reachability
  max(core_i, core_j, d_ij) on stored pairs; scipy's MST per connected component (a zero weight stored as
  the smallest subnormal float, below every other weight, because scipy and the hdbscan package read a
  stored 0 as no edge; 1 / w overflows to the infinite lambda the package gives a zero); the components
  joined by edges of weight 1, which is what every missing pair weighs in the dense mutual-reachability
  graph. That tree goes to the package's public ``HDBSCAN(metric="precomputed", min_samples=1)`` as a
  sparse graph: with min_samples = 1 a point's core distance is its lightest edge, so every edge's mutual
  reachability is its own weight and the package's MST is the tree itself (its sparse path loops in
  Python over the 2(N - 1) entries: ~55 us per image here). The package orders the edges by numpy's
  default sort, which is unstable and CPU-dependent, and which of two tied edges merges first changes the
  condensed tree (ARI 0.93 between two tie orders on 3,000 synthetic features, min_samples 4), so ties
  are broken first, in the stable order of the MST's edges: each weight is raised to at least one ulp
  above the one before, so the k-th of k tied weights moves by about k ulps (2.2e-16 k relative), and
  lambdas and excess-of-mass stabilities by as little. Mutual reachability is full of ties (each edge
  carries a core distance), so the MST is not unique: the clusters equal the package's on the dense
  matrix, but a few points hanging on tied edges may be labelled differently (as two valid dense MSTs
  would); with min_samples = 1 and no tie among the tree's positive weights the labels are the package's.
  The self-paced criteria are not applied: they are defined through DBSCAN's eps (tight and loose runs at
  eps -/+ gap), which HDBSCAN does not have; its own excess-of-mass selection already keeps the
  persistent clusters. The full graph holds
  every pair sharing support (tens per image, see ``graph_nnz_per_row``), several times the DBSCAN graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse import csgraph
from sklearn.cluster import DBSCAN

from reidforge.shared.config import bounded, choice

_MARGIN = 8  # candidates per row beyond k, so that the float32 boundary is settled among them
_WIDE_MARGIN = 120  # second search for the rows the first could not certify
_QUERY_CHUNK = 1 << 14  # queries searched and re-ranked at once
_PAIR_CHUNK = 1 << 13  # pairs whose float64 similarities are computed at once
_TRIPLE_CHUNK = 1 << 14  # (i, l, j) terms of the min-sums handled at once (cache-sized)
_CHUNK_ROWS = 64  # rows per min-sum chunk at most, which bounds its rows x distinct-j accumulator
_FULL_ROW_CHUNK = 1 << 22  # float64 similarities of whole rows computed at once (fallback)
_RANK_CHUNK = 1 << 9  # candidate vectors gathered (float32, then float64) per re-ranking step
_BLOCK = 2048  # rows per block of the blocked brute-force scan: one block product is 16 MB
_HOLD = 2  # the blocked scan cuts its candidates to each row's top once it holds this many per row and slot
_IVF_NPROBE = 8  # default inverted lists visited per query; sqrt(nprobe N) lists balance assignment and scan
_IVF_TRAIN_PER_LIST = 40  # k-means training points per list (faiss warns below 39)
_IVF_NITER = 10  # k-means iterations
_HNSW_M, _HNSW_EF_CONSTRUCTION, _HNSW_EF_SEARCH = 32, 80, 128
_RECALL_QUERIES = 500  # queries for the approximate indices' recall against brute-force search
_NORM_TOL = 1e-3  # accepted |norm - 1| of a feature row
_DECIMALS = 12  # Jaccard distances are rounded to this many decimals: exact-arithmetic ties at eps count in
_UNIT = 2.0**-24  # float32 unit roundoff
_INDICES = ("exact", "int8", "ivf", "hnsw")


@dataclass
class ClusterConfig:
    """Clustering hyper-parameters; the defaults are SpCL's."""

    method: str = choice("dbscan", "hdbscan")
    eps: float = bounded(0.6, 0, None, lo_open=True)
    eps_gap: float = bounded(0.02, 0)  # tight = eps - gap, loose = eps + gap
    min_samples: int = bounded(4, 1)
    k1: int = bounded(30, 1)
    k2: int = bounded(6, 1)
    knn: str = choice("exact", "int8", "ivf", "hnsw")  # kNN search (module docstring); GPU faiss when available
    ivf_nprobe: int = bounded(_IVF_NPROBE, 1)  # knn=ivf: lists each point probes (of sqrt(nprobe N)); more = higher recall, slower
    independence_quantile: float = bounded(0.9, 0, 1)  # SpCL: threshold fixed at the first clustering
    self_paced: bool = True  # False = plain DBSCAN labels (no reliability criteria)
    drop_outliers: bool = False  # cluster-contrast style: un-clustered -> label -1 instead of singleton ids
    hdbscan_min_cluster_size: int = bounded(4, 2)
    hdbscan_cluster_selection: str = choice("eom", "leaf")


@dataclass
class ClusterResult:
    labels: np.ndarray  # (N,) int64: clusters 0..K-1, then each un-clustered image its own id (or -1)
    num_clusters: int  # K: clusters with >= 2 members after the criteria
    num_outliers: int  # un-clustered images
    stats: dict[str, float]


def _check_features(features: np.ndarray) -> np.ndarray:
    """The features as C-contiguous float32, after the checks every entry point needs."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"features must be a 2-D (N, D) array with N >= 2, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # NaN/inf anywhere in a row shows in its norm
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise ValueError(f"features must be finite: row {bad[0]} contains NaN or inf")
    off = np.abs(np.sqrt(sq) - 1)
    worst = int(np.argmax(off))
    if off[worst] > _NORM_TOL:
        raise ValueError(f"features must be L2-normalised rows: row {worst} has norm {math.sqrt(sq[worst]):.6g}")
    return x


def _check_search(index: str, nprobe: int) -> None:
    """The kNN arguments of the public entry points."""
    if index not in _INDICES:
        raise ValueError(f"index must be one of {', '.join(_INDICES)}, got {index!r}")
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got nprobe={nprobe}")


def _check_k(k: int, n: int, name: str = "k1") -> None:
    if not 1 <= k < n:
        raise ValueError(f"{name} must be in [1, N) with N = {n} features, got {name}={k}")


def _pair_sims(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Float64 inner products of the pairs (rows[t], cols[t]), _RANK_CHUNK pairs at a time; symmetric
    in the pair."""
    table = torch.from_numpy(x)
    out = np.empty(len(rows))
    for s in range(0, len(rows), _RANK_CHUNK):
        a, b = (torch.index_select(table, 0, torch.from_numpy(ends[s:s + _RANK_CHUNK])) for ends in (rows, cols))
        out[s:s + _RANK_CHUNK] = (a.double() * b.double()).sum(1).numpy()
    return out


def _flat_index(x: np.ndarray) -> faiss.Index:
    """Exact inner-product search over ``x``; on all GPUs when faiss has any."""
    index = faiss.IndexFlatIP(x.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def _hnsw_index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexHNSWFlat(x.shape[1], _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = _HNSW_EF_SEARCH
    index.add(x)
    return index


def _ivf_candidates(x: np.ndarray, take: int, nprobe: int, stats: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """IVF-Flat search of every row among all rows: float32 similarities and ids (N x take, -1 = none).

    Each point probes the lists of its nprobe most similar k-means centroids, as faiss's IndexIVFFlat
    does, but the scan runs list by list: the queries probing a list against its members are one GEMM,
    whose rows update the queries' running top ``take`` and whose columns the members' (a pair is
    scored when either point probes the other's list; a pair scored twice is kept once).
    """
    n, dim = x.shape
    nlist = max(1, min(int(round(math.sqrt(nprobe * n))), n // _IVF_TRAIN_PER_LIST))
    nprobe = min(nprobe, nlist)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, nlist * _IVF_TRAIN_PER_LIST), replace=False))
    kmeans = faiss.Kmeans(dim, nlist, niter=_IVF_NITER, spherical=True, seed=1)
    kmeans.train(x[sample])
    _, probes = _flat_index(kmeans.centroids).search(x, nprobe)  # probes[:, 0] is the point's own list
    members = np.argsort(probes[:, 0], kind="stable")
    member_at = np.concatenate([[0], np.cumsum(np.bincount(probes[:, 0], minlength=nlist))])
    queries = np.argsort(probes.ravel(), kind="stable") // nprobe
    query_at = np.concatenate([[0], np.cumsum(np.bincount(probes.ravel(), minlength=nlist))])
    del probes
    best_s = np.full((n, take), -np.inf, np.float32)
    best_i = np.full((n, take), -1, np.int64)
    for lst in range(nlist):
        m = members[member_at[lst]:member_at[lst + 1]]
        q = queries[query_at[lst]:query_at[lst + 1]]
        if len(m) and len(q):
            sims = x[q] @ x[m].T
            _merge_top(best_s, best_i, q, sims, m)
            _merge_top(best_s, best_i, m, sims.T, q)  # the block also serves the members: symmetric probing
    stats.update(ivf_nlist=float(nlist), ivf_nprobe=float(nprobe))
    return best_s, best_i


def _rank(x: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (len(rows) x c; -1 = none) sorted by float64 similarity to their row, ties by index;
    missing candidates get -inf and go last. The float32 candidate vectors are gathered _RANK_CHUNK at a
    time and widened to float64, where their products with the row are exact and summed by BLAS."""
    c, dim = cand.shape[1], x.shape[1]
    step = max(1, _RANK_CHUNK // c)
    table = torch.from_numpy(x)
    gathered = torch.empty(step * c, dim)
    wide = torch.empty(step * c, dim, dtype=torch.float64)
    sims = np.empty(cand.shape)
    for s in range(0, len(rows), step):
        part = np.maximum(cand[s:s + step], 0)
        m = part.size
        torch.index_select(table, 0, torch.from_numpy(part.ravel()), out=gathered[:m])
        wide[:m].copy_(gathered[:m])
        left = x[rows[s:s + step]].astype(np.float64)
        sims[s:s + step] = np.matmul(wide[:m].numpy().reshape(len(part), c, dim), left[:, :, None])[:, :, 0]
    sims[cand < 0] = -np.inf
    order = np.lexsort((cand, -sims), axis=-1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(cand, order, 1)


def _full_rows(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of whole rows: float64 similarities to every point; everything tied with the k-th
    (with a slack for the re-ranking's own rounding) is re-ranked, so ties are broken by index."""
    n = len(x)
    sims, ids = np.empty((len(rows), k)), np.empty((len(rows), k), np.int64)
    step = max(1, _FULL_ROW_CHUNK // n)
    for s in range(0, len(rows), step):
        part = rows[s:s + step]
        left = x[part].astype(np.float64)
        full = np.empty((len(part), n))
        for c0 in range(0, n, _PAIR_CHUNK):
            full[:, c0:c0 + _PAIR_CHUNK] = left @ x[c0:c0 + _PAIR_CHUNK].T.astype(np.float64)
        kth = -np.partition(-full, k - 1, axis=1)[:, k - 1]
        for r, row in enumerate(part):
            cand = np.flatnonzero(full[r] >= kth[r] - 1e-12)
            s64, cand = _rank(x, np.array([row]), cand[None, :])
            sims[s + r], ids[s + r] = s64[0, :k], cand[0, :k]
    return sims, ids


def _merge_top(best_s: np.ndarray, best_i: np.ndarray, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
    """Merge the block ``sims`` (len(rows) x len(ids)) into the running top candidates of ``rows``
    (distinct); an id already held is not taken twice."""
    take = best_s.shape[1]
    if sims.shape[1] > take:
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        sims, ids = np.take_along_axis(sims, top, 1), ids[top]
    else:
        ids = np.broadcast_to(ids, sims.shape)
    cat_i = np.concatenate([best_i[rows], ids], 1)
    by_id = np.argsort(cat_i, axis=1, kind="stable")
    cat_i = np.take_along_axis(cat_i, by_id, 1)
    cat_s = np.take_along_axis(np.concatenate([best_s[rows], sims], 1), by_id, 1)
    again = np.zeros(cat_i.shape, bool)
    again[:, 1:] = cat_i[:, 1:] == cat_i[:, :-1]  # the same pair seen in two blocks
    cat_s[again], cat_i[again] = -np.inf, -1
    keep = np.argpartition(-cat_s, take - 1, axis=1)[:, :take]
    best_s[rows], best_i[rows] = np.take_along_axis(cat_s, keep, 1), np.take_along_axis(cat_i, keep, 1)


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """float32 matrix products in full precision (the error bound assumes it), whatever the caller set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _scan_operand(x: np.ndarray, kind: str) -> tuple[torch.Tensor, float]:
    """The rows as the blocked scan multiplies them, and the factor from their products to similarities:
    float32 as they are, or int8 with one scale for all rows, so that products compare as integers
    along rows and columns alike."""
    rows = torch.from_numpy(x)
    if kind != "int8":
        return rows, 1.0
    scale = max(float(x.max()), -float(x.min())) / 127  # > 0: the rows have unit norm
    quantized = torch.empty(x.shape, dtype=torch.int8)
    for s in range(0, len(x), _BLOCK):
        quantized[s:s + _BLOCK] = torch.round(rows[s:s + _BLOCK] / scale)
    return quantized, scale * scale


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a b^T into the front of the flat buffer ``out``: exact int32 sums of int8 products (oneDNN's VNNI
    kernels), or float32."""
    out = out[:len(a) * len(b)].view(len(a), len(b))
    return torch._int_mm(a, b.T, out=out) if a.dtype == torch.int8 else torch.mm(a, b.T, out=out)


def _lowest(dtype: torch.dtype) -> int | float:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min


def _ordinal(vals: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) ordered as ``vals`` (int32, or finite float32 through its bit pattern)."""
    if vals.dtype == torch.int32:
        return vals.long() + 2**31
    bits = vals.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1) + 2**31


def _top_per_row(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, start: int, end: int,
                 take: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``take`` largest (row, col, val) triples of each row in [start, end), rows ascending and values
    descending (ties in the order given), and each row's take-th value (the dtype's lowest where a row
    has fewer)."""
    order = torch.sort(rows.long() * 2**32 + (2**32 - 1 - _ordinal(vals)), stable=True).indices  # rows, then -vals
    rows, cols, vals = rows[order], cols[order], vals[order]
    local = rows.long() - start
    counts = torch.bincount(local, minlength=end - start)
    rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[local]
    keep = rank < take
    rows, cols, vals, rank, local = rows[keep], cols[keep], vals[keep], rank[keep], local[keep]
    floor = torch.full((end - start,), _lowest(vals.dtype), dtype=vals.dtype)
    last = rank == take - 1
    floor[local[last]] = vals[last]
    return rows, cols, vals, floor


def _blocked_top(feat: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` largest products of every row with all rows, itself included: (N, take) values,
    descending, and their ids. ``take`` <= N.

    A symmetric scan over blocks of _BLOCK rows, so half the products of a full scan. The diagonal
    blocks come first: each row's top ``take`` within its own block is a lower bound (its floor) of the
    row's final take-th product. Then each pair of blocks I < J is one product: its entries at or above
    their row's floor become candidates of the rows of I, those at or above their column's floor
    candidates of the rows of J, so nothing is transposed and only entries that can still make a row's
    top are held. A block whose rows hold more than _HOLD ``take`` candidates each is cut to each row's
    top, which also raises their floors; once I has met every J its rows are final. Every (row, column)
    pair is produced once, and memory stays at one product plus a few ``take`` candidates per row."""
    n = len(feat)
    starts = list(range(0, n, _BLOCK))
    ends = starts[1:] + [n]
    dtype = torch.int32 if feat.dtype == torch.int8 else feat.dtype
    floor = torch.full((n,), _lowest(dtype), dtype=dtype)
    held: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in starts]
    # one product and one mask, reused: fresh 16-64 MB arrays per block pair fragment the heap
    side = min(n, _BLOCK)
    product, mask = torch.empty(side * side, dtype=dtype), torch.empty(side * side, dtype=torch.bool)

    def cut(b: int) -> None:
        r, c, v = (torch.cat(part) for part in zip(*held[b]))
        r, c, v, floor[starts[b]:ends[b]] = _top_per_row(r, c, v, starts[b], ends[b], take)
        held[b] = [(r, c, v)]

    for b, (i0, i1) in enumerate(zip(starts, ends)):
        v, c = torch.topk(_product(feat[i0:i1], feat[i0:i1], product), min(take, i1 - i0), dim=1)
        held[b].append((torch.arange(i0, i1, dtype=torch.int32).repeat_interleave(v.shape[1]), (c + i0).int().ravel(),
                        v.ravel()))
        if v.shape[1] == take:
            floor[i0:i1] = v[:, -1]
    for a, (i0, i1) in enumerate(zip(starts, ends)):
        for b in range(a + 1, len(starts)):
            j0, j1 = starts[b], ends[b]
            s = _product(feat[i0:i1], feat[j0:j1], product)
            above = mask[:s.numel()].view(s.shape)
            r, c = torch.nonzero(torch.ge(s, floor[i0:i1, None], out=above), as_tuple=True)  # candidates of I's rows
            held[a].append(((r + i0).int(), (c + j0).int(), s[r, c]))
            r, c = torch.nonzero(torch.ge(s, floor[None, j0:j1], out=above), as_tuple=True)  # and of J's
            held[b].append(((c + j0).int(), (r + i0).int(), s[r, c]))
            for blk in (a, b):
                if sum(len(part[0]) for part in held[blk]) > _HOLD * (ends[blk] - starts[blk]) * take:
                    cut(blk)
        cut(a)
    return (torch.cat([h[0][2] for h in held]).view(n, take),
            torch.cat([h[0][1] for h in held]).long().view(n, take))


def _rows_top(x: np.ndarray, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 brute force for some rows: their ``width`` largest similarities (descending) and ids."""
    table = torch.from_numpy(x)
    sims, ids = np.empty((len(rows), width), np.float32), np.empty((len(rows), width), np.int64)
    step = max(1, _FULL_ROW_CHUNK // len(x))
    with _full_float32():
        for s in range(0, len(rows), step):
            v, c = torch.topk(table[torch.from_numpy(rows[s:s + step])] @ table.T, width, dim=1)
            sims[s:s + step], ids[s:s + step] = v.numpy(), c.numpy()
    return sims, ids


def _knn(x: np.ndarray, k: int, kind: str, stats: dict[str, float],
         nprobe: int = _IVF_NPROBE) -> tuple[np.ndarray, np.ndarray]:
    n, dim = x.shape
    # |float32 <x, y> - <x, y>| <= gamma_D |x| |y| for any summation order, plus the float64 re-ranking's own
    err = dim * _UNIT / (1 - dim * _UNIT) * (1 + _NORM_TOL) ** 2 + 1e-12
    start = time.perf_counter()
    take = min(n, k + _MARGIN)
    brute = kind in ("exact", "int8")
    if kind == "hnsw" or (brute and faiss.get_num_gpus() > 0):
        index = _hnsw_index(x) if kind == "hnsw" else _flat_index(x)

        def search(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            return index.search(x[rows], width)
    else:
        if kind == "ivf":
            cand_s, cand_i = _ivf_candidates(x, take, nprobe, stats)
        else:
            feat, unit = _scan_operand(x, kind)
            with _full_float32():
                cand_s, cand_i = _blocked_top(feat, take)
            cand_s, cand_i = cand_s.numpy().astype(np.float32) * np.float32(unit), cand_i.numpy()

        def search(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            return (cand_s[rows], cand_i[rows]) if width == take else _rows_top(x, rows, width)
    stats["knn_index_s"] = time.perf_counter() - start
    sims, ids = np.empty((n, k)), np.empty((n, k), np.int64)
    retry = []
    for q0 in range(0, n, _QUERY_CHUNK):
        rows = np.arange(q0, min(n, q0 + _QUERY_CHUNK))
        s32, cand = search(rows, take)
        s64, cand = _rank(x, rows, cand)
        sims[rows], ids[rows] = s64[:, :k], cand[:, :k]
        if kind == "exact":
            certain = (cand.shape[1] == n) | (s64[:, k - 1] > s32.min(axis=1) + err)
        else:  # approximate: only rows the index could not fill are redone
            certain = np.isfinite(s64[:, k - 1])
        retry.append(rows[~certain])
    retry = np.concatenate(retry)
    stats["knn_rows_widened"] = float(len(retry))
    if retry.size and kind == "exact" and take < n:
        s32, cand = search(retry, min(n, k + _WIDE_MARGIN))
        s64, cand = _rank(x, retry, cand)
        certain = (cand.shape[1] == n) | (s64[:, k - 1] > s32.min(axis=1) + err)
        sims[retry[certain]], ids[retry[certain]] = s64[certain, :k], cand[certain, :k]
        retry = retry[~certain]
    stats["knn_rows_full"] = float(len(retry))
    if retry.size:
        sims[retry], ids[retry] = _full_rows(x, retry, k)
    if kind != "exact":
        sample = np.random.default_rng(1).choice(n, min(n, _RECALL_QUERIES), replace=False)
        truth = _rank(x, sample, _rows_top(x, sample, take)[1])[1][:, :k]
        stats["knn_recall"] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids[sample], truth)]) / k)
    stats["knn_s"] = time.perf_counter() - start
    return sims, ids


def knn_search(features: np.ndarray, k: int, index: str = "exact",
               nprobe: int = _IVF_NPROBE) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every row among all rows, self included: (N, k) float64 cosine
    similarities, descending, and (N, k) int64 ids, ties by index. ``index="exact"`` is certified exact
    (module docstring); ``"int8"`` (the same blocked scan on int8 features), ``"ivf"`` (IVF-Flat:
    sqrt(nprobe N) k-means lists, each point probing ``nprobe``) and ``"hnsw"`` (M 32, efSearch 128) are
    approximate; their k + 8 candidates are re-ranked the same way."""
    _check_search(index, nprobe)  # the arguments first: checking the features reads them all
    x = _check_features(features)
    _check_k(k, len(x), "k")
    return _knn(x, k, index, {}, nprobe)


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


def _expanded_weights(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, k1: int) -> sp.csr_matrix:
    """V before query expansion (steps 2-4): softmax(-d) over each expanded k-reciprocal set, in chunks of
    rows so that the pairwise products of the k-reciprocal sets stay small."""
    n = len(x)
    recip = _reciprocal(ids, k1)
    recip_half = _reciprocal(ids, min(k1, int(np.around(k1 / 2)) + 1))
    half_len = np.diff(recip_half.indptr)
    half_t = recip_half.T.tocsr()
    # the kNN table sorted by id: members found there have their similarity already
    by_id = np.argsort(ids, axis=1)
    ids_by_id, sims_by_id = np.take_along_axis(ids, by_id, 1), np.take_along_axis(sims, by_id, 1)
    del by_id
    data, indices, lens = [], [], []
    for r0 in range(0, n, _QUERY_CHUNK):
        r1 = min(n, r0 + _QUERY_CHUNK)
        block = recip[r0:r1]
        # (i, c) for c in R(i, k1), valued |R(c, k1/2) ∩ R(i, k1)|
        overlap = block.multiply(block @ half_t).tocsr()
        local = np.repeat(np.arange(r1 - r0), np.diff(overlap.indptr))
        accept = overlap.data > 2 / 3 * half_len[overlap.indices]
        merged = sp.csr_matrix((np.ones(np.count_nonzero(accept), np.int32), (local[accept], overlap.indices[accept])),
                               shape=(r1 - r0, n))
        expanded = (block + merged @ recip_half).tocsr()
        expanded.sum_duplicates()  # one entry per member, columns sorted
        local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(expanded.indptr))
        cols = expanded.indices.astype(np.int64)
        known = (np.arange(r1 - r0, dtype=np.int64)[:, None] * n + ids_by_id[r0:r1]).ravel()  # sorted
        wanted = local * n + cols
        at = np.minimum(np.searchsorted(known, wanted), len(known) - 1)
        found = known[at] == wanted
        s = np.empty(len(cols))
        s[found] = sims_by_id[r0:r1].ravel()[at[found]]
        s[~found] = _pair_sims(x, r0 + local[~found], cols[~found])
        weight = np.exp(-(2 - 2 * s))
        weight /= np.bincount(local, weights=weight, minlength=r1 - r0)[local]
        data.append(weight)
        indices.append(expanded.indices)
        lens.append(np.diff(expanded.indptr))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate(lens), out=indptr[1:])
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n, n))


def _shared_pairs(v: sp.csr_matrix, max_distance: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, d_ij) for the pairs j > i whose rows of ``v`` (sorted indices) share support and whose
    d_ij = max(0, 1 - m/(2 - m)), m = sum_l min(v_il, v_jl), rounded to _DECIMALS decimals, is
    <= ``max_distance`` (all when None).

    Walks v's column index from each entry (i, l) to the rows j >= i of column l, a chunk of rows at a
    time (about _TRIPLE_CHUNK terms, at most _CHUNK_ROWS rows). Each chunk's pairs get compact ids (the
    distinct j through a stamp array, no sort) and one bincount sums their terms, each pair's in
    ascending l, as the reference's running ``temp_min`` does.
    """
    n = v.shape[0]
    index_type = np.int32 if v.nnz < 2**31 else np.int64
    # scipy's CSR -> CSC transpose is a counting sort: rows ascending within each column, the same slots
    # for v and for the positions of v's entries
    v_cols = v.tocsc()
    slot = sp.csr_matrix((np.arange(v.nnz, dtype=index_type), v.indices, v.indptr), shape=v.shape).tocsc().data
    # per entry (i, l) of v, the rows j >= i of column l: first[e] .. the end of column l
    first = np.empty(v.nnz, index_type)
    first[slot] = np.arange(v.nnz, dtype=index_type)
    del slot
    terms_before = np.zeros(v.nnz + 1, np.int64)
    np.cumsum(v_cols.indptr[v.indices + 1] - first, out=terms_before[1:])
    row_terms = terms_before[v.indptr[1:]]  # terms of rows 0..i
    del terms_before
    stamp, local = np.empty(n, np.int64), np.empty(n, np.int64)
    out_i, out_j, out_d = [], [], []
    r0 = 0
    while r0 < n:
        budget = (row_terms[r0 - 1] if r0 else 0) + _TRIPLE_CHUNK
        r1 = min(r0 + _CHUNK_ROWS, max(r0 + 1, int(np.searchsorted(row_terms, budget, side="right"))))
        e0, e1 = v.indptr[r0], v.indptr[r1]
        cnt = (v_cols.indptr[v.indices[e0:e1] + 1] - first[e0:e1]).astype(np.int64)
        total = int(cnt.sum())
        at = np.repeat(first[e0:e1] - (np.cumsum(cnt) - cnt), cnt) + np.arange(total)
        j = v_cols.indices[at]
        terms = np.minimum(np.repeat(v.data[e0:e1], cnt), v_cols.data[at])
        order = np.arange(total)
        stamp[j] = order  # the last occurrence of each j wins: one representative per distinct j
        distinct = j[stamp[j] == order]
        local[distinct] = np.arange(len(distinct))
        key = np.repeat(np.repeat(np.arange(r1 - r0), np.diff(v.indptr[r0:r1 + 1])), cnt) * len(distinct) + local[j]
        m = np.bincount(key, weights=terms, minlength=(r1 - r0) * len(distinct))
        pair = np.flatnonzero(m)  # every term is > 0, so the pairs that occur
        d = np.round(np.maximum(1 - m[pair] / (2 - m[pair]), 0), _DECIMALS)
        pi, pj = r0 + pair // len(distinct), distinct[pair % len(distinct)]
        keep = pj != pi
        if max_distance is not None:
            keep &= d <= max_distance
        out_i.append(pi[keep])
        out_j.append(pj[keep])
        out_d.append(d[keep])
        r0 = r1
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def _jaccard(x: np.ndarray, k1: int, k2: int, index: str, max_distance: float | None,
             stats: dict[str, float], nprobe: int = _IVF_NPROBE) -> sp.csr_matrix:
    n = len(x)
    sims, ids = _knn(x, k1, index, stats, nprobe)
    start = time.perf_counter()
    v = _expanded_weights(x, sims, ids, k1)
    if k2 != 1:
        expansion = ids[:, :min(k2, k1)]
        v = (_pattern(expansion, n, np.float64) @ v).tocsr()  # sums in rank order, as np.mean over rows
        v.data /= expansion.shape[1]
        v.sort_indices()
    del sims, ids
    stats["v_nnz_per_row"] = v.nnz / n
    rows, cols, d = _shared_pairs(v, max_distance)
    # the diagonal: 0, or 1 where the row of v is empty (then nothing is shared with itself either)
    diag = np.where(np.diff(v.indptr) > 0, 0.0, 1.0)
    del v
    every = np.arange(n, dtype=np.int64)
    rows, cols = np.concatenate([rows, cols, every]), np.concatenate([cols, rows, every])
    d = np.concatenate([d, d, diag])
    order = np.lexsort((cols, d, rows))  # rows sorted by distance, ties by column
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    graph = sp.csr_matrix((d[order], cols[order], indptr), shape=(n, n))
    stats["jaccard_s"] = time.perf_counter() - start
    stats["graph_nnz_per_row"] = graph.nnz / n
    return graph


def jaccard_distance(features: np.ndarray, k1: int = 30, k2: int = 6, index: str = "exact",
                     max_distance: float | None = None, nprobe: int = _IVF_NPROBE) -> sp.csr_matrix:
    """SpCL's k-reciprocal Jaccard distance of L2-normalised features (N x D) as an N x N CSR matrix:
    every pair sharing support (entries <= ``max_distance`` only, when given) plus the diagonal; pairs
    not stored are at distance 1. Rows are sorted by distance, ties by column. See the module docstring."""
    _check_search(index, nprobe)  # the arguments first: checking the features reads them all
    if k2 < 1:
        raise ValueError(f"k2 must be >= 1, got k2={k2}")
    x = _check_features(features)
    _check_k(k1, len(x))
    return _jaccard(x, k1, k2, index, max_distance, {}, nprobe)


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
    """HDBSCAN labels (noise -1) of the full Jaccard graph, through the dense-equivalent MST (module docstring)."""
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
            (cfg.knn in _INDICES, f"knn must be one of {', '.join(_INDICES)}, got {cfg.knn!r}"),
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

    def __call__(self, features: np.ndarray) -> ClusterResult:
        cfg = self.cfg
        start = time.perf_counter()
        x = _check_features(features)
        _check_k(cfg.k1, len(x))
        stats: dict[str, float] = {"n": float(len(x))}
        if cfg.method == "hdbscan":
            max_distance = None
        else:
            max_distance = cfg.eps + cfg.eps_gap if cfg.self_paced else cfg.eps
        graph = _jaccard(x, cfg.k1, cfg.k2, cfg.knn, max_distance, stats, cfg.ivf_nprobe)
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
                     fraction_clustered=1 - num_outliers / len(x), mean_cluster_size=float(sizes.mean()),
                     max_cluster_size=float(sizes.max()))
        return ClusterResult(labels=labels, num_clusters=num_clusters, num_outliers=num_outliers, stats=stats)
