"""Parameter and MAC counting against hand counts and models.md, and the complexity command."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reidforge.finetune import complexity
from reidforge.finetune.models import MODELS, build_model
from reidforge.shared.complexity import count_macs, count_params, feature_dim


class TinyNet(nn.Module):
    """Convs (plain, grouped, strided), a linear layer and an explicit matmul, plus uncounted layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # bias: not a MAC
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.strided = nn.Conv2d(8, 4, 1, stride=2, bias=False)
        self.fc = nn.Linear(4, 10)
        self.proj = nn.Parameter(torch.randn(6, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(torch.relu(self.bn(self.conv(x))))
        x = self.strided(x)  # (4, 8, 4)
        tokens = x.flatten(2).transpose(1, 2)[:, :5, :4]  # (1, 5, 4) slice: free
        mixed = torch.softmax(tokens @ tokens.transpose(1, 2), dim=-1)  # (5x4)(4x5): 100 MACs
        pooled = self.fc(x.mean(dim=(2, 3)) + mixed.sum())  # 40 MACs
        return pooled[:, :6] @ self.proj  # (1x6)(6x7): 42 MACs


def test_macs_equal_the_hand_count() -> None:
    h, w = 16, 8
    expected = (8 * h * w * 3 * 9  # 3x3 conv, 3 -> 8
                + 8 * h * w * 2 * 9  # grouped 3x3, 4 groups of 2 input channels
                + 4 * (h // 2) * (w // 2) * 8  # strided 1x1, 8 -> 4
                + 5 * 4 * 5 + 4 * 10 + 6 * 7)  # matmul, linear, parameter matmul
    net = TinyNet().train()
    assert count_macs(net, (h, w)) == expected
    assert net.training  # the count runs in eval mode and restores the mode
    assert feature_dim(net, (h, w)) == 7


class Attention(nn.Module):
    """Self-attention of the 144 input values read as 2 heads x 18 tokens x width 4 (contiguous, so the
    CPU picks the fused SDPA kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.reshape(1, 2, 18, 4)
        return nn.functional.scaled_dot_product_attention(q, q, q).flatten(1)


def test_fused_cpu_attention_is_counted() -> None:
    assert count_macs(Attention(), (8, 6)) == 2 * (18 * 18 * 4 + 18 * 18 * 4)  # per head: QK^T and AV


def test_count_params_trainable_only() -> None:
    net = TinyNet()
    total = 3 * 8 * 9 + 8 + 2 * 8 + 8 * 2 * 9 + 8 * 4 + 4 * 10 + 10 + 6 * 7
    assert count_params(net) == total
    net.bn.bias.requires_grad_(False)
    assert count_params(net) == total - 8 and count_params(net, trainable_only=False) == total


def test_bot_resnet50_macs_match_the_reference() -> None:
    model = build_model("bot_resnet50", 751)
    macs = count_macs(model, model.input_size)
    assert macs == pytest.approx(4.05e9, rel=0.01)  # models.md §3: LS1 at 256x128
    assert count_params(model) == 23_508_032 + 2048 * 751 + 2048


def test_fnc_counts_of_the_paper_split_and_the_layer4_only_split() -> None:
    with torch.device("meta"):  # shapes only
        paper, layer4_only, paper_333, layer4_only_333 = (
            build_model("fnc", n, split=split) for n in (0, 333) for split in ("after_conv4_1", "after_conv4"))
    assert (count_params(paper), count_params(paper_333)) == (107_284_912, 107_796_400)  # CityFlow's 333 ids
    assert (count_params(layer4_only), count_params(layer4_only_333)) == (79_596_592, 80_108_080)
    macs = count_macs(paper, (384, 288)), count_macs(layer4_only, (384, 288))
    assert macs == (44_821_209_088, 34_151_948_288)
    # The difference is one more copy of layer3[1:]: 22 SE-ResNeXt blocks (1x1 1024 -> 512, 3x3 512 -> 512 in 32
    # groups, 1x1 512 -> 1024 at 24 x 18, and the SE unit's two FCs 1024 <-> 64).
    block = 24 * 18 * (1024 * 512 + 512 * 512 * 9 // 32 + 512 * 1024) + 2 * 1024 * 64
    assert macs[0] - macs[1] == 22 * block


def test_variants_get_rows_of_their_own(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"split": "after_conv4"} in complexity.VARIANTS["fnc"]  # FNC's layer4-only split beside the paper's
    name = "coursework_mobilenetv3_small"
    monkeypatch.setitem(complexity.VARIANTS, name, ({"embedding_dim": 512},))
    assert complexity.main(["--models", name, "--markdown"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [(row[1].strip(), row[6].strip()) for row in rows] == [
        (name, "1024"), (f"{name} (embedding_dim=512)", "512")]  # label and feature width


def test_command_prints_a_row_per_model(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["coursework_mobilenetv3_small", "coursework_seresnet18_add"]
    head = 576 * 1024 + 2 * 1024 + 1024 * 10  # the coursework head with a 10-way classifier
    monkeypatch.setitem(complexity.PUBLISHED, names[0], complexity.Reference(927_008 + head, 0.05e9, 10, "test"))
    assert complexity.main(["--models", ",".join(names), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model") and len(lines) == 2 + len(names)
    row = next(line for line in lines if line.startswith(f"| {names[0]} "))
    assert f"{927_008 + head:,} (N=10)" in row and "params +0.00%" in row and "| 1024 " in row
    assert complexity.main(["--models", names[0]]) == 0
    assert not capsys.readouterr().out.startswith("|")  # plain text without --markdown
    with pytest.raises(SystemExit):
        complexity.main(["--models", "no_such_model"])


@pytest.mark.slow
def test_command_covers_every_registered_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert complexity.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines()[2:] if line.startswith("|")]
    assert rows == [complexity.row_label(name, options) for name in MODELS.names()
                    for options in ({}, *complexity.VARIANTS.get(name, ()))]
