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
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from reidforge.shared.checkpoints import Checkpoints
from reidforge.shared.config import bounded, choice
from reidforge.shared.rundir import claim_run_dir
from reidforge.shared.runlog import log_to


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


@dataclass
class Run:
    """A started training run: its accelerator, directory, checkpoints and the checkpoint to resume from."""

    accelerator: Accelerator
    run_dir: Path
    checkpoints: Checkpoints
    resume_from: Path | None


def start_run(cfg: RunConfig, resume: bool, overwrite: bool) -> Run:
    """Start ``cfg``'s run the way both stages do: the accelerator (mixed precision on a GPU only, the
    process-group timeout), the seed, the run directory claimed (``reidforge.shared.rundir``) with its
    ``log.txt`` attached, and the checkpoint ``--resume`` continues from; every rank returns after the main
    one has checked the directory."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda, mixed_precision=cfg.amp if cuda else "no", log_with="tensorboard",
                      project_dir=str(run_dir),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist_timeout_minutes))])
    if cfg.amp != "no" and not cuda:
        acc.print(f"amp={cfg.amp} needs a GPU; training in float32 on the CPU")
    set_seed(cfg.seed)
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg.keep_checkpoints)
    claim_run_dir(run_dir, cfg, resume, overwrite, acc.is_main_process)
    log_to(run_dir)
    resume_from = checkpoints.resume_point(acc.print) if resume else None
    acc.wait_for_everyone()  # every rank has checked the directory before the main one writes to it
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(acc, run_dir, checkpoints, resume_from)
