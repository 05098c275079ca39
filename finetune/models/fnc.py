"""FNC, Further Non-local and Channel attention (Liu et al., "Further Non-local and Channel Attention
Networks for Vehicle Re-identification", CVPRW 2020, §3-§4); models.md §7.

- Backbone (§3.1): SE-ResNeXt-101 32x4d with the last down-sampling removed (last stride 1), split into
  two branches (``split``, below): the stem and the first stages are shared, and each branch owns its
  own copy of the rest of the trunk (``spatial.trunk``, ``channel.trunk``).
- Spatial attention block, SAB (§3.2, Eqs. 1-2), on a branch's C x H x W map x (C = 2048, r = 2):
  g, h, p are 1x1 convs C -> C/r; A = softmax over the last axis of g(x)^T h(x) (HW x HW, no scaling);
  y = A p(x) reshaped to C/r x H x W; T is a 1x1 conv C/r -> C; output sigmoid(T(y)) (x) x.
- Channel attention block, CAB (§3.3, Eq. 3): 1x1 conv C -> C/2 (1024) + BN + ReLU, 3x3 conv C/2 -> C/2
  with 32 groups + BN + ReLU, 1x1 conv -> C giving x_raw; SE(x_raw) is the squeeze-and-excitation of
  [7] (GAP, FC C -> C/16, ReLU, FC -> C), a per-channel attention map; output sigmoid(SE(x_raw)) (x) x.
- ``fusion="add"`` is Table 6's ablation: both blocks add their attention map to x (x + T(y),
  x + SE(x_raw)) instead of gating x with its sigmoid.
- Per branch (§3.1): global average pooling -> feature reduction (1x1 conv + BN + ReLU) to 1024-d
  (spatial) or 512-d (channel) -> BNNeck (``reidforge.shared.heads.BNNeck``). Train mode returns
  ``spatial/feat``, ``channel/feat`` (the reduced, pre-BN vectors: batch-hard triplet) and
  ``spatial/logits``, ``channel/logits`` (label-smoothed CE); L = 2 (L_id,s + L_id,c) + L_tri,s + L_tri,c
  (Eq. 7, lambda = 2). Eval returns the two post-BN vectors concatenated: 1536-d.

The split, in the standard ResNet naming (He et al.: conv2_x..conv5_x, or res2..res5, are torchvision's
and timm's layer1..layer4, so conv4_x/res4 is ``layer3``, 23 blocks in SE-ResNeXt-101, and conv4_1 its
first block). The paper states it three times:

- §3.1: "We follow the modification strategies in state-of-the-art person Re-ID models [12] [16].
  Accordingly, we duplicate the convolutional layers after the conv4_1 layer to split the SE-ResNeXt-101
  into two branches." ([16] is MGN, which splits after res4_1; FastReID's MGN,
  ``fastreid/modeling/meta_arch/mgn.py``, shares ``layer3[0]`` and deep-copies ``layer3[1:]`` and
  ``layer4`` into every branch.)
- Fig. 1: "Layers after res3 are duplicated to split our network into 2 independent branches."
- Table 5: "FNC(not separate) refers to use same res4 in two branch"; §4.4: "The problem is that the
  same res4 is used when we train the entire network. [...] We then separated res4 from res3 in Figure 1."

``split`` offers each reading (the branch copies keep the backbone's block names: a branch's
``layer3.5`` is a copy of the backbone's ``layer3.5``):

- ``"after_conv4_1"`` (default), §3.1 as MGN does it: stem, layer1, layer2 and layer3[0] shared; each
  branch owns layer3[1:] (22 blocks) and layer4.
- ``"after_conv3"``, Fig. 1 and §4.4 read literally (the cut one block earlier, at res3/res4): stem,
  layer1 and layer2 shared; each branch owns all of layer3 and layer4.
- ``"after_conv4"``: only layer4 duplicated. This is the reading if the paper numbers the stages from 0
  (Cadene's ``layer0``..``layer4``, where "res3" is layer3 and "res4" layer4), the one models.md §7
  takes; under that numbering, though, §3.1's conv4_1 would be layer4's first block, which is not where
  MGN splits.
- ``"none"``, Table 5's "not separate": the whole trunk is shared and its layer4 map feeds both
  attention blocks. ("Same res4 in two branch" alone could also mean a shared layer3 under separate
  layer4 copies, which is ``"after_conv4"``.)

The default follows the text, the most specific of the three and the one that names the design it
copies (MGN); nothing in the paper (no parameter count, no code) settles it further.

Options: ``split`` (above), ``fusion`` ("multiply" | "add"), ``input_size`` ((384, 288), see below),
``trunk`` ("seresnext101_32x4d"): any ResNet-family backbone of ``reidforge.shared.backbones`` (stem,
layer1..layer4, ``out_channels``), built with last stride 1; SAB and CAB size themselves from its C, so
``trunk="resnet18"`` (C = 512: SAB inner width 256, CAB width 256 in 32 groups of 8) is a tiny FNC for
CPU runs. Pretrained trunk weights come in through ``model.weights``: :meth:`FNC.trunk_map` lists the
shared ``backbone.`` and, per branch, ``<branch>.trunk.layer3.`` and ``<branch>.trunk.layer4.``, so one
backbone file fills both copies.

Counts (the paper publishes none), from ``reidforge.shared.complexity``: trainable parameters without classifiers,
with CityFlow's 333-id classifiers (+1536 x 333), and MACs at 384 x 288 (convolutions, linear layers and
matrix products, the SAB affinity included); ``python finetune/complexity.py --models fnc`` prints the
SE-ResNeXt-101 rows.

                 SE-ResNeXt-101 32x4d                  trunk="resnet18"
split            params       333 ids      MACs        params      333 ids     MACs
after_conv4_1    107,284,912  107,796,400  44.821G     22,382,944  22,894,432  11.293G
after_conv3      108,807,664  109,319,152  45.759G     23,301,984  23,813,472  11.689G
after_conv4       79,596,592   80,108,080  34.152G     21,202,272  21,713,760  10.783G
none              63,472,304   63,983,792  27.879G     12,808,544  13,320,032   7.159G

In parts, SE-ResNeXt-101 at the default split: shared trunk 3,093,808, each branch's trunk copy
43,812,608 (layer3[1:] 27,688,320, layer4 16,124,288), SAB 8,393,728, CAB 5,021,824, reductions
3,148,800, BNNecks 1,536. ``trunk="resnet18"``: shared 1,602,112, each copy 9,574,400, SAB 525,568,
CAB 315,424; at the tiny recipe's 64 x 64: 0.416G MACs (after_conv4: 0.397G, none: 0.263G).

Where the paper is ambiguous or silent, and what is chosen:

- The split point: above.
- Input: "resized to 288*384" (§4.2) is read as width x height, so ``input_size`` (H, W) = (384, 288)
  (models.md §7); it is configurable, and nothing in the model is tied to it.
- CAB's mask: §3.3 calls CAB's output "a channel mask" and "the channel attention map ... normalized into
  [0, 1] through the sigmoid", so SE(x_raw) is taken as SE's excitation before its sigmoid and the
  mask is per channel (as models.md §7 reads it). Read as [7]'s whole module, which returns x_raw
  re-weighted, Eq. 3 would give a mask over positions and channels with the same parameters. In
  "add" mode the per-channel map is added to x, as §3.3 describes ("added the attention map on the
  origin map").
- Biases: the 1x1 convs of SAB, CAB's last 1x1 and the SE FCs carry a bias (no BN follows them); the
  convs followed by BN do not. SE reduction 16 (as in the backbone's SE units).
- The triplet feature is the reduction's ReLU output (§3.1 puts the BNNeck after the reduction).
- Training recipe (Ranger, warm-up, re-ranking k1 = 75, k2 = 10, lambda = 0.1) is not part of the model.
- Not in the paper: a smaller trunk for CPU runs (``trunk``). With it the reductions keep their 1024-d and
  512-d outputs (widening, from C = 512), so the feature stays 1536-d and the heads and losses are the
  paper's; only the trunk and the attention blocks' widths shrink.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import LossTerm, ReIDModel
from reidforge.finetune.models.mbr import split_trunk
from reidforge.shared.heads import BNNeck

FUSIONS = ("multiply", "add")
SPLITS = ("after_conv4_1", "after_conv3", "after_conv4", "none")
ID_LOSS_WEIGHT = 2.0  # Eq. 7: lambda


class SpatialAttentionBlock(nn.Module):
    """SAB: a non-local affinity over positions with inner width C / r, gating x through a sigmoid."""

    def __init__(self, channels: int = 2048, reduction: int = 2, fusion: str = "multiply"):
        super().__init__()
        inner = channels // reduction
        self.fusion = fusion
        self.g = nn.Conv2d(channels, inner, 1)
        self.h = nn.Conv2d(channels, inner, 1)
        self.p = nn.Conv2d(channels, inner, 1)
        self.t = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        g, h, p = (f(x).flatten(2) for f in (self.g, self.h, self.p))  # N x C/r x HW
        affinity = (g.transpose(1, 2) @ h).softmax(dim=-1)  # N x HW x HW
        y = (affinity @ p.transpose(1, 2)).transpose(1, 2).reshape(n, -1, height, width)
        out = self.t(y)
        return torch.sigmoid(out) * x if self.fusion == "multiply" else x + out


class ChannelAttentionBlock(nn.Module):
    """CAB: two conv blocks and a 1x1 conv to x_raw, SE excitation of it, gating x's channels."""

    def __init__(self, channels: int = 2048, width: int | None = None, groups: int = 32, se_reduction: int = 16,
                 fusion: str = "multiply"):
        super().__init__()
        width = width or channels // 2  # §3.3's 1024 at C = 2048
        self.fusion = fusion
        self.conv_block1 = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.ReLU(inplace=True))
        self.conv_block2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                                         nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(width, channels, 1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // se_reduction, 1),
                                nn.ReLU(inplace=True), nn.Conv2d(channels // se_reduction, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.conv(self.conv_block2(self.conv_block1(x))))  # N x C x 1 x 1
        return torch.sigmoid(out) * x if self.fusion == "multiply" else x + out


class Branch(nn.Module):
    """The branch's own trunk stages -> attention block -> GAP -> 1x1 conv + BN + ReLU reduction -> BNNeck."""

    def __init__(self, trunk: nn.Sequential, attention: nn.Module, channels: int, dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk  # ``layer3`` (the blocks not shared) and ``layer4``; empty when nothing is duplicated
        self.attention = attention
        self.reduction = nn.Sequential(nn.Conv2d(channels, dim, 1, bias=False), nn.BatchNorm2d(dim),
                                       nn.ReLU(inplace=True))
        self.neck = BNNeck(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        feat = self.reduction(self.attention(self.trunk(x)).mean(dim=(2, 3), keepdim=True)).flatten(1)
        return (feat, *self.neck(feat))


class FNC(ReIDModel):
    """SE-ResNeXt-101 (last stride 1) shared up to ``split``, then a spatial (SAB) and a channel (CAB) branch,
    each with its own copy of the rest of the trunk."""

    feature_dim = 1024 + 512

    def __init__(self, num_classes: int, split: str = "after_conv4_1", fusion: str = "multiply",
                 input_size: tuple[int, int] = (384, 288), trunk: str = "seresnext101_32x4d"):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.input_size = tuple(input_size)
        self.split = split
        self.backbone, layer4 = split_trunk(trunk, last_stride=1)
        if split == "none":  # Table 5's "not separate": one trunk feeds both attention blocks
            self.backbone.layer4 = layer4
            tails = [nn.Sequential(), nn.Sequential()]
        else:
            layer3 = self.backbone.layer3
            shared = {"after_conv3": 0, "after_conv4_1": 1, "after_conv4": len(layer3)}[split]
            # Slicing keeps the block names, so a branch's layer3.i is a copy of the backbone's layer3.i.
            self.backbone.layer3 = layer3[:shared]
            tail = nn.Sequential()
            tail.add_module("layer3", layer3[shared:])
            tail.add_module("layer4", layer4)
            tails = [tail, copy.deepcopy(tail)]
        channels = self.backbone.out_channels
        self.spatial = Branch(tails[0], SpatialAttentionBlock(channels, fusion=fusion), channels, 1024, num_classes)
        self.channel = Branch(tails[1], ChannelAttentionBlock(channels, fusion=fusion), channels, 512, num_classes)
        terms = [LossTerm("triplet", "spatial/feat"), LossTerm("triplet", "channel/feat")]
        if num_classes > 0:
            terms = [LossTerm("ce", "spatial/logits", ID_LOSS_WEIGHT),
                     LossTerm("ce", "channel/logits", ID_LOSS_WEIGHT), *terms]
        self.loss_terms = tuple(terms)

    def cam_layer(self) -> nn.Module:
        # The last map: the shared layer4, or the spatial branch's copy of it.
        return self.backbone.layer4 if self.split == "none" else self.spatial.trunk

    def trunk_map(self) -> tuple[tuple[str, str], ...]:
        # The shared part under its own names, then each branch's copies of the stages it owns.
        return (("backbone.", ""), *((f"{name}.trunk.{stage}.", f"{stage}.") for name in ("spatial", "channel")
                                     for stage, blocks in getattr(self, name).trunk.named_children() if len(blocks)))

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        b = self.backbone
        x = b.layer3(b.layer2(b.layer1(b.stem(images))))  # layer3: its shared blocks only (maybe none)
        if self.split == "none":
            x = b.layer4(x)
        s_feat, s_bn, s_logits = self.spatial(x)
        c_feat, c_bn, c_logits = self.channel(x)
        if not self.training:
            return torch.cat([s_bn, c_bn], dim=1)
        outputs = {"spatial/feat": s_feat, "channel/feat": c_feat}
        if s_logits is not None and c_logits is not None:
            outputs.update({"spatial/logits": s_logits, "channel/logits": c_logits})
        return outputs


@MODELS.register("fnc")
def fnc(num_classes: int, **options) -> FNC:
    return FNC(num_classes, **options)
