"""SpCL's clustering step shared by all ranks: each rank computes the kNN rows, V rows and Jaccard graph
rows of its contiguous block of features; rank 0 runs DBSCAN and the self-paced criteria on the gathered
graph (``pretrain/clustering.py``, Ge et al., NeurIPS 2020, §3.2), and the labels are SelfPacedClustering's.

W ranks, N features of dimension d in W contiguous blocks (``row_bounds``, the split of SpCL's feature
extraction), block r of n_r = N / W rows held by rank r as float32. Per stage, what rank r computes and
what it exchanges (bytes per rank, k1 = 30 by default, s_V ~ 100 nonzeros per row of V, ``v_nnz_per_row``):

1. kNN scan: every block is broadcast in turn as float16 (d 2 bytes per row): rank r receives
   2 d (N - n_r) bytes and multiplies its rows with all N (float16 values, float32 sums; products on CPU
   in float32 like the single-process scan's CPU path, on CUDA float16 GEMMs with float32 output),
   keeping each row's k1 + 8 largest. It never holds more than its block and one other in float16.
2. Re-ranking and certification (``pretrain/knn.py``): the exact float32 vectors of the candidates are
   fetched from their owners (at most 4 d (k1 + 8) n_r bytes, all-to-all) and ranked in float64, ties by
   index. A row is certified when its k1-th float64 similarity exceeds its smallest candidate's float16
   similarity by more than the float16 scan's bound e (``_product_error``). An uncertified row takes a
   second broadcast pass that collects every column whose float16 similarity is >= a - 2e, a = its
   k1-th largest float16 similarity of the first pass: a column left out has exact similarity < a - e,
   while k1 columns have >= a - e, so ranking the collected columns' fetched exact vectors in float64
   gives the row's exact top k1 (no whole float64 row as in one process's last resort).
3. The kNN table (N x k1 int64, 8 k1 N bytes) is all-gathered; each rank builds R(i, k1) and R(i, k1/2)
   of all rows from it (``ReciprocalSets``) and V's rows of its block (``expanded_rows``), fetching the
   exact vectors of expanded members outside its rows' kNN lists (float32, all-to-all, one round per
   chunk of 16,384 rows).
4. Query expansion: the CSR rows of V of its rows' first k2 neighbours are fetched (12 s_V bytes per
   row, at most 12 s_V k2 n_r bytes); V's expanded rows are summed in rank order as one process sums them.
5. Jaccard pairs: a mask of the columns of its expanded rows is all-gathered (N bytes from each rank);
   rank r receives the expanded rows of the other ranks that share a column with its own (12 s_V bytes
   each, at most 12 s_V (N - n_r)) and computes the min-sums of the pairs (i, j) of its rows i with
   i < j, i + j even or i > j, i + j odd, so that each pair is computed once and every rank gets about
   half of its rows' pairs. The pairs with d <= eps + gap go to rank 0 (24 bytes per pair, ~12 N
   pairs in all at SpCL's settings), which builds the graph (``symmetric_graph``), runs the three DBSCANs
   and the criteria (``SelfPacedClustering.cluster_graph``); the caller broadcasts the labels.

Why the labels are one process's: the float64 similarities, V's weights (the same sums in the same order),
the min-sums (each pair's terms in ascending column, as the single-process walk adds them) and the
rounding to 12 decimals are the single process's definitions, and the certified kNN table is the
exact float64 ranking either way. What may differ is the last bit of a float64 similarity (BLAS sums a
candidate's product in an order that depends on its place among the row's candidates), so a distance may
differ by one rounding quantum (1e-12): a DBSCAN decision changes only for a distance within 1e-12 of
eps, the caveat ``pretrain/clustering.py`` already states against a dense evaluation, and a neighbour's
rank only between similarities within ~1e-15 of each other.

Only ``method: dbscan`` with ``knn: exact`` is shared (``shared_clustering``); HDBSCAN's per-row nearest
entries and the approximate indices cluster on rank 0 alone. The collectives run on a gloo group of
their own (CPU tensors) whose timeout follows the clustering's measured time (``clustering_timeout``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta

import numba
import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from reidforge.pretrain.clustering import (_DECIMALS, _ROW_CHUNK, ClusterResult, ReciprocalSets, SelfPacedClustering,
                                           _pair_sims, expanded_rows, jaccard_of, stack_rows, symmetric_graph)
from reidforge.pretrain.knn import (_BLOCK, _MARGIN, _full_precision, _product, _product_error, _rank,
                                    _resolve, check_features, check_k)

TIMEOUT_MARGIN = 4.0  # the clustering may take this many times the previous epoch's before a rank is declared lost
TIMEOUT_FLOOR_S = 600.0  # and never less than this: the first epochs' features cluster fastest


def clustering_timeout(previous_seconds: float | None, default_minutes: float) -> timedelta:
    """How long a rank waits for the others during the clustering: TIMEOUT_MARGIN times the previous
    epoch's measured clustering seconds, at least TIMEOUT_FLOOR_S; ``default_minutes`` (the run's
    ``dist_timeout_minutes``) before any epoch was measured."""
    if previous_seconds is None:
        return timedelta(minutes=default_minutes)
    return timedelta(seconds=max(TIMEOUT_FLOOR_S, TIMEOUT_MARGIN * previous_seconds))


def shared_clustering(clustering: SelfPacedClustering) -> bool:
    """Whether ``distributed_cluster`` shares this clustering among the ranks (module docstring)."""
    return clustering.cfg.method == "dbscan" and clustering.cfg.knn == "exact"


def row_bounds(n: int, world: int) -> np.ndarray:
    """The W + 1 bounds of the ranks' contiguous blocks of N rows."""
    return np.linspace(0, n, world + 1).astype(np.int64)


class _Ranks:
    """This rank's place in the group and the all-to-all exchanges of numpy arrays."""

    def __init__(self, group: dist.ProcessGroup, bounds: np.ndarray):
        self.group, self.bounds = group, bounds
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.lo, self.hi = int(bounds[self.rank]), int(bounds[self.rank + 1])

    def exchange(self, send: list[np.ndarray]) -> list[np.ndarray]:
        """send[s] to rank s (one dtype, any leading length, equal trailing shape); returns what each rank
        sent here."""
        tail, dtype = send[0].shape[1:], send[0].dtype
        counts = torch.tensor([len(a) for a in send], dtype=torch.int64)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)
        width = math.prod(tail)
        flat = torch.from_numpy(np.ascontiguousarray(np.concatenate(send)).reshape(-1).view(np.uint8))
        out = torch.empty(int(got.sum()) * width * dtype.itemsize, dtype=torch.uint8)
        dist.all_to_all_single(out, flat, (got * width * dtype.itemsize).tolist(),
                               (counts * width * dtype.itemsize).tolist(), group=self.group)
        parts = np.split(out.numpy().view(dtype).reshape(-1, *tail), np.cumsum(got.numpy())[:-1])
        return parts

    def owners(self, ids: np.ndarray) -> list[np.ndarray]:
        """Sorted global ids split by the rank that owns them."""
        return np.split(ids, np.searchsorted(ids, self.bounds[1:-1]))

    def fetch(self, local: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (sorted, unique) of the distributed array whose block here is ``local``."""
        asked = self.exchange(self.owners(ids))
        got = self.exchange([local[a - self.lo] for a in asked])
        return np.concatenate(got) if got else local[:0]

    def all_gather(self, part: np.ndarray) -> np.ndarray:
        """The ranks' blocks concatenated in rank order (blocks of ``bounds`` rows)."""
        parts = self.exchange([part] * self.world)
        return np.concatenate(parts)


def _scan(ranks: _Ranks, mine: torch.Tensor, visit: Callable[[torch.Tensor, int], None]) -> None:
    """Broadcast every rank's float16 block in turn; ``visit(block on the scan device, first global id)``."""
    for s in range(ranks.world):
        size = int(ranks.bounds[s + 1] - ranks.bounds[s])
        block = mine.cpu() if s == ranks.rank else torch.empty((size, mine.shape[1]), dtype=torch.float16)
        dist.broadcast(block, group_src=s, group=ranks.group)
        visit(block.to(mine.device), int(ranks.bounds[s]))


def _operand(block16: torch.Tensor) -> torch.Tensor:
    """float16 rows as the scan multiplies them: float16 on CUDA, the same values in float32 on CPU."""
    return block16 if block16.device.type == "cuda" else block16.float()


def _exact_rank(ranks: _Ranks, x: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_rank`` of local ``rows`` (global ids) with global candidates (-1 = none), the candidates' exact
    vectors fetched; the table is sorted by global id so that ties still go by index."""
    need = np.union1d(np.unique(cand[cand >= 0]), rows)
    table = ranks.fetch(x, need)
    local = np.where(cand >= 0, np.searchsorted(need, cand), -1)
    sims, order = _rank(table, np.searchsorted(need, rows), local)
    return sims, np.where(order >= 0, need[np.maximum(order, 0)], -1)


def _knn_rows(ranks: _Ranks, x: np.ndarray, k: int, device: str, stats: dict[str, float]
              ) -> tuple[np.ndarray, np.ndarray]:
    """The exact kNN rows (float64 similarities, int64 ids) of this rank's block among all N (stages 1-2)."""
    start = time.perf_counter()
    n, dim = int(ranks.bounds[-1]), x.shape[1]
    dev = _resolve(device)
    take = min(n, k + _MARGIN)
    err = _product_error(torch.float16, dim)
    mine = torch.from_numpy(x).to(dev).half()
    best_s = torch.full((len(x), take), -math.inf, device=dev)
    best_i = torch.full((len(x), take), -1, dtype=torch.int64, device=dev)
    buffer = torch.empty(_BLOCK * _BLOCK, dtype=torch.float32, device=dev)

    def top(block: torch.Tensor, first: int) -> None:
        cols = _operand(block)
        for r0 in range(0, len(x), _BLOCK):
            rows = _operand(mine[r0:r0 + _BLOCK])
            for c0 in range(0, len(cols), _BLOCK):
                p = _product(rows, cols[c0:c0 + _BLOCK], buffer)
                v, c = torch.topk(p, min(take, p.shape[1]), dim=1)
                v, at = torch.topk(torch.cat([best_s[r0:r0 + _BLOCK], v], 1), take, dim=1)
                best_i[r0:r0 + _BLOCK] = torch.gather(torch.cat([best_i[r0:r0 + _BLOCK], c + first + c0], 1), 1, at)
                best_s[r0:r0 + _BLOCK] = v

    with _full_precision():
        _scan(ranks, mine, top)
    s32, cand = best_s.cpu().numpy(), best_i.cpu().numpy()
    rows = np.arange(ranks.lo, ranks.hi)
    s64, ids = _exact_rank(ranks, x, rows, cand)
    sims, ids = s64[:, :k], ids[:, :k]
    retry = np.flatnonzero(~((take == n) | (s64[:, k - 1] > s32.min(axis=1) + err)))
    widened = torch.tensor([len(retry)])
    dist.all_reduce(widened, group=ranks.group)
    stats["knn_rows_widened"] = float(widened)
    if widened:  # the band pass of the rows left uncertified (module docstring, stage 2)
        floor = torch.from_numpy(s32[retry, k - 1] - 2 * err).to(dev)
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        queries = mine[torch.from_numpy(retry).to(dev)]

        def band(block: torch.Tensor, first: int) -> None:
            cols = _operand(block)
            for r0 in range(0, len(retry), _BLOCK):
                for c0 in range(0, len(cols), _BLOCK):
                    p = _product(_operand(queries[r0:r0 + _BLOCK]), cols[c0:c0 + _BLOCK], buffer)
                    r, c = torch.nonzero(p >= floor[r0:r0 + _BLOCK, None], as_tuple=True)
                    found.append(((r + r0).cpu(), (c + first + c0).cpu()))

        with _full_precision():
            _scan(ranks, mine, band)
        r = torch.cat([f[0] for f in found]).numpy() if found else np.zeros(0, np.int64)
        c = torch.cat([f[1] for f in found]).numpy() if found else np.zeros(0, np.int64)
        width = int(np.bincount(r, minlength=len(retry)).max()) if len(retry) else 1
        padded = np.full((len(retry), max(width, k)), -1, np.int64)
        order = np.argsort(r, kind="stable")
        r, c = r[order], c[order]
        padded[r, np.arange(len(r)) - np.searchsorted(r, r)] = c
        s64, got = _exact_rank(ranks, x, ranks.lo + retry, padded)
        sims[retry], ids[retry] = s64[:, :k], got[:, :k]
        stats["knn_band_max"] = float(width)
    stats["knn_s"] = time.perf_counter() - start
    return sims, ids


def _expanded_block(ranks: _Ranks, x: np.ndarray, sims: np.ndarray, ids: np.ndarray, k1: int, k2: int
                    ) -> sp.csr_matrix:
    """This rank's rows of V after query expansion (stages 3-4), as an n_r x N CSR matrix."""
    n = int(ranks.bounds[-1])
    sets = ReciprocalSets.of(ids, k1)
    chunks = max(math.ceil(int(np.diff(ranks.bounds).max()) / _ROW_CHUNK), 1)  # one fetch round per chunk on every rank

    def pair_sims(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        need = np.union1d(np.unique(cols), np.unique(rows))
        table = ranks.fetch(x, need)
        return _pair_sims(table, np.searchsorted(need, rows), np.searchsorted(need, cols))

    parts = []
    for c in range(chunks):
        r0 = min(ranks.lo + c * _ROW_CHUNK, ranks.hi)
        r1 = min(r0 + _ROW_CHUNK, ranks.hi)
        parts.append(expanded_rows(sets, sims[r0 - ranks.lo:r1 - ranks.lo], ids[r0:r1], r0, pair_sims))
    v = stack_rows(parts, n)
    if k2 == 1:
        return v
    expansion = ids[ranks.lo:ranks.hi, :min(k2, k1)]
    wanted = np.unique(expansion)
    rows = _fetch_csr(ranks, v, wanted)
    # V with the fetched rows in their places: the product sums them in rank order, as one process does
    lens = np.zeros(n, np.int64)
    lens[wanted] = np.diff(rows.indptr)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    full = sp.csr_matrix((rows.data, rows.indices, indptr), shape=(n, n))
    pattern = sp.csr_matrix((np.ones(expansion.size), expansion.ravel(),
                             np.arange(0, expansion.size + 1, expansion.shape[1])), shape=(len(expansion), n))
    v = (pattern @ full).tocsr()
    v.data /= expansion.shape[1]
    v.sort_indices()
    return v


def _fetch_csr(ranks: _Ranks, local: sp.csr_matrix, ids: np.ndarray) -> sp.csr_matrix:
    """Rows ``ids`` (sorted, unique) of the row-distributed CSR matrix whose block here is ``local``."""
    asked = ranks.exchange(ranks.owners(ids))
    send_lens, send_cols, send_vals = [], [], []
    for a in asked:
        part = local[a - ranks.lo]
        send_lens.append(np.diff(part.indptr))
        send_cols.append(part.indices.astype(np.int64))
        send_vals.append(part.data)
    lens = np.concatenate(ranks.exchange(send_lens))
    indptr = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return sp.csr_matrix((np.concatenate(ranks.exchange(send_vals)), np.concatenate(ranks.exchange(send_cols)),
                          indptr), shape=(len(ids), local.shape[1]))


@numba.njit(cache=True)
def _walk_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, col_ptr: np.ndarray,
               col_rows: np.ndarray, col_data: np.ndarray, lo: int, hi: int, max_distance: float,
               scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The min-sum walk of ``clustering._walk`` from rows [lo, hi) of v (CSR and CSC arrays) to the rows j
    of each column with i < j, i + j even or i > j, i + j odd: (i, j, d) with d <= max_distance, each
    pair's terms added in ascending column as the single-process walk adds them."""
    n = len(indptr) - 1
    acc = np.zeros(n)
    last = np.full(n, -1, np.int64)
    touched = np.empty(n, np.int64)
    out_i, out_j, out_d = np.empty(1024, np.int64), np.empty(1024, np.int64), np.empty(1024)
    count = 0
    for i in range(lo, hi):
        t = 0
        for e in range(indptr[i], indptr[i + 1]):
            v_il = data[e]
            col = indices[e]
            for f in range(col_ptr[col], col_ptr[col + 1]):
                j = col_rows[f]
                if j == i or (j > i) != ((i + j) % 2 == 0):
                    continue
                if last[j] != i:
                    last[j], acc[j], touched[t] = i, 0.0, j
                    t += 1
                acc[j] += min(v_il, col_data[f])
        for s in range(t):
            j = touched[s]
            d = jaccard_of(acc[j], scale)
            if d > max_distance:
                continue
            if count == len(out_d):
                out_i = np.concatenate((out_i, np.empty_like(out_i)))
                out_j = np.concatenate((out_j, np.empty_like(out_j)))
                out_d = np.concatenate((out_d, np.empty_like(out_d)))
            out_i[count], out_j[count], out_d[count] = i, j, d
            count += 1
    return out_i[:count], out_j[:count], out_d[:count]


def _graph_pairs(ranks: _Ranks, v: sp.csr_matrix, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's share of the Jaccard pairs (stage 5): (i, j, d) with i in its block."""
    n = v.shape[1]
    mask = np.zeros((1, n), np.uint8)
    mask[0, v.indices] = 1
    masks = ranks.all_gather(mask).astype(bool)
    entry_row = np.repeat(np.arange(len(v.indptr) - 1), np.diff(v.indptr))
    # the rows here that share a column with rank s's rows go to rank s
    send = [np.zeros(0, np.int64) if s == ranks.rank else
            np.flatnonzero(np.bincount(entry_row, weights=masks[s][v.indices], minlength=len(v.indptr) - 1))
            + ranks.lo for s in range(ranks.world)]
    lens = ranks.exchange([np.diff(v[ids - ranks.lo].indptr) for ids in send])
    cols = ranks.exchange([v[ids - ranks.lo].indices.astype(np.int64) for ids in send])
    vals = ranks.exchange([v[ids - ranks.lo].data for ids in send])
    theirs = ranks.exchange(send)
    # this block's rows and the received ones (other blocks: disjoint), in global row order
    ids = np.concatenate([np.arange(ranks.lo, ranks.hi), *theirs])
    lens = np.concatenate([np.diff(v.indptr), *lens])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    data, indices = np.concatenate([v.data, *vals]), np.concatenate([v.indices.astype(np.int64), *cols])
    order = np.argsort(ids)
    take = np.concatenate([np.arange(starts[o], starts[o] + lens[o]) for o in order]) if len(order) else starts[:0]
    row_lens = np.zeros(n, np.int64)
    row_lens[ids] = lens
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(row_lens, out=indptr[1:])
    full = sp.csr_matrix((data[take], indices[take], indptr), shape=(n, n))
    by_col = full.tocsc()  # rows ascending within each column, as in the single-process walk
    index = np.int64
    return _walk_rows(full.indptr.astype(index), full.indices.astype(index), full.data, by_col.indptr.astype(index),
                      by_col.indices.astype(index), by_col.data, ranks.lo, ranks.hi, max_distance, 10.0**_DECIMALS)


def distributed_cluster(clustering: SelfPacedClustering, features: np.ndarray, n: int,
                        group: dist.ProcessGroup) -> ClusterResult | None:
    """SelfPacedClustering on N features held in W contiguous blocks (``row_bounds``): ``features`` is
    this rank's block (L2-normalised rows). Every rank of ``group`` calls it; rank 0 gets the
    ClusterResult, the others None (module docstring). ``clustering`` must be ``shared_clustering``."""
    if not shared_clustering(clustering):
        raise ValueError(f"distributed clustering needs method=dbscan and knn=exact, got "
                         f"method={clustering.cfg.method!r}, knn={clustering.cfg.knn!r}")
    cfg, start = clustering.cfg, time.perf_counter()
    ranks = _Ranks(group, row_bounds(n, dist.get_world_size(group)))
    if len(features) != ranks.hi - ranks.lo:
        raise ValueError(f"rank {ranks.rank} holds {len(features)} feature rows, its block of N = {n} "
                         f"is rows {ranks.lo}..{ranks.hi}")
    check_k(cfg.k1, n)
    try:  # every rank checks its block; one bad block stops all ranks with its message
        x = check_features(features) if len(features) >= 2 else np.ascontiguousarray(features, dtype=np.float32)
        failed = ""
    except ValueError as error:
        failed = f"rank {ranks.rank} (rows {ranks.lo}..{ranks.hi}): {error}"
    bad = torch.tensor([int(bool(failed))])
    dist.all_reduce(bad, group=group)
    if bad:
        raise ValueError(failed or "features of another rank failed their check (its message is in its log)")
    stats: dict[str, float] = {"n": float(n)}
    sims, ids = _knn_rows(ranks, x, cfg.k1, cfg.knn_device, stats)
    ids = ranks.all_gather(ids)
    stage = time.perf_counter()
    v = _expanded_block(ranks, x, sims, ids, cfg.k1, cfg.k2)
    del sims, ids
    nnz = torch.tensor([v.nnz], dtype=torch.float64)
    dist.all_reduce(nnz, group=group)
    stats["v_nnz_per_row"] = float(nnz) / n
    stats["v_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    max_distance, _ = clustering.graph_bounds()
    rows, cols, d = _graph_pairs(ranks, v, max_distance)
    diag = np.where(np.diff(v.indptr) > 0, 0.0, 1.0)
    del v
    stats["pairs_s"] = time.perf_counter() - stage
    # rank 0 gathers every rank's pairs and diagonal
    gathered = ranks.exchange([np.stack([rows, cols]).T if s == 0 else np.zeros((0, 2), np.int64)
                               for s in range(ranks.world)])
    dists = ranks.exchange([d if s == 0 else d[:0] for s in range(ranks.world)])
    diags = ranks.exchange([diag if s == 0 else diag[:0] for s in range(ranks.world)])
    stats["jaccard_s"] = time.perf_counter() - stage + stats["v_s"]
    if ranks.rank != 0:
        return None
    pairs = np.concatenate(gathered)
    graph = symmetric_graph(pairs[:, 0], pairs[:, 1], np.concatenate(dists), np.concatenate(diags))
    stats["graph_nnz_per_row"] = graph.nnz / n
    return clustering.cluster_graph(graph, stats, start)
