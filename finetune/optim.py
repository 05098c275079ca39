"""Fine-tuning's additions to the optimiser block (``reidforge.shared.optim``): trunk freeze and BoT's centres.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reidforge.finetune.models.base import ReIDModel
from reidforge.shared.config import ConfigError, bounded, choice
from reidforge.shared.optim import OptimConfig, lr_factor


@dataclass
class TrainOptimConfig(OptimConfig):
    """The shared optimiser block and what only fine-tuning does: trunk freezing and BoT's centre SGD."""

    freeze_mode: str = choice("fastreid", "mbr")  # how a trunk freeze runs (see the module docstring)
    center_lr: float = bounded(0.0, 0)  # > 0: center-loss centres get BoT's own SGD at this lr (BoT: 0.5); 0: main optimiser


def freeze_iterations(iters: int, epochs: float, iters_per_epoch: int) -> int:
    """The freeze length in iterations from ``freeze_backbone_iters`` or ``freeze_backbone_epochs``."""
    if iters < 0 or epochs < 0:
        raise ConfigError(f"freeze_backbone_iters={iters} and freeze_backbone_epochs={epochs} must be >= 0")
    if iters and epochs:
        raise ConfigError(f"freeze_backbone_iters={iters} and freeze_backbone_epochs={epochs}: set at most one")
    return iters or round(epochs * iters_per_epoch)


class TrunkFreeze:
    """Keeps the trunk of ``model`` still for the first ``iterations`` optimiser steps (``mode`` as in
    :class:`TrainOptimConfig`): call :meth:`set_mode` before the forward pass and :meth:`drop_grads` between
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


def build_center_optimizer(centers: Sequence[tuple[nn.Parameter, float]], cfg: TrainOptimConfig) -> CenterSGD | None:
    """BoT's separate optimiser for ``centers`` (pairs of centre tensor and loss weight), or None when
    ``cfg.center_lr`` is 0 or there are no centres (they then belong to the main optimiser)."""
    return CenterSGD(centers, cfg.center_lr) if cfg.center_lr > 0 and centers else None


def freeze_lr_factor(iteration: int, iters_per_epoch: int, total_epochs: float, cfg: TrainOptimConfig,
                     freeze_iters: int = 0) -> float:
    """:func:`reidforge.shared.optim.lr_factor`, but in ``freeze_mode="mbr"``: 1 until ``freeze_iters``, then
    the schedule from its start, per epoch (MBR's, see the module docstring), over the epochs left."""
    if cfg.freeze_mode == "mbr":
        if iteration < freeze_iters:
            return 1.0
        iteration -= freeze_iters
        total_epochs -= freeze_iters / iters_per_epoch
        iteration = (iteration // iters_per_epoch + 1) * iters_per_epoch  # stepped before each epoch
    return lr_factor(iteration, iters_per_epoch, total_epochs, cfg)
