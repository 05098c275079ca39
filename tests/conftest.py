"""Shared fixtures: a tiny deterministic record source and shards written from it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources

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


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world: synthetic_person/{train,query,gallery} (8 train ids) and synthetic_lup/pool."""
    root = tmp_path_factory.mktemp("shards")
    cfg = SyntheticConfig(train_ids=8, images_per_train_id=4, test_ids=4, images_per_test_id=4, distractors=2,
                          pool_images=40, pool_images_per_id=10)
    sources = build_sources(cfg)
    for dataset, split in (("synthetic_person", "train"), ("synthetic_person", "query"),
                           ("synthetic_person", "gallery"), ("synthetic_lup", "pool")):
        write_split(sources[dataset][split], root / dataset / split, split, relabel=split == "train",
                    options=WriteOptions(progress=False))
    return root


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Every test starts from the same RNG state (a random init can leave a small SE/CBAM bottleneck
    # all-dead, without gradient).
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests read their commands' stderr line by line: progress lines (reidforge.shared.progress) stay off
    # unless a test sets REIDFORGE_PROGRESS itself (tests/test_progress.py; the fault bench's children).
    monkeypatch.setenv("REIDFORGE_PROGRESS", "0")


def _proxy_loss(model: torch.nn.Module, outputs: dict[str, torch.Tensor], pids: torch.Tensor) -> torch.Tensor:
    """A loss through every declared term: CE where declared, a squared norm standing in for the others."""
    return sum(F.cross_entropy(outputs[t.input], pids) if t.loss == "ce" else outputs[t.input].pow(2).mean()
               for t in model.loss_terms)


def assert_gradients_reach_every_parameter(model: torch.nn.Module, num_classes: int,
                                           size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One backward pass of a batch of 2 in train mode; returns the train outputs."""
    model.train()
    outputs = model(torch.randn(2, 3, *size))
    _proxy_loss(model, outputs, torch.tensor([0, num_classes - 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    return outputs


@contextlib.contextmanager
def killed_in_epoch(monkeypatch: pytest.MonkeyPatch, trainer: type, epoch: int) -> Iterator[None]:
    """Within the block, ``trainer._train_epoch`` dies (as a kill would) when it reaches 0-based ``epoch``."""
    real = trainer._train_epoch

    def dies(self: Any, current: int, *args: Any) -> Any:
        if current == epoch:
            raise KeyboardInterrupt("killed")
        return real(self, current, *args)

    monkeypatch.setattr(trainer, "_train_epoch", dies)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(trainer, "_train_epoch", real)
