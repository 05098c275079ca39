"""Losses on hand-computed cases, loss routing, optimisers and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.losses import CenterLoss, CircleSoftmax, Criterion, LossConfig, batch_hard_triplet
from finetune.models.base import LossTerm
from finetune.optim import OptimConfig, build_center_optimizer, build_optimizer, build_scheduler, lr_factor

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


def test_backbone_frozen_for_the_first_iterations() -> None:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 1)})
    cfg = OptimConfig(name="adam", lr=0.01, warmup_epochs=0)
    opt = build_optimizer(model, cfg, freeze_iters=3)
    sched = build_scheduler(opt, cfg, iters_per_epoch=10, total_epochs=1)
    x = torch.randn(8, 4)
    start = model["backbone"].weight.detach().clone()
    for it in range(5):
        opt.zero_grad()
        model["head"](model["backbone"](x)).pow(2).mean().backward()
        opt.step()
        sched.step()
        moved = not torch.equal(model["backbone"].weight, start)
        assert moved == (it >= 3), it  # frozen during iterations 0..2, training from iteration 3


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

    shared = build_optimizer(holder, OptimConfig())  # center_lr 0: one optimiser moves everything
    assert any(p is centres for g in shared.param_groups for p in g["params"])
    cfg = OptimConfig(name="adam", lr=0.01, warmup_epochs=0, center_lr=0.5)
    main = build_optimizer(holder, cfg, exclude=[p for p, _ in crit.centers()])
    own = build_center_optimizer(crit.centers(), cfg)
    assert all(p is not centres for g in main.param_groups for p in g["params"])
    assert [g["params"] for g in own.param_groups] == [[centres]] and own.defaults["momentum"] == 0
    assert build_center_optimizer(crit.centers(), OptimConfig()) is None and build_center_optimizer([], cfg) is None
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
