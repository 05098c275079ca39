"""The contract every re-ID model follows, so one engine trains and evaluates all of them.

- ``forward(images, camids=None, viewids=None)``: ``images`` is a normalised (N, 3, H, W) batch; models
  that use camera or view metadata (MBR's embeddings) take it here, the others ignore it.
- In training mode it returns a dict of named outputs (e.g. ``"global/feat"``, ``"global/logits"``);
  ``loss_terms`` declares which output feeds which loss with which weight, so the routing and the
  weights (FNC's λ = 2, MBR's 0.6/0.4 split, ...) belong to the model, not to the engine.
- In evaluation mode it returns the final (N, feature_dim) inference feature.
- ``cam_layer()`` names the module whose output is the last spatial feature map (for Grad-CAM).
- ``trunk_map()`` says where the pretrained backbone lives in the model, so that one loader reaches
  every copy of a duplicated stage (``reidforge.shared.weights``) and one freeze covers them (``reidforge.finetune.optim``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from reidforge.shared.heads import BNNeck, build_pooling


@dataclass(frozen=True)
class LossTerm:
    """``weight * loss(outputs[input], pids)`` where ``loss`` is ``"ce"`` (logits) or ``"triplet"`` (features)."""

    loss: str
    input: str
    weight: float = 1.0


class ReIDModel(nn.Module, ABC):
    """Base class: subclasses set the attributes below and implement ``forward``."""

    feature_dim: int
    input_size: tuple[int, int]  # (height, width) the paper trains and tests at
    loss_terms: tuple[LossTerm, ...]

    @abstractmethod
    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor: ...

    def cam_layer(self) -> nn.Module:
        """The module whose output is the last spatial feature map (Grad-CAM's layer); multi-branch
        models whose trunk stops early point at a branch."""
        return self.backbone

    def trunk_map(self) -> tuple[tuple[str, str], ...]:
        """Pairs (prefix in this model's state dict, prefix in the backbone's own state dict) covering every
        tensor built from the pretrained backbone. Models that copy a backbone stage into branches list each
        copy (e.g. ``("branches.0.", "layer4.")``), so a backbone file fills all of them; the longest model
        prefix wins where two overlap."""
        return (("backbone.", ""),)

    def trunk_keys(self) -> dict[str, str]:
        """Every state-dict key of the model covered by :meth:`trunk_map`, with its backbone key."""
        pairs = sorted(self.trunk_map(), key=lambda pair: -len(pair[0]))
        keys = {}
        for key in self.state_dict():
            for model_prefix, backbone_prefix in pairs:
                if key.startswith(model_prefix):
                    keys[key] = backbone_prefix + key[len(model_prefix):]
                    break
        return keys


class BNNeckModel(ReIDModel):
    """backbone -> pooling -> BNNeck (BoT §3.5), the single-branch head most models share.

    Train mode returns ``global/feat`` (pooled, pre-BN), ``global/bn_feat`` and, when the neck has a
    classifier, ``global/logits``; eval mode returns the post-BN feature.
    """

    def __init__(self, backbone: nn.Module, pooling: str, neck_classes: int):
        super().__init__()
        self.backbone = backbone
        self.pool = build_pooling(pooling)
        self.neck = BNNeck(backbone.out_channels, neck_classes)
        self.feature_dim = backbone.out_channels

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        feat = self.pool(self.backbone(images))
        bn_feat, logits = self.neck(feat)
        if not self.training:
            return bn_feat
        outputs = {"global/feat": feat, "global/bn_feat": bn_feat}
        if logits is not None:
            outputs["global/logits"] = logits
        return outputs
