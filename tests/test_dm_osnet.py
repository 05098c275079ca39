"""DL-MHSA against independently computed multi-head attention, the DM-OSNet backbone and re-ID model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from reidforge.finetune.losses import Criterion
from reidforge.finetune.models import build_model
from reidforge.shared.backbones import build_backbone
from reidforge.shared.backbones.dm_osnet import DLMHSA, DLMHSAStream
from reidforge.shared.backbones.osnet import LightConv3x3


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C)


def _map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _mha(weight: torch.Tensor, bias: torch.Tensor, heads: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention with DL-MHSA's 1x1 q/k/v conv weights and no output projection."""
    dim = weight.shape[1]
    mha = nn.MultiheadAttention(dim, heads, batch_first=True, dtype=weight.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(weight.reshape(3 * dim, dim))
        mha.in_proj_bias.copy_(bias)
        mha.out_proj.weight.copy_(torch.eye(dim, dtype=weight.dtype))
        mha.out_proj.bias.zero_()
    return mha.eval()


# float32 to the 1e-5 the model runs at, float64 to show the remaining difference is rounding only.
TOLERANCES = [(torch.float32, 1e-5), (torch.float64, 1e-10)]


def _random_attention(dim: int, window: int, ds_ratio: int, dtype: torch.dtype) -> DLMHSA:
    """DL-MHSA in eval mode with random weights and BN statistics, outputs of order 1."""
    torch.manual_seed(0)
    attn = DLMHSA(dim, window=window, ds_ratio=ds_ratio)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        for bn in (attn.norm, attn.grid_norm, attn.ds_norm):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.add_(1.0)
    return attn.to(dtype).eval()


def _global_layer(attn: DLMHSA, attention_1: torch.Tensor) -> torch.Tensor:
    mha = _mha(torch.cat([attn.q.weight, attn.kv.weight]), torch.cat([attn.q.bias, attn.kv.bias]), attn.heads)
    pooled = _tokens(attn.ds_norm(F.avg_pool2d(attention_1, attn.ds_ratio)))
    out, _ = mha(_tokens(attention_1), pooled, pooled, need_weights=False)
    return attn.proj(_map(out, *attention_1.shape[2:]) + attention_1)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_one_window_over_the_whole_map_is_full_mhsa(dtype: torch.dtype, tol: float) -> None:
    attn = _random_attention(64, window=8, ds_ratio=1, dtype=dtype)  # G = H = W: one window; ds = 1: no pooling
    x = torch.randn(2, 64, 8, 8, dtype=dtype)
    with torch.no_grad():
        full = _mha(attn.qkv.weight, attn.qkv.bias, attn.heads)
        tokens = _tokens(attn.norm(x))
        local, _ = full(tokens, tokens, tokens, need_weights=False)  # plain MHSA over all 64 positions
        expected = _global_layer(attn, attn.grid_norm(x + _map(local, 8, 8)))  # pooling with ds = 1 is the identity
        torch.testing.assert_close(attn(x), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize(("dim", "h", "w", "window", "ds_ratio"), [(64, 16, 16, 8, 8), (96, 16, 8, 4, 2)])
def test_windows_are_independent_mhsa_and_the_global_layer_attends_to_pooled_tokens(
        dim: int, h: int, w: int, window: int, ds_ratio: int, dtype: torch.dtype, tol: float) -> None:
    attn = _random_attention(dim, window, ds_ratio, dtype)
    x = torch.randn(2, dim, h, w, dtype=dtype)
    with torch.no_grad():
        mha = _mha(attn.qkv.weight, attn.qkv.bias, attn.heads)
        normed = attn.norm(x)
        local = torch.empty_like(x)
        for i in range(0, h, window):
            for j in range(0, w, window):
                tokens = _tokens(normed[:, :, i:i + window, j:j + window])
                out, _ = mha(tokens, tokens, tokens, need_weights=False)
                local[:, :, i:i + window, j:j + window] = _map(out, window, window)
        expected = _global_layer(attn, attn.grid_norm(x + local))
        torch.testing.assert_close(attn(x), expected, rtol=tol, atol=tol)


def test_rejects_a_map_the_windows_do_not_tile() -> None:
    with pytest.raises(ValueError, match="divisible by window 8"):
        DLMHSA(64)(torch.randn(1, 64, 12, 8))


def test_backbone_parameter_count_and_macs() -> None:
    net = build_backbone("dm_osnet").eval()
    assert _params(net) == 1_935_908  # models.md §2: +14,528 in each of the two conv2 blocks
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = net(torch.randn(1, 3, 256, 128))  # the math backend exposes the attention matmuls to the counter
    assert out.shape == (1, 512, 16, 8)
    assert counter.get_total_flops() // 2 == 1_053_586_432  # models.md §2: about 1.054 GMACs


def _stream_delta(mid: int) -> int:
    """Parameters a DL-MHSA stream adds over the four Lite 3x3 units it replaces."""
    return _params(DLMHSAStream(mid)) - 4 * _params(LightConv3x3(mid))


def test_mhsa_stages_switch_inserts_and_removes_the_attention_streams() -> None:
    counts = {}
    for stages in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)]:
        net = build_backbone("dm_osnet", mhsa_stages=stages)
        counts[stages] = _params(net)
        attention = [name for name, m in net.named_modules() if isinstance(m, DLMHSA)]
        stage_of = {"conv2": 0, "conv3": 1, "conv4": 2}
        switched_on = [i for i, on in enumerate(stages) if on]
        assert sorted({stage_of[name.split(".")[0]] for name in attention}) == switched_on
        assert len(attention) == 2 * sum(stages)
    assert counts[(0, 0, 0)] == _params(build_backbone("osnet_ibn_x1_0"))
    plain = build_backbone("dm_osnet", mhsa_stages=(0, 0, 0), ibn=False)
    assert _params(plain) == _params(build_backbone("osnet_x1_0"))
    deltas = [counts[s] - counts[(0, 0, 0)] for s in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    assert deltas == [2 * _stream_delta(mid) for mid in (64, 96, 128)]
    assert deltas[0] == 2 * 14_528
    assert counts[(1, 1, 1)] - counts[(0, 0, 0)] == sum(deltas)


def test_window_and_pooling_reach_every_stage() -> None:
    net = build_backbone("dm_osnet", mhsa_stages=(1, 1, 1), ds_ratios=(8, 4, 2))
    settings = {name.split(".")[0]: (m.window, m.ds_ratio, m.heads) for name, m in net.named_modules()
                if isinstance(m, DLMHSA)}
    assert settings == {"conv2": (8, 8, 2), "conv3": (8, 4, 3), "conv4": (8, 2, 4)}
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 256, 128)).shape == (1, 512, 16, 8)


def test_model_outputs_in_train_and_eval_mode() -> None:
    model = build_model("dm_osnet", 7)
    assert model.input_size == (256, 128) and model.feature_dim == 512
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        out = model.train()(x)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "global/feat": (2, 512), "global/bn_feat": (2, 512), "global/logits": (2, 7)}
        feature = model.eval()(x)
    assert feature.shape == (2, 512)
    torch.testing.assert_close(feature, model.neck.bn(model.pool(model.backbone(x))))  # post-BN at inference
    assert [(t.loss, t.input) for t in model.loss_terms] == [("ce", "global/logits"), ("triplet", "global/feat")]


def test_model_options() -> None:
    sbs = build_model("dm_osnet", 7, pooling="gem", classifier="circle", neck_feat="after")  # Base-SBS.yml
    assert sbs.neck.classifier is None
    routes = [(t.loss, t.input) for t in sbs.loss_terms]
    assert routes == [("circle", "global/bn_feat"), ("triplet", "global/bn_feat")]
    extractor = build_model("dm_osnet", 0)
    assert extractor.neck.classifier is None
    assert [(t.loss, t.input) for t in extractor.loss_terms] == [("triplet", "global/feat")]
    with torch.no_grad():
        assert set(extractor.train()(torch.randn(2, 3, 64, 32))) == {"global/feat", "global/bn_feat"}
    with pytest.raises(ValueError, match="neck_feat"):
        build_model("dm_osnet", 7, neck_feat="middle")
    with pytest.raises(ValueError, match="classifier"):
        build_model("dm_osnet", 7, classifier="arcface")


@pytest.mark.parametrize("options", [{}, {"pooling": "gem", "classifier": "circle", "neck_feat": "after"}])
def test_every_loss_term_finds_its_output(options: dict) -> None:
    model = build_model("dm_osnet", 4, **options).train()
    out = model(torch.randn(4, 3, 64, 32))
    criterion = Criterion(model.loss_terms, 4, {k: v.shape[1] for k, v in out.items()})
    total, values = criterion(out, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(total) and len(values) == 2


def test_one_backward_reaches_every_trainable_parameter() -> None:
    torch.manual_seed(0)
    # Attention in all three stages; 4-pixel windows let a 128x64 batch (conv4 map 8x4) keep the test fast.
    model = build_model("dm_osnet", 5, mhsa_stages=(1, 1, 1), window=4, ds_ratios=(4, 4, 4)).train()
    out = model(torch.randn(2, 3, 128, 64))
    loss = F.cross_entropy(out["global/logits"], torch.tensor([1, 3])) + out["global/feat"].norm(dim=1).mean()
    loss.backward()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["neck.bn.bias"]  # BNNeck's zero shift
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
