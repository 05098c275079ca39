"""ResNet-18 with stage attention and stage fusion, as in the EEEM071 coursework (Aricatt, §3, Table 2).

The trunk is :class:`reidforge.shared.backbones.resnet.ResNetBackbone` (torchvision ResNet-18, output stride 32,
so torchvision ImageNet weights load by key). On top of it:

- **Attention after every stage** (§3.2): an SE unit (Hu et al., CVPR 2018, §3: GAP, FC C->C/16, ReLU,
  FC C/16->C, sigmoid, channel rescaling) or a CBAM unit (Woo et al., ECCV 2018, §3: channel attention
  sigma(MLP(AvgPool) + MLP(MaxPool)) with a shared C->C/16->C MLP, then spatial attention
  sigma(conv7x7([AvgPool_c; MaxPool_c]))), applied to the output of layer1..layer4.
- **Fusion** (§3.1, at 224x224: stage 3 is 256x14x14, stage 4 is 512x7x7): stage 3 goes through a
  strided 1x1 conv to 512x7x7 and is concatenated with stage 4 (``"concat"``, 1024 channels) or added to
  it (``"add"``, 512 channels). ``"global_concat"`` (§3.4, "SE-ResNet18 Global Concatenation") also
  brings stages 1 and 2 to 512x7x7 and concatenates all four (2048 channels).

Deviations (the report is silent on these; the choices follow the coursework's code):
- The attention units sit once after each *stage*, as the coursework code places them, not inside
  every residual block as in Hu et al. and Woo et al.
- The stage-3 projection is conv1x1/2 + BN (the report names only the conv; the code adds the BN).
- Global concatenation brings stages 1 and 2 down with chains of 3x3/2 conv (bias) + ReLU that double
  the width at each step, as in the code; it taps stage 1 at layer1's output, where the code taps the
  stem output (same width), because the report fuses "all 4 stages".
- CBAM concatenates [avg; max] in the order of Woo et al.'s Eq. 3 (the code uses [max; avg]), and its
  spatial conv has no BN (Eq. 3; the CBAM release adds one).
"""

from __future__ import annotations

import torch
from torch import nn

from reidforge.shared.backbones import BACKBONES
from reidforge.shared.backbones.resnet import ResNetBackbone

STAGE_WIDTHS = (64, 128, 256, 512)
FUSIONS = ("none", "concat", "add", "global_concat")


class SqueezeExcite(nn.Module):
    """SE unit (Hu et al. §3): x * sigmoid(FC(ReLU(FC(GAP(x)))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. §3): channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                 nn.Linear(channels // reduction, channels))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        x = x * channel[:, :, None, None]
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def _projection(stage: int) -> nn.Sequential:
    """Brings stage ``stage`` (1..3) to stage 4's 512 channels and resolution."""
    if stage == 3:
        return nn.Sequential(nn.Conv2d(256, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))
    layers: list[nn.Module] = []
    width = STAGE_WIDTHS[stage - 1]
    for _ in range(4 - stage):
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        width *= 2
    return nn.Sequential(*layers)


class StageAttentionResNet18(ResNetBackbone):
    """ResNet-18 with an attention unit after each stage and optional fusion of earlier stages into stage 4."""

    def __init__(self, attention: str, fusion: str = "none", reduction: int = 16):
        super().__init__(18)
        units = {"se": SqueezeExcite, "cbam": CBAM}
        if attention not in units:
            raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(units)}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        self.attention = nn.ModuleList(units[attention](c, reduction) for c in STAGE_WIDTHS)
        self.fusion = fusion
        self.fuse_from = {"none": (), "concat": (3,), "add": (3,), "global_concat": (3, 2, 1)}[fusion]
        self.projections = nn.ModuleList(_projection(s) for s in self.fuse_from)
        self.out_channels = 512 if fusion in ("none", "add") else 512 * (1 + len(self.fuse_from))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        stages = []
        for layer, unit in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.attention):
            x = unit(layer(x))
            stages.append(x)
        fused = [project(stages[s - 1]) for s, project in zip(self.fuse_from, self.projections)]
        if self.fusion == "add":
            return x + fused[0]
        return torch.cat([x, *fused], dim=1) if fused else x


@BACKBONES.register()
def resnet18_se(fusion: str = "none") -> StageAttentionResNet18:
    return StageAttentionResNet18("se", fusion)


@BACKBONES.register()
def resnet18_cbam(fusion: str = "none") -> StageAttentionResNet18:
    return StageAttentionResNet18("cbam", fusion)
