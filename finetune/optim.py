"""Optimisers and learning-rate schedules of the seed recipes.

- Optimisers: Adam, AdamW, SGD (momentum, optional Nesterov), RMSprop, and Ranger = RAdam inside
  Lookahead (k = 6, α = 0.5; Wright 2019, as the FNC paper §4.2 trains) built from torch's RAdam and
  timm's Lookahead.
- Schedule (per iteration, so a warm-up is smooth even over few epochs): linear warm-up from
  ``warmup_factor`` x lr to lr over ``warmup_epochs``, then either ×``gamma`` at each epoch in
  ``milestones`` (BoT: ×0.1 at 40 and 70) or a cosine decay to ``min_lr_factor`` x lr at the end.
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
- Trunk freezing (``freeze_backbone_iters`` / ``freeze_backbone_epochs`` of the engine): the parameters
  of the model's trunk (:meth:`ReIDModel.trunk_map`) lose their gradient before each optimiser step
  while frozen, so no optimiser moves them or keeps state for them (no momentum or Adam moments build
  up, no weight decay): FastReID's ``_generate_optimizer_class_with_freeze_layer``
  (``fastreid/solver/build.py``) sets ``p.grad = None`` the same way, and MBR's ``requires_grad =
  False`` has that effect on its Adam. Unlike toggling ``requires_grad`` it works unchanged under
  DistributedDataParallel. ``freeze_mode``:

  - ``fastreid`` (``SOLVER.FREEZE_ITERS`` with ``MODEL.FREEZE_LAYERS: [backbone]``, Base-SBS: 1000):
    every trunk tensor, branch copies included, is frozen for the first N iterations; the frozen
    modules are in eval mode meanwhile (BatchNorm statistics held, ``LayerFreeze`` in
    ``fastreid/engine/hooks.py``); the schedule runs as if nothing were frozen.
  - ``mbr`` (vehicle_reid_itsc2023 ``main.py`` with ``config/config_BoT_Veri776.yaml``): the trunk
    before the branches is frozen (``epoch_freeze_L1toL3``: ``model.modelup2L3``, stem to layer3; the
    R50 branches, copies of layer4, train throughout), here the :meth:`ReIDModel.trunk_map` pairs onto
    the backbone's root (``("backbone.", "")``), not the stage copies; its BatchNorm layers stay in
    train mode. While frozen no scheduler exists, so every group trains at the constant base lr. At
    the unfreeze (``if epoch == epoch_freeze_L1toL3 - 1``) the scheduler (``Warm_MultiStep``:
    ``WarmupMultiStepLR`` of ``lr_scheduler/sche_optim.py``, ``warmup_iters: 10`` epochs,
    ``warmup_factor: 0.0``, ``milestones: [40, 70, 100]``) is built anew at 0 and stepped once
    before each epoch, so epoch j after the unfreeze trains at the schedule's value for epoch j + 1:
    this mode evaluates the whole schedule, warm-up included, per epoch in the same way, from the
    unfreeze. The code unfreezes at the start of 0-based epoch ``epoch_freeze_L1toL3 - 1``, so its
    ``epoch_freeze_L1toL3: 10`` is ``freeze_backbone_epochs: 9`` here; 130 epochs (``num_epochs``).
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

from reidforge.finetune.models.base import ReIDModel
from reidforge.shared.config import ConfigError, bounded, choice


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
    freeze_mode: str = choice("fastreid", "mbr")  # how a trunk freeze runs (see the module docstring)
    clip_grad_norm: float = bounded(0.0, 0)  # 0 disables clipping
    center_lr: float = bounded(0.0, 0)  # > 0: center-loss centres get BoT's own SGD at this lr (BoT: 0.5); 0: main optimiser


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


def freeze_iterations(iters: int, epochs: float, iters_per_epoch: int) -> int:
    """The freeze length in iterations from ``freeze_backbone_iters`` or ``freeze_backbone_epochs``."""
    if iters < 0 or epochs < 0:
        raise ConfigError(f"freeze_backbone_iters={iters} and freeze_backbone_epochs={epochs} must be >= 0")
    if iters and epochs:
        raise ConfigError(f"freeze_backbone_iters={iters} and freeze_backbone_epochs={epochs}: set at most one")
    return iters or round(epochs * iters_per_epoch)


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


class TrunkFreeze:
    """Keeps the trunk of ``model`` still for the first ``iterations`` optimiser steps (``mode`` as in
    :class:`OptimConfig`): call :meth:`set_mode` before the forward pass and :meth:`drop_grads` between
    backward and the optimiser step (and clipping) of every iteration."""

    def __init__(self, model: ReIDModel, iterations: int, mode: str):
        pairs = sorted(model.trunk_map(), key=lambda pair: -len(pair[0]))  # the longest prefix wins
        # mbr freezes the trunk before the branches: the pairs onto the backbone's root, not stage copies
        frozen = tuple(m for m, b in pairs if mode == "fastreid" or b == "")

        def owner(name: str) -> str | None:
            return next((m for m, _ in pairs if name.startswith(m)), None)

        names = [name for name, p in model.named_parameters() if p.requires_grad and owner(name) in frozen]
        if iterations > 0 and not names:
            raise ConfigError(f"a trunk freeze of {iterations} iterations freezes no parameter of "
                              f"{type(model).__name__} (trunk_map {model.trunk_map()})")
        params = dict(model.named_parameters())
        self.params = [params[name] for name in names] if iterations > 0 else []
        self.iterations = iterations
        self.modules: list[nn.Module] = []  # FastReID holds the frozen layers' BatchNorm statistics
        if mode == "fastreid" and iterations > 0:
            chosen: list[str] = []
            for name, module in model.named_modules():
                if (name + ".").startswith(frozen) and not any(name.startswith(c + ".") for c in chosen):
                    chosen.append(name)
                    self.modules.append(module)

    def active(self, iteration: int) -> bool:
        return iteration < self.iterations

    def set_mode(self, iteration: int) -> None:
        """Frozen modules in eval mode while frozen, back to train mode at the first free iteration."""
        if iteration <= self.iterations:
            for module in self.modules:
                module.train(not self.active(iteration))

    def drop_grads(self, iteration: int) -> None:
        if self.active(iteration):
            for p in self.params:
                p.grad = None


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


def lr_factor(iteration: int, iters_per_epoch: int, total_epochs: float, cfg: OptimConfig,
              freeze_iters: int = 0) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based, counted over the whole run).

    ``freeze_iters`` matters in ``freeze_mode="mbr"`` only: 1 until then, then the schedule from its
    start, per epoch (MBR's, see the module docstring), over the epochs left.
    """
    if cfg.freeze_mode == "mbr":
        if iteration < freeze_iters:
            return 1.0
        iteration -= freeze_iters
        total_epochs -= freeze_iters / iters_per_epoch
        iteration = (iteration // iters_per_epoch + 1) * iters_per_epoch  # stepped before each epoch
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iters_per_epoch: int,
                    total_epochs: int, freeze_iters: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler (call ``step()`` after every optimizer step) of :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, total_epochs, cfg, freeze_iters))
