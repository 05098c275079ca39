"""`python data/build_shards.py synthetic` end to end, run as a script from another directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reidforge.data.readers import IndexedShards, StreamingShards
from reidforge.data.shards import load_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = ["train_ids=6", "test_ids=4", "images_per_test_id=6", "distractors=5", "pool_images=60",
        "vehicle_train_ids=3", "vehicle_test_ids=3"]


def _build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "data" / "build_shards.py"), "synthetic", "--out", str(out), "--no-progress",
           "--config", str(REPO / "launch" / "configs" / "synthetic.yaml"), *TINY, *extra]
    return subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=300)


def test_synthetic_build_summary_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = _build(out, "--samples-per-shard", "25", "--workers", "2")
    assert first.returncode == 0, first.stderr
    splits = {(m["dataset"], m["split"]) for m in map(load_manifest, (p.parent for p in out.rglob("manifest.json")))}
    assert splits == {("synthetic_person", s) for s in ("train", "query", "gallery")} | {
        ("synthetic_lup", "pool")} | {("synthetic_vehicle", s) for s in ("train", "query", "gallery")}
    table = first.stdout.splitlines()
    assert table[0].split("|")[1].strip() == "dataset" and len(table) == 2 + 7 + 1
    pool = load_manifest(out / "synthetic_lup" / "pool")
    assert pool["num_samples"] == 60 and pool["num_pids"] == 0 and len(pool["shards"]) == 3
    train = IndexedShards(out / "synthetic_person" / "train")
    assert sorted(set(train.pids.tolist())) == list(range(6))  # relabelled 0..N-1
    gallery = next(s for s in StreamingShards(out / "synthetic_person" / "gallery"))
    assert gallery["image"].shape == (3, 128, 64)

    again = _build(out, "--samples-per-shard", "25")
    assert again.returncode == 0, again.stderr
    header = [c.strip() for c in again.stdout.splitlines()[0].split("|")]
    rows = [[c.strip() for c in line.split("|")] for line in again.stdout.splitlines()[2:9]]
    reused, shards, skipped = ([r[header.index(name)] for r in rows] for name in ("reused", "shards", "skipped"))
    assert reused == shards  # every shard vouched for and reused
    assert skipped == ["0"] * len(rows)

    changed = _build(out, "--samples-per-shard", "25", "seed=1")
    assert changed.returncode == 0 and all(line.split("|")[-2].strip() == "0"
                                           for line in changed.stdout.splitlines()[2:9])


def test_help_lists_each_dataset() -> None:
    result = subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), "synthetic", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--out" in result.stdout and "Market-1501" in result.stdout
