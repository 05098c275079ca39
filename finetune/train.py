"""Fine-tune a re-ID model on shards and evaluate it (see finetune/engine.py).

    accelerate launch finetune/train.py --config launch/configs/<recipe>.yaml [--resume] [key=value ...]
    python finetune/train.py --config launch/configs/bot_tiny.yaml epochs=2

Every field of TrainConfig can be overridden as key=value (e.g. ``optim.lr=1e-4 data.p=8``).
"""

from __future__ import annotations

import sys

from reidforge.data.shards import ShardError
from reidforge.finetune.engine import TrainConfig, train
from reidforge.shared.config import config_main
from reidforge.shared.weights import WeightsError


def main(argv: list[str] | None = None) -> int:
    return config_main(TrainConfig, train, argv, __doc__, errors=(ShardError, WeightsError))


if __name__ == "__main__":
    sys.exit(main())
