"""LKA-ReID (Xiang et al., "LKA-ReID: Vehicle Re-Identification with Large Kernel Attention", 2024): MBR-4B
(``finetune/models/mbr.py``) with large kernel attention in its BoT branches and hybrid channel attention
in its R50 branches (§II.A, Fig. 1); models.md §6.

- Branches ``h1`` (CE) and ``h2`` (triplet) are MBR's R50 branches, whose three layer4 bottlenecks each
  get an HCA module in place of their 3x3 conv (``hca``).
- Branches ``l1`` (CE) and ``l2`` (triplet) are MBR's BoT branches, whose three blocks each get a VAN
  attention unit with LKA in place of their MHSA (``lka``).
- Everything else is MBR-4B's: trunk, heads, LBS routing and weights, 8192-d L2-normalised
  concatenation at test time (the paper ranks by cosine similarity, which orders these vectors as
  MBR's Euclidean distance does), LAI with ``n_cams``/``n_views`` (Table I's "Ours*"; off by default,
  as in Table II).
- Pretrained trunk (``model.weights``): :meth:`LKAReID.trunk_map` gives the H branches every layer4
  tensor but those of the conv2 each HCA replaces; the HCA and VAN units are new, start from their
  init and are not trunk tensors, so a trunk freeze leaves them training.

**LKA unit** (§II.B, Eqs. 1-3): F' = Conv1x1(GELU(F)); Attention = Conv1x1(DW-D-Conv(DW-Conv(F')));
Output = Conv1x1(Attention (x) F') + F. For the 21 x 21 kernel of VAN (K = 21, d = 3): a 5x5 depth-wise
conv, a 7x7 depth-wise conv with dilation 3 and a 1x1 conv, all with bias; 512 channels at 16 x 16.

**HCA** (§II.C, Fig. 3, from MLCA): local average pooling of the C x H x W input to C x 5 x 5; the global
path averages that to C values and runs a 1-D conv (kernel k) across channels; the local path runs a
1-D conv (kernel k) over the 25 * C values laid out cell by cell; both go through a sigmoid, are
restored to H x W by adaptive average pooling ("anti-pooling") and mixed 0.5 / 0.5; the result
multiplies the input. k = |log2(C) / gamma + b / gamma|_odd with gamma = b = 2 (Eq. 4): 5 for C = 512.
2k = 10 parameters per module.

Table II against this code (575 classes, trainable parameters, no LAI; MACs of convolutions, linear
layers and matrix products at 256 x 256, ``reidforge.shared.complexity``), as params / MACs:

- baseline (``lka=False, hca=False``): 61,440,064 / 12.236G; Table II 61.44M / 14.44G.
- +LKA (``hca=False``): 61,575,232 / 11.690G (-0.546G); Table II 61.57M / 13.89G (-0.55G).
- +HCA (``lka=False``): 47,284,348 / 11.331G (-0.906G); Table II 47.29M / 14.25G (-0.19G).
- both (default): 47,419,516 / 10.785G (-1.451G); Table II 47.42M / 13.70G (-0.74G).

``trunk="resnet18"`` (MBR-4B's option, D = 512; see the last deviation below) is a tiny LKA-ReID for CPU
runs: 12,074,856 parameters at any input size (baseline 21,478,208, +LKA 21,512,000, +HCA 12,041,064),
0.17G MACs at 64 x 64 (the default: 0.68G). The VAN units then work on 128 channels, HCA on 512 as in
the full model (k = 5).

Where this departs from the paper, or fills what it leaves open:

- The paper places neither module exactly. The parameter deltas do: +135,168 is six VAN units replacing
  six 512-channel MHSAs (+22,528 each), -14,155,776 is exactly six 3x3 512 -> 512 conv weights, so HCA
  takes the 3x3 conv of the three layer4 bottlenecks of both R50 branches (their BN and ReLU stay).
- The LKA MAC delta matches Table II; the HCA one does not (-0.906G here, -0.19G printed). No way of
  handling the stride with these parameters gives -0.19G: pooling after the HCA, or the stride on the
  last 1x1, -0.906G; the stride on the first 1x1, -1.107G; no stride (16 x 16 H branches), +1.913G.
  The 14.44G baseline is not reproduced either (12.236G; models.md §6 finds no counter that gives it).
- +HCA counts 47,284,348 (47.28M) where Table II prints 47.29M, 0.012 % apart: with "both" at 47.42M the
  table implies about 0.7K-10.5K more parameters than the 60 HCA carries as described (5.7K-10.5K if
  the table truncates, as its 61.57M for +LKA's 61,575,232 suggests), e.g. a BN per module; §II.C
  describes none.
- The first layer4 bottleneck's 3x3 conv has stride 2, which an HCA (same size in and out) cannot take:
  a 2x2 average pool follows the HCA there, as MBR's BoT blocks do for stride 2, so the H branches keep
  their 8 x 8 output.
- Eq. 1 applies GELU before the first 1x1 conv and is followed here; VAN's code applies it after.
- Eq. 4's "gamma and b ... default value is 2" is followed (ECA and MLCA use b = 1); both give k = 5 at
  512 channels.
- HCA fuses the two paths after anti-pooling (§II.C) where MLCA fuses them at 5 x 5 first; pooling is
  linear, so the two orders give the same map. MLCA's code mixes the global path across the images of
  a batch (a reshape that is only right for one image); here every image gets its own.
- Loss weights are not given; MBR-4B's are reused. ``lka=False, hca=False`` is MBR-4B under LKA-ReID's
  branch names.
- Not in the paper: a smaller trunk for CPU runs. A ResNet-18 layer4 is two basic blocks of two 3x3
  convs each; HCA takes conv2 of both, the conv that, like a bottleneck's 3x3, keeps the width (512 ->
  512, as an HCA must) in every block; conv1, which carries the first block's stride and its 256 -> 512
  widening, stays. Each H-branch block thus keeps one 3x3 conv where a bottleneck keeps none, and no
  average pool is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reidforge.finetune.models import MODELS
from reidforge.finetune.models.mbr import MBR4B


class LKA(nn.Module):
    """VAN's large kernel attention: a 21x21 kernel as 5x5 dw + 7x7 dw (dilation 3) + 1x1, gating its input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class VANAttention(nn.Module):
    """LKA-ReID Eqs. 1-3: GELU, 1x1, LKA, 1x1, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.activation = nn.GELU()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.spatial_gating_unit = LKA(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.spatial_gating_unit(self.proj_1(self.activation(x)))) + x


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 2) -> int:
    """Eq. 4: log2(C) / gamma + b / gamma truncated, plus 1 when even."""
    t = int(abs(math.log2(channels) + b) / gamma)
    return t if t % 2 else t + 1


class HCA(nn.Module):
    """Hybrid channel attention: local (k_s x k_s cells) and global channel attention, mixed and unpooled."""

    def __init__(self, channels: int, local_size: int = 5, local_weight: float = 0.5):
        super().__init__()
        k = eca_kernel_size(channels)
        self.local_size, self.local_weight = local_size, local_weight
        self.conv_local = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.conv_global = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.local_size
        local = F.adaptive_avg_pool2d(x, s)
        # MLCA's layout: one sequence of s*s cells x C channels, so the 1-D conv also spans cell boundaries.
        cells = local.flatten(2).transpose(1, 2).reshape(n, 1, s * s * c)
        att_local = self.conv_local(cells).view(n, s * s, c).transpose(1, 2).reshape(n, c, s, s).sigmoid()
        att_global = self.conv_global(local.mean(dim=(2, 3)).unsqueeze(1)).view(n, c, 1, 1).sigmoid()
        att = self.local_weight * att_local + (1 - self.local_weight) * att_global
        return x * F.adaptive_avg_pool2d(att, (h, w))


def _hca_in_place_of(conv: nn.Conv2d) -> nn.Module:
    stride = conv.stride[0]
    hca = HCA(conv.in_channels)
    return hca if stride == 1 else nn.Sequential(hca, nn.AvgPool2d(stride))  # HCA keeps the map size


class LKAReID(MBR4B):
    """MBR-4B with VAN/LKA units in the BoT ("L") branches and HCA in the R50 ("H") branches."""

    branch_names = ("h1", "h2", "l1", "l2")

    def __init__(self, num_classes: int, lka: bool = True, hca: bool = True, **mbr_options):
        super().__init__(num_classes, attention=VANAttention if lka else None, **mbr_options)
        self.hca = hca
        if hca:
            for branch in self.branches[:2]:  # MBR's R50 branches
                for block in branch:  # conv2: a bottleneck's 3x3, or a basic block's width-keeping second 3x3
                    block.conv2 = _hca_in_place_of(block.conv2)

    def trunk_map(self) -> tuple[tuple[str, str], ...]:
        if not self.hca:
            return super().trunk_map()
        # The HCA modules are new: the R50 branches take every layer4 tensor but those of the conv2 they replace.
        return (("backbone.", ""), *((f"branches.{i}.{name}.{child}.", f"layer4.{name}.{child}.")
                                     for i in (0, 1) for name, block in self.branches[i].named_children()
                                     for child, module in block.named_children()
                                     if child != "conv2" and module.state_dict()))


@MODELS.register("lka_reid")
def lka_reid(num_classes: int, **options) -> LKAReID:
    return LKAReID(num_classes, **options)
