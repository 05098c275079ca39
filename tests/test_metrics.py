"""Ranking metrics: hand-computed cases, a per-query float64 reference, chunking, CUHK03 classic and VehicleID."""

from __future__ import annotations

import numpy as np
import pytest

from reidforge.shared.metrics import cuhk03_classic_metrics, rank_metrics, vehicleid_draws, vehicleid_metrics


def test_junk_removed_distractor_kept_and_ap_by_hand() -> None:
    # gallery: same pid+cam (junk), other pid, match, distractor (pid 0), match
    g_pids, g_cams = np.array([1, 2, 1, 0, 1]), np.array([0, 1, 1, 2, 2])
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = rank_metrics(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # ranked list after junk removal: 2, 1, 0, 1 -> hits at ranks 2 and 4
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-12)
    assert r["mINP"] == pytest.approx(2 / 4, abs=1e-12)
    assert r["cmc"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_query_without_positive_is_skipped_and_ties_are_stable() -> None:
    g_pids, g_cams = np.array([3, 1, 1]), np.array([1, 1, 0])
    dist = np.array([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9]])
    # query 0 (pid 1, cam 0): tie between gallery 0 and 1 keeps gallery order -> hit at rank 2; gallery 2 is junk
    # query 1 (pid 7): no positive -> excluded from every average
    r = rank_metrics(dist, np.array([1, 7]), g_pids, np.array([0, 0]), g_cams)
    assert r["num_valid_queries"] == 1
    assert r["mAP"] == pytest.approx(0.5, abs=1e-12) and r["cmc"][0] == 0.0 and r["cmc"][1] == 1.0
    assert len(r["cmc"]) == 3  # max_rank capped at the gallery size


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="distmat is 1x2 but there are 1 query and 3 gallery pids"):
        rank_metrics(np.zeros((1, 2)), [1], [1, 2, 3], [0], [0, 1, 2])


def _reference(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
               g_camids: np.ndarray, max_rank: int = 50, ap: str = "standard") -> dict[str, object]:
    """The protocol written out per query in float64: stable sort, drop junk and pid -1, walk the list."""
    aps, inps, cmcs = np.full(len(q_pids), np.nan), np.full(len(q_pids), np.nan), []
    for q in range(len(q_pids)):
        order = np.argsort(np.asarray(distmat[q], dtype=np.float64), kind="stable")
        junk = ((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])) | (g_pids[order] == -1)
        rel = g_pids[order][~junk] == q_pids[q]
        if not rel.any():
            continue
        hit_ranks = np.flatnonzero(rel) + 1
        total = 0.0
        for i, r in enumerate(hit_ranks, start=1):
            precision = i / r
            if ap == "trapezoid":
                precision = ((i - 1) / (r - 1) if r > 1 else 1.0) / 2 + precision / 2
            total += precision
        aps[q], inps[q] = total / len(hit_ranks), len(hit_ranks) / hit_ranks[-1]
        cmcs.append((np.arange(1, min(max_rank, len(g_pids)) + 1) >= hit_ranks[0]).astype(np.float64))
    valid = ~np.isnan(aps)
    return {"mAP": float(np.mean(aps[valid])), "mINP": float(np.mean(inps[valid])), "cmc": np.mean(cmcs, axis=0),
            "num_valid_queries": int(valid.sum()), "AP": aps, "INP": inps}


def _random_case(seed: int, ties: bool, dtype: type = np.float32) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(20, 80)), int(rng.integers(50, 400))
    q_pids, g_pids = rng.integers(1, 25, num_q), rng.integers(-1, 25, num_g)  # -1 junk and 0 distractors
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    dist = rng.integers(0, 12, (num_q, num_g)) if ties else rng.random((num_q, num_g))
    return dist.astype(dtype), q_pids, g_pids, q_cams, g_cams


def _assert_same(ours: dict, ref: dict, atol: float = 1e-12) -> None:
    assert ours["num_valid_queries"] == ref["num_valid_queries"]
    assert ours["mAP"] == pytest.approx(ref["mAP"], abs=atol) and ours["mINP"] == pytest.approx(ref["mINP"], abs=atol)
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], rtol=0, atol=atol)
    np.testing.assert_allclose(ours["AP"], ref["AP"], rtol=0, atol=atol)  # NaN at the same queries
    np.testing.assert_allclose(ours["INP"], ref["INP"], rtol=0, atol=atol)


def test_trapezoid_ap_single_hit_at_rank_two() -> None:
    dist = np.array([[0.1, 0.2, 0.3]])
    args = (dist, [1], [2, 1, 3], [0], [1, 1, 1])
    assert rank_metrics(*args)["mAP"] == pytest.approx(0.5, abs=1e-12)
    assert rank_metrics(*args, ap="trapezoid")["mAP"] == pytest.approx(0.25, abs=1e-12)


def test_trapezoid_ap_by_hand() -> None:
    # hits at ranks 1 and 3: standard (1 + 2/3)/2; trapezoid ((1 + 1)/2 + (1/2 + 2/3)/2)/2
    r = rank_metrics(np.array([[0.1, 0.2, 0.3, 0.4]]), [5], [5, 2, 5, 3], [0], [1, 1, 2, 1], ap="trapezoid")
    assert r["mAP"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2, abs=1e-12)
    assert r["mINP"] == pytest.approx(2 / 3, abs=1e-12)


def test_unlabelled_gallery_is_removed_and_distractors_count() -> None:
    # gallery: pid -1 (removed), pid 0 distractor (a negative), match
    r = rank_metrics(np.array([[0.1, 0.2, 0.3]]), [4], [-1, 0, 4], [0], [1, 1, 1])
    assert r["mAP"] == pytest.approx(0.5, abs=1e-12) and r["cmc"].tolist() == [0.0, 1.0, 1.0]


def test_per_query_arrays_mark_skipped_queries_with_nan() -> None:
    r = rank_metrics(np.array([[0.2, 0.1], [0.1, 0.2]]), [1, 9], [1, 2], [0, 0], [1, 1])
    assert r["AP"][0] == pytest.approx(0.5) and np.isnan(r["AP"][1]) and np.isnan(r["INP"][1])


@pytest.mark.parametrize("ap", ["standard", "trapezoid"])
@pytest.mark.parametrize("seed", range(4))
def test_random_cases_equal_the_per_query_reference(seed: int, ap: str) -> None:
    for ties, dtype in ((False, np.float32), (True, np.float32), (False, np.float64), (True, np.int64)):
        case = _random_case(seed, ties, dtype)
        _assert_same(rank_metrics(*case, max_rank=20, ap=ap), _reference(*case, max_rank=20, ap=ap))


def test_trapezoid_never_exceeds_standard() -> None:
    case = _random_case(9, ties=False)
    standard, trapezoid = rank_metrics(*case)["AP"], rank_metrics(*case, ap="trapezoid")["AP"]
    valid = ~np.isnan(standard)
    assert (trapezoid[valid] <= standard[valid] + 1e-15).all() and (trapezoid[valid] < standard[valid]).any()


def test_chunk_size_changes_nothing() -> None:
    case = _random_case(3, ties=True)
    default = rank_metrics(*case)
    for chunk_size in (1, 7, 1000):
        other = rank_metrics(*case, chunk_size=chunk_size)
        for key in ("mAP", "mINP", "num_valid_queries"):
            assert other[key] == default[key]
        for key in ("cmc", "AP", "INP"):
            np.testing.assert_array_equal(other[key], default[key])


@pytest.mark.parametrize("call,message", [
    (lambda: rank_metrics(np.zeros(3), [1], [1, 2, 3], [0], [0, 1, 2]), "distmat must be 2-D"),
    (lambda: rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [0]), "1 query and 1 gallery camids"),
    (lambda: rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], max_rank=0), "max_rank must be >= 1"),
    (lambda: rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], ap="interpolated"), "ap must be one of"),
    (lambda: rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], chunk_size=0), "chunk_size must be >= 1"),
    (lambda: rank_metrics(np.array([[np.nan, 1.0]]), [1], [1, 2], [0], [1, 1]), "distmat contains NaN"),
    (lambda: rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [0, 1]), "no query has a positive"),
])
def test_bad_input_is_a_one_line_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _cuhk03_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, seed):
    """torchreid's eval_cuhk03 sampling loop (dict of pids in first-appearance order, one choice per pid)."""
    state = np.random.RandomState(seed)
    all_cmc = []
    for q in range(len(q_pids)):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw = (g_pids[order] == q_pids[q])[keep]
        if not raw.any():
            continue
        positions: dict[int, list[int]] = {}
        for idx, pid in enumerate(g_pids[order][keep]):
            positions.setdefault(int(pid), []).append(idx)
        cmc = np.zeros(max_rank)
        for _ in range(10):
            mask = np.zeros(len(raw), bool)
            for idxs in positions.values():
                mask[state.choice(idxs)] = True
            cmc += np.minimum(np.cumsum(raw[mask]), 1)[:max_rank] / 10
        all_cmc.append(cmc)
    return np.mean(all_cmc, axis=0)


def test_cuhk03_classic_is_seeded_and_matches_the_sampling_loop() -> None:
    rng = np.random.default_rng(4)
    q_pids, g_pids = rng.integers(0, 15, 40), rng.integers(0, 15, 150)
    q_cams, g_cams = rng.integers(0, 2, 40), rng.integers(0, 2, 150)
    dist = rng.random((40, 150))
    first = cuhk03_classic_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, seed=3)
    again = cuhk03_classic_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, seed=3)
    other = cuhk03_classic_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, seed=4)
    np.testing.assert_array_equal(first["cmc"], again["cmc"])
    assert not np.array_equal(first["cmc"], other["cmc"])
    np.testing.assert_allclose(first["cmc"], _cuhk03_reference(dist, q_pids, g_pids, q_cams, g_cams, 10, 3),
                               rtol=0, atol=1e-12)
    market = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert first["mAP"] == market["mAP"]  # AP on the full, unsampled list
    assert (first["cmc"] >= market["cmc"] - 1e-12).all()  # one image per pid can only move the first hit up


def test_vehicleid_draws_are_seeded_partitions_with_one_gallery_image_per_id() -> None:
    pids = np.repeat(np.arange(30), 4)[::-1]
    draws = vehicleid_draws(pids, num_draws=3, seed=1)
    again = vehicleid_draws(pids, num_draws=3, seed=1)
    assert all(np.array_equal(a, b) for draw, other in zip(draws, again) for a, b in zip(draw, other))
    for query, gallery in draws:
        assert sorted(pids[gallery].tolist()) == list(range(30))
        assert np.array_equal(np.sort(np.r_[query, gallery]), np.arange(len(pids)))
    assert not np.array_equal(draws[0][1], draws[1][1])
    # draw d depends on (seed, d) only: fewer draws are a prefix, another seed other draws
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(vehicleid_draws(pids, 2, seed=1), draws))
    assert not np.array_equal(vehicleid_draws(pids, 1, seed=2)[0][1], draws[0][1])
    # pinned: shard builds written by data/build_shards.py vehicleid stay valid only while these hold
    assert [(q.tolist(), g.tolist()) for q, g in vehicleid_draws([5, 3, 5, 3, 3, 9, 5], 3, seed=1)] == [
        ([0, 1, 4, 6], [2, 3, 5]), ([1, 2, 4, 6], [0, 3, 5]), ([0, 1, 4, 6], [2, 3, 5])]
    with pytest.raises(ValueError, match="num_draws must be >= 1 and seed >= 0, got 1 and -1"):
        vehicleid_draws(pids, 1, seed=-1)


def test_vehicleid_metrics_average_the_draws() -> None:
    rng = np.random.default_rng(2)
    pids = np.repeat(np.arange(20), 5)
    feats = rng.standard_normal((20, 8))[pids] + 0.8 * rng.standard_normal((100, 8))
    draws = [(((feats[q, None] - feats[None, g]) ** 2).sum(-1), pids[q], pids[g]) for q, g in vehicleid_draws(pids, 4)]
    r = vehicleid_metrics(iter(draws), max_rank=5)
    singles = [rank_metrics(d, qp, gp, np.zeros(len(qp)), np.ones(len(gp)), max_rank=5) for d, qp, gp in draws]
    assert r["num_draws"] == 4 and r["mAP"] == pytest.approx(np.mean([s["mAP"] for s in singles]), abs=1e-12)
    np.testing.assert_allclose(r["cmc"], np.mean([s["cmc"] for s in singles], axis=0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="draws is empty"):
        vehicleid_metrics([])
