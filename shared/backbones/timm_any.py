"""Any timm architecture as a feature extractor: ``build_timm_pooled(name, input_size, **options)`` (``--model timm:<name>``).

timm (huggingface/pytorch-image-models, ``timm/models/_factory.py`` ``create_model``) builds the network
with ``pretrained=False``, so nothing is downloaded (the weights come from a local file through
``reidforge.shared.weights.load_pretrained``), and ``num_classes=0``, which makes the classifier an identity: the
forward returns timm's own pooled feature, (N, ``num_features``) (``forward_head(pre_logits=True)``: the
global pooling of a CNN, the class token or pooled tokens after the final norm of a ViT). Unlike the
registered backbones it returns no feature map, so it is pooled by nothing further.

Input size: the one asked for, else ``img_size`` of the options, else the architecture's default config
(``timm.data.resolve_model_data_config``, which also gives the mean and std). An architecture with a fixed
input size (``fixed_input_size`` in its timm config: a ViT's patch grid and position embedding) is built
for the asked size through timm's ``img_size`` option, as timm itself does for a new resolution, unless the options set ``img_size`` or ``dynamic_img_size`` (which resamples the
position embedding at each forward, as a file trained at another size needs).

Grad-CAM (:meth:`TimmPooled.cam_layer`): the last feature map before timm's pooling is the output of
``forward_features``: the module that computes it is found by running it once (a CNN's last stage or head
conv, NCHW; a Swin's final norm, NHWC). A token model on a patch grid (ViT, DeiT, BEiT, EVA, MLP-Mixer)
instead gives the tokens entering its last block (``blocks[-1].norm1``), reshaped to the patch grid without
the class, distillation and register tokens: the class token a ViT's pooling keeps is mixed from the patch
tokens only in that block's attention, so the final norm's patch tokens get no gradient
(jacobgil/pytorch-grad-cam, ``usage_examples/vit_example.py``, ``reshape_transform``). Other outputs (a
LeViT's tokens, whose grid no patch embedding gives) have no map: :class:`NoFeatureMap` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import PatchEmbed
from timm.models import get_pretrained_cfg
from torch import nn

from reidforge.shared.backbones import NoFeatureMap, PooledBackbone
from reidforge.shared.config import ConfigError

TIMM_PREFIX = "timm:"


class TimmPooled(PooledBackbone):
    """A timm network (``backbone``, no classifier) and the input size, mean and std it runs with; ``options``
    are those ``timm.create_model`` got (``img_size`` included when it was added for the input size)."""

    def __init__(self, network: nn.Module, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 options: dict[str, Any]):
        super().__init__(network, nn.Identity(), network.num_features)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.options = options

    def _patch_embed(self) -> PatchEmbed | None:
        """The patch embedding of a token model on a patch grid (ViT, DeiT, BEiT, EVA, MLP-Mixer, ResMLP: a
        ``PatchEmbed`` and ``blocks`` with a ``norm1``), else None."""
        net = self.backbone
        embed = getattr(net, "patch_embed", None) or getattr(net, "stem", None)
        blocks = getattr(net, "blocks", None)
        tokens = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[-1], "norm1")
        return embed if isinstance(embed, PatchEmbed) and tokens else None

    def cam_layer(self) -> nn.Module:
        """The module whose output is the last feature map (see the module docstring); :class:`NoFeatureMap`
        when there is none laid out as an image."""
        if self._patch_embed() is not None:
            return self.backbone.blocks[-1].norm1
        ran: list[tuple[nn.Module, Any]] = []
        hooks = [m.register_forward_hook(lambda module, _inputs, output: ran.append((module, output)))
                 for m in self.backbone.modules()]
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                device = next(self.backbone.parameters()).device
                final = self.backbone.forward_features(torch.zeros(1, 3, *self.input_size, device=device))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        name = type(self.backbone).__name__
        if not isinstance(final, torch.Tensor) or final.ndim != 4:
            shape = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
            raise NoFeatureMap(f"{name}'s last features are {shape}: neither an image-shaped map nor tokens of a "
                               "patch embedding that gives their grid, so nothing to lay over the image")
        # an Identity passes its input on: the module that computed the map is the one before it
        made = [m for m, output in ran if output is final and not isinstance(m, nn.Identity)]
        if not made:
            raise NoFeatureMap(f"{name} computes its last feature map outside any module, so no hook can read it")
        return made[-1]

    def cam_reshape(self, activation: torch.Tensor) -> torch.Tensor:
        """``cam_layer``'s output as an (N, C, h, w) map: patch tokens on their grid (the class, distillation
        and register tokens dropped), an NHWC map permuted."""
        net = self.backbone
        if (embed := self._patch_embed()) is not None:
            grid = (embed.dynamic_feat_size(self.input_size) if getattr(net, "dynamic_img_size", False)
                    else embed.grid_size)
            tokens = activation[:, getattr(net, "num_prefix_tokens", 0):]
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"Grad-CAM: {tokens.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} grid "
                                 f"of a {self.input_size[0]}x{self.input_size[1]} input")
            return tokens.reshape(len(tokens), grid[0], grid[1], -1).permute(0, 3, 1, 2)
        if getattr(net, "output_fmt", "NCHW") == "NHWC":  # timm's Format is a str enum
            return activation.permute(0, 3, 1, 2)
        return activation


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def build_timm_pooled(name: str, input_size: Sequence[int] | None = None, **options: Any) -> TimmPooled:
    """timm's ``name`` with no classifier and random init, run at ``input_size`` (see the module docstring);
    ``options`` go to ``timm.create_model``."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm architecture {name!r} (timm {timm.__version__}; "
                          "timm.list_models() lists them)")
    reserved = sorted({"pretrained", "num_classes", "pretrained_cfg_overlay", "checkpoint_path"} & options.keys())
    if reserved:
        raise ConfigError(f"{TIMM_PREFIX}{name}: option {reserved[0]!r} is fixed here (no download, no classifier; "
                          "the weights come from --weights)")
    config = get_pretrained_cfg(name)
    fixed = _pair(config.input_size[1:]) if config is not None and config.fixed_input_size else None
    size = None if input_size is None else _pair(input_size)
    # dynamic_img_size resamples the position embedding at every forward: that model takes any size already
    adapted = (fixed is not None and size is not None and size != fixed and "img_size" not in options
               and not options.get("dynamic_img_size"))
    if adapted:
        options = {**options, "img_size": list(size)}
    try:
        network = timm.create_model(name, pretrained=False, num_classes=0, **options)
    except (TypeError, ValueError, AssertionError) as e:  # an option the architecture does not take
        if adapted:
            raise ConfigError(f"{TIMM_PREFIX}{name} takes a fixed input size {fixed[0]} {fixed[1]} (fixed_input_size "
                              f"in its timm config) and no img_size option to build it for {size[0]} {size[1]} "
                              f"({str(e).splitlines()[0]})") from None
        raise ConfigError(f"{TIMM_PREFIX}{name} with options {options}: {str(e).splitlines()[0]}") from None
    data = resolve_model_data_config(network)
    default = _pair(options["img_size"]) if "img_size" in options else _pair(data["input_size"][1:])
    return TimmPooled(network, size or default, data["mean"], data["std"], options)
