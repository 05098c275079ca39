"""Optimisers and learning-rate schedules of the seed recipes.

- Optimisers: Adam, AdamW, SGD (momentum, optional Nesterov), RMSprop, and Ranger = RAdam inside
  Lookahead (k = 6, α = 0.5; Wright 2019, as the FNC paper §4.2 trains) built from torch's RAdam and
  timm's Lookahead.
- Schedule (per iteration, so a warm-up is smooth even over few epochs): linear warm-up from
  ``warmup_factor`` x lr to lr over ``warmup_epochs``, then either ×``gamma`` at each epoch in
  ``milestones`` (BoT: ×0.1 at 40 and 70) or a cosine decay to ``min_lr_factor`` x lr at the end.
- Biases get no weight decay when ``bias_decay`` is off (BoT keeps it; the default follows BoT).
- Backbone freezing for the first N iterations (MBR freezes its trunk for 10 epochs) sets the learning
  rate of the backbone's parameter groups to 0 until then, instead of toggling ``requires_grad``: that
  works unchanged under DistributedDataParallel, and with lr 0 no optimiser moves a weight (weight decay
  included). The backbone is every parameter whose name starts with ``backbone``.
- Center-loss centres (``center_lr`` > 0): BoT's separate optimiser (§3.6; ``optimizer_center`` of the
  reid-strong-baseline code), :class:`CenterSGD`: plain SGD at ``center_lr`` (BoT: 0.5), no momentum, no
  weight decay, no schedule, stepped after the main optimiser on the gradient of the *unweighted* center
  loss (the total loss carries beta * L_C, so the centres' gradient is divided by beta first, as BoT's
  ``param.grad.data *= 1. / CENTER_LOSS_WEIGHT``). The main optimiser then leaves the centres out.
  ``center_lr`` = 0 keeps them in the main optimiser with every other parameter.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from timm.optim import Lookahead
from torch import nn

from shared.config import choice


@dataclass
class OptimConfig:
    name: str = choice("adam", "adamw", "sgd", "rmsprop", "ranger")
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD and RMSprop
    nesterov: bool = False
    bias_decay: bool = True
    schedule: str = choice("multistep", "cosine")
    warmup_epochs: float = 10.0
    warmup_factor: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    min_lr_factor: float = 0.0
    clip_grad_norm: float = 0.0  # 0 disables clipping
    center_lr: float = 0.0  # > 0: center-loss centres get BoT's own SGD at this lr (BoT: 0.5); 0: main optimiser


def param_groups(module: nn.Module, weight_decay: float, bias_decay: bool, freeze_iters: int = 0,
                 exclude: Collection[nn.Parameter] = ()) -> list[dict]:
    """Trainable parameters (but ``exclude``) grouped by (weight decay, frozen at the start); each group keeps
    ``frozen_until``."""
    excluded = {id(p) for p in exclude}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in excluded:
            decays = bias_decay or p.ndim > 1
            frozen = freeze_iters > 0 and name.startswith("backbone")
            groups.setdefault((decays, frozen), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "frozen_until": freeze_iters if frozen else 0}
            for (decays, frozen), params in sorted(groups.items())]


def build_optimizer(module: nn.Module, cfg: OptimConfig, freeze_iters: int = 0,
                    exclude: Collection[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimiser ``cfg.name`` over the trainable parameters of ``module`` except ``exclude``."""
    groups = param_groups(module, cfg.weight_decay, cfg.bias_decay, freeze_iters, exclude)
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


class CenterSGD(torch.optim.SGD):
    """BoT's optimiser of the center-loss centres: SGD on the gradient of the unweighted center loss.

    ``centers`` pairs each centre tensor with the weight beta of its loss term; ``step`` divides the
    tensor's gradient (that of beta * L_C) by beta before the SGD update, in place, as BoT does.
    """

    def __init__(self, centers: Sequence[tuple[nn.Parameter, float]], lr: float):
        if any(weight <= 0 for _, weight in centers):
            raise ValueError(f"center-loss weights must be > 0, got {[w for _, w in centers]}")
        super().__init__([{"params": [p], "loss_weight": float(weight)} for p, weight in centers], lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(group["loss_weight"])
        return super().step(closure)


def build_center_optimizer(centers: Sequence[tuple[nn.Parameter, float]], cfg: OptimConfig) -> CenterSGD | None:
    """BoT's separate optimiser for ``centers`` (pairs of centre tensor and loss weight), or None when
    ``cfg.center_lr`` is 0 or there are no centres (they then belong to the main optimiser)."""
    return CenterSGD(centers, cfg.center_lr) if cfg.center_lr > 0 and centers else None


def lr_factor(iteration: int, iters_per_epoch: int, total_epochs: int, cfg: OptimConfig) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based, counted over the whole run)."""
    epoch = iteration / iters_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    span = max(total_epochs - cfg.warmup_epochs, 1e-8)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iters_per_epoch: int,
                    total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler (call ``step()`` after every optimizer step); groups with
    ``frozen_until`` > 0 stay at lr 0 until that iteration."""

    def factor(frozen_until: int):  # one closure per group, so each sees its own freeze length
        return lambda it: 0.0 if it < frozen_until else lr_factor(it, iters_per_epoch, total_epochs, cfg)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor(g.get("frozen_until", 0)) for g in optimizer.param_groups])
