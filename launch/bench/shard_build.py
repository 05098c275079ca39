"""Shard building speed against ``tar cf`` of the same files, measured in one run.

    python launch/bench/shard_build.py [--images 20000] [--repeats 3] [--out runs/bench/shard_build.json]

Builds a fixture tree of ``--images`` JPEGs (128x64, about 5 KB each, like Market-1501 crops) in the
bring-your-own folder layout (``<root>/train/<pid>/<camid>/*.jpg``), then times

1. ``tar cf`` of the tree (a subprocess): copying the same bytes into one archive, the floor;
2. ``write_split`` of the ``folder`` adapter's source, with 1 and with 2 encoding workers: reading the
   files, writing webdataset shards with a json per sample, fsync, sha256 and the offset index.

Both read the files just written, from the page cache, so the figures compare the writer's own cost
with tar's rather than the disk. Each method keeps its best of ``--repeats`` runs. The target is a
writer at 0.8 of tar's rate or better.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from reidforge.data.datasets.folder import FolderAdapter
from reidforge.data.shards import WriteOptions, write_split
from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

TARGET = 0.8


def make_tree(root: Path, n: int, seed: int = 0) -> int:
    """``n`` JPEGs of 128x64 under ``root/train/<pid>/<camid>/``; returns their total size in bytes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 128)[:, None, None]
    total = 0
    for i in range(n):
        # A smooth body of random colours plus sensor noise: about 5 KB at quality 90, like real crops.
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        blocks = np.kron(rng.normal(0, 40, (32, 16, 3)), np.ones((4, 4, 1)))  # texture at 4-pixel scale
        pixels = (1 - ramp) * top + ramp * bottom + blocks + rng.normal(0, 8, (128, 64, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        path = root / "train" / f"{i // 20:05d}" / f"{i % 6}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def best_time(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best is reported")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/shard_build.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "tree", Path(tmp) / "out"
        start = time.perf_counter()
        total = make_tree(tree, args.images)
        made = time.perf_counter() - start
        start = time.perf_counter()
        source = FolderAdapter(SimpleNamespace(root=tree, name="bench")).sources()["bench"]["train"]
        listed = time.perf_counter() - start

        def tar() -> None:
            subprocess.run(["tar", "cf", str(Path(tmp) / "tree.tar"), "-C", str(tree), "train"], check=True)

        def build(workers: int) -> Callable[[], None]:
            def run() -> None:
                shutil.rmtree(out, ignore_errors=True)  # no shard may be reused from the previous run
                write_split(source, out, "train", relabel=True, options=WriteOptions(workers=workers, progress=False))
            return run

        seconds = {"tar cf": best_time(tar, args.repeats),
                   "write_split, 1 worker": best_time(build(1), args.repeats),
                   "write_split, 2 workers": best_time(build(2), args.repeats)}
    mb = total / 1e6
    base = args.images / seconds["tar cf"]
    rows = [[name, round(args.images / s, 1), round(mb / s, 1), round(args.images / s / base, 2)]
            for name, s in seconds.items()]
    print(f"{args.images:,} JPEGs of 128x64, {mb:.1f} MB ({total / args.images / 1e3:.1f} KB each), "
          f"made in {made:.1f} s, listed by the folder adapter in {listed:.2f} s; best of {args.repeats}")
    print(format_table(["method", "images/s", "MB/s", "vs tar"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"images": args.images, "megabytes": mb, "seconds": seconds,
                                 "images_per_s": {k: args.images / s for k, s in seconds.items()},
                                 "megabytes_per_s": {k: mb / s for k, s in seconds.items()},
                                 "ratio_vs_tar": {k: seconds["tar cf"] / s for k, s in seconds.items()},
                                 "adapter_listing_s": listed, "target": TARGET})


if __name__ == "__main__":
    main()
