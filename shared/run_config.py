"""The config blocks both training stages share, so one name means one thing in every recipe.

A stage's schema (``finetune/engine.py`` ``TrainConfig``, ``pretrain/spcl.py`` ``SpCLConfig``) extends
:class:`RunConfig`, the run itself, and composes a ``model`` block (:class:`ModelConfig` or an extension),
a ``data`` block (``reidforge.data.config.DataConfig`` or an extension) and an ``optim`` block
(``reidforge.shared.optim.OptimConfig`` or an extension). A stage redeclares a shared field only to give
it its own default or range, with that default's source beside it; its own settings get names of their
own. Keys of earlier versions are refused with their new names (``reidforge.shared.config.RENAMED``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reidforge.shared.config import bounded, choice


@dataclass
class ModelConfig:
    name: str = "resnet50"  # a registered architecture (models.md): a model to fine-tune, a backbone in SpCL
    options: dict[str, Any] = field(default_factory=dict)  # the architecture's keyword options (models.md)
    # A local pretrained file, its layout detected by structure (shared/weights.py: torchvision, timm, Cadene,
    # IBN-Net, torchreid, FastReID, DM-OSNet authors', SpCL's, our exports); "" = random init.
    weights: str = ""
    allow_partial: bool = False  # accept a file that leaves some trunk tensors at their init


@dataclass
class RunConfig:
    run_name: str = "run"  # the run directory is <output_dir>/<run_name>
    output_dir: str = "runs"
    seed: int = 0  # seeds the initialisation, the sampler and every image's augmentation
    epochs: int = bounded(120, 0)  # 0 exports the initial model
    # Iterations an epoch trains: 0 = one pass over the sampler's batches; > 0 = exactly that many, further
    # passes of the sampler (each drawn afresh) following when one pass is shorter.
    iters_per_epoch: int = bounded(0, 0)
    eval_every: int = bounded(10, 1)  # evaluate every this many epochs, and after the last
    checkpoint_every: int = bounded(1, 1)  # save the full training state every this many epochs, and after the last
    keep_checkpoints: int = bounded(2, 1)  # the newest this many checkpoints are kept
    log_every: int = bounded(20, 1)  # TensorBoard: a point of window means every this many iterations
    amp: str = choice("no", "bf16", "fp16")  # mixed precision on a GPU (the CPU trains in float32)
    # How long a process waits for the others at a collective (a long evaluation or clustering on rank 0).
    dist_timeout_minutes: int = bounded(120, 1)
