"""OSNet backbones (all widths, IBN) and the torchreid-style OSNet re-ID model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reidforge.finetune.models import build_model
from reidforge.shared.backbones import build_backbone

OSNETS = {"osnet_x1_0": 512, "osnet_x0_75": 384, "osnet_x0_5": 256, "osnet_x0_25": 128, "osnet_ibn_x1_0": 512}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("variant", "count", "published_m"), [
    ("osnet_x1_0", 2_169_508, 2.17),  # models.md §1; torchreid/paper "2.2M"
    ("osnet_x0_75", 1_285_754, 1.29),
    ("osnet_x0_5", 630_034, 0.63),
    ("osnet_x0_25", 201_864, 0.20),
    ("osnet_ibn_x1_0", 2_169_508 + 1_024, 2.17),  # IN affine after the two conv2 blocks
])
def test_parameter_counts_without_classifier(variant: str, count: int, published_m: float) -> None:
    model = build_model("osnet", 0, variant=variant)
    assert _params(model) == count
    assert round(count / 1e6, 2) == published_m


def test_backbone_count_and_macs_match_the_paper() -> None:
    model = build_model("osnet", 0).eval()
    assert _params(model.backbone) == 1_905_828  # models.md §1: backbone without the fc layer
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *model.input_size))
    assert counter.get_total_flops() // 2 == 978_875_392  # the paper's 978.9M mult-adds


@pytest.mark.parametrize(("name", "channels"), OSNETS.items())
def test_backbones_map_to_a_stride_16_feature_map(name: str, channels: int) -> None:
    net = build_backbone(name).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 128))
    assert net.out_channels == channels and out.shape == (1, channels, 16, 8)


def test_state_dict_uses_torchreid_names() -> None:
    keys = set(build_backbone("osnet_ibn_x1_0").state_dict())
    expected = {
        "conv1.conv.weight", "conv1.bn.weight",  # IN in the stem of the IBN variant
        "conv2.0.conv1.conv.weight", "conv2.0.conv2a.conv1.weight", "conv2.0.conv2a.conv2.weight",
        "conv2.0.conv2d.3.bn.running_var", "conv2.0.gate.fc1.bias", "conv2.0.gate.fc2.weight",
        "conv2.0.conv3.bn.weight", "conv2.0.downsample.conv.weight", "conv2.0.IN.weight", "conv2.1.IN.bias",
        "conv2.2.0.conv.weight", "conv3.2.0.bn.running_mean", "conv4.1.conv2c.2.conv2.weight", "conv5.conv.weight",
    }
    assert expected <= keys
    assert not any(k.startswith(("conv3.0.IN", "conv4.0.IN", "conv4.2")) for k in keys)


def test_ibn_variant_places_instance_norms_in_stem_and_conv2_only() -> None:
    net = build_backbone("osnet_ibn_x1_0")
    names = [name for name, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)]
    assert names == ["conv1.bn", "conv2.0.IN", "conv2.1.IN"]
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in build_backbone("osnet_x1_0").modules())


@pytest.mark.parametrize("variant", ["osnet_x1_0", "osnet_x0_25", "osnet_ibn_x1_0"])
def test_model_outputs_in_train_and_eval_mode(variant: str) -> None:
    model = build_model("osnet", 7, variant=variant)
    x = torch.randn(2, 3, *model.input_size)
    assert model.input_size == (256, 128) and model.feature_dim == 512
    with torch.no_grad():
        out = model.train()(x)
        assert out["global/feat"].shape == (2, 512) and out["global/logits"].shape == (2, 7)
        assert model.eval()(x).shape == (2, 512)
    assert [(t.loss, t.input) for t in model.loss_terms] == [("ce", "global/logits")]
    triplet = build_model("osnet", 7, variant=variant, triplet=True)
    assert [(t.loss, t.input) for t in triplet.loss_terms] == [("ce", "global/logits"), ("triplet", "global/feat")]


def test_model_without_classifier_is_a_feature_extractor() -> None:
    model = build_model("osnet", 0)
    assert model.classifier is None and model.loss_terms == ()
    with torch.no_grad():
        assert set(model.train()(torch.randn(2, 3, 64, 32))) == {"global/feat"}


def test_rejects_a_backbone_that_is_not_osnet() -> None:
    with pytest.raises(ValueError, match="not an OSNet"):
        build_model("osnet", 3, variant="resnet18")


def test_one_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("osnet", 5, variant="osnet_ibn_x1_0").train()
    out = model(torch.randn(2, 3, 128, 64))
    loss = F.cross_entropy(out["global/logits"], torch.tensor([1, 3])) + out["global/feat"].norm(dim=1).mean()
    loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))
    missing = [name for name, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
