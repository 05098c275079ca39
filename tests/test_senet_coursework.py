"""SE-ResNeXt backbones, the coursework backbones (MobileNetV3, SE/CBAM ResNet-18 with fusion) and models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small

from reidforge.finetune.models import build_model
from reidforge.finetune.models.base import LossTerm
from reidforge.finetune.models.coursework import VARIANTS
from reidforge.shared.backbones import build_backbone
from reidforge.shared.backbones.coursework_resnet18 import CBAM, SqueezeExcite
from reidforge.shared.complexity import count_params
from reidforge.shared.weights import load_pretrained

from conftest import assert_gradients_reach_every_parameter


@pytest.mark.parametrize(("legacy", "keys"), [(False, {"conv1.weight", "layer1.0.se.fc1.weight"}),
                                               (True, {"layer0.conv1.weight", "layer1.0.se_module.fc1.weight"})])
def test_seresnext50_parameters_layouts_and_last_stride(legacy: bool, keys: set[str]) -> None:
    x = torch.randn(1, 3, 64, 32)
    for stride, shape in ((2, (2, 1)), (1, (4, 2))):
        net = build_backbone("seresnext50_32x4d", last_stride=stride, legacy=legacy).eval()
        assert count_params(net) == 25_510_896  # models.md §4, without the 1000-class fc
        assert keys <= set(net.state_dict())  # timm's names, or Cadene's for the legacy layout
        with torch.no_grad():
            out = net(x)
            assert out.shape == (1, 2048, *shape) and net.out_channels == 2048
            stem_then_layers = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x)))))
        assert torch.equal(out, stem_then_layers)


def test_seresnext101_parameters() -> None:
    assert count_params(build_backbone("seresnext101_32x4d")) == 48_955_416 - 2048 * 1000 - 1000  # models.md


def test_mobilenetv3_is_torchvision_features(tmp_path) -> None:
    net = build_backbone("mobilenetv3_small")
    assert net.out_channels == 576 and count_params(net) == 927_008
    torch.save(mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pth")
    report = load_pretrained(net, tmp_path / "mnv3.pth")
    assert report.trunk_missing == [] and report.unused and all(k.startswith("classifier.") for k in report.unused)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 576, 7, 7)


def test_squeeze_excite_and_cbam_rescale_without_changing_shape() -> None:
    x = torch.randn(2, 32, 6, 4)
    se, cbam = SqueezeExcite(32), CBAM(32)
    assert count_params(se) == 2 * 32 * 2 + 2 + 32
    assert count_params(cbam) == count_params(se) + 2 * 7 * 7  # + the bias-free 7x7 spatial conv
    with torch.no_grad():
        for unit in (se, cbam):
            out = unit(x)
            assert out.shape == x.shape
            ratio = out / x  # the gates are sigmoids: every response is scaled into (0, 1)
            assert ((ratio > 0) & (ratio < 1)).all()
        gate = torch.sigmoid(se.fc(x.mean(dim=(2, 3))))
        assert torch.allclose(se(x), x * gate[:, :, None, None])


@pytest.mark.parametrize(("fusion", "channels"), [("none", 512), ("concat", 1024), ("add", 512),
                                                  ("global_concat", 2048)])
def test_stage_fusion_widths_and_parameters(fusion: str, channels: int) -> None:
    net = build_backbone("resnet18_se", fusion=fusion).eval()
    assert net.out_channels == channels
    with torch.no_grad():  # stage 3 at 1/16 is projected onto stage 4's 1/32 grid (report §3.1: 14x14 -> 7x7)
        assert net(torch.randn(1, 3, 64, 96)).shape == (1, channels, 2, 3)
    projection = 256 * 512 + 2 * 512  # strided 1x1 conv + BN, stage 3 -> 512x7x7
    chains = sum(ci * co * 9 + co for ci, co in ((64, 128), (128, 256), (256, 512), (128, 256), (256, 512)))
    extra = {"none": 0, "concat": projection, "add": projection, "global_concat": projection + chains}
    assert count_params(net) - count_params(build_backbone("resnet18_se")) == extra[fusion]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_coursework_models(name: str) -> None:
    dim = VARIANTS[name][2]
    model = build_model(name, 7)
    assert model.input_size == (224, 224) and model.feature_dim == dim
    assert model.loss_terms == (LossTerm("ce", "global/logits"), LossTerm("triplet", "global/feat"))
    head = model.backbone.out_channels * dim + 2 * dim + dim * 7  # bias-free FC, BN, bias-free FC
    assert count_params(model) == count_params(model.backbone) + head
    outputs = assert_gradients_reach_every_parameter(model, 7, (32, 32))
    assert outputs["global/feat"].shape == (2, dim) and outputs["global/logits"].shape == (2, 7)
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        feat = model(x)
        assert feat.shape == (2, dim) and (feat >= 0).all()  # the embedding ends in ReLU (+ dropout)
        assert torch.equal(feat, model(x))  # dropout is off in eval mode


def test_coursework_model_without_classifier() -> None:
    bare = build_model("coursework_seresnet18_concat", 0)
    assert bare.head.classifier is None and bare.loss_terms == (LossTerm("triplet", "global/feat"),)
    assert set(bare.train()(torch.randn(2, 3, 32, 32))) == {"global/feat"}


def test_coursework_seresnext50_is_the_spec_head_variant() -> None:
    model = build_model("coursework_seresnext50", 751, legacy=True)
    assert count_params(model) == 25_510_896 + 2048 * 512 + 2 * 512 + 512 * 751
    assert model.backbone.layer4[0].conv2.stride == (2, 2)  # keeps last stride 2
    assert isinstance(model.backbone.layer0, nn.Sequential)  # backbone options pass through
