"""DM-OSNet re-ID model (Zhou et al., "Integration of Multi-Head Self-Attention and Convolution for Person
Re-Identification", Sensors 2022): the ``dm_osnet`` backbone (OSNet-IBN x1.0 with DL-MHSA in conv2, see
``shared/backbones/dm_osnet.py``) under a fast-reid BNNeck head, trained at 256x128 (§4.2).

backbone (512 x 16 x 8) -> global average pool, f_t (``global/feat``) -> BatchNorm1d with frozen zero
bias, f_i (``global/bn_feat``) -> bias-free Linear(512, num_classes) (``global/logits``).
Losses: cross-entropy with label smoothing 0.1 on the logits and batch-hard triplet (margin 0.3) on f_t,
weight 1 each. Evaluation returns f_i (512-d).

Options: ``mhsa_stages`` (Table 2 ablation; (0, 0, 0) is the OSNet-IBN baseline under the same head and
recipe), ``window``, ``ds_ratios`` and ``ibn`` as the backbone's; ``pooling`` ("avg" or "gem"),
``classifier`` ("linear" or "circle") and ``neck_feat`` ("before" or "after": the triplet's input) for
the head.

The paper says only that the implementation "refers to FastReID"; the head and losses above are the
fast-reid bag-of-tricks settings of the authors' ``Base-bagtricks.yml``. Where this departs from the
paper or the authors' code:

- The authors' per-dataset configs inherit a further ``Base-SBS.yml`` overlay: GeM pooling, a
  CircleSoftmax classifier (scale 64, margin 0.35) on the post-BN feature, the triplet on the post-BN
  feature with a soft margin, and a 60-epoch cosine schedule that contradicts the paper's 120 epochs.
  ``pooling="gem", classifier="circle", neck_feat="after"`` select the model side of it (the ``circle``
  loss term owns its class proxies, so the neck then has no linear classifier); the circle margin, the
  soft triplet margin and the schedule are training settings.
- The classifier is initialised N(0, 0.001) (BoT's BNNeck) instead of fast-reid's N(0, 0.01).
- LUPerson/SpCL pretraining (§3.3) is the pretrain stage's job: this model starts from random weights
  or from a weights file loaded onto ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import BNNeckModel, LossTerm
from reidforge.shared.backbones import build_backbone


class DMOSNet(BNNeckModel):
    def __init__(self, num_classes: int, mhsa_stages: Sequence[int] = (1, 0, 0), window: int = 8,
                 ds_ratios: Sequence[int] = (8, 8, 8), ibn: bool = True, pooling: str = "avg",
                 classifier: str = "linear", neck_feat: str = "before"):
        if classifier not in ("linear", "circle"):
            raise ValueError(f"classifier must be 'linear' or 'circle', got {classifier!r}")
        if neck_feat not in ("before", "after"):
            raise ValueError(f"neck_feat must be 'before' or 'after', got {neck_feat!r}")
        backbone = build_backbone("dm_osnet", mhsa_stages=mhsa_stages, window=window, ds_ratios=ds_ratios, ibn=ibn)
        super().__init__(backbone, pooling, num_classes if classifier == "linear" else 0)
        self.input_size = (256, 128)
        identity = (LossTerm("ce", "global/logits") if classifier == "linear"
                    else LossTerm("circle", "global/bn_feat"))
        triplet = LossTerm("triplet", "global/feat" if neck_feat == "before" else "global/bn_feat")
        self.loss_terms = (identity, triplet) if num_classes > 0 else (triplet,)


@MODELS.register("dm_osnet")
def dm_osnet(num_classes: int, mhsa_stages: Sequence[int] = (1, 0, 0), window: int = 8,
             ds_ratios: Sequence[int] = (8, 8, 8), ibn: bool = True, pooling: str = "avg",
             classifier: str = "linear", neck_feat: str = "before") -> DMOSNet:
    """DM-OSNet as the paper trains it; backbone options as ``dm_osnet``'s, head options as above."""
    return DMOSNet(num_classes, mhsa_stages, window, ds_ratios, ibn, pooling, classifier, neck_feat)
