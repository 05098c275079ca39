"""FNC, Further Non-local and Channel attention (Liu et al., "Further Non-local and Channel Attention
Networks for Vehicle Re-identification", CVPRW 2020, §3-§4); models.md §7.

- Backbone (§3.1): SE-ResNeXt-101 32x4d with the last down-sampling removed (last stride 1). The stem
  and layer1..layer3 are shared; layer4 is duplicated, one copy per branch (``separate_layer4=True``,
  "FNC(separate)") or shared by both branches (``False``, Table 5's "not separate").
- Spatial attention block, SAB (§3.2, Eqs. 1-2), on a branch's C x H x W map x (C = 2048, r = 2):
  g, h, p are 1x1 convs C -> C/r; A = softmax over the last axis of g(x)^T h(x) (HW x HW, no scaling);
  y = A p(x) reshaped to C/r x H x W; T is a 1x1 conv C/r -> C; output sigmoid(T(y)) (x) x.
- Channel attention block, CAB (§3.3, Eq. 3): 1x1 conv C -> C/2 (1024) + BN + ReLU, 3x3 conv C/2 -> C/2
  with 32 groups + BN + ReLU, 1x1 conv -> C giving x_raw; SE(x_raw) is the squeeze-and-excitation of
  [7] (GAP, FC C -> C/16, ReLU, FC -> C), a per-channel attention map; output sigmoid(SE(x_raw)) (x) x.
- ``fusion="add"`` is Table 6's ablation: both blocks add their attention map to x (x + T(y),
  x + SE(x_raw)) instead of gating x with its sigmoid.
- Per branch (§3.1): global average pooling -> feature reduction (1x1 conv + BN + ReLU) to 1024-d
  (spatial) or 512-d (channel) -> BNNeck (``shared.heads.BNNeck``). Train mode returns
  ``spatial/feat``, ``channel/feat`` (the reduced, pre-BN vectors: batch-hard triplet) and
  ``spatial/logits``, ``channel/logits`` (label-smoothed CE); L = 2 (L_id,s + L_id,c) + L_tri,s + L_tri,c
  (Eq. 7, lambda = 2). Eval returns the two post-BN vectors concatenated: 1536-d.

Options: ``separate_layer4`` (True), ``fusion`` ("multiply" | "add"), ``input_size`` ((384, 288), see
below), ``trunk`` ("seresnext101_32x4d"): any ResNet-family backbone of ``shared.backbones`` (stem,
layer1..layer4, ``out_channels``), built with last stride 1; SAB and CAB size themselves from its C, so
``trunk="resnet18"`` (C = 512: SAB inner width 256, CAB width 256 in 32 groups of 8) is a tiny FNC for
CPU runs. ``backbone_weights``: a local state dict for the trunk loaded onto the backbone *before*
layer4 is copied (a file loaded after building reaches ``backbone.*`` and the spatial branch's layer4
only).

Counts (the paper publishes none; models.md §7 estimates them): 79,596,592 trainable parameters without
classifiers, separate (trunk to layer3 30,782,128, layer4 16,124,288 per copy, SAB 8,393,728, CAB
5,021,824, reductions 3,148,800, BNNecks 1,536); 63,472,304 not separate. The classifiers add 1536 N
(CityFlow's 333 ids: 80,108,080). MACs at 384 x 288 (convolutions, linear layers and matrix products,
the SAB affinity included): 34.15G separate, 27.88G not separate. ``trunk="resnet18"``: 21,202,272
separate (trunk to layer3 2,782,784, layer4 8,393,728 per copy, SAB 525,568, CAB 315,424, reductions
789,504, BNNecks 1,536), 12,808,544 not separate; 0.40G MACs at 64 x 64 separate (the default: 1.26G).

Where the paper is ambiguous or silent, and what is chosen:

- Input: "resized to 288*384" (§4.2) is read as width x height, so ``input_size`` (H, W) = (384, 288)
  (models.md §7); it is configurable, and nothing in the model is tied to it.
- The split point: §3.1 duplicates the layers "after the conv4_1 layer" (an MGN-style split inside
  res4), Fig. 1 those "after res3", and Table 5 speaks of separating "res4 from res3". Shared through
  layer3 with layer4 duplicated is the reading of Fig. 1 and Table 5 that models.md §7 adopts.
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
from pathlib import Path

import torch
from torch import nn

from finetune.models import MODELS
from finetune.models.base import LossTerm, ReIDModel
from finetune.models.mbr import split_trunk
from shared.heads import BNNeck

FUSIONS = ("multiply", "add")
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
    """Attention block -> GAP -> 1x1 conv + BN + ReLU reduction -> BNNeck."""

    def __init__(self, attention: nn.Module, channels: int, dim: int, num_classes: int):
        super().__init__()
        self.attention = attention
        self.reduction = nn.Sequential(nn.Conv2d(channels, dim, 1, bias=False), nn.BatchNorm2d(dim),
                                       nn.ReLU(inplace=True))
        self.neck = BNNeck(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        feat = self.reduction(self.attention(x).mean(dim=(2, 3), keepdim=True)).flatten(1)
        return (feat, *self.neck(feat))


class FNC(ReIDModel):
    """SE-ResNeXt-101 (last stride 1) to layer3, then a spatial (SAB) and a channel (CAB) branch."""

    feature_dim = 1024 + 512

    def __init__(self, num_classes: int, separate_layer4: bool = True, fusion: str = "multiply",
                 input_size: tuple[int, int] = (384, 288), backbone_weights: str | Path | None = None,
                 trunk: str = "seresnext101_32x4d"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.input_size = tuple(input_size)
        # The trunk stops at layer3; the branches own layer4.
        self.backbone, layer4 = split_trunk(trunk, backbone_weights, last_stride=1)
        self.layer4 = nn.ModuleList([layer4, copy.deepcopy(layer4)] if separate_layer4 else [layer4])
        channels = self.backbone.out_channels
        self.spatial = Branch(SpatialAttentionBlock(channels, fusion=fusion), channels, 1024, num_classes)
        self.channel = Branch(ChannelAttentionBlock(channels, fusion=fusion), channels, 512, num_classes)
        terms = [LossTerm("triplet", "spatial/feat"), LossTerm("triplet", "channel/feat")]
        if num_classes > 0:
            terms = [LossTerm("ce", "spatial/logits", ID_LOSS_WEIGHT),
                     LossTerm("ce", "channel/logits", ID_LOSS_WEIGHT), *terms]
        self.loss_terms = tuple(terms)

    def cam_layer(self) -> nn.Module:
        return self.layer4[0]  # the trunk stops at layer3; the spatial branch's layer4 makes the last map

    def trunk_map(self) -> tuple[tuple[str, str], ...]:
        return (("backbone.", ""), *((f"layer4.{i}.", "layer4.") for i in range(len(self.layer4))))

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        b = self.backbone
        x = b.layer3(b.layer2(b.layer1(b.stem(images))))
        spatial_in = self.layer4[0](x)
        channel_in = self.layer4[1](x) if len(self.layer4) > 1 else spatial_in
        s_feat, s_bn, s_logits = self.spatial(spatial_in)
        c_feat, c_bn, c_logits = self.channel(channel_in)
        if not self.training:
            return torch.cat([s_bn, c_bn], dim=1)
        outputs = {"spatial/feat": s_feat, "channel/feat": c_feat}
        if s_logits is not None and c_logits is not None:
            outputs.update({"spatial/logits": s_logits, "channel/logits": c_logits})
        return outputs


@MODELS.register("fnc")
def fnc(num_classes: int, **options) -> FNC:
    return FNC(num_classes, **options)
