"""pretrain/knn.py's approximate searches: the recall they report, the settings they record, and the
benchmark's features (launch/bench/clustering.py) their figures are measured on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from reidforge.pretrain import knn
from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering

from dense_clustering import dense_knn

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_clustering", ROOT / "launch" / "bench" / "clustering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blobs(seed: int, n: int, dim: int = 32, num_ids: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_ids, dim))[rng.integers(0, num_ids, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, truth)]) / truth.shape[1])


def test_sampled_truth_is_brute_force_across_column_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "_RECALL_COLUMNS", 37)  # many column blocks, the last one short
    x = _blobs(3, 500)
    rows = np.array([0, 7, 499, 250, 13])
    ids = knn._sample_top(torch.from_numpy(x), rows, 12)
    exact = dense_knn(x, 12)[rows]
    for got, want in zip(ids, exact):  # the same sets (float32 order may differ from float64's)
        assert set(got) == set(want)


@pytest.mark.parametrize("index", ["ivf", "hnsw", "int8"])
def test_recall_is_measured_against_brute_force_with_the_settings(index: str) -> None:
    x = _blobs(4, 900, dim=48, num_ids=20)
    stats: dict[str, float] = {}
    _, ids = knn.knn_table(x, 30, index, stats, nprobe=2, device="cpu")
    # below 2,000 images the sample is every image: the reported recall is the table's whole recall
    assert stats["knn_recall_queries"] == 900
    assert stats["knn_recall"] == pytest.approx(_recall(ids, dense_knn(x, 30)), rel=1e-12)
    settings = {k for k in stats if k.startswith(("ivf_", "hnsw_"))}
    assert settings == {"ivf": {"ivf_nlist", "ivf_nprobe"}, "hnsw": {"hnsw_m", "hnsw_ef_construction",
                                                                        "hnsw_ef_search"}, "int8": set()}[index]
    if index == "hnsw":
        assert (stats["hnsw_m"], stats["hnsw_ef_search"]) == (knn._HNSW_M, knn._HNSW_EF_SEARCH)


def test_recall_sample_has_a_fixed_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "_RECALL_QUERIES", 100)
    x = _blobs(5, 700)
    result = SelfPacedClustering(ClusterConfig(knn="ivf", k1=10))(x)
    assert result.stats["knn_recall_queries"] == 100 and 0 < result.stats["knn_recall"] <= 1
    assert result.stats["ivf_nprobe"] == knn.IVF_NPROBE
    assert "knn_recall" not in SelfPacedClustering(ClusterConfig(k1=10))(x).stats  # exact: certified, no sample


def test_hard_features_are_noise_dominated_identities() -> None:
    bench = _bench()
    x, owner = bench.hard(400, 256)
    assert x.shape == (400, 256) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    assert np.array_equal(np.bincount(owner), np.full(20, 20))  # n / 20 identities of 20 images
    same = owner[:, None] == owner[None, :]
    sims = x @ x.T
    mates = sims[same & ~np.eye(400, dtype=bool)].mean()
    # s in [2.6, 3.8]: cosine between mates 1 / (1 + s^2) ~ 0.065-0.13, others ~0 (std 1/sqrt(256))
    assert 0.06 < mates < 0.14 and abs(sims[~same].mean()) < 0.01
    np.testing.assert_array_equal(bench.hard(400, 256)[0], x)  # seeded


def test_auto_is_int8_on_cpu_and_exact_on_cuda() -> None:
    x = _blobs(6, 600)
    auto: dict[str, float] = {}
    int8: dict[str, float] = {}
    _, ids = knn.knn_table(x, 12, "auto", auto, device="cpu")
    np.testing.assert_array_equal(ids, knn.knn_table(x, 12, "int8", int8, device="cpu")[1])
    assert auto["knn_recall"] == int8["knn_recall"]  # approximate: its recall is reported
    assert SelfPacedClustering(ClusterConfig(knn="auto", knn_device="cpu", k1=12))(x).stats["knn_recall"] > 0.9
    if torch.cuda.is_available():  # the certified scan: no recall sample, the dense table
        stats: dict[str, float] = {}
        np.testing.assert_array_equal(knn.knn_table(x, 12, "auto", stats, device="cuda")[1], dense_knn(x, 12))
        assert "knn_recall" not in stats


def test_bench_search_mode_reports_recall_settings_and_memory() -> None:
    bench = _bench()
    run = bench._isolated("search", 3000, 32, 16.0, 0.2, "ivf", None, 4, "cpu")
    assert run["knn_recall_queries"] == 2000 and 0.5 < run["knn_recall"] <= 1
    assert run["ivf_nprobe"] == 4 and run["ivf_nlist"] == min(round(np.sqrt(4 * 3000)), 3000 // 40)
    assert run["seconds"] >= run["knn_s"] > 0 and run["peak_rss"] > 0
    assert bench._settings(run) == f"; ivf_nlist {run['ivf_nlist']:g}, ivf_nprobe 4"
