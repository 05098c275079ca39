"""Building shard sets: every split of every dataset a builder returns, and the summary of the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reidforge.data.shards import ShardError, WriteOptions, check_writable_dir, safe_name, write_split
from reidforge.data.source import Sources
from reidforge.shared.table import format_table


def select_splits(sources: Sources, splits: list[str] | None) -> Sources:
    """Keep only the named splits; an unknown name is a one-line error listing the valid ones."""
    if not splits:
        return sources
    valid = sorted({s for per_dataset in sources.values() for s in per_dataset})
    unknown = [s for s in splits if s not in valid]
    if unknown:
        raise ShardError(f"unknown split name(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return {d: {s: src for s, src in per.items() if s in splits} for d, per in sources.items()
            if any(s in splits for s in per)}


def build_all(sources: Sources, out: str | Path, options: WriteOptions) -> list[dict[str, Any]]:
    """Write every split under ``out/<dataset>/<split>/``; train pids are relabelled 0..N-1."""
    out = check_writable_dir(out)
    # Every name becomes one path component under ``out``: checked for all splits before any is written.
    for dataset, splits in sources.items():
        safe_name(dataset, "dataset name")
        for split in splits:
            safe_name(split, f"{dataset}: split name")
    out.mkdir(exist_ok=True)
    manifests = []
    for dataset, splits in sources.items():
        for split, source in splits.items():
            manifests.append(write_split(source, out / dataset / split, split, relabel=split == "train",
                                         options=options))
    return manifests


def summary(manifests: list[dict[str, Any]]) -> str:
    rows = [
        [m["dataset"], m["split"], m["num_samples"], m["num_pids"], m["num_cameras"], len(m["shards"]),
         round(sum(s["size"] for s in m["shards"]) / 2**20, 2), m.get("reused_shards", 0), len(m.get("skipped", []))]
        for m in manifests
    ]
    return format_table(["dataset", "split", "images", "ids", "cameras", "shards", "MiB", "reused", "skipped"], rows)
