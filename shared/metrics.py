"""Ranking metrics for re-ID retrieval: CMC, mAP and mINP under the Market-1501 protocol, the classic
CUHK03 single-gallery-shot CMC, and VehicleID's averaging over random gallery draws.

Market-1501 protocol (Zheng et al., ICCV 2015, as implemented by torchreid and FastReID): for each query
the gallery is ranked by ascending distance; gallery items with the query's pid *and* camid are removed
(junk), pid -1 items are removed, pid-0 distractors stay as negatives. With R positives left at 1-based
ranks r_1 < ... < r_R:

- AP ``"standard"`` = (1/R) * sum_i i / r_i, the non-interpolated form most papers report;
- AP ``"trapezoid"`` = (1/R) * sum_i ((i-1)/(r_i-1) + i/r_i) / 2, with (i-1)/(r_i-1) read as 1 when r_i = 1:
  the Market MATLAB ``compute_AP.m`` and layumi form; it is never above the standard AP;
- INP = R / r_R (mINP: Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook",
  TPAMI 2021);
- CMC(k) = 1 when r_1 <= k.

Deviations from the reference toolkits, all deliberate:

- ties are broken by gallery index (a stable ranking); torchreid and FastReID use an unstable argsort, so
  their order among equal distances is arbitrary;
- AP, INP and all averages are float64; torchreid's Cython evaluator accumulates in float32 (about 1e-6
  drift);
- a query without any positive is skipped in every average, for both AP flavours (layumi divides the
  trapezoid mAP by all queries);
- the CMC has min(max_rank, G) entries, G being the number of gallery columns given.

Ranks are found without sorting whole rows: per query only the distances up to its last positive are
sorted, and each positive's rank among the kept items is counted from them. Queries are processed in
chunks, so memory stays at one chunk of distances whatever the gallery size, and the results do not
depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

AP_FLAVOURS = ("standard", "trapezoid")
_CHUNK_ELEMENTS = 1 << 22  # distances per query chunk (16 MB as float32)


def _inputs(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
            g_camids: ArrayLike, max_rank: int) -> tuple[np.ndarray, ...]:
    """Validated arrays; ``distmat`` stays as given (no float64 copy of a whole Q x G matrix)."""
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D, got shape {distmat.shape}")
    if not (np.issubdtype(distmat.dtype, np.floating) or np.issubdtype(distmat.dtype, np.integer)):
        raise ValueError(f"distmat must hold real numbers, got dtype {distmat.dtype}")
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    num_q, num_g = distmat.shape
    if (len(q_pids), len(g_pids)) != (num_q, num_g):
        raise ValueError(f"distmat is {num_q}x{num_g} but there are {len(q_pids)} query and {len(g_pids)} gallery pids")
    if (len(q_camids), len(g_camids)) != (num_q, num_g):
        raise ValueError(f"distmat is {num_q}x{num_g} but there are {len(q_camids)} query and "
                         f"{len(g_camids)} gallery camids")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return distmat, q_pids, g_pids, q_camids, g_camids


def _as_float(block: np.ndarray) -> np.ndarray:
    """float32 and float64 stay as they are (exact comparisons either way); anything else becomes float64."""
    if block.dtype in (np.float32, np.float64):
        return block
    return block.astype(np.float32 if block.dtype == np.float16 else np.float64)


def _positive_ranks(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                    g_camids: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(query index, 0-based rank among the query's kept gallery items) of every positive, sorted by query
    and then rank."""
    kept = g_pids != -1
    kept_cols = None if kept.all() else np.flatnonzero(kept)
    g_pids, g_camids = g_pids[kept], g_camids[kept]
    # gallery columns grouped by pid: each query's same-pid columns are one slice of `by_pid`
    by_pid = np.argsort(g_pids, kind="stable")
    pids, starts, counts = np.unique(g_pids[by_pid], return_index=True, return_counts=True)
    out_q, out_rank = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if not len(pids):
        return out_q[0], out_rank[0]
    slot = np.minimum(np.searchsorted(pids, q_pids), len(pids) - 1)
    found = pids[slot] == q_pids
    q_start, q_count = np.where(found, starts[slot], 0), np.where(found, counts[slot], 0)

    for q0 in range(0, len(q_pids), chunk_size):
        q1 = min(q0 + chunk_size, len(q_pids))
        block = distmat[q0:q1] if kept_cols is None else distmat[q0:q1][:, kept_cols]
        block = _as_float(np.asarray(block))
        if np.isnan(block).any():
            raise ValueError("distmat contains NaN")
        # every (query, same-pid gallery item) pair of the chunk, in ranked order within each query
        n_same = q_count[q0:q1]
        rows = np.repeat(np.arange(q1 - q0), n_same)
        first = np.cumsum(n_same) - n_same
        cols = by_pid[np.repeat(q_start[q0:q1] - first, n_same) + np.arange(len(rows))]
        values = block[rows, cols]
        order = np.lexsort((cols, values, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        positive = g_camids[cols] != q_camids[q0 + rows]

        pos_at = np.flatnonzero(positive)
        pos_rows = rows[pos_at]
        valid = np.unique(pos_rows)
        if not len(valid):
            continue
        last_pos = pos_at[np.r_[pos_rows[1:] != pos_rows[:-1], True]]  # one per valid query, in row order
        threshold = np.full(q1 - q0, -np.inf)
        threshold[valid] = values[last_pos]
        # only distances up to the last positive can precede a positive
        below = block <= threshold[:, None]
        skipped = np.ones(q1 - q0, bool)
        skipped[valid] = False
        below[skipped] = False
        seg_bounds = np.r_[0, np.cumsum(np.count_nonzero(below, axis=1))]
        below_values = block[below]
        pair_bounds = np.searchsorted(rows, np.arange(q1 - q0 + 1))

        # rank of each pair among all kept columns: strictly smaller distances, then equal ones at lower index
        rank_all = np.zeros(len(rows), np.int64)
        for r in valid:
            a, b = pair_bounds[r], pair_bounds[r + 1]
            seg = np.sort(below_values[seg_bounds[r]:seg_bounds[r + 1]])
            v = values[a:b]
            less = np.searchsorted(seg, v, side="left")
            tied = np.flatnonzero(np.searchsorted(seg, v, side="right") - less > 1)
            for t in tied:
                less[t] += np.count_nonzero(block[r, :cols[a + t]] == v[t])
            rank_all[a:b] = less
        # junk items ranked before each positive do not count
        junk = (~positive).astype(np.int64)
        junk_before = np.cumsum(junk) - junk
        junk_before -= junk_before[pair_bounds[rows]]
        out_q.append(q0 + pos_rows)
        out_rank.append((rank_all - junk_before)[pos_at])
    return np.concatenate(out_q), np.concatenate(out_rank)


def rank_metrics(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, max_rank: int = 50, ap: str = "standard", *,
                 chunk_size: int | None = None) -> dict[str, object]:
    """Market-protocol metrics for a query x gallery distance matrix (smaller = more similar).

    Returns ``mAP``, ``mINP`` (floats over the valid queries), ``cmc`` (float64 array of
    min(max_rank, G) entries: cmc[k-1] = fraction of valid queries with a positive in the top k),
    ``num_valid_queries``, and per-query float64 arrays ``AP`` and ``INP`` of length Q, NaN for a query
    without positives. ``ap`` picks the AP flavour (``"standard"`` or ``"trapezoid"``, see the module
    docstring). ``chunk_size`` is the number of queries ranked at once (default: about 4M distances);
    it changes memory, never results. ``distmat`` may be float32 or float64 (float16 and integers are
    widened); it is not copied as a whole.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    if ap not in AP_FLAVOURS:
        raise ValueError(f"ap must be one of {AP_FLAVOURS}, got {ap!r}")
    num_q, num_g = distmat.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    query, rank = _positive_ranks(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size)
    if not len(query):
        raise ValueError("no query has a positive gallery match in another camera")
    num_pos = np.bincount(query, minlength=num_q)
    first = np.r_[0, np.cumsum(num_pos)[:-1]]
    hit = np.arange(len(query)) - first[query] + 1  # i: 1-based index of the positive within its query
    precision = hit / (rank + 1.0)
    if ap == "trapezoid":
        # precision just before the i-th hit: (i-1)/(r_i-1), or 1 when the hit is at rank 1
        before = np.divide(hit - 1.0, rank, out=np.ones(len(rank)), where=rank > 0)
        precision = (before + precision) / 2
    valid = num_pos > 0
    ap_q = np.full(num_q, np.nan)
    inp_q = np.full(num_q, np.nan)
    ap_q[valid] = np.bincount(query, weights=precision, minlength=num_q)[valid] / num_pos[valid]
    last = first[valid] + num_pos[valid] - 1
    inp_q[valid] = num_pos[valid] / (rank[last] + 1.0)

    length = min(max_rank, num_g)
    first_hit = rank[first[valid]]
    cmc = np.cumsum(np.bincount(first_hit[first_hit < length], minlength=length)) / np.count_nonzero(valid)
    return {"mAP": float(np.mean(ap_q[valid])), "mINP": float(np.mean(inp_q[valid])), "cmc": cmc,
            "num_valid_queries": int(np.count_nonzero(valid)), "AP": ap_q, "INP": inp_q}


def cuhk03_classic_metrics(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                           g_camids: ArrayLike, max_rank: int = 50, num_repeats: int = 10,
                           seed: int = 0) -> dict[str, object]:
    """CUHK03 classic single-gallery-shot metrics (Li et al., CVPR 2014; torchreid ``use_metric_cuhk03``).

    The CMC is averaged over ``num_repeats`` draws that keep one random gallery image per pid of each
    query's ranked list (after junk removal); mAP, mINP, ``AP`` and ``INP`` are the Market-protocol values
    on the full list. Keys are those of :func:`rank_metrics`.

    Draw order, for reproducibility: one ``numpy.random.RandomState(seed)``; for each valid query in query
    order, for each repeat, for each gallery pid in order of first appearance in the query's ranked list,
    one ``randint(0, n)`` over that pid's n images in ranked order. That is exactly the sequence of
    ``np.random.choice`` calls of torchreid's ``eval_cuhk03`` after ``np.random.seed(seed)``, so the two
    draw the same images whenever their rankings agree (they can differ on tied distances); torchreid's
    averages are float32.
    """
    distmat, q_pids, g_pids, q_camids, g_camids = _inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    result = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    state = np.random.RandomState(seed)
    length = len(result["cmc"])
    cmc = np.zeros(length)
    for q in np.flatnonzero(~np.isnan(result["AP"])):
        ranked = np.argsort(_as_float(np.asarray(distmat[q])), kind="stable")
        junk = ((g_pids[ranked] == q_pids[q]) & (g_camids[ranked] == q_camids[q])) | (g_pids[ranked] == -1)
        pids = g_pids[ranked[~junk]]
        uniq, first, inverse, counts = np.unique(pids, return_index=True, return_inverse=True, return_counts=True)
        by_pid = np.argsort(inverse, kind="stable")  # ranked positions grouped by pid
        start = np.cumsum(counts) - counts
        appearance = np.argsort(first)  # pids in first-appearance order
        target = np.flatnonzero(uniq[appearance] == q_pids[q])[0]
        hits = np.zeros(length)
        for _ in range(num_repeats):
            chosen = by_pid[start[appearance] + state.randint(0, counts[appearance])]
            hits[np.count_nonzero(chosen < chosen[target]):] += 1  # empty when the rank is beyond max_rank
        cmc += hits / num_repeats
    result["cmc"] = cmc / result["num_valid_queries"]
    return result


def vehicleid_draws(pids: ArrayLike, num_draws: int = 10, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """VehicleID test draws (Liu et al., CVPR 2016): per draw, one random image of each id forms the gallery
    and the others are the queries. Returns ``(query indices, gallery indices)`` per draw, both ascending.

    Draw ``d`` uses ``numpy.random.default_rng([seed, d])``: over the ids in ascending order, one
    ``integers(0, n)`` per id picks among its n images in the order they come. A draw therefore depends
    only on ``seed``, ``d`` and ``pids`` (the first k of 10 draws are the k draws), and
    ``data/datasets/vehicleid.py`` writes exactly these partitions as ``query_<d>``/``gallery_<d>``.
    """
    pids = np.asarray(pids).ravel()
    if num_draws < 1 or seed < 0:
        raise ValueError(f"num_draws must be >= 1 and seed >= 0, got {num_draws} and {seed}")
    order = np.argsort(pids, kind="stable")
    starts = np.flatnonzero(np.r_[True, pids[order][1:] != pids[order][:-1]]) if len(pids) else np.zeros(0, int)
    counts = np.diff(np.r_[starts, len(pids)])
    draws = []
    for d in range(num_draws):
        rng = np.random.default_rng([seed, d])
        gallery = np.sort(order[starts + rng.integers(0, counts)])
        draws.append((np.setdiff1d(np.arange(len(pids)), gallery), gallery))
    return draws


def vehicleid_metrics(draws: Iterable[tuple[ArrayLike, ArrayLike, ArrayLike]], max_rank: int = 50,
                      ap: str = "standard") -> dict[str, object]:
    """Market-protocol metrics averaged over VehicleID draws, each ``(distmat, q_pids, g_pids)``.

    VehicleID has no cameras: queries and gallery are disjoint images, so nothing is junk (every query gets
    camid 0 and every gallery image camid 1). Returns the mean ``mAP``, ``mINP`` and ``cmc`` plus
    ``num_draws`` and the per-draw ``mAP_per_draw`` and ``cmc_per_draw`` (draws x ranks). ``draws`` may be
    a generator, so that only one distance matrix is held at a time.
    """
    per_draw: list[dict[str, object]] = []
    for distmat, q_pids, g_pids in draws:
        num_q, num_g = np.shape(distmat)
        per_draw.append(rank_metrics(distmat, q_pids, g_pids, np.zeros(num_q, np.int64), np.ones(num_g, np.int64),
                                     max_rank, ap))
    if not per_draw:
        raise ValueError("draws is empty")
    if len({len(r["cmc"]) for r in per_draw}) > 1:
        raise ValueError("draws have galleries of different sizes below max_rank")
    cmcs = np.stack([r["cmc"] for r in per_draw])
    maps = np.array([r["mAP"] for r in per_draw])
    return {"mAP": float(maps.mean()), "mINP": float(np.mean([r["mINP"] for r in per_draw])),
            "cmc": cmcs.mean(axis=0), "num_draws": len(per_draw), "mAP_per_draw": maps, "cmc_per_draw": cmcs}
