"""k-reciprocal re-ranking: the sparse implementation against a dense port of the original algorithm."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from reidforge.shared import rerank
from reidforge.shared.rerank import re_rank


def _re_rank_dense(q_feats: np.ndarray, g_feats: np.ndarray, k1: int = 20, k2: int = 6,
                   lambda_value: float = 0.3, dtype: type = np.float64) -> np.ndarray:
    """Zhong et al. (CVPR 2017) as in the authors' Python port, on dense N x N arrays, with the two
    definitions the sparse version fixes: distances squared once, ties broken by index (stable argsort).
    ``dtype`` is that of D and V: float64 for exact comparisons, float32 as in the port. Peak memory is
    about four N x N arrays of ``dtype`` plus the int64 argsort."""
    x = np.concatenate([q_feats, g_feats]).astype(dtype)
    num_q, n = len(q_feats), len(x)
    sq = np.einsum("ij,ij->i", x, x)
    original_dist = x @ x.T
    original_dist *= -2
    original_dist += sq[:, None]
    original_dist += sq[None, :]
    np.maximum(original_dist, 0, out=original_dist)
    original_dist /= np.max(original_dist, axis=0)
    original_dist = original_dist.T
    initial_rank = np.argsort(original_dist, axis=1, kind="stable").astype(np.int32)
    v = np.zeros((n, n), dtype)
    half = int(np.around(k1 / 2))
    for i in range(n):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        k_reciprocal = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, :half + 1]
            c_backward = initial_rank[c_forward, :half + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal)) > 2 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    del initial_rank
    inv_index = [np.where(v[:, j] != 0)[0] for j in range(n)]
    jaccard_dist = np.zeros((num_q, n), dtype)
    for i in range(num_q):
        temp_min = np.zeros(n, dtype)
        for j in np.where(v[i] != 0)[0]:
            temp_min[inv_index[j]] += np.minimum(v[i, j], v[inv_index[j], j])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist[:num_q] * lambda_value
    return final_dist[:, num_q:]


def _clustered(rng: np.random.Generator, num_q: int, num_g: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Features around a few centres, so that k-reciprocal sets are non-trivial."""
    centres = rng.standard_normal((max(2, (num_q + num_g) // 12), dim))
    q = centres[rng.integers(0, len(centres), num_q)] + 0.4 * rng.standard_normal((num_q, dim))
    g = centres[rng.integers(0, len(centres), num_g)] + 0.4 * rng.standard_normal((num_g, dim))
    return q.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize("seed,num_q,num_g", [(0, 30, 100), (1, 45, 220), (2, 60, 300), (3, 37, 163)])
def test_equals_dense_original_on_random_sets(seed: int, num_q: int, num_g: int) -> None:
    q, g = _clustered(np.random.default_rng(seed), num_q, num_g)
    ours = re_rank(q, g)
    assert ours.shape == (num_q, num_g) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _re_rank_dense(q, g), rtol=0, atol=1e-6)


def test_equals_dense_original_with_duplicates_and_ties() -> None:
    # features on a small integer grid: many exactly equal distances (so the index tie-break decides the
    # neighbour lists, and ties straddle the k1+1 boundary), exact duplicates, and exact float64 arithmetic
    rng = np.random.default_rng(7)
    grid = rng.integers(-2, 3, (40, 6)).astype(np.float32)
    q = np.concatenate([grid[:20], grid[:5]])
    g = np.concatenate([grid, grid[10:30], grid[:15]])
    np.testing.assert_allclose(re_rank(q, g), _re_rank_dense(q, g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k1,k2,lambda_value", [(5, 1, 0.0), (7, 3, 1.0), (3, 6, 0.5), (20, 30, 0.3)])
def test_equals_dense_original_for_other_parameters(k1: int, k2: int, lambda_value: float) -> None:
    q, g = _clustered(np.random.default_rng(11), 35, 140)
    np.testing.assert_allclose(re_rank(q, g, k1, k2, lambda_value), _re_rank_dense(q, g, k1, k2, lambda_value),
                               rtol=0, atol=1e-6)


def test_stored_values_grow_with_n_times_k() -> None:
    k1, per_row = 20, []
    for n in (400, 1600, 6400):
        x, num_q = rerank._features(*_clustered(np.random.default_rng(n), n // 4, n - n // 4))
        knn, knn_d0, row_max, _ = rerank._neighbours(x, num_q, (k1 + 1, k1 // 2 + 1))
        v = rerank._k_reciprocal_weights(x, knn, knn_d0, row_max, k1)
        # an expanded set holds R(i, k1) plus at most round(k1/2) + 1 members per merged candidate
        assert v.nnz <= n * (k1 + 1) * (k1 // 2 + 2)
        per_row.append(v.nnz / n)
    assert max(per_row) < 2 * (k1 + 1) and max(per_row) < 1.2 * min(per_row), per_row  # about k1 per row, flat in N


def test_blurred_boundaries_and_whole_rows_match_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    # ties and duplicates across small blocks, with one spare candidate per row: boundaries inside runs of
    # equal distances are settled by the float64 re-ranking, or by whole float64 rows when they run past it
    monkeypatch.setattr(rerank, "_MARGIN", 1)
    monkeypatch.setattr(rerank, "_BLOCK_ELEMENTS", 1 << 12)
    rng = np.random.default_rng(3)
    grid = rng.integers(-2, 3, (60, 5)).astype(np.float32)
    q, g = _clustered(rng, 40, 160, dim=5)
    q = np.concatenate([q, grid[:30], q[:10]])
    g = np.concatenate([g, grid, grid[20:50], g[:40]])
    np.testing.assert_allclose(re_rank(q, g), _re_rank_dense(q, g), rtol=0, atol=1e-6)


def test_small_working_chunks_change_memory_not_results(monkeypatch: pytest.MonkeyPatch) -> None:
    q, g = _clustered(np.random.default_rng(5), 200, 3800, dim=32)
    n = len(q) + len(g)
    default = re_rank(q, g)
    for name, value in (("_BLOCK_ELEMENTS", 1 << 20), ("_PAIR_CHUNK", 1 << 12), ("_TRIPLE_CHUNK", 1 << 17),
                        ("_RESULT_CHUNK", 1 << 17)):
        monkeypatch.setattr(rerank, name, value)
    tracemalloc.start()
    small = re_rank(q, g)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # values keep the float32 GEMM's rounding (module docstring), which a block's shape and the BLAS thread
    # split may move by an ulp; the neighbour sets and the float64 parts do not depend on the chunking
    np.testing.assert_allclose(small, default, rtol=0, atol=1e-6)
    dense = n * n * 8  # one float64 N x N matrix; the dense original holds about four
    assert peak < dense / 6, f"peak {peak / 2**20:.1f} MB vs one dense matrix {dense / 2**20:.0f} MB"


def test_bad_input_is_an_error() -> None:
    q, g = np.zeros((2, 4)), np.ones((3, 4))
    with pytest.raises(ValueError, match="q_feats and g_feats differ in feature size: 4 vs 5"):
        re_rank(q, np.ones((3, 5)))
    with pytest.raises(ValueError, match="g_feats must be a non-empty 2-D feature array"):
        re_rank(q, np.ones(4))
    with pytest.raises(ValueError, match="must be finite"):
        re_rank(q, np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="lambda_value must be in"):
        re_rank(q, g, lambda_value=1.5)
    with pytest.raises(ValueError, match="k1 and k2 must be >= 1"):
        re_rank(q, g, k1=0)
    with pytest.raises(ValueError, match="all the same vector"):
        re_rank(np.ones((2, 4)), np.ones((3, 4)))
