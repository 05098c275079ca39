"""MBR-4B (Almeida et al., "Strength in Diversity: Multi-Branch Representation Learning for Vehicle
Re-Identification", ITSC 2023) as the authors' code builds ``MBR_4B`` (vehicle_reid_itsc2023,
``models/models.py``); models.md §5. Every detail below is the code's.

- Shared trunk: ResNet50-IBN-a stem and layer1..layer3 (1024 x 16 x 16 at 256 x 256).
- Four branches on the layer3 map, each trained by one loss family ("Loss-Branch-Split", LBS):
  0. ``r50_a`` (CE) and 1. ``r50_b`` (triplet): deep copies of the trunk's layer4, stride 2 (2048 x 8 x 8);
  2. ``bot_a`` (CE) and 3. ``bot_b`` (triplet): three Bottleneck-Transformer blocks (randomly
     initialised, stride 1, 2048 x 16 x 16) whose 3x3 conv is a 4-head MHSA over 512 channels with
     BoTNet's 2-D relative position logits (two learned tensors, one per axis, sized to the layer3 map).
- Per branch: global average pooling -> (+ LAI) -> BatchNorm1d with a frozen zero bias. CE branches add
  a bias-free Linear(2048, num_classes) (init N(0, 0.001)); triplet branches keep the BN only for
  inference (its weight counts as trainable, as in the code, but no loss reaches it).
- Train mode returns ``<branch>/feat`` (the pre-BN vector) for every branch and ``<branch>/logits`` for
  the CE ones; loss weights CE R50 0.6, CE BoT 0.4, triplet R50 1.0, triplet BoT 0.4 (the code's
  ``MBR_4B`` setting). ``num_classes=0`` leaves the triplet terms only.
- Eval returns the four post-BN vectors, each L2-normalised, concatenated: 8192-d.
- LAI (``n_cams``, ``n_views``; off by default): a zero-initialised learned tensor
  [4, n_cams * n_views, 2048] (cams-only or views-only when the other count is 0); row
  ``camid * n_views + viewid`` is added to each branch's pooled vector before the BN, in training and
  at test time. It needs the metadata in ``forward``, and 0-based ids.

Options: ``n_cams``, ``n_views``; ``input_size`` (default (256, 256)): the position tensors are sized
to its layer3 map (input / 16), so another size changes the parameter count; ``trunk``
("resnet50_ibn_a"): any ResNet-family backbone of ``reidforge.shared.backbones`` (stem, layer1..layer4,
``out_channels``); the widths above are for D = its ``out_channels`` = 2048: the R50 branches are its
layer4, the BoT blocks take the layer3 map and have D / 4 planes and D outputs, and the LAI tensor,
the BNNecks and the 4 x D feature follow D. ``trunk="resnet18"`` (D = 512: BoT blocks 256 -> 512 over
128 planes, a 2048-d feature) is a tiny MBR-4B for CPU runs. ``attention`` (from Python): a channels
-> module factory used in place of MHSA in the BoT blocks, which is how LKA-ReID swaps in its LKA units.
Pretrained trunk weights come in through ``model.weights``: :meth:`MBR4B.trunk_map` sends the file's
layer4 to both R50 branches, as the code deep-copies the ImageNet layer4.

Counts (VeRi, 575 classes, trainable parameters, no LAI, as ``count_parameters`` in the code):
61,440,064, the 61.44M of LKA-ReID's Table II; LAI for 20 cams x 8 views adds 1,310,720. MACs at
256 x 256 (convolutions, linear layers and matrix products): 12.23G against the 14.44G that LKA-ReID's
Table II prints for this baseline; the difference is not explained there (models.md §6).
``trunk="resnet18"``: 21,478,208 (trunk to layer3 2,782,784, R50 branches 8,393,728 and BoT branches
658,560 each; 21,459,776 at 64 x 64), LAI for 20 cams x 8 views adds 327,680; 0.20G MACs at 64 x 64
(the default: 0.73G).

Where this departs from the paper or the code:

- The trunk's ImageNet weights (torch.hub IBN-Net) are not fetched; ``model.weights`` takes a local
  file. The code's last-stride edit on the trunk is not reproduced: it touches a layer4 the model drops.
- MHSA is kept exactly as coded, quirks included: no 1/sqrt(d) scaling of the logits, and the position
  term multiplies the query position's embedding with the *key* position's query vector
  (energy[i, j] = q_i.k_j + r_i.q_j, soft-max over j), where BoTNet's paper has q_i.r_j.
- The frozen first-10-epochs trunk, the schedule and the triplet margin (0.1) are training settings,
  not part of the model.
- Unknown camera or view ids (negative, or beyond ``n_cams``/``n_views``) raise instead of indexing a
  wrong row.
- Not in the paper or the code: a smaller trunk for CPU runs (``trunk``), with the branch widths
  scaled to it as above.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.base import LossTerm, ReIDModel
from reidforge.shared.backbones import build_backbone
from reidforge.shared.heads import BNNeck

# (loss, weight) per branch, in branch order: R50 CE, R50 triplet, BoT CE, BoT triplet (MBR_4B).
LBS_LOSSES = (("ce", 0.6), ("triplet", 1.0), ("ce", 0.4), ("triplet", 0.4))


def split_trunk(name: str, **options: Any) -> tuple[nn.Module, nn.Module]:
    """A ResNet-family backbone (stem, layer1..layer4, ``out_channels``) cut after layer3, and its layer4."""
    backbone = build_backbone(name, **options)
    if not all(hasattr(backbone, part) for part in ("stem", "layer1", "layer2", "layer3", "layer4")):
        raise ValueError(f"trunk {name!r} is not a ResNet-family backbone (stem, layer1..layer4)")
    layer4 = backbone.layer4
    del backbone.layer4
    return backbone, layer4


class MHSA(nn.Module):
    """BoTNet multi-head self-attention on an (N, C, H, W) map of a fixed size, as MBR codes it."""

    def __init__(self, dim: int, resolution: tuple[int, int], heads: int = 4):
        super().__init__()
        self.heads, self.resolution = heads, resolution
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        # The code's names and shapes: rel_h varies along the width, rel_w along the height.
        self.rel_h = nn.Parameter(torch.randn(1, heads, dim // heads, 1, resolution[1]))
        self.rel_w = nn.Parameter(torch.randn(1, heads, dim // heads, resolution[0], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (h, w) != self.resolution:
            raise ValueError(f"MHSA position logits are {self.resolution}, the map is {(h, w)}: "
                             "build the model with input_size = 16 x the map size")
        q, k, v = (f(x).view(n, self.heads, c // self.heads, h * w) for f in (self.query, self.key, self.value))
        position = (self.rel_h + self.rel_w).view(1, self.heads, c // self.heads, h * w)
        energy = q.transpose(-2, -1) @ k + position.transpose(-2, -1) @ q  # no 1/sqrt(d), as coded
        return (v @ energy.softmax(dim=-1).transpose(-2, -1)).view(n, c, h, w)


class BoTBlock(nn.Module):
    """Bottleneck-Transformer block: 1x1 -> attention -> 1x1 (x4), BN/ReLU and shortcut as in ResNet."""

    expansion = 4

    def __init__(self, in_channels: int, attention: nn.Module, planes: int = 512):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.attention = attention
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # The code's projection shortcut keeps its conv bias.
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.attention(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class MBR4B(ReIDModel):
    """ResNet50-IBN-a trunk to layer3, two R50 and two BoT branches under LBS heads."""

    branch_names = ("r50_a", "r50_b", "bot_a", "bot_b")

    def __init__(self, num_classes: int, n_cams: int = 0, n_views: int = 0,
                 input_size: tuple[int, int] = (256, 256),
                 attention: Callable[[int], nn.Module] | None = None, trunk: str = "resnet50_ibn_a"):
        super().__init__()
        if input_size[0] % 32 or input_size[1] % 32:
            raise ValueError(f"input_size must be a multiple of 32 on both sides, got {input_size}")
        self.input_size = tuple(input_size)
        # layer4 lives on as the R50 branches; the trunk stops at layer3
        self.backbone, layer4 = split_trunk(trunk)
        dim = self.backbone.out_channels  # the branch width D: 2048, or 512 for ResNet-18
        self.feature_dim = dim * len(self.branch_names)
        if attention is None:
            attention = partial(MHSA, resolution=(input_size[0] // 16, input_size[1] // 16))
        layer3_channels = layer4[0].conv1.in_channels  # 1024, or 256 for ResNet-18
        self.branches = nn.ModuleList([copy.deepcopy(layer4), copy.deepcopy(layer4),
                                       self._bot_branch(attention, layer3_channels, dim),
                                       self._bot_branch(attention, layer3_channels, dim)])
        self.necks = nn.ModuleList([BNNeck(dim, num_classes if loss == "ce" else 0) for loss, _ in LBS_LOSSES])
        self.n_cams, self.n_views = n_cams, n_views
        embeddings = (n_cams or 1) * (n_views or 1)
        self.lai = (nn.Parameter(torch.zeros(len(self.branch_names), embeddings, dim))
                    if n_cams > 0 or n_views > 0 else None)
        self.loss_terms = tuple(
            LossTerm(loss, f"{name}/{'logits' if loss == 'ce' else 'feat'}", weight)
            for name, (loss, weight) in zip(self.branch_names, LBS_LOSSES)
            if loss == "triplet" or num_classes > 0)

    @staticmethod
    def _bot_branch(attention: Callable[[int], nn.Module], in_channels: int, dim: int) -> nn.Sequential:
        planes = dim // BoTBlock.expansion  # 512 for D = 2048
        return nn.Sequential(*(BoTBlock(c, attention(planes), planes) for c in (in_channels, dim, dim)))

    def _lai_rows(self, camids: torch.Tensor | None, viewids: torch.Tensor | None) -> torch.Tensor:
        index: torch.Tensor | int = 0
        for ids, count, name in ((camids, self.n_cams, "camids"), (viewids, self.n_views, "viewids")):
            if count == 0:
                continue
            if ids is None:
                raise ValueError(f"this model embeds cameras and views (LAI): forward needs {name}")
            if bool(((ids < 0) | (ids >= count)).any()):
                raise ValueError(f"{name} must lie in [0, {count}), got {ids.min().item()}..{ids.max().item()}")
            index = index * count + ids.long().view(-1)
        return index  # camid * n_views + viewid, or the one id that is embedded

    def cam_layer(self) -> nn.Module:
        return self.branches[0]  # the trunk stops at layer3; the first R50 branch makes the last map

    def trunk_map(self) -> tuple[tuple[str, str], ...]:
        # The R50 branches are copies of the trunk's layer4 (the code deep-copies the ImageNet layer4).
        return (("backbone.", ""), ("branches.0.", "layer4."), ("branches.1.", "layer4."))

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        rows = self._lai_rows(camids, viewids) if self.lai is not None else None
        b = self.backbone
        x = b.layer3(b.layer2(b.layer1(b.stem(images))))
        outputs: dict[str, torch.Tensor] = {}
        inference = []
        for i, (name, branch, neck) in enumerate(zip(self.branch_names, self.branches, self.necks)):
            feat = branch(x).mean(dim=(2, 3))
            if rows is not None:
                feat = feat + self.lai[i, rows]
            bn_feat, logits = neck(feat)
            inference.append(F.normalize(bn_feat, dim=1))
            outputs[f"{name}/feat"] = feat
            if logits is not None:
                outputs[f"{name}/logits"] = logits
        return outputs if self.training else torch.cat(inference, dim=1)


@MODELS.register("mbr_4b")
def mbr_4b(num_classes: int, **options) -> MBR4B:
    return MBR4B(num_classes, **options)
