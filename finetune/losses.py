"""Supervised re-ID losses and the criterion that routes a model's outputs to them.

- ``ce``: cross-entropy with label smoothing (Szegedy et al. 2016; BoT §3.3, ε = 0.1), torch's own: target
  (1 - ε) one-hot + ε / C, averaged over the batch, as BoT's ``CrossEntropyLabelSmooth``
  (reid-strong-baseline layers/triplet_loss.py) and MBR's ``nn.CrossEntropyLoss(label_smoothing=ε)``.
  Deviation for the FastReID recipes that use it (DM-OSNet bag of tricks): FastReID's
  ``cross_entropy_loss`` smooths as the ``circle`` term below does, ε / (C - 1) off the target.
- ``triplet``: batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances of the raw
  features, with a margin (BoT: 0.3) or the soft margin ``log(1 + exp(d_ap - d_an))`` (margin None).
- ``center``: center loss (Wen et al., ECCV 2016) as BoT uses it: the squared distance of each feature
  to its class centre, summed over the batch dimension and divided by the batch size. The centres are
  parameters of the criterion, not the model; ``optim.center_lr`` > 0 trains them with their own SGD as
  BoT does (lr 0.5, reidforge.finetune.optim.CenterSGD), else the main optimiser moves them.
- ``circle``: circle-softmax classification (Sun et al., CVPR 2020, §3.3): cosine logits against class
  proxies with self-paced weights α_p = [1 + m - s_p]_+, α_n = [s_n + m]_+ and margins Δp = 1 - m,
  Δn = m, scaled by γ; proxies belong to the criterion. As in FastReID (``CircleSoftmax`` in
  fastreid/layers/any_softmax.py feeds ``cls_outputs`` to ``cross_entropy_loss`` in
  fastreid/modeling/losses/cross_entroy_loss.py, ε from ``MODEL.LOSSES.CE.EPSILON``, 0.1 in
  configs/Base-SBS.yml), the scaled logits go to a cross-entropy smoothed by ``loss.label_smoothing`` with
  FastReID's formula, not torch's: target 1 - ε, every other class ε / (C - 1) (torch puts 1 - ε + ε / C
  and ε / C), and the row losses summed and divided by the number of non-zero rows (the batch size
  whenever ε > 0). FastReID's adaptive smoothing (ε < 0) is not offered.

A model declares ``loss_terms`` (finetune/models/base.py); :class:`Criterion` applies each term to the
named output and returns the weighted total plus every term's value for logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reidforge.finetune.models.base import LossTerm
from reidforge.shared.config import ConfigError, bounded


@dataclass
class LossConfig:
    label_smoothing: float = bounded(0.1, 0, 1)
    triplet_margin: float = 0.3  # <= 0 selects the soft margin
    circle_margin: float = bounded(0.25, 0)
    circle_scale: float = bounded(64.0, 0, None, lo_open=True)


def batch_hard_triplet(features: torch.Tensor, pids: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Mean over anchors of the hardest-positive vs hardest-negative triplet loss."""
    dist = torch.cdist(features, features).clamp(min=1e-12)
    same = pids[:, None] == pids[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    valid = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)  # anchors with both kinds in the batch
    if not valid.any():
        return features.sum() * 0.0
    gap = hardest_pos[valid] - hardest_neg[valid]
    return F.softplus(gap).mean() if margin is None else F.relu(gap + margin).mean()


def fastreid_cross_entropy(logits: torch.Tensor, pids: torch.Tensor, eps: float) -> torch.Tensor:
    """FastReID's ``cross_entropy_loss`` for ε >= 0: soft target 1 - ε, ε / (C - 1) on every other class."""
    log_probs = F.log_softmax(logits, dim=1)
    off_target = eps / max(logits.shape[1] - 1, 1)  # one class: log-probability 0, the loss is 0 either way
    with torch.no_grad():
        targets = torch.full_like(log_probs, off_target).scatter_(1, pids[:, None], 1 - eps)
    rows = -(targets * log_probs).sum(dim=1)
    return rows.sum() / max(int(rows.detach().count_nonzero()), 1)


class CenterLoss(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        diff = features - self.centers[pids]
        return diff.pow(2).sum(dim=1).clamp(1e-12, 1e12).sum() / features.shape[0]


class CircleSoftmax(nn.Module):
    def __init__(self, num_classes: int, dim: int, margin: float = 0.25, scale: float = 64.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.001)
        self.margin, self.scale, self.label_smoothing = margin, scale, label_smoothing

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(features), F.normalize(self.weight))
        alpha_p = (1 + self.margin - cos.detach()).clamp(min=0)
        alpha_n = (cos.detach() + self.margin).clamp(min=0)
        target = F.one_hot(pids, cos.shape[1]).bool()
        logits = torch.where(target, alpha_p * (cos - (1 - self.margin)), alpha_n * (cos - self.margin))
        return fastreid_cross_entropy(self.scale * logits, pids, self.label_smoothing)


class Criterion(nn.Module):
    """Weighted sum of a model's declared loss terms. ``dims`` gives each feature output's width
    (needed by the terms that own parameters: center and circle)."""

    KINDS = ("ce", "triplet", "center", "circle")

    def __init__(self, terms: Sequence[LossTerm], num_classes: int, dims: Mapping[str, int],
                 cfg: LossConfig = LossConfig()):
        super().__init__()
        unknown = [t.loss for t in terms if t.loss not in self.KINDS]
        if unknown:
            raise ValueError(f"unknown loss kind(s) {unknown}; valid: {', '.join(self.KINDS)}")
        if not 0 <= cfg.label_smoothing < 1:  # FastReID's EPSILON -1 (adaptive smoothing) included
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.terms, self.cfg = list(terms), cfg
        self.owned = nn.ModuleDict()
        for t in self.terms:
            key = self._key(t)
            if t.loss == "center":
                self.owned[key] = CenterLoss(num_classes, dims[t.input])
            elif t.loss == "circle":
                self.owned[key] = CircleSoftmax(num_classes, dims[t.input], cfg.circle_margin, cfg.circle_scale,
                                                cfg.label_smoothing)

    def centers(self) -> list[tuple[nn.Parameter, float]]:
        """The centres of every center-loss term, each with the term's weight."""
        return [(self.owned[self._key(t)].centers, t.weight) for t in self.terms if t.loss == "center"]

    @staticmethod
    def _key(term: LossTerm) -> str:
        return f"{term.loss}:{term.input}".replace(".", "_")

    def forward(self, outputs: Mapping[str, torch.Tensor], pids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        total = outputs[self.terms[0].input].new_zeros(())
        values: dict[str, float] = {}
        margin = self.cfg.triplet_margin if self.cfg.triplet_margin > 0 else None
        for t in self.terms:
            x = outputs[t.input]
            if t.loss == "ce":
                value = F.cross_entropy(x, pids, label_smoothing=self.cfg.label_smoothing)
            elif t.loss == "triplet":
                value = batch_hard_triplet(x, pids, margin)
            else:
                value = self.owned[self._key(t)](x, pids)
            total = total + t.weight * value
            values[f"{t.loss}/{t.input}"] = float(value.detach())
        return total, values
