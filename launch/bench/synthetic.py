"""Synthetic world rendering speed on one core: images/s (render + JPEG encode) per kind of image.

    python launch/bench/synthetic.py [--images 1500] [--out runs/bench/synthetic.json]

The target is 300 images/s per core for 128x64 persons; the table gives each kind's ratio to it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

TARGET = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="images rendered per kind")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/synthetic.json"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    n = args.images
    cfg = SyntheticConfig(train_ids=n // 10, test_ids=n // 10, pool_images=n, vehicle_train_ids=n // 10)
    sources = build_sources(cfg)
    kinds = {
        f"person train {cfg.height}x{cfg.width}": sources["synthetic_person"]["train"],
        f"person gallery {cfg.height}x{cfg.width} (with distractors)": sources["synthetic_person"]["gallery"],
        f"LUPerson-like pool {cfg.height}x{cfg.width}": sources["synthetic_lup"]["pool"],
        f"vehicle train {cfg.vehicle_height}x{cfg.vehicle_width}": sources["synthetic_vehicle"]["train"],
    }
    rates = {}
    for name, source in kinds.items():
        count = min(n, len(source))
        start = time.perf_counter()
        for i in range(count):
            source.image(i)
        rates[name] = count / (time.perf_counter() - start)
    print(format_table(["images", "images/s (1 core)", f"vs {TARGET:.0f}/s target"],
                       [[k, round(v, 1), round(v / TARGET, 2)] for k, v in rates.items()]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"images_per_s": rates, "target": TARGET})


if __name__ == "__main__":
    main()
