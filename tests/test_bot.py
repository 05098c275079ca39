"""The BoT baseline: parameter counts, last stride, BNNeck outputs, loss routing, gradients."""

from __future__ import annotations

import pytest
import torch

from reidforge.finetune.models import build_model
from reidforge.finetune.models.base import LossTerm
from reidforge.finetune.models.bot import CENTER_LOSS_WEIGHT
from reidforge.shared.complexity import count_params
from conftest import assert_gradients_reach_every_parameter

TRUNKS = {"bot_resnet50": 23_508_032, "bot_resnet50_ibn_a": 23_508_032, "bot_seresnext50": 25_510_896}


@pytest.mark.parametrize(("name", "trunk"), sorted(TRUNKS.items()))
def test_parameter_counts_and_gradients(name: str, trunk: int) -> None:
    model = build_model(name, 751)
    assert count_params(model.backbone) == trunk  # models.md §3 / §4
    assert count_params(model) == trunk + 2048 * 751 + 2048  # BNNeck: BN weight + classifier
    assert count_params(model, trainable_only=False) == count_params(model) + 2048  # the frozen BN bias
    assert_gradients_reach_every_parameter(model, 751, (64, 32))
    assert model.neck.bn.bias.grad is None and not model.neck.bn.bias.any()  # frozen at zero


def test_last_stride_one_and_outputs() -> None:
    model = build_model("bot_resnet50", 5)
    assert model.input_size == (256, 128) and model.feature_dim == 2048
    assert model.loss_terms == (LossTerm("ce", "global/logits"), LossTerm("triplet", "global/feat"))
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert model.backbone.eval()(x).shape == (2, 2048, 4, 2)  # stride 16: 16x8 at 256x128
        outputs = model.train()(x)
        assert set(outputs) == {"global/feat", "global/bn_feat", "global/logits"}
        assert outputs["global/feat"].shape == (2, 2048) and outputs["global/logits"].shape == (2, 5)
        model.eval()
        feat = model.pool(model.backbone(x))
        assert torch.allclose(model(x), model.neck.bn(feat))  # eval returns the post-BN feature


def test_center_loss_and_no_classifier() -> None:
    model = build_model("bot_resnet50_ibn_a", 0, center_loss=True).train()
    assert model.neck.classifier is None and count_params(model) == 23_508_032 + 2048
    assert model.loss_terms == (LossTerm("triplet", "global/feat"),
                                LossTerm("center", "global/feat", CENTER_LOSS_WEIGHT))
    assert set(model(torch.randn(2, 3, 64, 32))) == {"global/feat", "global/bn_feat"}
