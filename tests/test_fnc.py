"""FNC: parameter counts, the non-local inner width, the fusion and layer4 options, the train/eval
contract (models.md §7), and the tiny (ResNet-18) trunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.losses import Criterion
from finetune.models import build_model
from finetune.models.fnc import FNC, ChannelAttentionBlock, SpatialAttentionBlock
from shared.backbones import build_backbone
from shared.complexity import count_params

LAYER4 = 16_124_288  # one SE-ResNeXt-101 layer4 copy


def _meta(num_classes: int = 0, **options) -> FNC:
    with torch.device("meta"):  # shapes only
        return build_model("fnc", num_classes, **options)


@pytest.fixture(scope="module")
def model() -> FNC:
    torch.manual_seed(0)
    return build_model("fnc", 5)


def test_parameter_counts_and_the_layer4_option() -> None:
    separate, shared = _meta(), _meta(separate_layer4=False)
    assert count_params(separate) == 79_596_592
    assert count_params(separate.layer4[0]) == count_params(separate.layer4[1]) == LAYER4
    assert count_params(separate) - count_params(shared) == LAYER4  # exactly one layer4
    assert count_params(separate.spatial.attention) == 8_393_728  # 4 x 2048 x 1024 + biases
    assert count_params(separate.channel.attention) == 5_021_824
    assert count_params(_meta(333)) - count_params(separate) == (1024 + 512) * 333


def test_sab_inner_width_is_half_the_channels() -> None:
    sab = _meta().spatial.attention
    assert (sab.g.out_channels, sab.h.out_channels, sab.p.out_channels) == (1024, 1024, 1024)
    assert (sab.t.in_channels, sab.t.out_channels) == (1024, 2048)

    torch.manual_seed(0)
    sab = SpatialAttentionBlock(2048)
    x = torch.randn(2, 2048, 3, 4)
    seen = []
    sab.t.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    with torch.no_grad():
        out = sab(x)
        g, h, p = (f(x).flatten(2) for f in (sab.g, sab.h, sab.p))
        affinity = torch.einsum("nci,ncj->nij", g, h).softmax(-1)  # Eq. 1, every one of the 1024 channels
        y = torch.einsum("nij,ncj->nci", affinity, p).reshape(2, 1024, 3, 4)
        assert seen == [(2, 1024, 3, 4)]
        assert torch.allclose(out, torch.sigmoid(sab.t(y)) * x, atol=1e-5)  # Eq. 2
        sab.p.weight[1023] += 1.0  # the last inner channel carries information through to the output
        assert not torch.allclose(sab(x), out)


def test_fusion_multiply_gates_and_add_adds() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 3, 3)
    for block in (SpatialAttentionBlock(64), ChannelAttentionBlock(64, width=64, groups=4, se_reduction=4)):
        block.eval()
        with torch.no_grad():
            gated = block(x)
            block.fusion = "add"
            added = block(x)
        assert ((gated.abs() <= x.abs() + 1e-6) & (gated * x >= 0)).all()  # a [0, 1] mask on x
        assert not torch.allclose(gated, added)
    cab = ChannelAttentionBlock(64, width=64, groups=4, se_reduction=4).eval()
    with torch.no_grad():
        mask = torch.sigmoid(cab.se(cab.conv(cab.conv_block2(cab.conv_block1(x)))))
        assert mask.shape == (2, 64, 1, 1) and torch.allclose(cab(x), mask * x)  # a per-channel mask


def test_fusion_option_changes_the_model_output(model: FNC) -> None:
    with torch.device("meta"):
        added = build_model("fnc", 5, fusion="add")
    added.load_state_dict(model.state_dict(), assign=True)  # the same weights, shared rather than copied
    assert added.spatial.attention.fusion == added.channel.attention.fusion == "add"
    x = torch.randn(2, 3, 32, 32)
    model.eval(), added.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), added(x))
    with pytest.raises(ValueError, match="fusion must be one of"):
        build_model("fnc", 5, fusion="concat")


def test_train_outputs_feed_every_loss_and_reach_every_branch(model: FNC) -> None:
    torch.manual_seed(0)
    model.train()
    model.zero_grad(set_to_none=True)
    pids = torch.tensor([0, 0, 1, 1])
    outputs = model(torch.randn(4, 3, 32, 32))  # last stride 1: 2 x 2 maps at layer4
    widths = {"spatial/feat": 1024, "channel/feat": 512, "spatial/logits": 5, "channel/logits": 5}
    assert {k: v.shape for k, v in outputs.items()} == {k: (4, w) for k, w in widths.items()}
    assert [(t.loss, t.input, t.weight) for t in model.loss_terms] == [
        ("ce", "spatial/logits", 2.0), ("ce", "channel/logits", 2.0),
        ("triplet", "spatial/feat", 1.0), ("triplet", "channel/feat", 1.0)]
    loss, _ = Criterion(model.loss_terms, 5, widths)(outputs, pids)
    loss.backward()
    for part in (model.backbone, model.layer4[0], model.layer4[1], model.spatial, model.channel):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    model.eval()
    with torch.no_grad():
        feature = model(torch.randn(2, 3, 32, 32))
    assert feature.shape == (2, model.feature_dim) == (2, 1536)


@pytest.mark.parametrize("separate", [True, False])
def test_layer4_feeds_its_own_branch_or_both(separate: bool) -> None:
    with torch.device("meta"):  # the autograd graph alone says which layer4 each output depends on
        model = build_model("fnc", 0, separate_layer4=separate)
        outputs = model(torch.randn(4, 3, 32, 32))
    assert len(model.layer4) == (2 if separate else 1) and [t.loss for t in model.loss_terms] == ["triplet"] * 2
    first = model.layer4[0][2].conv3.weight
    reached = {key: torch.autograd.grad(outputs[key].sum(), first, retain_graph=True, allow_unused=True)[0] is not None
               for key in ("spatial/feat", "channel/feat")}
    assert reached == {"spatial/feat": True, "channel/feat": not separate}


@pytest.mark.slow
def test_full_size_forward(model: FNC) -> None:
    seen = []
    handle = model.spatial.attention.t.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.eval()
    with torch.no_grad():
        feature = model(torch.randn(1, 3, *model.input_size))
    handle.remove()
    assert model.input_size == (384, 288) and feature.shape == (1, 1536)
    assert seen == [(1, 1024, 24, 18)]  # last stride 1: 1/16 of the input, 432 positions in the affinity


def test_tiny_trunk_sizes_the_attention_blocks_from_its_channels() -> None:
    tiny = _meta(trunk="resnet18")
    assert count_params(tiny) == 21_202_272
    assert count_params(_meta(trunk="resnet18", separate_layer4=False)) == 12_808_544
    assert count_params(tiny.layer4[0]) == 8_393_728  # two ResNet-18 basic blocks, 512 channels
    sab, cab = tiny.spatial.attention, tiny.channel.attention
    assert (sab.g.in_channels, sab.g.out_channels, sab.t.out_channels) == (512, 256, 512)  # C / r
    conv = cab.conv_block2[0]
    assert (cab.conv_block1[0].out_channels, conv.out_channels, conv.groups) == (256, 256, 32)  # C / 2
    assert (count_params(sab), count_params(cab)) == (525_568, 315_424)
    assert (tiny.spatial.reduction[0].out_channels, tiny.channel.reduction[0].out_channels) == (1024, 512)


def test_tiny_trunk_trains_and_gives_the_1536_d_feature() -> None:
    torch.manual_seed(0)
    model = build_model("fnc", 5, trunk="resnet18")
    outputs = model(torch.randn(4, 3, 64, 64))
    widths = {"spatial/feat": 1024, "channel/feat": 512, "spatial/logits": 5, "channel/logits": 5}
    assert {k: v.shape for k, v in outputs.items()} == {k: (4, w) for k, w in widths.items()}
    loss, _ = Criterion(model.loss_terms, 5, widths)(outputs, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.feature_dim) == (2, 1536)


def test_backbone_weights_load_onto_the_chosen_trunk_before_layer4_is_copied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("fnc", 0, trunk="resnet18", backbone_weights=tmp_path / "resnet18.pth")
    expected = source.layer4[1].conv2.weight
    assert all(torch.equal(layer4[1].conv2.weight, expected) for layer4 in model.layer4)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
