"""Optimisers and learning-rate schedules of the seed recipes.

- Optimisers: Adam, AdamW, SGD (momentum, optional Nesterov), RMSprop, and Ranger = RAdam inside
  Lookahead (k = 6, α = 0.5; Wright 2019, as the FNC paper §4.2 trains) built from torch's RAdam and
  timm's Lookahead.
- Schedule (per iteration, so a warm-up is smooth even over few epochs): linear warm-up from
  ``warmup_factor`` x lr to lr over ``warmup_epochs``, then either ×``gamma`` at each epoch in
  ``milestones`` (BoT: ×0.1 at 40 and 70) or a cosine decay to ``min_lr_factor`` x lr at the end.
- Biases get no weight decay when ``bias_decay`` is off (BoT keeps it; the default follows BoT).
"""

from __future__ import annotations

import math
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


def param_groups(module: nn.Module, weight_decay: float, bias_decay: bool) -> list[dict]:
    """Trainable parameters, with biases and norm weights (1-D tensors) split out when they skip decay."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not bias_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(module, cfg.weight_decay, cfg.bias_decay)
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
    """A per-iteration scheduler: call ``step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, total_epochs, cfg))
