"""Image transforms on uint8 CHW tensors (torchvision.transforms.v2), for training and for testing.

The training pipeline is the re-ID standard (BoT, torchreid): resize, random horizontal flip, pad and
random crop back to size, optional colour jitter, scale to float and normalise, random erasing. All of
it runs on tensors, so decoding (``torchvision.io``) and augmentation never go through PIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class TransformConfig:
    height: int = 256
    width: int = 128
    flip: float = 0.5  # probability of a horizontal flip
    pad: int = 10  # pixels of padding before the random crop; 0 disables pad+crop
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 disables it
    random_erasing: float = 0.5  # probability of erasing one random rectangle
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


def build_transforms(cfg: TransformConfig, train: bool) -> v2.Compose:
    """The training (augmenting) or test (deterministic) pipeline for ``cfg``."""
    size = (cfg.height, cfg.width)
    steps: list[v2.Transform] = [v2.Resize(size, antialias=True)]
    if train:
        if cfg.flip > 0:
            steps.append(v2.RandomHorizontalFlip(cfg.flip))
        if cfg.pad > 0:
            steps += [v2.Pad(cfg.pad), v2.RandomCrop(size)]
        if cfg.color_jitter > 0:
            s = cfg.color_jitter
            steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    if train and cfg.random_erasing > 0:
        # Erased pixels become 0 after normalisation, i.e. the dataset mean, as in BoT.
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(steps)
