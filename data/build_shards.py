"""Turn a dataset into webdataset shards (see data/shards.py for the contract).

    python data/build_shards.py synthetic --out shards [--config launch/configs/synthetic.yaml] [key=value ...]
    python data/build_shards.py <dataset> --root DATASET_DIR --out shards [options]
    python data/build_shards.py verify shards
    python data/build_shards.py summary shards

Re-running a build skips every shard the manifest vouches for (sha256) and writes only what is missing.
`python data/build_shards.py <dataset> --help` lists each dataset's options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import reidforge.data.datasets  # noqa: F401  (registers every adapter)
from reidforge.data.build import build_all, select_splits, summary
from reidforge.data.shards import ShardError, WriteOptions, check_writable_dir, load_manifest, verify_split
from reidforge.data.source import ADAPTERS, DatasetError
from reidforge.shared.config import ConfigError
from reidforge.shared.progress import progress_settings


def _split_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="build_shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = [*ADAPTERS, "verify", "summary"]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    for name, adapter in ADAPTERS.items():
        p = sub.add_parser(name, help=adapter.summary, description=adapter.summary)
        p.add_argument("--out", required=True, type=Path, help="output root; splits go to OUT/<dataset>/<split>/")
        adapter.dataset_arguments(p)
        p.add_argument("--splits", help="comma-separated split names to build (default: all)")
        p.add_argument("--samples-per-shard", type=int, default=WriteOptions.samples_per_shard)
        p.add_argument("--workers", type=int, default=1, help="processes that encode samples (default 1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
        if adapter.config_schema is not None:
            p.add_argument("--config", type=Path, help="YAML config with the fields to override")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("verify", help="check shards against their manifests' sha256")
    p.add_argument("paths", nargs="+", type=Path, help="split directories or roots that contain them")
    p = sub.add_parser("summary", help="print the table of every split under a root")
    p.add_argument("root", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before, between or after the options.
    args, extra = parser.parse_known_args(argv)
    adapter = ADAPTERS.get(args.command)
    if extra and (adapter is None or adapter.config_schema is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        if args.command == "verify":
            dirs = [d for path in args.paths for d in (_split_dirs(path) or [path])]
            problems = [line for d in dirs for line in verify_split(d)]
            print("\n".join(problems) if problems else f"{len(dirs)} split(s) verified: every shard matches its manifest")
            return 1 if problems else 0
        if args.command == "summary":
            dirs = _split_dirs(args.root)
            if not dirs:
                raise ShardError(f"no shard splits under {args.root}")
            print(summary([load_manifest(d) for d in dirs]))
            return 0
        check_writable_dir(args.out)  # before any work
        progress_settings()  # a bad REIDFORGE_PROGRESS too
        sources = select_splits(adapter(args).sources(), args.splits.split(",") if args.splits else None)
        options = WriteOptions(samples_per_shard=args.samples_per_shard, workers=args.workers,
                               progress=not args.no_progress)
        manifests = build_all(sources, args.out, options)
        print(summary(manifests))
        print(f"shards written under {args.out}")
        return 0
    except (ShardError, ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
