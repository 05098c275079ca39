"""The EEEM071 coursework models (Aricatt, "EEEM071 Coursework Report"; vehicle re-ID on VeRi-776).

Every model is backbone -> global average pooling -> the report's head (§6, Table 9, best row)
**FC-BN-ReLU-Dropout-FC**: Linear(C, d) + BatchNorm1d(d) + ReLU + Dropout(0.5) gives the d-dim
embedding, and a final Linear(d, N) the logits. Softmax CE on the logits and batch-hard triplet
(margin 0.3, §2.1) on the embedding, weights 1 and 1. Train mode returns
``{"global/feat": embedding, "global/logits": logits}``; eval mode returns the embedding (dropout off).
Input 224x224 (§2.1 and the 14x14 / 7x7 stage shapes of §3.1); the tuned MobileNet baseline of Table 1
went on to 512x512 (Table 7), which the engine can set. The report says "MobileNet V3"; the starter
code it builds on uses the Small variant.

| registered name | report row | backbone (``reidforge.shared.backbones``) | fusion | d |
|---|---|---|---|---|
| ``coursework_mobilenetv3_small`` | Table 1, baseline + custom head | ``mobilenetv3_small`` | | 1024 |
| ``coursework_resnet18`` | Table 2, ResNet18 | ``resnet18`` | | 1024 |
| ``coursework_seresnet18`` | Table 2, SE-ResNet18 | ``resnet18_se`` | | 1024 |
| ``coursework_seresnet18_concat`` | Table 2, SE-ResNet18 Concatenation | ``resnet18_se`` | concat | 1024 |
| ``coursework_seresnet18_add`` | Table 2, SE-ResNet18 Addition | ``resnet18_se`` | add | 1024 |
| ``coursework_seresnet18_global_concat`` | Table 2, SE-ResNet18 Global Conc. | ``resnet18_se`` | global_concat | 1024 |
| ``coursework_cbam_resnet18`` | Table 2, ResNet CBAM | ``resnet18_cbam`` | | 1024 |
| ``coursework_cbam_resnet18_concat`` | Table 2, ResNet CBAM and Concatenation | ``resnet18_cbam`` | concat | 1024 |
| ``coursework_seresnext50`` | Table 2, SE-ResNeXt50 | ``seresnext50_32x4d``, last stride 2 | | 512 |

Options: ``embedding_dim`` (d), ``dropout`` (0.5); other keywords go to the backbone (e.g. ``legacy=True``
for the Cadene SE-ResNeXt layout whose ImageNet weights the coursework used).

Deviations:
- Both linear layers of the head are bias-free: the report (§6) sets "the bias in the fc layers to
  zero" so that the class hyperplanes pass through the origin; the code keeps torch's default biases.
  (The first one's bias would be cancelled by the BN anyway.)
- d = 1024 follows the report's best embedding size (Table 4) and its code; the code's SE-ResNet18
  file once used 128. The ResNet-18 files of the code also disable the dropout, which the report's head
  (Table 9) has: the head here is the report's for every model.
- SE-ResNeXt50: the code (``src/models/seresnet.py`` ``CustomSEResNeXt``) puts Linear(2048, 512)-BN-ReLU
  without dropout (``dropout_p = None``) under the Cadene trunk (last stride 2); d = 512 is the default
  here, and ``launch/configs/seresnext50_veri.yaml`` sets ``dropout: 0.0`` and ``legacy: true`` to match.
- The triplet loss takes the embedding after dropout, as the code does (the dropout is the head's last
  layer before the classifier).
- Label smoothing is not stated by the report (the starter code makes it a flag); it is the engine's
  ``reidforge.finetune.losses`` setting, like every other model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import LossTerm, ReIDModel
from reidforge.shared.backbones import build_backbone


class EmbeddingHead(nn.Module):
    """FC-BN-ReLU-Dropout to a d-dim embedding, then a bias-free FC classifier (none when num_classes=0)."""

    def __init__(self, in_dim: int, dim: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                   nn.Dropout(dropout))
        self.classifier = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else None

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat = self.embed(pooled)
        return feat, (self.classifier(feat) if self.classifier is not None else None)


class CourseworkModel(ReIDModel):
    """Backbone -> GAP -> FC-BN-ReLU-Dropout embedding -> FC classifier."""

    input_size = (224, 224)

    def __init__(self, backbone: str, num_classes: int, embedding_dim: int = 1024, dropout: float = 0.5,
                 **backbone_options: Any):
        super().__init__()
        self.backbone = build_backbone(backbone, **backbone_options)
        self.head = EmbeddingHead(self.backbone.out_channels, embedding_dim, num_classes, dropout)
        self.feature_dim = embedding_dim
        self.loss_terms = ((LossTerm("ce", "global/logits"),) if num_classes > 0 else ()) + (
            LossTerm("triplet", "global/feat"),)

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        feat, logits = self.head(self.backbone(images).mean(dim=(2, 3)))
        if not self.training:
            return feat
        outputs = {"global/feat": feat}
        if logits is not None:
            outputs["global/logits"] = logits
        return outputs


# name -> (backbone, backbone options, embedding size): the rows of the table above.
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "coursework_mobilenetv3_small": ("mobilenetv3_small", {}, 1024),
    "coursework_resnet18": ("resnet18", {}, 1024),
    "coursework_seresnet18": ("resnet18_se", {}, 1024),
    "coursework_seresnet18_concat": ("resnet18_se", {"fusion": "concat"}, 1024),
    "coursework_seresnet18_add": ("resnet18_se", {"fusion": "add"}, 1024),
    "coursework_seresnet18_global_concat": ("resnet18_se", {"fusion": "global_concat"}, 1024),
    "coursework_cbam_resnet18": ("resnet18_cbam", {}, 1024),
    "coursework_cbam_resnet18_concat": ("resnet18_cbam", {"fusion": "concat"}, 1024),
    "coursework_seresnext50": ("seresnext50_32x4d", {"last_stride": 2}, 512),
}


def _register(name: str, backbone: str, backbone_options: dict[str, Any], default_dim: int) -> None:
    def build(num_classes: int, embedding_dim: int = default_dim, dropout: float = 0.5,
              **options: Any) -> CourseworkModel:
        return CourseworkModel(backbone, num_classes, embedding_dim, dropout, **{**backbone_options, **options})

    build.__name__ = build.__qualname__ = name
    MODELS.register(name)(build)


for _name, (_backbone, _options, _dim) in VARIANTS.items():
    _register(_name, _backbone, _options, _dim)
