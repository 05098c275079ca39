"""DL-MHSA and the DM-OSNet backbone (Zhou et al., "Integration of Multi-Head Self-Attention and Convolution
for Person Re-Identification", Sensors 2022, §3.1-§3.2, §4.2-§4.3).

**DL-MHSA** (double-layer MHSA, §3.1, Eqs. 1-9) on a C x H x W map with k = C / head_dim heads:

1. Local layer: the map is cut into non-overlapping G x G-pixel windows ((H/G)(W/G) windows of G^2 tokens,
   Eq. 2) and every head computes softmax(Q K^T / sqrt(d)) V inside each window (Eqs. 1, 3, 4). The heads
   are concatenated and added to the input: attention_1 = F(heads) + X (Eq. 5).
2. Global layer: Q is projected from attention_1 at all H*W positions, K and V from attention_1 average-
   pooled with kernel = stride = ds, so every position attends to (H/ds)(W/ds) pooled tokens (Eqs. 6-8);
   attention_2 = F(heads) + attention_1 (Eq. 9).

Cost: O(HW * G^2) for the local layer plus O(HW * HW/ds^2) for the global one, against O((HW)^2).

**DM-OSNet** (§3.2, Eq. 10, Fig. 3) replaces the 4-unit (9x9) stream of the OSNet blocks of the stages
switched on in ``mhsa_stages`` (conv2, conv3, conv4; Table 2) with 1x1 conv -> DL-MHSA -> BN -> ReLU, whose
output goes through the block's shared aggregation gate like the other three streams. The paper's model
is ``mhsa_stages=(1, 0, 0)`` (§4.3): both conv2 blocks, on a 64x32 map at 256x128 input, with 2 heads.

Where this departs from the paper, or fills what the paper leaves open (from the authors' reference
code, the fast-reid ``dmosnet.py``, and the TransCNN H-MHSA it follows):

- Normalisation and projections that Eqs. 5 and 9 do not show: a BN on the input before the local
  layer's 1x1 qkv conv; a BN on attention_1 (the local layer returns BN(X + F(heads))); a BN on the pooled
  map before the global layer's 1x1 K/V conv; a 1x1 output projection applied to attention_2. All 1x1
  convs inside DL-MHSA carry a bias. Eq. 10 omits the stream's 1x1 conv, BN and ReLU "for clarity".
- Eq. 3 prints the local attention map as (HW/G^2) x (HW/G^2) x C/k; the windows of Eq. 2 and the
  stated O(HW * G^2) cost mean (HW/G^2) maps of G^2 x G^2 per head, which is what is computed.
- The number of heads is not in the paper: head_dim = 32 (reference code), so 2/3/4 heads at conv2/3/4.
- K/V pooling: the paper pools with kernel = stride = G (§3.1, §4.2: G = 8) and that is the default at
  every stage. The reference code pairs G = 8 with ds = 4 at conv3 and ds = 2 at conv4 (settings it never
  enables); ``ds_ratios=(8, 4, 2)`` reproduces them.
- IBN layout (affine Instance Norm in the stem and after the conv2 blocks, as ``osnet_ibn_x1_0``): used by
  the reference code, not mentioned in the paper; ``ibn=False`` gives the plain OSNet layout.
- No positional encoding (none in the paper; the reference code's is commented out) and no dropout (the
  reference code's output Dropout2d has p = 0).
- The 4-unit stream is swapped in both blocks of a switched-on stage; no fc-512 layer, as in the
  reference code (the head lives in ``finetune/models/dm_osnet.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reidforge.shared.backbones import BACKBONES
from reidforge.shared.backbones.osnet import OSNet, StreamFactory


class DLMHSA(nn.Module):
    """Double-layer multi-head self-attention on an (N, C, H, W) map; H and W divisible by G and ds."""

    def __init__(self, dim: int, head_dim: int = 32, window: int = 8, ds_ratio: int = 8):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"DL-MHSA width {dim} is not a multiple of head_dim {head_dim}")
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.window, self.ds_ratio = window, ds_ratio
        self.norm = nn.BatchNorm2d(dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.grid_norm = nn.BatchNorm2d(dim)
        self.avg_pool = nn.AvgPool2d(ds_ratio, stride=ds_ratio)
        self.ds_norm = nn.BatchNorm2d(dim)
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g, k, d = self.window, self.heads, self.head_dim
        if h % g or w % g or h % self.ds_ratio or w % self.ds_ratio:
            raise ValueError(f"DL-MHSA needs a map divisible by window {g} and ds_ratio {self.ds_ratio}, "
                             f"got {h}x{w}")
        gh, gw = h // g, w // g

        # Layer 1: channels are (q|k|v, head, d); rows and columns split into (window index, offset).
        qkv = self.qkv(self.norm(x)).reshape(n, 3, k, d, gh, g, gw, g)
        qkv = qkv.permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(3, n, k * gh * gw, g * g, d)
        local = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        local = local.reshape(n, k, gh, gw, g, g, d).permute(0, 1, 6, 2, 4, 3, 5).reshape(n, c, h, w)
        attention_1 = self.grid_norm(x + local)

        # Layer 2: full-resolution queries against ds-pooled keys and values.
        q = self.q(attention_1).reshape(n, k, d, h * w).transpose(-2, -1)
        kv = self.kv(self.ds_norm(self.avg_pool(attention_1))).reshape(n, 2, k, d, -1).transpose(-2, -1)
        # Contiguous inputs let the CPU pick the fused kernel instead of materialising HW x HW/ds^2 scores.
        glob = F.scaled_dot_product_attention(q.contiguous(), kv[:, 0].contiguous(), kv[:, 1].contiguous())
        return self.proj(glob.transpose(-2, -1).reshape(n, c, h, w) + attention_1)


class DLMHSAStream(nn.Module):
    """The stream that takes the 9x9 stream's place: 1x1 conv, DL-MHSA, BN, ReLU."""

    def __init__(self, channels: int, head_dim: int = 32, window: int = 8, ds_ratio: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.attn = DLMHSA(channels, head_dim, window, ds_ratio)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.attn(self.conv1(x))))


def _stream(head_dim: int, window: int, ds_ratio: int) -> StreamFactory:
    return lambda mid: DLMHSAStream(mid, head_dim, window, ds_ratio)


@BACKBONES.register()
def dm_osnet(mhsa_stages: Sequence[int] = (1, 0, 0), window: int = 8, ds_ratios: Sequence[int] = (8, 8, 8),
             head_dim: int = 32, ibn: bool = True) -> OSNet:
    """DM-OSNet x1.0; ``mhsa_stages`` switches DL-MHSA on per stage (conv2, conv3, conv4), (0, 0, 0) is OSNet."""
    if len(mhsa_stages) != 3 or len(ds_ratios) != 3:
        raise ValueError(f"mhsa_stages and ds_ratios need one entry per stage (conv2, conv3, conv4), "
                         f"got {list(mhsa_stages)} and {list(ds_ratios)}")
    streams = [_stream(head_dim, window, ds) if on else None for on, ds in zip(mhsa_stages, ds_ratios)]
    return OSNet(1.0, ibn=ibn, widest_streams=streams)
