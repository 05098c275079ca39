"""Turn a dataset into webdataset shards (see data/shards.py for the contract).

    python data/build_shards.py synthetic --out shards [--config launch/configs/synthetic.yaml] [key=value ...]
    python data/build_shards.py verify shards/synthetic_person/train
    python data/build_shards.py summary shards

Re-running a build skips every shard the manifest vouches for (sha256) and writes only what is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.build import build_all, select_splits, summary
from data.shards import ShardError, WriteOptions, check_writable_dir, load_manifest, verify_split
from shared.config import ConfigError, load_config


def _synthetic(args: argparse.Namespace):
    from data.synthetic import SyntheticConfig, build_sources

    return build_sources(load_config(SyntheticConfig, args.config, args.overrides))


BUILDERS = {"synthetic": (_synthetic, "the procedural re-ID world: persons (Market-1501 protocol), an unlabeled "
                                      "LUPerson-like pool, vehicles (VeRi-776 protocol); fields of SyntheticConfig "
                                      "can be overridden as key=value")}


def _split_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_shards.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*BUILDERS, "verify", "summary"]) + "}")
    for name, (_, help_text) in BUILDERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", required=True, type=Path, help="output root; splits go to OUT/<dataset>/<split>/")
        p.add_argument("--config", type=Path, help="YAML config (e.g. launch/configs/synthetic.yaml)")
        p.add_argument("--splits", help="comma-separated split names to build (default: all)")
        p.add_argument("--samples-per-shard", type=int, default=WriteOptions.samples_per_shard)
        p.add_argument("--workers", type=int, default=1, help="processes that encode samples (default 1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("verify", help="check shards against their manifests' sha256")
    p.add_argument("paths", nargs="+", type=Path, help="split directories or roots that contain them")
    p = sub.add_parser("summary", help="print the table of every split under a root")
    p.add_argument("root", type=Path)
    # Overrides may come before, between or after the options.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in BUILDERS or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in BUILDERS:
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
        builder, _ = BUILDERS[args.command]
        sources = select_splits(builder(args), args.splits.split(",") if args.splits else None)
        options = WriteOptions(samples_per_shard=args.samples_per_shard, workers=args.workers,
                               progress=not args.no_progress)
        manifests = build_all(sources, args.out, options)
        print(summary(manifests))
        print(f"shards written under {args.out}")
        return 0
    except (ShardError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
