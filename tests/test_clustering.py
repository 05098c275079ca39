"""SpCL's clustering step: the sparse implementation against the dense reference in dense_clustering.py."""

from __future__ import annotations

import json
import tracemalloc

import hdbscan
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse import csgraph
from sklearn.metrics import adjusted_rand_score

from reidforge.pretrain import clustering, knn
from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering, jaccard_distance
from reidforge.pretrain.knn import knn_search
from reidforge.shared.config import ConfigError, load_config
from dense_clustering import canonical, dense_jaccard, dense_knn, dense_spcl_labels, generate_pseudo_labels


def _blobs(seed: int, n: int, dim: int = 32, num_ids: int = 40, noise: float = 0.35,
           clustered: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``num_ids`` centres plus uniformly random ones (label -1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim))
    k = int(n * clustered)
    truth = np.r_[rng.integers(0, num_ids, k), np.full(n - k, -1)]
    x = np.concatenate([centres[truth[:k]] + noise * rng.standard_normal((k, dim)), rng.standard_normal((n - k, dim))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def _dyadic(seed: int, n: int, dim: int = 12) -> np.ndarray:
    """Unit vectors with four entries +-1/2: every inner product is a multiple of 1/4, exact in float32 and
    float64, so neighbour lists are full of exact ties (broken by index) and there are exact duplicates."""
    rng = np.random.default_rng(seed)
    protos = np.zeros((n // 12, dim))
    for p in protos:
        p[rng.choice(dim, 4, replace=False)] = 0.5 * rng.choice([-1, 1], 4)
    x = protos[rng.integers(0, len(protos), n)]
    for row in x[: n // 2]:  # move one entry: similarity 3/4 to its prototype
        src = rng.choice(np.flatnonzero(row))
        row[rng.choice(np.flatnonzero(row == 0))], row[src] = row[src], 0
    return x[rng.permutation(n)].astype(np.float32)


def _near_ties(seed: int, n: int = 360, dim: int = 24) -> np.ndarray:
    """Groups of near-duplicates: similarities within a group differ by ~1e-4, below the float16 scan's
    error bound (~1e-3) but far above float64's; groups of 30 and of 150 (more than k + 120 rows tied
    within the bound, so the whole-row path runs too)."""
    rng = np.random.default_rng(seed)
    sizes = [150] + [30] * ((n - 150) // 30)
    centres = rng.standard_normal((len(sizes), dim))
    x = np.repeat(centres, sizes, axis=0) + 0.01 * rng.standard_normal((sum(sizes), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(len(x))].astype(np.float32)


def _as_dense(graph: sp.csr_matrix) -> np.ndarray:
    """The stored entries of ``graph`` (explicit zeros included) over a matrix of ones."""
    coo = graph.tocoo()
    out = np.ones(graph.shape)
    out[coo.row, coo.col] = coo.data
    return out


def _check_graph(graph: sp.csr_matrix, dense: np.ndarray, max_distance: float | None) -> None:
    n = len(dense)
    diag = graph.diagonal()
    stored = sp.csr_matrix((np.ones(graph.nnz), graph.indices, graph.indptr), shape=graph.shape)
    assert stored.diagonal().all() and not diag.any(), "explicit zero diagonal"
    # rows sorted by distance (what sklearn's sort_graph_by_row_values checks)
    for r in range(n):
        assert (np.diff(graph.data[graph.indptr[r]:graph.indptr[r + 1]]) >= 0).all()
    expected = dense.copy()
    np.fill_diagonal(expected, 0)
    if max_distance is not None:
        expected[expected > max_distance] = 1
    ours = _as_dense(graph)
    # the implicit-1 pattern exactly, the values to float64 summation-order precision
    np.testing.assert_array_equal(ours < 1, expected < 1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-12)  # one rounding step


@pytest.mark.parametrize("seed,n,k1,k2", [(0, 300, 30, 6), (1, 420, 20, 4), (2, 250, 12, 1), (3, 200, 8, 12)])
def test_jaccard_equals_dense_reference(seed: int, n: int, k1: int, k2: int) -> None:
    x, _ = _blobs(seed, n)
    dense = dense_jaccard(x, k1, k2)
    _check_graph(jaccard_distance(x, k1, k2, max_distance=None), dense, None)
    _check_graph(jaccard_distance(x, k1, k2, max_distance=0.55), dense, 0.55)


def _random_v(seed: int, n: int = 300, per_row: int = 10) -> sp.csr_matrix:
    """Rows like V's: a few positive weights summing to 1, with exact duplicate rows (distance 0, and
    tied distances to everything else)."""
    rng = np.random.default_rng(seed)
    cols = np.stack([rng.choice(n, per_row, replace=False) for _ in range(n)])
    vals = rng.random((n, per_row)) + 0.05
    copies = np.arange(1, n, 7)  # row 7t + 1 repeats row 7t
    cols[copies], vals[copies] = cols[copies - 1], vals[copies - 1]
    vals /= vals.sum(1, keepdims=True)
    v = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * per_row + 1, per_row)), shape=(n, n))
    v.sort_indices()
    return v


def _reference_pairs(v: sp.csr_matrix) -> list[tuple[int, int, float]]:
    """The min-sums as the definition reads, pair by pair: each entry (i, l) of row i, in ascending l, adds
    min(v_il, v_jl) to m_ij of every row j > i holding column l; pairs in the order first reached."""
    by_col = v.tocsc()
    out = []
    for i in range(v.shape[0]):
        m: dict[int, float] = {}
        for e in range(v.indptr[i], v.indptr[i + 1]):
            l, v_il = v.indices[e], v.data[e]
            for f in range(by_col.indptr[l], by_col.indptr[l + 1]):
                j = int(by_col.indices[f])
                if j > i:
                    m[j] = m.get(j, 0.0) + min(v_il, by_col.data[f])
        out += [(i, j, float(np.round(max(1 - m_ij / (2 - m_ij), 0.0), 12))) for j, m_ij in m.items()]
    return out


def _assert_pairs(got: tuple, expected: list[tuple[int, int, float]]) -> None:
    rows, cols, d = got[:3]
    np.testing.assert_array_equal(rows, [p[0] for p in expected])
    np.testing.assert_array_equal(cols, [p[1] for p in expected])
    # bit for bit
    np.testing.assert_array_equal(d.view(np.int64), np.array([p[2] for p in expected]).view(np.int64))


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_walk_equals_the_pairwise_definition(seed: int) -> None:
    v = _random_v(seed)
    full = _reference_pairs(v)
    assert len(full) > 2000 and any(d == 0 for *_, d in full)
    _assert_pairs(clustering._shared_pairs(v, None), full)
    _assert_pairs(clustering._shared_pairs(v, 0.9), [p for p in full if p[2] <= 0.9])
    # each row's 5 smallest (d, column), from either end of the pair; a pair left out is beyond both
    # of its rows' 5th smallest, so at least as far as the smallest 5th distance of a full row
    nearest = set()
    fifth = []
    for r in range(v.shape[0]):
        mine = sorted((d, j if i == r else i, (i, j)) for i, j, d in full if r in (i, j))
        nearest |= {pair for *_, pair in mine[:5]}
        fifth += [mine[4][0]] if len(mine) >= 5 else []
    got = clustering._shared_pairs(v, None, nearest=5)
    _assert_pairs(got, sorted(p for p in full if (p[0], p[1]) in nearest))  # in (i, j) order
    assert got[3] == min(fifth) and all(d >= min(fifth) for i, j, d in full if (i, j) not in nearest)


def test_ties_and_duplicates_are_broken_by_index() -> None:
    # exact ties straddle every neighbour-list boundary: float32 search cannot certify them, so the rows
    # are widened or computed whole in float64, and the index decides as in the reference's stable sort
    x = _dyadic(0, 360)
    sims, ids = knn_search(x, 10)
    np.testing.assert_array_equal(ids, dense_knn(x, 10))
    assert (np.diff(sims, axis=1) <= 0).all()
    dense = dense_jaccard(x, 10, 4)
    _check_graph(jaccard_distance(x, 10, 4, max_distance=None), dense, None)
    cfg = ClusterConfig(k1=10, k2=4, eps=0.5)
    ref, _ = dense_spcl_labels(dense, eps=0.5)
    np.testing.assert_array_equal(SelfPacedClustering(cfg)(x).labels, canonical(ref))


def test_uncertified_rows_take_the_wide_and_full_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    # a pessimistic float32 error bound and narrow margins: most rows fail the first certificate, some the
    # second too, and are computed whole
    monkeypatch.setattr(knn, "_UNIT", 2.0**-10)
    monkeypatch.setattr(knn, "_MARGIN", 1)
    monkeypatch.setattr(knn, "_WIDE_MARGIN", 3)
    x, _ = _blobs(4, 300, dim=8, noise=0.1)
    stats: dict[str, float] = {}
    sims, ids = knn.knn_table(x, 15, "exact", stats, device="cpu")
    assert stats["knn_rows_widened"] > 0 and stats["knn_rows_full"] > 0
    np.testing.assert_array_equal(ids, dense_knn(x, 15))


@pytest.fixture(scope="module")
def blobs_with_dense() -> tuple[np.ndarray, np.ndarray]:
    x, _ = _blobs(5, 500, num_ids=30, noise=0.45)
    return x, dense_jaccard(x)


@pytest.mark.parametrize("eps", [0.4, 0.5, 0.6, 0.7])
def test_labels_equal_dense_pipeline(blobs_with_dense: tuple[np.ndarray, np.ndarray], eps: float) -> None:
    x, dense = blobs_with_dense
    ref, thres = dense_spcl_labels(dense, eps=eps)
    result = SelfPacedClustering(ClusterConfig(eps=eps))(x)
    np.testing.assert_array_equal(result.labels, canonical(ref))
    assert result.stats["indep_threshold"] == thres
    assert result.num_clusters == len(np.unique(result.labels)) - result.num_outliers
    assert result.labels.dtype == np.int64
    # each criterion's removals, of which the union is what the two remove together
    s = result.stats
    both = s["rejected_by_independence"] + s["rejected_by_compactness"]
    assert max(s["rejected_by_independence"], s["rejected_by_compactness"]) <= s["rejected_by_criteria"] <= both


def test_exact_arithmetic_ties_at_eps_count_as_neighbours() -> None:
    # images whose query expansions share four of six rows and nothing else: m = 2/3, d = 0.5 exactly,
    # computed as 0.5 +- 1e-16 depending on the order of the sums; rounded, the tie is <= eps in both
    x, _ = _blobs(2, 500, num_ids=30, noise=0.45)
    dense = dense_jaccard(x)
    ties = np.argwhere(np.triu(dense == 0.5))
    assert len(ties)
    graph = jaccard_distance(x, max_distance=0.5)
    assert all(graph[i, j] == 0.5 and graph[j, i] == 0.5 for i, j in ties)
    ref, _ = dense_spcl_labels(dense, eps=0.5)
    np.testing.assert_array_equal(SelfPacedClustering(ClusterConfig(eps=0.5))(x).labels, canonical(ref))


def test_plain_dbscan_without_criteria(blobs_with_dense: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.cluster import DBSCAN
    x, dense = blobs_with_dense
    ref = generate_pseudo_labels(DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense))
    result = SelfPacedClustering(ClusterConfig(self_paced=False))(x)
    np.testing.assert_array_equal(result.labels, canonical(ref))
    assert "indep_threshold" not in result.stats


def test_independence_threshold_frozen_and_restored(blobs_with_dense: tuple[np.ndarray, np.ndarray]) -> None:
    x, dense = blobs_with_dense
    y, _ = _blobs(6, 400, num_ids=25, noise=0.5)
    cluster = SelfPacedClustering(ClusterConfig())
    cluster(x)
    first = cluster.state_dict()["indep_threshold"]
    assert first == dense_spcl_labels(dense)[1]
    second = cluster(y)
    assert cluster.state_dict()["indep_threshold"] == first  # frozen
    dense_y = dense_jaccard(y)
    np.testing.assert_array_equal(second.labels, canonical(dense_spcl_labels(dense_y, indep_thres=first)[0]))
    fresh_thres = dense_spcl_labels(dense_y)[1]
    assert fresh_thres != first  # so that the restored state matters below
    restored = SelfPacedClustering(ClusterConfig())
    restored.load_state_dict(json.loads(json.dumps(cluster.state_dict())))
    np.testing.assert_array_equal(restored(y).labels, second.labels)
    assert SelfPacedClustering(ClusterConfig())(y).stats["indep_threshold"] == fresh_thres
    with pytest.raises(ValueError, match="indep_threshold"):
        restored.load_state_dict({"threshold": 0.1})


def test_drop_outliers(blobs_with_dense: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs_with_dense
    kept = SelfPacedClustering(ClusterConfig())(x)
    dropped = SelfPacedClustering(ClusterConfig(drop_outliers=True))(x)
    single = kept.labels >= kept.num_clusters
    np.testing.assert_array_equal(dropped.labels, np.where(single, -1, kept.labels))
    assert dropped.num_outliers == kept.num_outliers == np.count_nonzero(single) > 0
    assert dropped.num_clusters == kept.num_clusters


def test_hdbscan_on_separated_blobs() -> None:
    x, truth = _blobs(7, 400, num_ids=12, noise=0.25)
    result = SelfPacedClustering(ClusterConfig(method="hdbscan"))(x)
    clustered = truth >= 0
    assert adjusted_rand_score(truth[clustered], result.labels[clustered]) > 0.95
    assert result.num_clusters == 12
    # the hdbscan package on the dense Jaccard matrix: the same clusters. Mutual reachability is full of
    # ties (every edge of a point carries its core distance), so the minimum spanning tree is not unique,
    # and a few un-clustered points hanging on tied edges may be labelled differently.
    ref = hdbscan.HDBSCAN(metric="precomputed", min_cluster_size=4, min_samples=4).fit(dense_jaccard(x)).labels_
    ref = canonical(generate_pseudo_labels(ref))
    assert adjusted_rand_score(ref[clustered], result.labels[clustered]) == 1
    assert adjusted_rand_score(ref, result.labels) > 0.95


@pytest.mark.parametrize("selection", ["eom", "leaf"])
@pytest.mark.parametrize("min_cluster_size", [2, 4, 8])
def test_hdbscan_equals_the_package_on_the_dense_matrix(selection: str, min_cluster_size: int) -> None:
    # min_samples = 1: mutual reachability is the distance itself, and where the dense minimum spanning
    # tree has no tied positive weight the single-linkage hierarchy is unique, so the labels must be the
    # package's on the dense matrix exactly. Exact duplicates put zero distances in the tree: they must
    # stay edges (a stored zero is no edge to scipy and the package). A second group in orthogonal
    # coordinates shares no support with the first: two components, joined at distance 1 as in the dense
    # matrix
    x, _ = _blobs(6, 150, num_ids=8, noise=0.3)
    x = np.concatenate([x, x[::10]])
    y, _ = _blobs(1, 40, dim=8, num_ids=2, noise=0.2, clustered=1.0)
    x = np.block([[x, np.zeros((len(x), 8), np.float32)], [np.zeros((len(y), 32), np.float32), y]])
    graph = jaccard_distance(x, max_distance=None)
    assert csgraph.connected_components(graph)[0] == 2
    dense = _as_dense(graph)
    tree = csgraph.minimum_spanning_tree(dense + 1 - np.eye(len(x))).data - 1  # shifted: zeros stay edges
    positive = tree[tree > 0]
    assert len(np.unique(positive)) == len(positive) and np.count_nonzero(tree == 0) >= 15
    # every group of zero-distance points is smaller than 2 min_cluster_size: nothing splits at lambda =
    # infinity, where the order of the tied zero edges would matter
    _, zero_groups = csgraph.connected_components(sp.csr_matrix((dense == 0) & ~np.eye(len(x), dtype=bool)))
    assert np.bincount(zero_groups).max() < 2 * min_cluster_size
    cfg = ClusterConfig(method="hdbscan", min_samples=1, hdbscan_min_cluster_size=min_cluster_size,
                        hdbscan_cluster_selection=selection)
    result = SelfPacedClustering(cfg)(x)
    ref = hdbscan.HDBSCAN(metric="precomputed", min_samples=1, min_cluster_size=min_cluster_size,
                          cluster_selection_method=selection).fit(dense).labels_
    np.testing.assert_array_equal(result.labels, canonical(generate_pseudo_labels(ref)))
    assert result.num_clusters >= 10
    # from the bounded graph (each row's 30 smallest and their mirrors), a third of the full one here
    assert result.stats["graph_nnz_per_row"] < graph.nnz / len(x) / 2


def test_hdbscan_graph_is_bounded_and_exact_where_it_matters() -> None:
    # collapsed features (one blob, as early in training): nearly every pair shares support, so the full
    # graph is N^2-like; the HDBSCAN graph keeps each row's k smallest plus their mirrors, and those are
    # the dense matrix's: the core distances are exact, and every pair below tau is stored
    x, _ = _blobs(20, 400, num_ids=1, noise=0.6, clustered=1.0)
    dense = dense_jaccard(x)
    np.fill_diagonal(dense, np.inf)
    full = jaccard_distance(x, max_distance=None)
    k = 10
    graph = jaccard_distance(x, max_distance=None, nearest=k)
    assert full.nnz > 0.5 * 400**2 and graph.nnz <= 400 * (2 * k + 1)
    ours = _as_dense(graph)
    np.fill_diagonal(ours, np.inf)
    np.testing.assert_allclose(np.sort(ours, 1)[:, :k], np.sort(dense, 1)[:, :k], rtol=0, atol=2e-12)
    stats: dict[str, float] = {}
    clustering._jaccard(x, 30, 6, "exact", None, stats, nearest=k, device="cpu")
    tau = stats["graph_complete_below"]
    assert tau == np.sort(dense, 1)[:, k - 1].min() < 1
    np.testing.assert_array_equal(ours < tau, dense < tau)  # every pair below tau is stored
    result = SelfPacedClustering(ClusterConfig(method="hdbscan", hdbscan_neighbours=k))(x)
    assert result.stats["graph_nnz_per_row"] <= 2 * k + 1 and result.stats["graph_complete_below"] == tau


@pytest.mark.parametrize("kind", ["exact", "int8"])
def test_blocked_scan_keeps_each_rows_top_products(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # blocks of 37 rows (the last one short) and a cut whenever a block holds more than its top: every
    # path of the scan runs, and the result must be the top of the full product matrix
    monkeypatch.setattr(knn, "_BLOCK", 37)
    monkeypatch.setattr(knn, "_HOLD", 1)
    x, _ = _blobs(11, 300, num_ids=12)
    feat, _ = knn._scan_operand(x, kind, torch.device("cpu"))
    vals, ids = knn._blocked_top(feat, 12)
    x64 = x.astype(np.float64)
    full = (feat.int() @ feat.int().T) if kind == "int8" else torch.from_numpy(x64 @ x64.T)
    assert ids.shape == (300, 12) and all(len(set(row)) == 12 for row in ids.tolist())
    top = torch.topk(full, 12, dim=1).values
    if kind == "int8":  # exact integers: the same values, and each id carries its value
        assert torch.equal(vals, top) and torch.equal(torch.gather(full, 1, ids), vals)
    else:  # float32 blocks against float64: within rounding
        np.testing.assert_allclose(vals.numpy(), top.numpy(), atol=1e-5)
        np.testing.assert_allclose(torch.gather(full, 1, ids).numpy(), vals.numpy(), atol=1e-5)
    assert (vals[:, :-1] >= vals[:, 1:]).all()


@pytest.mark.parametrize("data", ["blobs", "dyadic"])
def test_exact_search_across_blocks_equals_dense(monkeypatch: pytest.MonkeyPatch, data: str) -> None:
    monkeypatch.setattr(knn, "_BLOCK", 50)
    monkeypatch.setattr(knn, "_HOLD", 1)
    x = _blobs(12, 360, num_ids=15)[0] if data == "blobs" else _dyadic(13, 360)
    stats: dict[str, float] = {}
    _, ids = knn.knn_table(x, 12, "exact", stats, device="cpu")
    np.testing.assert_array_equal(ids, dense_knn(x, 12))


@pytest.mark.parametrize("fmt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("data", ["near_ties", "dyadic"])
def test_low_precision_scan_is_certified_and_repaired(monkeypatch: pytest.MonkeyPatch, fmt: torch.dtype,
                                                       data: str) -> None:
    # the block products in the given format (float16 is CUDA's; on CPU the same values in float32), with
    # that format's error bound: rows the bound cannot settle are widened or computed whole in float64,
    # and the table is the dense float64 one, ties by index
    monkeypatch.setitem(knn._SCAN_FORMAT, "cpu", fmt)
    monkeypatch.setattr(knn, "_BLOCK", 100)  # several block pairs
    x = _near_ties(16) if data == "near_ties" else _dyadic(17, 360)
    k = 12
    stats: dict[str, float] = {}
    sims, ids = knn.knn_table(x, k, "exact", stats, device="cpu")
    np.testing.assert_array_equal(ids, dense_knn(x, k))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(sims, np.einsum("id,ikd->ik", x64, x64[ids]), rtol=0, atol=1e-12)
    # the scan alone orders the (near-)ties wrongly: the float64 repair is what makes the table exact
    feat, _ = knn._scan_operand(x, "exact", torch.device("cpu"))
    assert not np.array_equal(knn._blocked_top(feat, k)[1].numpy(), dense_knn(x, k))
    if data == "dyadic":  # exact ties at the boundary: no format can certify those rows at first
        assert stats["knn_rows_widened"] > 0
    elif fmt != torch.float32:  # within the bound, every row is in doubt, and the group of 150 exceeds k + 120
        assert stats["knn_rows_widened"] == len(x) and stats["knn_rows_full"] == 150
    else:  # float32 separates them
        assert stats["knn_rows_widened"] == 0


def test_product_error_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 features in a float32 scan: only the sums round, gamma_D (1 + 1e-3)^2 plus the slack
    assert knn._product_error(torch.float32, 512) == 512 * 2**-24 / (1 - 512 * 2**-24) * 1.001**2 + 1e-12
    # float16: input rounding 2 nu rho with rho = 2^-11 nu + 2^-25 sqrt(D), sums at 2^-22 (truncating)
    rho = 2**-11 * 1.001 + 2**-25 * np.sqrt(2048)
    bound = 2 * 1.001 * rho + rho**2 + 2048 * 2**-22 / (1 - 2048 * 2**-22) * (1.001 + rho) ** 2 + 1e-12
    assert knn._product_error(torch.float16, 2048) == pytest.approx(bound, rel=1e-15)
    assert 1.4e-3 < bound < 1.6e-3
    # the worst case of input rounding: every entry rounded the same way. x = (1, ..., 1) / sqrt(D) at the
    # D <= 1024 whose 1/sqrt(D) rounds worst in float16: the scan's <x~, x~> is off by ~2u, most of the
    # bound (the sums' part is small at this D), and never beyond it
    dims = np.arange(16, 1025)
    dim = int(dims[np.argmax(np.abs(np.float16(1 / np.sqrt(dims)) * np.sqrt(dims) - 1))])
    x = np.full((2, dim), 1 / np.sqrt(dim), np.float32)
    monkeypatch.setitem(knn._SCAN_FORMAT, "cpu", torch.float16)
    feat, _ = knn._scan_operand(x, "exact", torch.device("cpu"))
    off = abs(float(knn._product(feat[:1], feat[1:], torch.empty(1))) - float(x[0].astype(np.float64) @ x[1]))
    bound = knn._product_error(torch.float16, dim)
    assert 0.6 * bound < off <= bound, (dim, off, bound)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scan_equals_dense() -> None:
    # the float16 tensor-core scan itself (cuBLAS, float32 accumulation), certified and repaired
    for x in (_near_ties(18), _blobs(19, 2000, dim=64)[0]):
        stats: dict[str, float] = {}
        _, ids = knn.knn_table(x, 12, "exact", stats, device="cuda")
        np.testing.assert_array_equal(ids, dense_knn(x, 12))
        assert stats["knn_rows_widened"] > 0


def test_int8_search_gives_the_exact_labels() -> None:
    x, _ = _blobs(14, 800, dim=64, num_ids=20, noise=0.4)
    sims, ids = knn_search(x, 30, "int8")
    exact = dense_knn(x, 30)
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, exact)]) / 30
    assert recall > 0.99 and (ids[:, 0] == np.arange(len(x))).all() and (np.diff(sims, axis=1) <= 0).all()
    fast = SelfPacedClustering(ClusterConfig(knn="int8"))(x)
    np.testing.assert_array_equal(fast.labels, SelfPacedClustering(ClusterConfig())(x).labels)
    assert fast.stats["knn_recall"] > 0.99


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indices(index: str) -> None:
    x, _ = _blobs(8, 600, num_ids=15, noise=0.3, clustered=1.0)  # ~40 per cluster: the top 10 are mates
    sims, ids = knn_search(x, 10, index)
    exact = dense_knn(x, 10)
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, exact)]) / 10
    assert recall > 0.95 and (ids[:, 0] == np.arange(len(x))).all() and (np.diff(sims, axis=1) <= 0).all()
    result = SelfPacedClustering(ClusterConfig(knn=index))(x)
    assert result.stats["knn_recall"] > 0.95


def test_more_ivf_probes_find_more_neighbours() -> None:
    x, _ = _blobs(15, 3000, dim=48, num_ids=60, noise=0.5, clustered=0.7)
    exact = dense_knn(x, 30)
    recall = {}
    for nprobe in (1, 8):
        stats: dict[str, float] = {}
        _, ids = knn.knn_table(x, 30, "ivf", stats, nprobe)
        recall[nprobe] = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, exact)]) / 30
        assert stats["ivf_nprobe"] == nprobe  # of min(sqrt(nprobe N), N / 40) lists
        assert stats["ivf_nlist"] == min(round(np.sqrt(nprobe * len(x))), len(x) // 40)
    assert recall[8] > recall[1] + 0.05, recall
    assert SelfPacedClustering(ClusterConfig(knn="ivf", ivf_nprobe=8))(x).stats["ivf_nprobe"] == 8


def test_bad_input_is_a_one_line_error() -> None:
    x, _ = _blobs(9, 50)
    cases = [
        (x[0], "2-D"),
        (np.where(np.arange(50)[:, None] == 3, np.nan, x), "row 3 contains NaN"),
        (np.where(np.arange(50)[:, None] == 5, 2 * x, x), "L2-normalised rows: row 5 has norm 2"),
        (x[:30], "k1 must be in \\[1, N\\) with N = 30"),
        (x.astype(np.int64), "floating point"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            SelfPacedClustering(ClusterConfig())(bad)
        assert "\n" not in str(err.value)
    for cfg, message in [(ClusterConfig(eps=0.99), "eps \\+ eps_gap must be < 1"),
                         (ClusterConfig(eps=0.01), "eps - eps_gap must be > 0"),
                         (ClusterConfig(knn="flat"), "knn must be"),
                         (ClusterConfig(ivf_nprobe=0), "ivf_nprobe must be >= 1"),
                         (ClusterConfig(independence_quantile=0), "independence_quantile"),
                         (ClusterConfig(knn_device="gpu"), "knn_device must be one of auto, cpu, cuda"),
                         (ClusterConfig(method="hdbscan", min_samples=8, hdbscan_neighbours=5),
                          "hdbscan_neighbours must be >= min_samples")]:
        with pytest.raises(ValueError, match=message):
            SelfPacedClustering(cfg)
    SelfPacedClustering(ClusterConfig(min_samples=8, hdbscan_neighbours=5))  # DBSCAN does not read it
    with pytest.raises(ValueError, match="index must be one of"):
        jaccard_distance(x, index="lsh")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        knn_search(x, 5, "ivf", nprobe=0)
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        knn_search(x, 5, device="gpu")
    with pytest.raises(ValueError, match="max_distance must be >= 0"):
        jaccard_distance(x, max_distance=-0.1)
    with pytest.raises(ValueError, match="nearest must be >= 1"):
        jaccard_distance(x, nearest=0)


def test_cuda_requested_without_a_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x, _ = _blobs(9, 50)
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device"):
        knn_search(x, 5, device="cuda")
    with pytest.raises(ValueError, match="knn_device=cuda but torch sees no CUDA device"):
        SelfPacedClustering(ClusterConfig(knn_device="cuda"))
    assert knn._resolve("auto") == torch.device("cpu")


def test_config_loads_through_shared_config() -> None:
    cfg = load_config(ClusterConfig, overrides=["knn=ivf", "ivf_nprobe=16", "eps=0.5", "drop_outliers=true"])
    assert (cfg.knn, cfg.ivf_nprobe, cfg.eps, cfg.drop_outliers, cfg.method) == ("ivf", 16, 0.5, True, "dbscan")
    with pytest.raises(ConfigError, match="valid choices: exact, int8, ivf, hnsw"):
        load_config(ClusterConfig, overrides=["knn=flat"])
    assert load_config(ClusterConfig, overrides=["knn_device=cpu"]).knn_device == "cpu"
    with pytest.raises(ConfigError, match="valid choices: auto, cpu, cuda"):
        load_config(ClusterConfig, overrides=["knn_device=gpu"])


def test_memory_grows_with_n_not_n_squared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "_QUERY_CHUNK", 1 << 10)
    monkeypatch.setattr(clustering, "_ROW_CHUNK", 1 << 10)
    n = 10000
    x, _ = _blobs(10, n, num_ids=400)
    tracemalloc.start()  # NumPy's allocations (the compiled walk's own are outside it: O(N) plus its output)
    graph = jaccard_distance(x)  # the default: pairs up to SpCL's loose eps, 0.62
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense = n * n * 4  # one float32 N x N matrix; the reference holds about three
    assert peak < dense / 10, f"peak {peak / 2**20:.1f} MB vs one dense matrix {dense / 2**20:.0f} MB"
    assert graph.nnz < 40 * n  # about the cluster size per row
