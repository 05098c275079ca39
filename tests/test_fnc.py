"""FNC: parameter counts, the split point (which trunk stages are shared and which each branch owns), the
trunk map, the non-local inner width, the fusion option, the train/eval contract (models.md §7), and the
tiny (ResNet-18) trunk."""

from __future__ import annotations

import pytest
import torch

from reidforge.finetune.losses import Criterion
from reidforge.finetune.models import build_model
from reidforge.finetune.models.fnc import FNC, SPLITS, ChannelAttentionBlock, SpatialAttentionBlock
from reidforge.shared.backbones import build_backbone
from reidforge.shared.complexity import count_params

LAYER4 = 16_124_288  # one SE-ResNeXt-101 layer4 copy
LAYER3_TAIL = 27_688_320  # its layer3[1:], 22 blocks
LAYER3_FIRST = 1_522_752  # its layer3[0], the block that carries the stride and the 512 -> 1024 widening


def _meta(num_classes: int = 0, **options) -> FNC:
    with torch.device("meta"):  # shapes only
        return build_model("fnc", num_classes, **options)


@pytest.fixture(scope="module")
def model() -> FNC:
    torch.manual_seed(0)
    return build_model("fnc", 5)


def test_parameter_counts_of_every_split() -> None:
    paper, fig1, layer4_only, shared = (_meta(split=split) for split in SPLITS)
    assert count_params(paper) == 107_284_912  # the default: §3.1's "after the conv4_1 layer"
    assert count_params(paper.spatial.trunk) == count_params(paper.channel.trunk) == LAYER3_TAIL + LAYER4
    assert count_params(paper.spatial.trunk.layer3) == LAYER3_TAIL
    assert count_params(fig1) - count_params(paper) == LAYER3_FIRST  # one block more in each branch, none shared
    assert count_params(layer4_only) == 79_596_592 and count_params(layer4_only.spatial.trunk) == LAYER4
    assert count_params(paper) - count_params(layer4_only) == LAYER3_TAIL  # a second copy of layer3[1:]
    assert count_params(shared) == 63_472_304 == count_params(layer4_only) - LAYER4
    assert count_params(paper.spatial.attention) == 8_393_728  # 4 x 2048 x 1024 + biases
    assert count_params(paper.channel.attention) == 5_021_824
    assert count_params(_meta(333)) - count_params(paper) == (1024 + 512) * 333
    with pytest.raises(ValueError, match="split must be one of"):
        _meta(split="conv4")


@pytest.mark.parametrize("split, shared_layer3, own_layer3", [
    ("after_conv4_1", ["0"], [str(i) for i in range(1, 23)]),
    ("after_conv3", [], [str(i) for i in range(23)]),
    ("after_conv4", [str(i) for i in range(23)], []),
    ("none", [str(i) for i in range(23)], [])])
def test_split_shares_the_first_stages_and_gives_each_branch_its_own_rest(
        split: str, shared_layer3: list[str], own_layer3: list[str]) -> None:
    model = _meta(split=split)
    assert [name for name, _ in model.backbone.layer3.named_children()] == shared_layer3
    assert hasattr(model.backbone, "layer4") == (split == "none")
    spatial, channel = model.spatial.trunk, model.channel.trunk
    if split == "none":  # one trunk for both attention blocks
        assert model.backbone.layer4[0].conv2.stride == (1, 1)
        assert len(spatial) == len(channel) == 0
        return
    for trunk in (spatial, channel):  # a branch's block i is a copy of the backbone's layer3.i
        assert [name for name, _ in trunk.named_children()] == ["layer3", "layer4"]
        assert [name for name, _ in trunk.layer3.named_children()] == own_layer3
        assert len(trunk.layer4) == 3 and trunk.layer4[0].conv2.stride == (1, 1)  # last stride 1 in every copy
    own = {id(p) for p in spatial.parameters()}
    assert own and not own & {id(p) for p in channel.parameters()}  # no tensor shared between the copies


@pytest.mark.parametrize("split", SPLITS)
def test_trunk_map_reaches_every_backbone_tensor_from_each_branch(split: str) -> None:
    with torch.device("meta"):
        backbone = set(build_backbone("seresnext101_32x4d", last_stride=1).state_dict())
    model = _meta(split=split)
    keys = model.trunk_keys()
    assert set(keys.values()) == backbone  # nothing the model does not have, nothing left out
    not_trunk = {k for k in model.state_dict() if k not in keys}
    assert all(k.startswith(("spatial.attention.", "spatial.reduction.", "spatial.neck.", "channel.attention.",
                             "channel.reduction.", "channel.neck.")) for k in not_trunk)
    for branch in ("spatial.", "channel."):
        reached = {v for k, v in keys.items() if k.startswith(("backbone.", branch))}
        assert reached == backbone
    if split == "after_conv4_1":
        assert model.trunk_map() == (("backbone.", ""), ("spatial.trunk.layer3.", "layer3."),
                                     ("spatial.trunk.layer4.", "layer4."), ("channel.trunk.layer3.", "layer3."),
                                     ("channel.trunk.layer4.", "layer4."))
        assert keys["backbone.layer3.0.conv1.weight"] == "layer3.0.conv1.weight"
        assert keys["channel.trunk.layer3.1.conv1.weight"] == "layer3.1.conv1.weight"
        assert keys["spatial.trunk.layer3.22.se.fc2.bias"] == "layer3.22.se.fc2.bias"
        assert keys["spatial.trunk.layer4.2.bn3.running_var"] == "layer4.2.bn3.running_var"


@pytest.mark.parametrize("split", SPLITS)
def test_trunk_filled_through_the_map_is_the_backbone_in_both_branches(split: str) -> None:
    torch.manual_seed(0)
    source = build_backbone("resnet18", last_stride=1).eval()
    for module in source.modules():  # non-trivial BN statistics, so that a misplaced tensor shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
    model = build_model("fnc", 0, trunk="resnet18", split=split).eval()
    weights = source.state_dict()
    model.load_state_dict({k: weights[v] for k, v in model.trunk_keys().items()}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    maps = []
    for branch in (model.spatial, model.channel):
        branch.attention.register_forward_hook(lambda module, inputs, output: maps.append(inputs[0]))
    with torch.no_grad():
        expected = source(x)
        model(x)
    assert len(maps) == 2 and all(torch.allclose(m, expected, atol=1e-5) for m in maps)
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
    for part in (model.backbone, model.spatial.trunk, model.channel.trunk, model.spatial, model.channel):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    model.eval()
    with torch.no_grad():
        feature = model(torch.randn(2, 3, 32, 32))
    assert feature.shape == (2, model.feature_dim) == (2, 1536)


def test_the_branches_layer3_copies_learn_apart() -> None:
    torch.manual_seed(0)
    model = build_model("fnc", 5, trunk="resnet18")  # the default split: layer3[0] shared, layer3[1] per branch
    spatial, channel = model.spatial.trunk.layer3[0], model.channel.trunk.layer3[0]
    assert torch.equal(spatial.conv1.weight, channel.conv1.weight)  # copies of one block: equal at the start
    outputs = model(torch.randn(4, 3, 64, 64))
    widths = {k: v.shape[1] for k, v in outputs.items()}
    loss, _ = Criterion(model.loss_terms, 5, widths)(outputs, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    grads = [block.conv1.weight.grad for block in (spatial, channel)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(grads[0], grads[1])  # each copy is trained by its own branch's losses only
    assert model.backbone.layer3[0].conv1.weight.grad.abs().sum() > 0  # the shared block by both


@pytest.mark.parametrize("split", SPLITS)
def test_each_branch_runs_on_its_own_trunk_copy(split: str) -> None:
    with torch.device("meta"):  # the autograd graph alone says which copy each output depends on
        model = build_model("fnc", 0, split=split)
        outputs = model(torch.randn(4, 3, 32, 32))
    assert [t.loss for t in model.loss_terms] == ["triplet"] * 2
    last = (model.backbone.layer4 if split == "none" else model.spatial.trunk.layer4)[2].conv3.weight
    first = (model.backbone.layer3[0] if split in ("after_conv4_1", "after_conv4", "none")
             else model.spatial.trunk.layer3[0]).conv1.weight  # layer3's first block: shared or the spatial copy
    reached = {(key, name): torch.autograd.grad(outputs[key].sum(), weight, retain_graph=True,
                                                allow_unused=True)[0] is not None
               for key in ("spatial/feat", "channel/feat") for name, weight in (("first", first), ("last", last))}
    shared_first = split != "after_conv3"
    assert reached == {("spatial/feat", "first"): True, ("spatial/feat", "last"): True,
                       ("channel/feat", "first"): shared_first, ("channel/feat", "last"): split == "none"}


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
    assert count_params(tiny) == 22_382_944
    assert [count_params(_meta(trunk="resnet18", split=split)) for split in SPLITS[1:]] == [
        23_301_984, 21_202_272, 12_808_544]
    assert count_params(tiny.spatial.trunk.layer4) == 8_393_728  # two ResNet-18 basic blocks, 512 channels
    assert count_params(tiny.spatial.trunk.layer3) == 1_180_672  # layer3's second basic block, 256 channels
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
