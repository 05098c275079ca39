"""Losses on hand-computed cases, loss routing, optimisers and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reidforge.finetune.losses import CenterLoss, CircleSoftmax, Criterion, LossConfig, batch_hard_triplet, fastreid_cross_entropy
from reidforge.finetune.models.base import LossTerm
from reidforge.finetune.optim import TrainOptimConfig, build_center_optimizer, freeze_lr_factor
from reidforge.shared.config import ConfigError
from reidforge.shared.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor

PIDS = torch.tensor([0, 0, 1, 1])
POINTS = torch.tensor([[0.0], [1.0], [3.0], [6.0]])


def test_batch_hard_triplet_by_hand() -> None:
    # hardest positive / negative per anchor: (1, 3), (1, 2), (3, 2), (3, 5)
    assert batch_hard_triplet(POINTS, PIDS, 0.3).item() == pytest.approx(1.3 / 4)
    soft = sum(math.log1p(math.exp(g)) for g in (-2, -1, 1, -2)) / 4
    assert batch_hard_triplet(POINTS, PIDS, None).item() == pytest.approx(soft, rel=1e-6)
    lonely = batch_hard_triplet(POINTS[:3], torch.tensor([0, 1, 2]), 0.3)  # no positives: no anchor
    assert lonely.item() == 0.0


def test_label_smoothed_ce_matches_the_bot_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    eps, n = 0.1, 3
    q = (1 - eps) * F.one_hot(target, n) + eps / n
    expected = -(q * logits.log_softmax(1)).sum(1).mean()
    crit = Criterion([LossTerm("ce", "logits")], num_classes=3, dims={})
    total, values = crit({"logits": logits}, target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and list(values) == ["ce/logits"]


def test_center_and_circle_by_hand() -> None:
    center = CenterLoss(2, 1)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.5], [4.0]]))
    assert center(POINTS, PIDS).item() == pytest.approx((0.25 + 0.25 + 1 + 4) / 4)
    circle = CircleSoftmax(2, 2, margin=0.25, scale=1.0)
    with torch.no_grad():
        circle.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    feats = torch.tensor([[1.0, 0.0]])  # cos to class 0 = 1, to class 1 = 0
    sp, sn, m = 1.0, 0.0, 0.25
    logit_p, logit_n = max(1 + m - sp, 0) * (sp - (1 - m)), max(sn + m, 0) * (sn - m)
    expected = -math.log(math.exp(logit_p) / (math.exp(logit_p) + math.exp(logit_n)))
    assert circle(feats, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_circle_term_smooths_its_labels_as_fastreid_does() -> None:
    # Proxies at 0, 90 and 180 degrees from the feature: cosines 1, 0, -1 (target class 0), m = 0.25:
    # alpha_p (1 - 0.75) = 0.25 x 0.25, alpha_n (0 - 0.25) = 0.25 x -0.25, alpha_n = [-1 + 0.25]_+ = 0; scale 2.
    logits = [0.125, -0.125, 0.0]
    log_z = math.log(sum(math.exp(x) for x in logits))
    log_p = [x - log_z for x in logits]
    fastreid = -(0.9 * log_p[0] + 0.05 * log_p[1] + 0.05 * log_p[2])  # cross_entroy_loss.py: eps / (C - 1)
    torch_form = -((0.9 + 0.1 / 3) * log_p[0] + 0.1 / 3 * (log_p[1] + log_p[2]))  # (1 - eps) onehot + eps / C
    cfg = LossConfig(label_smoothing=0.1, circle_margin=0.25, circle_scale=2.0)
    crit = Criterion([LossTerm("circle", "x")], num_classes=3, dims={"x": 2}, cfg=cfg)
    with torch.no_grad():
        crit.owned["circle:x"].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))
    feats = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # the same direction twice: the batch mean is one row's loss
    total, values = crit({"x": feats}, torch.tensor([0, 0]))
    assert total.item() == pytest.approx(fastreid, rel=1e-6) and values["circle/x"] == pytest.approx(fastreid, rel=1e-6)
    assert abs(fastreid - torch_form) > 1e-3  # the two smoothings differ at this size
    plain = CircleSoftmax(3, 2, margin=0.25, scale=2.0)  # label_smoothing 0: plain cross-entropy
    plain.weight.data.copy_(crit.owned["circle:x"].weight.data)
    assert plain(feats, torch.tensor([0, 0])).item() == pytest.approx(-log_p[0], rel=1e-6)


def test_fastreid_cross_entropy_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([0, 2])
    eps = 0.2
    q = torch.tensor([[0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3], [0.2 / 3, 0.2 / 3, 0.8, 0.2 / 3]])
    expected = -(q * logits.log_softmax(1)).sum(1).mean()
    assert fastreid_cross_entropy(logits, target, eps).item() == pytest.approx(expected.item(), rel=1e-6)
    # Torch's label_smoothing = eps C / (C - 1) gives the same soft target.
    same = F.cross_entropy(logits, target, label_smoothing=eps * 4 / 3)
    assert fastreid_cross_entropy(logits, target, eps).item() == pytest.approx(same.item(), rel=1e-6)
    # Without smoothing a row whose loss is exactly 0 leaves the divisor: log 2 over one row, not two.
    confident = torch.tensor([[200.0, 0.0], [0.0, 0.0]])  # exp(-200) underflows: p = 1 exactly
    assert fastreid_cross_entropy(confident, torch.tensor([0, 0]), 0.0).item() == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \[0, 1\), got -1.0"):
        Criterion([LossTerm("circle", "x")], 3, {"x": 2}, LossConfig(label_smoothing=-1.0))


def test_criterion_routes_and_weights_each_term() -> None:
    outputs = {"a/feat": POINTS.requires_grad_(), "a/logits": torch.randn(4, 2, requires_grad=True)}
    terms = [LossTerm("ce", "a/logits", 2.0), LossTerm("triplet", "a/feat", 1.0), LossTerm("center", "a/feat", 5e-4)]
    crit = Criterion(terms, num_classes=2, dims={"a/feat": 1}, cfg=LossConfig(triplet_margin=0.3))
    total, values = crit(outputs, PIDS)
    expected = 2.0 * values["ce/a/logits"] + values["triplet/a/feat"] + 5e-4 * values["center/a/feat"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert outputs["a/logits"].grad is not None and crit.owned["center:a/feat"].centers.grad is not None
    with pytest.raises(ValueError, match="unknown loss kind"):
        Criterion([LossTerm("arcface", "a/feat")], 2, {})


def test_schedule_warmup_then_steps_or_cosine() -> None:
    cfg = OptimConfig(warmup_epochs=10, warmup_factor=0.01, milestones=[40, 70])
    f = lambda epoch: lr_factor(epoch * 100, 100, 120, cfg)  # noqa: E731
    assert f(0) == pytest.approx(0.01) and f(5) == pytest.approx(0.505) and f(10) == 1.0
    assert f(39.99) == 1.0 and f(40) == pytest.approx(0.1) and f(70) == pytest.approx(0.01)
    cos = OptimConfig(schedule="cosine", warmup_epochs=0, min_lr_factor=0.1)
    assert lr_factor(0, 10, 20, cos) == 1.0 and lr_factor(100, 10, 20, cos) == pytest.approx(0.55)
    assert lr_factor(200, 10, 20, cos) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop", "ranger"])
def test_every_optimizer_descends_with_the_scheduler(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    cfg = OptimConfig(name=name, lr=0.05 if name != "rmsprop" else 0.01, warmup_epochs=1, milestones=[100])
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, iters_per_epoch=10, total_epochs=10)
    start = F.mse_loss(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    assert F.mse_loss(model(x), y).item() < 0.8 * start
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr)


# FastReID's delayed cosine: configs/Base-SBS.yml (MAX_EPOCH 60, BASE_LR 3.5e-4, DELAY_EPOCHS 30,
# ETA_MIN_LR 7e-7, WARMUP_FACTOR 0.1, WARMUP_ITERS 2000, linear) at FastReID's Market epoch of
# 12936 // 64 = 202 iterations. fastreid/solver/build.py build_lr_scheduler: T_max = 60 - max(ceil(2000 / 202),
# 30) = 30; WarmupLR (lr_scheduler.py _get_warmup_factor_at_epoch) after every iteration: 0.1 (1 - i/2000) + i/2000;
# hooks.py LRScheduler.after_epoch steps torch's CosineAnnealingLR once epoch e + 1 > 30 (and iteration > 2000),
# so epoch e >= 30 trains at 7e-7 + (3.5e-4 - 7e-7) (1 + cos(pi (e - 30) / 30)) / 2.
SBS = OptimConfig(name="adam", lr=3.5e-4, schedule="cosine", warmup_epochs=2000 / 202, warmup_factor=0.1,
                  delay_epochs=30, min_lr_factor=7e-7 / 3.5e-4)
SBS_LR = [(0, 3.5e-05),  # 0.1 x base
          (1000, 1.925e-04),  # (0.1 x 0.5 + 0.5) x base
          (1999, 3.498425e-04),  # (0.1 x 0.0005 + 0.9995) x base
          (2000, 3.5e-04), (31 * 202 - 1, 3.5e-04),  # warm-up over; held through epoch 30
          (31 * 202, 3.490432490260689e-04), (32 * 202 - 1, 3.490432490260689e-04),  # epoch 31: k = 1
          (45 * 202, 1.7535e-04),  # k = 15: cos(pi / 2) = 0, halfway to eta_min
          (60 * 202 - 1, 1.6567509739310505e-06)]  # last iteration, k = 29: the run ends one step short of eta_min
# Warm-up past the delay (50 iterations an epoch: 2000 iterations = 40 epochs): T_max = 60 - max(40, 30) = 20 and
# the first cosine step follows epoch 39, so epoch 40 trains at k = 1 and the last epoch, k = 20, at eta_min.
LONG_WARMUP = OptimConfig(name="adam", lr=3.5e-4, schedule="cosine", warmup_epochs=40, warmup_factor=0.1,
                          delay_epochs=30, min_lr_factor=7e-7 / 3.5e-4)
LONG_WARMUP_LR = [(1950, 3.42125e-04), (1999, 3.498425e-04), (2000, 3.478497686849408e-04),
                  (49 * 50, 1.7535e-04), (60 * 50 - 1, 7e-07)]  # epoch 49: k = 10 of 20


@pytest.mark.parametrize("cfg, ipe, expected", [(SBS, 202, SBS_LR), (LONG_WARMUP, 50, LONG_WARMUP_LR)])
def test_delayed_cosine_gives_fastreids_learning_rates(cfg: OptimConfig, ipe: int, expected: list) -> None:
    for iteration, lr in expected:
        assert cfg.lr * lr_factor(iteration, ipe, 60, cfg) == pytest.approx(lr, rel=1e-12, abs=0), iteration


def _fastreid_curve(ipe: int, warmup_iters: int, delay: int, epochs: int, cfg: OptimConfig) -> list[float]:
    """The lr of every iteration with torch's CosineAnnealingLR stepped as FastReID's LRScheduler hook steps it
    (after_epoch, once next_iter > WARMUP_ITERS and epoch + 1 > DELAY_EPOCHS) beside its per-iteration warm-up."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    eta_min = cfg.lr * cfg.min_lr_factor
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs - max(math.ceil(warmup_iters / ipe), delay),
                                                        eta_min)
    opt.param_groups[0]["lr"] = cfg.lr * cfg.warmup_factor  # WarmupLR, built after it, starts at iteration 0
    lrs, iteration = [], 0
    for epoch in range(epochs):
        for _ in range(ipe):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()  # no gradient: moves nothing, keeps torch's step-order check quiet
            iteration += 1
            if iteration <= warmup_iters:  # after_step: WarmupLR.step() while next_iter <= WARMUP_ITERS
                alpha = iteration / warmup_iters
                opt.param_groups[0]["lr"] = cfg.lr * (cfg.warmup_factor * (1 - alpha) + alpha)
        if iteration + 1 > warmup_iters and epoch + 1 > delay:  # after_epoch
            cosine.step()
    return lrs


@pytest.mark.parametrize("ipe, warmup_iters, delay", [(202, 2000, 30), (50, 2000, 30), (30, 45, 5)])
def test_delayed_cosine_follows_torchs_scheduler_stepped_as_fastreid_steps_it(ipe: int, warmup_iters: int,
                                                                              delay: int) -> None:
    cfg = OptimConfig(lr=3.5e-4, schedule="cosine", warmup_epochs=warmup_iters / ipe, warmup_factor=0.1,
                      delay_epochs=delay, min_lr_factor=0.002)
    reference = _fastreid_curve(ipe, warmup_iters, delay, 60, cfg)
    ours = [cfg.lr * lr_factor(i, ipe, 60, cfg) for i in range(len(reference))]
    assert ours == pytest.approx(reference, rel=1e-12, abs=0)


# MBR (vehicle_reid_itsc2023 main.py, config/config_BoT_Veri776.yaml): lr 1e-4, no scheduler while the trunk is
# frozen (epochs 0..8 for epoch_freeze_L1toL3 = 10), then WarmupMultiStepLR (lr_scheduler/sche_optim.py;
# warmup_factor 0.0, warmup_iters 10 epochs, milestones [40, 70, 100], gamma 0.1) built at 0 in epoch 9 and
# stepped before each epoch: epoch 9 + j trains at last_epoch j + 1, warm-up (j + 1) / 10, x0.1 per milestone
# <= j + 1. 130 epochs.
MBR = TrainOptimConfig(name="adam", lr=1e-4, warmup_epochs=10, warmup_factor=0.0, milestones=[40, 70, 100],
                  freeze_mode="mbr")
MBR_LR = [(0, 1e-4), (899, 1e-4),  # frozen trunk: constant base lr
          (900, 1e-5), (999, 1e-5),  # epoch 9: last_epoch 1, warm-up 0.1
          (1700, 9e-5), (1800, 1e-4),  # epoch 17: 0.9; epoch 18: warm-up over
          (4799, 1e-4), (4800, 1e-5),  # epoch 48: last_epoch 40, the first milestone
          (7800, 1e-6), (10800, 1e-7), (12999, 1e-7)]  # epochs 78, 108 and the last, 129


def test_mbr_mode_holds_the_base_lr_then_restarts_the_schedule_per_epoch() -> None:
    for iteration, lr in MBR_LR:
        assert MBR.lr * freeze_lr_factor(iteration, 100, 130, MBR, freeze_iters=900) == pytest.approx(lr, rel=1e-12), iteration
    # without a freeze MBR's scheduler exists from epoch 0 and is stepped before it: epoch 0 trains at 0.1
    assert freeze_lr_factor(0, 100, 130, MBR) == pytest.approx(0.1) and freeze_lr_factor(99, 100, 130, MBR) == pytest.approx(0.1)


def test_fastreid_mode_schedules_as_if_nothing_were_frozen() -> None:
    for iteration in (0, 500, 999, 1000, 2000, 9000):
        assert freeze_lr_factor(iteration, 202, 60, TrainOptimConfig(**vars(SBS)), freeze_iters=1000) == \
            lr_factor(iteration, 202, 60, SBS)


def test_center_loss_centres_get_bots_own_sgd() -> None:
    """center_lr > 0 (BoT §3.6): the centres leave the main optimiser and its schedule; their SGD step at
    center_lr follows the gradient of the unweighted center loss, c_j -= lr * 2 * sum_{y_i=j} (c_j - f_i) / N."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    terms = [LossTerm("triplet", "feat"), LossTerm("center", "feat", 5e-4)]
    crit = Criterion(terms, num_classes=2, dims={"feat": 1}, cfg=LossConfig(triplet_margin=0.3))
    holder = torch.nn.ModuleDict({"model": net, "criterion": crit})
    centres = crit.owned["center:feat"].centers
    assert crit.centers() == [(centres, 5e-4)]

    shared = build_optimizer(holder, TrainOptimConfig())  # center_lr 0: one optimiser moves everything
    assert any(p is centres for g in shared.param_groups for p in g["params"])
    cfg = TrainOptimConfig(name="adam", lr=0.01, warmup_epochs=0, center_lr=0.5)
    main = build_optimizer(holder, cfg, exclude=[p for p, _ in crit.centers()])
    own = build_center_optimizer(crit.centers(), cfg)
    assert all(p is not centres for g in main.param_groups for p in g["params"])
    assert [g["params"] for g in own.param_groups] == [[centres]] and own.defaults["momentum"] == 0
    assert build_center_optimizer(crit.centers(), TrainOptimConfig()) is None and build_center_optimizer([], cfg) is None
    sched = build_scheduler(main, cfg, iters_per_epoch=10, total_epochs=1)  # cosine to 0: never touches centres

    x = torch.randn(4, 2)
    for _ in range(3):
        feats = net(x)
        before = centres.detach().clone()
        expected = before.clone()
        for j in range(2):
            members = feats.detach()[PIDS == j]
            expected[j] -= 0.5 * 2 * (before[j] - members).sum(0) / len(PIDS)
        main.zero_grad()
        own.zero_grad()
        crit({"feat": feats}, PIDS)[0].backward()
        main.step()
        own.step()
        sched.step()
        assert torch.allclose(centres.detach(), expected, atol=1e-6)
    assert own.param_groups[0]["lr"] == 0.5
