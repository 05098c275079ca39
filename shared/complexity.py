"""Model complexity: parameter counts, multiply-accumulates and the inference feature width.

Conventions (models.md, "Counting conventions"): parameters count trainable tensors unless asked
otherwise; MACs count only the multiply-accumulates of convolutions, linear layers and matrix products
(``mm``, ``addmm``, ``bmm``, ``baddbmm`` and so every ``matmul``/``einsum``, attention's QK^T and AV
included, and ``scaled_dot_product_attention``), as OSNet's "mult-adds" and timm's "GMACs" do. Batch
norm, activations, pooling, soft-max, element-wise products and adds, and biases are left out.

The count comes from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per
multiply-accumulate for exactly those operators, so MACs = FLOPs / 2. Its table has no entry for the
fused CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, which SDPA picks on the CPU
for contiguous inputs), so that kernel is added with torch's own SDPA formula. It runs one forward pass
of a single image in eval mode, so it counts what inference runs: a classifier used only in training
is left out, as the published counts leave it out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                               *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter elements; frozen ones (e.g. BNNeck's bias) only when ``trainable_only=False``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def measure_forward(model: nn.Module, input_size: tuple[int, int], **forward_kwargs: Any) -> tuple[int, Any]:
    """MACs of one eval-mode forward pass of a single (3, H, W) zero image, and that pass's output.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    try:
        x = torch.zeros(1, 3, *input_size, device=next(model.parameters(), torch.empty(0)).device)
        with torch.no_grad(), counter:
            output = model(x, **forward_kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2, output


def count_macs(model: nn.Module, input_size: tuple[int, int], **forward_kwargs: Any) -> int:
    """Multiply-accumulates of one eval-mode forward pass of a single (3, H, W) image."""
    return measure_forward(model, input_size, **forward_kwargs)[0]


def feature_dim(model: nn.Module, input_size: tuple[int, int], **forward_kwargs: Any) -> int:
    """Width of the eval-mode output, measured (models also declare it as ``feature_dim``)."""
    return int(measure_forward(model, input_size, **forward_kwargs)[1].shape[-1])
