"""Tensor transforms: sizes, dtypes, determinism of the test pipeline, augmentation, normalisation."""

from __future__ import annotations

import pytest
import torch

from reidforge.data.transforms import Normalize, TransformConfig, build_transforms
from reidforge.shared.config import ConfigError


def _image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 160, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_test_pipeline_is_deterministic_uint8() -> None:
    t = build_transforms(TransformConfig(height=128, width=64), train=False)
    a, b = t(_image()), t(_image())
    assert a.shape == (3, 128, 64) and a.dtype == torch.uint8 and torch.equal(a, b)


def test_normalize_on_the_batch() -> None:
    cfg = TransformConfig()
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = Normalize(cfg.mean, cfg.std)(batch)
    expected = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert out.dtype == torch.float32 and torch.allclose(out[1, :, 2, 2], expected, atol=1e-6)


def test_train_pipeline_augments_at_the_right_size() -> None:
    cfg = TransformConfig(height=128, width=64, flip=1.0, pad=0, random_erasing=0.0)
    flipped = build_transforms(cfg, train=True)(_image())
    plain = build_transforms(cfg, train=False)(_image())
    assert torch.equal(flipped, plain.flip(-1))
    erase_cfg = TransformConfig(height=128, width=64, flip=0.0, pad=0, random_erasing=1.0)
    torch.manual_seed(0)
    erased = build_transforms(erase_cfg, train=True)(_image())
    changed = (erased != plain).any(dim=0)
    fill = torch.tensor([round(255 * m) for m in erase_cfg.mean], dtype=torch.uint8)
    assert changed.any() and (erased.permute(1, 2, 0)[changed] == fill).all()  # one mean-filled rectangle
    rows, cols = changed.nonzero().unbind(1)
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.9
    jitter = build_transforms(TransformConfig(height=128, width=64, color_jitter=0.4, random_erasing=0.0), train=True)
    assert jitter(_image()).dtype == torch.uint8 and not torch.equal(jitter(_image()), plain)


def test_pad_crop_is_a_zero_filled_shift_within_pad() -> None:
    cfg = TransformConfig(height=64, width=32, flip=0.0, pad=4, random_erasing=0.0)
    train, test = build_transforms(cfg, train=True), build_transforms(cfg, train=False)
    plain = test(_image())
    shifts = set()
    torch.manual_seed(1)
    for _ in range(20):
        out = train(_image())
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if torch.equal(out, _shift(plain, dy, dx))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5  # the offset really is random


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Crop of ``image`` at offset (dy, dx), zero outside it."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[:, ys, xs] = image[:, max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def _scene() -> torch.Tensor:
    """A structured image (gradients and a bright box) that every AutoAugment/AugMix op visibly changes."""
    rows = torch.linspace(0, 200, 160).view(160, 1).expand(160, 70)
    cols = torch.linspace(30, 120, 70).view(1, 70).expand(160, 70)
    image = torch.stack([rows, cols, (rows + cols) / 2]).to(torch.uint8)
    image[:, 40:90, 20:50] = 240
    return image


OFF = dict(height=128, width=64, flip=0.0, pad=0, random_erasing=0.0)


def test_autoaugment_and_augmix_at_zero_draw_nothing_and_change_nothing() -> None:
    train = build_transforms(TransformConfig(**OFF), train=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = train(_scene())
    assert torch.equal(out, build_transforms(TransformConfig(**OFF), train=False)(_scene()))
    assert torch.equal(torch.get_rng_state(), state)  # no draw: seeded runs reproduce runs without the options


@pytest.mark.parametrize("name", ["autoaugment", "augmix"])
def test_autoaugment_and_augmix_at_one_change_images_keep_uint8_and_size_and_follow_the_seed(name: str) -> None:
    t = build_transforms(TransformConfig(**OFF, **{name: 1.0}), train=True)
    plain = build_transforms(TransformConfig(**OFF), train=False)(_scene())
    outs = []
    for seed in range(16):
        torch.manual_seed(seed)
        outs.append(t(_scene()))
    assert all(o.dtype == torch.uint8 and o.shape == (3, 128, 64) for o in outs)
    assert sum(not torch.equal(o, plain) for o in outs) >= 10  # a sub-policy may skip both its ops now and then
    assert len({o.numpy().tobytes() for o in outs}) >= 8  # seeds draw different augmentations
    torch.manual_seed(3)
    assert torch.equal(t(_scene()), outs[3])


def test_autoaugment_runs_before_the_resize_and_augmix_after_the_flip() -> None:
    """FastReID's order (fastreid/data/transforms/build.py): RandomApply(AutoAugment) first, AugMix after the flip."""
    t = build_transforms(TransformConfig(**{**OFF, "flip": 1.0}, autoaugment=1.0, augmix=1.0), train=True)
    seen = {}
    t.autoaugment = lambda image: seen.setdefault("autoaugment", image)
    t.augmix = lambda image: seen.setdefault("augmix", image)
    t(_scene())
    assert torch.equal(seen["autoaugment"], _scene())
    resized = build_transforms(TransformConfig(**OFF), train=False)(_scene())
    assert torch.equal(seen["augmix"], resized.flip(-1))


def test_augmentation_probabilities_must_be_probabilities() -> None:
    with pytest.raises(ConfigError, match="data.transform.augmix"):
        build_transforms(TransformConfig(augmix=1.5), train=True)
