"""Tensor transforms: sizes, dtypes, determinism of the test pipeline, and that augmentation acts."""

from __future__ import annotations

import torch

from data.transforms import TransformConfig, build_transforms


def _image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 160, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_test_pipeline_is_deterministic_and_normalised() -> None:
    cfg = TransformConfig(height=128, width=64)
    t = build_transforms(cfg, train=False)
    a, b = t(_image()), t(_image())
    assert a.shape == (3, 128, 64) and a.dtype == torch.float32 and torch.equal(a, b)
    flat = torch.full((3, 10, 10), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(t(flat)[:, 0, 0], expected, atol=1e-5)


def test_train_pipeline_augments_at_the_right_size() -> None:
    cfg = TransformConfig(height=128, width=64, flip=1.0, pad=0, random_erasing=0.0)
    flipped = build_transforms(cfg, train=True)(_image())
    plain = build_transforms(cfg, train=False)(_image())
    assert torch.allclose(flipped, plain.flip(-1))
    full = build_transforms(TransformConfig(height=128, width=64, color_jitter=0.3, random_erasing=1.0), train=True)
    torch.manual_seed(0)
    out = full(_image())
    assert out.shape == (3, 128, 64) and not torch.allclose(out, plain)
    assert (out == 0).all(dim=0).any()  # an erased rectangle (zeros after normalisation)


def test_pad_crop_is_a_zero_filled_shift_within_pad() -> None:
    cfg = TransformConfig(height=64, width=32, flip=0.0, pad=4, random_erasing=0.0)
    train, test = build_transforms(cfg, train=True), build_transforms(cfg, train=False)
    plain = test(_image())
    zero = (torch.zeros(3, 1, 1) - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
    shifts = set()
    torch.manual_seed(1)
    for _ in range(20):
        out = train(_image())
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.allclose(out, _shift(plain, dy, dx, zero), atol=1e-5)]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5  # the offset really is random


def _shift(image: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """Crop of ``image`` at offset (dy, dx), filled with ``fill`` outside it."""
    h, w = image.shape[-2:]
    out = fill.expand(3, h, w).clone()
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = image[:, max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out
