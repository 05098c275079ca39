"""pretrain/distributed_clustering.py: the clustering shared by torchrun ranks (gloo on CPU) gives one
process's labels and criteria.

Run as a script under torchrun, this file is the worker: ``<out> <n> <dim> [key=value ...]`` (cluster
settings) clusters the seeded features of ``_features`` with each rank holding its block, and rank 0
writes the result to ``<out>/result.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering
from reidforge.pretrain.distributed_clustering import (TIMEOUT_FLOOR_S, TIMEOUT_MARGIN, clustering_timeout,
                                                       row_bounds)

# the statistics that do not depend on how the work is split (timings and the scan's own counts do)
SAME = ("n", "v_nnz_per_row", "graph_nnz_per_row", "dbscan_clusters", "indep_threshold", "rejected_by_independence",
        "rejected_by_compactness", "rejected_by_criteria", "num_clusters", "num_outliers", "fraction_clustered",
        "mean_cluster_size", "max_cluster_size")


def _features(n: int, dim: int) -> np.ndarray:
    """Identities of 2-30 images at mixed spreads, so that DBSCAN leaves outliers and the criteria reject."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(2, 30, n)
    pid = np.repeat(np.arange(n), sizes)[:n]
    centres = rng.standard_normal((pid.max() + 1, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.05, 0.35, pid.max() + 1)[pid, None]
    x = centres[pid] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _config(settings: list[str]) -> ClusterConfig:
    cfg = ClusterConfig(knn_device="cpu")
    for item in settings:
        key, value = item.split("=")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    return cfg


def _worker(out: Path, n: int, dim: int, settings: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from reidforge.pretrain.distributed_clustering import distributed_cluster

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    bounds = row_bounds(n, world)
    block = _features(n, dim)[bounds[rank]:bounds[rank + 1]]
    result = distributed_cluster(SelfPacedClustering(_config(settings)), block, n, dist.group.WORLD)
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"labels": result.labels.tolist(), "stats": result.stats,
                                                     "world": world}))
    else:
        assert result is None
    dist.destroy_process_group()


def _torchrun(tmp_path: Path, ranks: int, n: int, dim: int, *settings: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(Path(__file__).resolve()), str(tmp_path), str(n), str(dim), *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize("ranks, n, dim, settings", [
    (2, 1500, 32, ()),
    (3, 1201, 24, ("k1=20", "k2=4", "eps=0.5")),  # uneven blocks (400, 400, 401), other settings
])
def test_ranks_give_one_process_labels_and_criteria(tmp_path: Path, ranks: int, n: int, dim: int,
                                                    settings: tuple[str, ...]) -> None:
    shared = _torchrun(tmp_path, ranks, n, dim, *settings)
    one = SelfPacedClustering(_config(list(settings)))(_features(n, dim))
    assert shared["world"] == ranks
    assert np.array_equal(np.array(shared["labels"]), one.labels)
    assert {k: shared["stats"].get(k) for k in SAME} == {k: one.stats.get(k) for k in SAME}
    # the case is not trivial: clusters, outliers and rejections by the criteria
    assert one.num_clusters > 20 and one.num_outliers > 0 and one.stats["rejected_by_criteria"] > 0


def test_timeout_follows_the_measured_clustering_time() -> None:
    assert clustering_timeout(None, 120) == timedelta(minutes=120)  # nothing measured yet: the run's setting
    assert clustering_timeout(1000.0, 120) == timedelta(seconds=TIMEOUT_MARGIN * 1000.0)
    assert clustering_timeout(1.0, 120) == timedelta(seconds=TIMEOUT_FLOOR_S)  # the floor
    assert (TIMEOUT_MARGIN, TIMEOUT_FLOOR_S) == (4.0, 600.0)


def test_row_bounds_split_like_the_feature_extraction() -> None:
    assert row_bounds(1201, 3).tolist() == [0, 400, 800, 1201]
    assert row_bounds(10, 1).tolist() == [0, 10]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
