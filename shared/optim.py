"""The optimiser block of both training stages (``optim.*``) and what it builds: optimiser and lr schedule.

- Optimisers: Adam, AdamW, SGD (momentum, optional Nesterov), RMSprop, and Ranger = RAdam inside
  Lookahead (k = 6, α = 0.5; Wright 2019, as the FNC paper §4.2 trains) built from torch's RAdam and
  timm's Lookahead.
- Schedule (per iteration, so a warm-up is smooth even over few epochs): linear warm-up from
  ``warmup_factor`` x lr to lr over ``warmup_epochs``, then either ×``gamma`` at each epoch in
  ``milestones`` (BoT: ×0.1 at 40 and 70; SpCL's ``StepLR(step_size=20)`` over 50 epochs: [20, 40]) or a
  cosine decay to ``min_lr_factor`` x lr at the end. Without a warm-up the multistep factor is constant
  within an epoch, so a per-epoch ``StepLR``/``MultiStepLR`` (SpCL's) gives the same rates.
- Delayed cosine (``delay_epochs`` > 0): FastReID's ``SOLVER.DELAY_EPOCHS`` with ``SCHED:
  CosineAnnealingLR``, as ``fastreid/solver/build.py`` (``build_lr_scheduler``) and
  ``fastreid/engine/hooks.py`` (``LRScheduler``) run it. The warm-up (``WarmupLR``, linear,
  ``WARMUP_FACTOR``) steps after every iteration, ending at the base lr; torch's ``CosineAnnealingLR``
  steps once per epoch, in ``after_epoch``, only once ``next_iter > WARMUP_ITERS`` and ``epoch + 1 >
  DELAY_EPOCHS``, with ``T_max = MAX_EPOCH - max(ceil(WARMUP_ITERS / iters_per_epoch), DELAY_EPOCHS)``
  and ``eta_min = ETA_MIN_LR``. So 0-based epoch e trains at
  ``eta_min + (lr - eta_min) (1 + cos(pi k / T_max)) / 2`` with ``k = max(0, e - s)``,
  ``s = max(floor(delay), ceil(warmup) - 1)`` (warm-up and delay in epochs here), constant within the
  epoch. Base-SBS (``configs/Base-SBS.yml``: 60 epochs, ``DELAY_EPOCHS: 30``, ``WARMUP_ITERS: 2000``,
  ``WARMUP_FACTOR: 0.1``, ``ETA_MIN_LR: 7e-7``) on Market (202 iterations an epoch) holds 3.5e-4 from
  iteration 2000 to the end of epoch 30 and ends at k = 29 of T_max = 30. FastReID's warm-up is given
  in iterations: ``warmup_epochs = WARMUP_ITERS / iters_per_epoch`` expresses it, where FastReID's epoch is
  ``len(dataset) // IMS_PER_BATCH`` iterations whatever the sampler (``fastreid/engine/defaults.py``).
- Gradient clipping (``clip_grad_norm`` > 0) by the global norm, before the optimiser step.

The defaults are the fine-tuning ones (BoT's multistep with a 10-epoch warm-up); SpCL's schema gives
its block SpCL's own (``pretrain/spcl.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import Lookahead
from torch import nn

from reidforge.shared.config import ConfigError, bounded, choice
from reidforge.shared.tensorboard import grad_norm


@dataclass
class OptimConfig:
    name: str = choice("adam", "adamw", "sgd", "rmsprop", "ranger")  # optimiser of every trainable parameter
    lr: float = bounded(3.5e-4, 0, None, lo_open=True)  # base learning rate, reached after the warm-up
    weight_decay: float = bounded(5e-4, 0)  # L2 decay of the weights (and of biases/norms with bias_decay)
    momentum: float = bounded(0.9, 0, 1)  # SGD and RMSprop
    nesterov: bool = False  # SGD only
    bias_decay: bool = True  # decay 1-d parameters (biases, norm scales) too
    schedule: str = choice("multistep", "cosine")  # per-epoch lr after the warm-up
    warmup_epochs: float = bounded(10.0, 0)  # linear warm-up length; 0 = none
    warmup_factor: float = bounded(0.01, 0, 1)  # the warm-up starts at lr x this
    milestones: list[int] = field(default_factory=lambda: [40, 70])  # multistep: epochs where lr is multiplied by gamma
    gamma: float = bounded(0.1, 0, 1, lo_open=True)  # multistep: lr factor at each milestone
    min_lr_factor: float = bounded(0.0, 0, 1)  # cosine: the final lr as a fraction of lr
    delay_epochs: float = bounded(0.0, 0)  # cosine only: FastReID's SOLVER.DELAY_EPOCHS (held at lr, then per-epoch cosine)
    clip_grad_norm: float = bounded(0.0, 0)  # 0 disables clipping


def param_groups(module: nn.Module, weight_decay: float, bias_decay: bool,
                 exclude: Collection[nn.Parameter] = ()) -> list[dict]:
    """Trainable parameters (but ``exclude``) grouped by weight decay."""
    excluded = {id(p) for p in exclude}
    groups: dict[bool, list[nn.Parameter]] = {}
    for p in module.parameters():
        if p.requires_grad and id(p) not in excluded:
            groups.setdefault(bias_decay or p.ndim > 1, []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0}
            for decays, params in sorted(groups.items())]


def build_optimizer(module: nn.Module, cfg: OptimConfig, exclude: Collection[nn.Parameter] = ()
                    ) -> torch.optim.Optimizer:
    """The optimiser ``cfg.name`` over the trainable parameters of ``module`` except ``exclude``."""
    groups = param_groups(module, cfg.weight_decay, cfg.bias_decay, exclude)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "ranger":
        return Lookahead(torch.optim.RAdam(groups, lr=cfg.lr), alpha=0.5, k=6)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def check_schedule(cfg: OptimConfig, total_epochs: int) -> None:
    """One-line errors for schedule settings that cannot run, before any model is built."""
    if cfg.delay_epochs < 0:
        raise ConfigError(f"optim.delay_epochs={cfg.delay_epochs} must be >= 0")
    if cfg.delay_epochs > 0 and cfg.schedule != "cosine":
        raise ConfigError(f"optim.delay_epochs={cfg.delay_epochs} delays a cosine schedule; "
                          f"optim.schedule is {cfg.schedule!r}")
    if cfg.delay_epochs > 0 and total_epochs - max(math.ceil(cfg.warmup_epochs), cfg.delay_epochs) <= 0:
        raise ConfigError(f"optim.delay_epochs={cfg.delay_epochs} with optim.warmup_epochs={cfg.warmup_epochs} "
                          f"leaves no cosine epoch in epochs={total_epochs}")


def lr_factor(iteration: int, iters_per_epoch: int, total_epochs: float, cfg: OptimConfig) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based, counted over the whole run)."""
    epoch = iteration / iters_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.delay_epochs > 0:  # FastReID: one cosine step per epoch once warm-up and delay are over
        start = max(math.floor(cfg.delay_epochs), math.ceil(cfg.warmup_epochs) - 1)
        span = total_epochs - max(math.ceil(cfg.warmup_epochs), cfg.delay_epochs)
        progress = min(1.0, max(0, iteration // iters_per_epoch - start) / span)
    else:
        progress = min(1.0, (epoch - cfg.warmup_epochs) / max(total_epochs - cfg.warmup_epochs, 1e-8))
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iters_per_epoch: int, total_epochs: int,
                    factor: Callable[[int, int, float, Any], float] = lr_factor
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler (call ``step()`` after every optimizer step) of ``factor``: :func:`lr_factor`,
    or a stage's variant with the same arguments (fine-tuning's trunk freeze, ``finetune/optim.py``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: factor(it, iters_per_epoch, total_epochs, cfg))


def clip_gradients(accelerator: Any, parameters: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.Tensor:
    """The global gradient norm before clipping; gradients clipped to ``cfg.clip_grad_norm`` when it is > 0."""
    parameters = list(parameters)
    if cfg.clip_grad_norm > 0:
        return accelerator.clip_grad_norm_(parameters, cfg.clip_grad_norm)
    return grad_norm(accelerator, parameters)
