"""Shared fixtures: a tiny deterministic record source and shards written from it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.shards import WriteOptions, write_split

# The tests run many small tensor ops: one intra-op thread is faster there than two, and immune to a
# busy machine's oversubscription.
torch.set_num_threads(1)


class ToySource:
    """``n`` small JPEGs whose pixels encode their position; pid i // 4, camid i % 3."""

    dataset = "toy"

    def __init__(self, n: int = 40, size: tuple[int, int] = (32, 16)):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"{i // 4:04d}_c{i % 3 + 1}s1_{i:06d}_00"

    def meta(self, i: int) -> dict:
        return {"pid": 100 + i // 4, "camid": i % 3, "viewid": None, "source": f"toy/{i}.jpg", "colour": "red"}

    def image(self, i: int) -> tuple[bytes, str]:
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (*self.size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"


@pytest.fixture
def toy_source() -> ToySource:
    return ToySource()


@pytest.fixture
def toy_split(tmp_path: Path, toy_source: ToySource) -> Path:
    split_dir = tmp_path / "toy" / "train"
    write_split(toy_source, split_dir, "train", relabel=True, options=WriteOptions(samples_per_shard=16, progress=False))
    return split_dir
