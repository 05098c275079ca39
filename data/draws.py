"""Augmentation randomness as a pure function of the draw: exact resume with any number of DataLoader workers.

A DataLoader normally seeds each worker once (base seed + worker id) and the worker's transforms then
consume that stream sample after sample, so what one image's augmentation looks like depends on the
worker count, on which worker got the batch and on how many batches that worker handled before. A run
resumed from a checkpoint restarts the workers (and, mid-epoch, hands them other batches), so it draws
different augmentations than the run it continues.

Here every drawn sample carries its own seed instead:

* :class:`SeededBatches` wraps a batch sampler that can say where each batch sits (``keyed()`` yields
  ``(key, batch)``, the key being e.g. ``(epoch, global batch number)``) and yields ``(index, draw_seed)``
  pairs, ``draw_seed`` derived from ``(seed, *key, position in the batch)`` by ``numpy.random.SeedSequence``.
* :class:`SeededDraws` wraps the dataset: ``dataset[(index, draw_seed)]`` seeds the torch RNG with
  ``draw_seed`` and returns ``dataset[index]``. Inside a worker it simply reseeds the worker's RNG
  (nothing else in a worker draws from it); in the main process (``num_workers=0``) it does so under
  ``torch.random.fork_rng`` so the training loop's RNG stream is left exactly as it was.

So a sample's augmentation depends only on ``(seed, key, position)``: the same with 0 or 8 workers,
whichever worker reads it, and whether the run was resumed. Only the torch RNG is seeded because the
transforms (``data/transforms.py``) draw from it alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class KeyedBatchSampler(Protocol):
    """A batch sampler that also yields each batch's key (``data/samplers.py`` ``PKSampler.keyed``)."""

    def keyed(self) -> Iterator[tuple[tuple[int, ...], list[int]]]: ...

    def __len__(self) -> int: ...


def draw_seeds(seed: int, key: tuple[int, ...], size: int) -> list[int]:
    """``size`` 63-bit seeds for the positions of the batch identified by ``(seed, *key)``."""
    words = np.random.SeedSequence([seed % (1 << 64), *key]).generate_state(size, np.uint64)
    return (words >> np.uint64(1)).tolist()


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, draw_seed)`` pairs from a sampler's ``keyed()`` batches (see the module docstring)."""

    def __init__(self, sampler: KeyedBatchSampler, seed: int) -> None:
        super().__init__()
        self.sampler, self.seed = sampler, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for key, batch in self.sampler.keyed():
            yield list(zip(batch, draw_seeds(self.seed, key, len(batch))))

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDraws(Dataset):
    """``dataset[(index, draw_seed)]``: ``dataset[index]`` with the torch RNG seeded by ``draw_seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # Only the CPU generator, which the transforms draw from: torch.manual_seed also queues a lazy
        # seeding call per accelerator backend, recording a stack trace each time (~1.5 ms a draw).
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
