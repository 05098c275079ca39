"""Fine-tune a re-ID model on shards and evaluate it (see finetune/engine.py).

    accelerate launch finetune/train.py --config launch/configs/<recipe>.yaml [--resume] [key=value ...]
    python finetune/train.py --config launch/configs/bot_tiny.yaml epochs=2

Every field of TrainConfig can be overridden as key=value (e.g. ``optim.lr=1e-4 data.p=8``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.shards import ShardError
from finetune.engine import TrainConfig, train
from shared.config import ConfigError, load_config
from shared.weights import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="recipe YAML (launch/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, ShardError, WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
