"""The data block both training stages share (``data.*``): splits, P x K batches, loading and transforms.

Fine-tuning (``finetune/engine.py``) adds a validation pair, SpCL (``pretrain/spcl.py``) the CFS
selection of its pool; each lists the batch samplers it offers (``data/samplers.py``). The rest of the
run's settings are ``reidforge.shared.run_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reidforge.data.transforms import TransformConfig
from reidforge.shared.config import bounded


@dataclass
class DataConfig:
    # Training shard splits, concatenated: labelled identities to fine-tune on, or SpCL's unlabelled pool.
    train: list[str] = field(default_factory=lambda: ["runs/demo/shards/synthetic_person/train"])
    query: str = "runs/demo/shards/synthetic_person/query"  # the labelled test pair: query split
    gallery: str = "runs/demo/shards/synthetic_person/gallery"  # and its gallery split
    sampler: str = "pk"  # how training batches are drawn (each stage lists its samplers)
    p: int = bounded(16, 1)  # identities (pseudo-identities in SpCL) per process and iteration
    k: int = bounded(4, 1)  # images per identity
    workers: int = bounded(2, 0)  # DataLoader worker processes
    test_batch_size: int = bounded(128, 1)  # images per batch when embedding
    max_bad_fraction: float = bounded(0.01, 0, 1)  # undecodable images a pass tolerates (fraction) before it stops
    transform: TransformConfig = field(default_factory=TransformConfig)
