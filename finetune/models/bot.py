"""BoT, the re-ID strong baseline (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification", CVPRW 2019); models.md §3.

- Backbone with **last stride 1** (§3.4): 2048x16x8 at 256x128.
- Global average pooling gives ``f_t``; **BNNeck** (§3.5, :class:`reidforge.shared.heads.BNNeck`): BatchNorm1d with
  a frozen zero bias gives ``f_i``, a bias-free linear classifier (init N(0, 0.001)) gives the logits.
- Losses (§3.3, §3.6): label-smoothed CE (ε = 0.1) on the logits, batch-hard triplet (margin 0.3) on
  ``f_t``, and, with ``center_loss=True``, center loss on ``f_t`` with weight 5e-4. The ε, the margin and
  the centres belong to ``reidforge.finetune.losses``, the centres' own SGD (lr 0.5, ``optim.center_lr``) to
  ``reidforge.finetune.optim``; the model only routes outputs.
- Train mode returns ``{"global/feat": f_t, "global/bn_feat": f_i, "global/logits": logits}``; eval mode returns ``f_i``
  (the paper's "after" feature, compared by cosine distance).

Registered: ``bot_resnet50`` (the paper's), ``bot_resnet50_ibn_a`` (IBN-Net-a trunk, Pan et al., ECCV
2018, as in the reid-strong-baseline repository) and ``bot_seresnext50`` (SE-ResNeXt-50 32x4d trunk,
models.md §4, whose recommendation this is: BoT head and last stride 1 for comparability with §3).
Options: ``last_stride`` (1), ``center_loss`` (False), ``pooling`` ("avg", or "gem" as in fast-reid).
The paper starts from ImageNet weights; here they come from a local file (``model.weights``), mapped onto
``backbone.`` by ``reidforge.shared.weights.load_pretrained`` whatever its layout.
Deviation: center loss is off by default (the BNNeck-only setting, 94.1/85.7 on Market in the paper,
against 94.5/85.9 with it); ``center_loss=True`` with ``optim.center_lr=0.5`` is the paper's full recipe
(launch/configs/bot_market.yaml sets the lr, so the option alone switches it on).
"""

from __future__ import annotations

from typing import Any

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import BNNeckModel, LossTerm
from reidforge.shared.backbones import build_backbone

CENTER_LOSS_WEIGHT = 5e-4  # BoT §3.6: beta in L = L_ID + L_Triplet + beta * L_C


class BoT(BNNeckModel):
    """Backbone -> pooling -> BNNeck, trained with CE + triplet (+ center)."""

    input_size = (256, 128)

    def __init__(self, backbone: str, num_classes: int, last_stride: int = 1, center_loss: bool = False,
                 pooling: str = "avg"):
        super().__init__(build_backbone(backbone, last_stride=last_stride), pooling, num_classes)
        terms = [LossTerm("triplet", "global/feat")]
        if num_classes > 0:
            terms.insert(0, LossTerm("ce", "global/logits"))
        if center_loss:
            terms.append(LossTerm("center", "global/feat", CENTER_LOSS_WEIGHT))
        self.loss_terms = tuple(terms)


@MODELS.register()
def bot_resnet50(num_classes: int, **options: Any) -> BoT:
    return BoT("resnet50", num_classes, **options)


@MODELS.register()
def bot_resnet50_ibn_a(num_classes: int, **options: Any) -> BoT:
    return BoT("resnet50_ibn_a", num_classes, **options)


@MODELS.register()
def bot_seresnext50(num_classes: int, **options: Any) -> BoT:
    return BoT("seresnext50_32x4d", num_classes, **options)
