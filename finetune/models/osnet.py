"""OSNet re-ID model (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019),
with torchreid's head: the OSNet that DM-OSNet's Tables 2-4 quote ([0,0,0] in Table 2).

backbone (any OSNet width, or the IBN variant) -> global average pool -> fc 512 + BN1d + ReLU, the 512-d
inference feature -> Linear(512, num_classes) with bias. Input 256x128. OSNet x1.0 without the classifier
has 2,169,508 parameters (the published 2.2M) and 978.9M MACs at 256x128.

Training outputs ``global/feat`` (the 512-d feature) and ``global/logits``. Losses: cross-entropy with
label smoothing (0.1) on the logits, torchreid's softmax recipe; ``triplet=True`` adds the term of
torchreid's triplet engine (batch-hard, margin 0.3, weight 1) on the 512-d feature. Evaluation returns
the 512-d feature.

Deviations from torchreid: none in the network (same fc layer, same N(0, 0.01) init of the linear layers).
torchreid's model returns only logits in its softmax mode; here the feature is always returned as well,
and routed to a loss only when ``triplet=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import LossTerm, ReIDModel
from reidforge.shared.backbones import build_backbone
from reidforge.shared.backbones.osnet import OSNet


class OSNetReID(ReIDModel):
    feature_dim = 512

    def __init__(self, num_classes: int, variant: str = "osnet_x1_0", triplet: bool = False):
        super().__init__()
        backbone = build_backbone(variant)
        if not isinstance(backbone, OSNet):
            raise ValueError(f"backbone {variant!r} is not an OSNet")
        self.backbone = backbone
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        dim = self.feature_dim
        self.fc = nn.Sequential(nn.Linear(backbone.out_channels, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(dim, num_classes) if num_classes > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        self.input_size = (256, 128)
        terms = [LossTerm("ce", "global/logits", 1.0)] if self.classifier is not None else []
        if triplet:
            terms.append(LossTerm("triplet", "global/feat", 1.0))
        self.loss_terms = tuple(terms)

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        feat = self.fc(self.pool(self.backbone(images)))
        if not self.training:
            return feat
        outputs = {"global/feat": feat}
        if self.classifier is not None:
            outputs["global/logits"] = self.classifier(feat)
        return outputs


@MODELS.register("osnet")
def osnet(num_classes: int, variant: str = "osnet_x1_0", triplet: bool = False) -> OSNetReID:
    """``variant``: an OSNet backbone (osnet_x1_0, osnet_x0_75, osnet_x0_5, osnet_x0_25, osnet_ibn_x1_0)."""
    return OSNetReID(num_classes, variant, triplet)
