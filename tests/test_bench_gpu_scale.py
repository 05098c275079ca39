"""launch/bench/gpu_check.py at its tiny CPU size, and launch/bench/scale_estimate.py's projection."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "launch" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _script("gpu_check")
scale = _script("scale_estimate")


def test_gpu_check_tiny_on_cpu_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--size", "tiny", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["size"] == "tiny" and report["device"] == "cpu"
    assert all(r["device"] == "cpu" and r["size"] for r in rows)  # every row says its size and device
    finetune = {r["model"]: r for r in rows if r["kind"] == "finetune"}
    assert list(finetune) == list(gpu_check.SEED_MODELS)
    for r in finetune.values():
        assert r["images_per_s"] > 0 and r["extract_images_per_s"] > 0 and r["batch"] == 4
    assert finetune["mbr_4b"]["input"] == [64, 64] and finetune["dm_osnet"]["input"] == [64, 32]
    (loader,) = [r for r in rows if r["kind"] == "dataloader"]
    assert loader["images"] > 0 and loader["images_per_s"] > 0 and loader["workers"] == 0
    (spcl,) = [r for r in rows if r["kind"] == "spcl_epoch"]
    assert spcl["iterations"] == 2 and spcl["images"] == 120 and math.isfinite(spcl["loss"]) and spcl["seconds"] > 0
    scans = {r["n"]: r for r in rows if r["kind"] == "knn_torch"}
    brute = {r["n"]: r for r in rows if r["kind"] == "knn_faiss"}
    assert sorted(scans) == sorted(brute) == [2048, 4096]
    assert scans[2048]["block_pairs"] == 1 and scans[4096]["block_pairs"] == 3  # 2 blocks: 2 diagonal + 1 pair
    for n in (2048, 4096):
        assert scans[n]["seconds"] > 0 and brute[n]["seconds"] > 0
        assert brute[n]["agreement_at_30"] >= 0.999  # both float32 on CPU: only near-ties may differ


def test_gpu_check_skips_a_knn_size_its_budget_cannot_hold() -> None:
    rows = gpu_check.check_knn([2048, 4096], torch.device("cpu"), deadline=time.perf_counter())
    assert [(r["kind"], r["n"], r["seconds"] is None) for r in rows] == [
        ("knn_torch", 2048, False), ("knn_faiss", 2048, False), ("knn_torch", 4096, True), ("knn_faiss", 4096, True)]
    skipped = rows[2]
    assert skipped["notes"].startswith("not run") and skipped["projected_seconds"] == pytest.approx(
        rows[0]["seconds"] * 4)  # (N / N_prev)^2


MEASURED = scale.Measured(
    n=16384, rank_row_s={512: 50e-6, 2048: 200e-6}, full_cell_s=1e-9, widened_fraction=0.1, full_fraction=0.001,
    jaccard_row_s=100e-6, dbscan_entry_s=1e-6, graph_entries_per_row=25.0, host_bytes_per_image=7000.0,
    clustered_fraction=0.75, mean_cluster_size=20.0, memory_bytes_per_slot={512: 1100.0, 2048: 4200.0},
    scan_pair_s={512: 0.2, 2048: 0.5})


def _step(n: int, d: int, assumptions: scale.Assumptions, name: str) -> scale.Step:
    return next(s for s in scale.project(n, d, MEASURED, assumptions) if s.name == name)


def test_projection_knn_scan_quadruples_with_n_and_divides_by_world() -> None:
    a = scale.Assumptions()
    n = 2048 * 1024
    assert scale.block_pairs(n) == 1024 * 1025 // 2 and scale.block_pairs(4096) == 3
    one = _step(n, 512, a, "kNN scan").epoch_s
    assert _step(2 * n, 512, a, "kNN scan").epoch_s / one == pytest.approx(4, rel=1e-3)
    assert _step(n, 512, replace(a, world=4), "kNN scan").epoch_s == pytest.approx(2 * one, rel=1e-12)
    assert one == pytest.approx(scale.block_pairs(n) / 8 * scale.pair_seconds(512, a), rel=1e-12)


def test_projection_terms_follow_their_stated_scaling() -> None:
    a = scale.Assumptions()
    n = 2_000_000
    # Jaccard is shared by the ranks at min(1, 2 / world) of one process's walk; DBSCAN runs on rank 0
    assert _step(n, 512, a, "Jaccard").epoch_s == pytest.approx(n * 100e-6 / 4)
    assert _step(n, 512, replace(a, world=2), "Jaccard").epoch_s == pytest.approx(n * 100e-6)
    assert _step(n, 512, replace(a, world=1), "Jaccard").epoch_s == pytest.approx(n * 100e-6)
    assert _step(n, 512, a, "DBSCAN x 3 + criteria").epoch_s == pytest.approx(n * 25 * 1e-6)
    # extraction: N / (world x the smaller of the model's and the loader's rate)
    assert _step(n, 512, a, "extract").epoch_s == pytest.approx(n / (8 * min(5000.0, 8 * 1000.0)))
    # training: ceil(N / (16 x world)) iterations of 16 images at the encoder's rate + the memory loss
    classes = n * 0.25 + n * 0.75 / 20
    memory_s = 2 * classes * 512 * 2 / (a.gpu_bandwidth * a.bandwidth_efficiency)
    assert _step(n, 512, a, "train").epoch_s == pytest.approx(math.ceil(n / 128) * (16 / 1500 + memory_s))
    # the bank is resident on every GPU in every step
    assert all(s.gpu_bytes >= n * 1100.0 for s in scale.project(n, 512, MEASURED, a))


def test_a_measured_block_pair_replaces_the_assumed_one() -> None:
    a = scale.Assumptions(pair_s={512: 1e-4})
    extra = 2 * 2048**2 * 1536 / (a.gpu_flops * a.flops_efficiency)
    assert scale.pair_seconds(512, a) == 1e-4 and scale.pair_seconds(2048, a) == pytest.approx(1e-4 + extra)
    assumed = scale.Assumptions()
    assert scale.pair_seconds(512, assumed) == pytest.approx(
        2 * 2048**2 * 512 / (989e12 * 0.6) + 2048**2 * 14 / (3.35e12 * 0.7) + 100e-6)


def test_gpu_json_rates_replace_the_assumptions(tmp_path: Path) -> None:
    rows = [{"kind": "knn_torch", "n": 1_000_000, "dim": 512, "seconds": 30.0, "seconds_per_block_pair": 2.5e-4},
            {"kind": "knn_torch", "n": 4_000_000, "dim": 512, "seconds": None},  # skipped by its budget
            {"kind": "finetune", "model": "dm_osnet", "images_per_s": 1200.0, "extract_images_per_s": 4000.0},
            {"kind": "finetune", "model": "bot_resnet50", "images_per_s": 2000.0, "extract_images_per_s": 7000.0},
            {"kind": "dataloader", "images_per_s": 9000.0, "workers": 8}]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"size": "gpu", "gpu": "NVIDIA H200", "rows": rows}))
    a = scale.from_gpu_check(path, scale.Assumptions())
    assert a.pair_s == {512: 2.5e-4} and a.train_images_per_s == {512: 1200.0, 2048: 2000.0}
    assert a.extract_images_per_s == {512: 4000.0, 2048: 7000.0} and a.loader_images_per_s_per_worker == 1125.0
    assert a.source == "gpu_check gpu on NVIDIA H200"
    path.write_text(json.dumps({"rows": rows[:2]}))
    with pytest.raises(SystemExit, match="no 'finetune' row for dm_osnet"):
        scale.from_gpu_check(path, scale.Assumptions())


def test_scale_estimate_runs_at_a_tiny_measuring_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scale.json"
    scale.main(["--measure-n", "4096", "--sizes", "100000", "--dims", "512,2048", "--out", str(out)])
    report = json.loads(out.read_text())
    m = report["measured"]
    assert m["n"] == 4096 and 0 <= m["widened_fraction"] <= 1 and 0 <= m["full_fraction"] <= 1
    assert all(m[k] > 0 for k in ("jaccard_row_s", "dbscan_entry_s", "graph_entries_per_row", "mean_cluster_size"))
    assert m["memory_bytes_per_slot"]["2048"] > m["memory_bytes_per_slot"]["512"] >= 512 * 2
    projections = report["projections"]
    assert [(p["n"], p["dim"]) for p in projections] == [(100000, 512), (100000, 2048)]
    for p in projections:
        names = [s["name"] for s in p["steps"]]
        assert names == ["extract", "kNN scan", "kNN re-rank + certify", "Jaccard", "DBSCAN x 3 + criteria", "train"]
        assert p["epoch_s"] == pytest.approx(sum(s["epoch_s"] for s in p["steps"])) and p["run_s"] == 30 * p["epoch_s"]
    text = capsys.readouterr().out
    assert "100,000 x 512, 8 GPUs" in text and "assumptions:" in text and "| kNN scan " in text
