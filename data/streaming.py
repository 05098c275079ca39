"""Streamed P x K pseudo-identity batches: training on shards that can only be read in sequence (URL splits).

SpCL (Ge et al., NeurIPS 2020, §4.1) trains on P pseudo-identities x K images a batch, which the indexed
path samples by index (``data/samplers.py``). Shards behind an HTTP server have no random access, so
:class:`PseudoIdentityStream` builds the batches from the images as they arrive:

1. Each rank and DataLoader worker reads its own shards (webdataset's split_by_node / split_by_worker over
   the pool's shards, shuffled by (seed, epoch)); a worker passes over its shards again and again (each
   pass in its own shuffled order) until the trainer has taken the epoch's batches.
2. The samples, still undecoded, go through a shuffle buffer of ``shuffle_buffer`` samples, then into a
   buffer per pseudo-class (the current clustering's label of their ``index``; label < 0: not trained).
3. A class is complete when its buffer holds K images, or every image of the class that this worker's
   shards hold (fewer than K: a small cluster or an un-clustered image, repeated to K, as P x K sampling
   with replacement does). Once P classes are complete, their images are decoded and augmented and
   emitted as one batch. The same class may come again in a later pass (drawn with replacement).
4. At most ``max_buffered`` undecoded images wait in incomplete class buffers; past that the oldest
   incomplete class is dropped, so a clustering with many large classes cannot exhaust host memory.

Determinism: with the same worker count and shard bytes the batches are a pure function of
(seed, epoch, labels): each emitted batch ``b`` (the DataLoader takes worker ``b % workers``'s
``b // workers``-th) seeds its images' augmentation by (seed, epoch, b, rank) (``data/draws.py``).
Batches before ``start`` are read but not decoded and come out as empty placeholders, which the trainer
skips; so a resumed epoch continues with the batches the killed one would have trained on.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from reidforge.data.draws import draw_seeds
from reidforge.data.readers import Problem, RawSample, StreamingShards, collate
from reidforge.data.shards import ShardError


class PseudoIdentityStream(IterableDataset):
    """Endless P x K batches (collated, ``batch["problems"]`` beside them) from ``stream`` (module docstring).

    ``labels``: the pseudo label of every global index of the pool (-1: not trained, e.g. not kept or
    undecodable). ``stream`` is the pool's :class:`StreamingShards` with the training transform.
    """

    def __init__(self, stream: StreamingShards, labels: np.ndarray, p: int, k: int, *, seed: int, epoch: int,
                 rank: int = 0, start: int = 0, shuffle_buffer: int = 1000, max_buffered: int = 20000):
        if len(labels) != int(stream.offsets[-1]):
            raise ValueError(f"labels: {len(labels)} for a pool of {int(stream.offsets[-1])} samples")
        if p < 1 or k < 1 or shuffle_buffer < 0 or max_buffered < 1:
            raise ValueError(f"need p, k, max_buffered >= 1 and shuffle_buffer >= 0; got {p}, {k}, {max_buffered}, "
                             f"{shuffle_buffer}")
        self.stream, self.labels = stream, np.asarray(labels, dtype=np.int64)
        self.p, self.k, self.seed, self.epoch, self.rank, self.start = p, k, seed, epoch, rank, start
        self.shuffle_buffer, self.max_buffered = shuffle_buffer, max_buffered

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.stream.my_shards((self.seed, self.epoch))
        local = self._local_sizes(shards)
        if not local.any():
            raise ShardError(f"{self.stream.split_dir}: the {len(shards)} shards of rank {self.rank} worker {worker} "
                             "hold no image with a pseudo label to train on (more shards than ranks x workers?)")
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        shuffle: list[RawSample] = []
        classes: OrderedDict[int, list[RawSample]] = OrderedDict()
        ready: deque[list[RawSample]] = deque()
        problems: list[Problem] = []
        buffered, emitted, passes = 0, 0, 0
        while True:
            delivered = 0
            for i in rng.permutation(len(shards)):
                for item in self.stream.read_raw(*shards[i]):
                    if isinstance(item, Problem):
                        problems.append(item)
                        continue
                    if self.labels[item.index] < 0:
                        continue
                    delivered += 1
                    if self.shuffle_buffer:
                        if len(shuffle) < self.shuffle_buffer:
                            shuffle.append(item)
                            continue
                        j = int(rng.integers(len(shuffle)))
                        item, shuffle[j] = shuffle[j], item
                    buffered += self._add(item, classes, ready, local)
                    while buffered > self.max_buffered:  # drop the oldest incomplete class
                        buffered -= len(classes.popitem(last=False)[1])
                    while len(ready) >= self.p:
                        yield self._batch([ready.popleft() for _ in range(self.p)], emitted * workers + worker,
                                          problems)
                        problems, emitted = [], emitted + 1
            passes += 1
            if delivered == 0:
                raise ShardError(f"{self.stream.split_dir}: pass {passes} over the shards of rank {self.rank} worker "
                                 f"{worker} delivered no trainable image ({len(problems)} problems)")

    def _local_sizes(self, shards: list[tuple[int, dict[str, Any]]]) -> np.ndarray:
        """Per pseudo-class, how many of its images these shards hold."""
        ranges = [int(self.stream.offsets[k]) + s["first_index"] + np.arange(s["num_samples"]) for k, s in shards]
        labels = self.labels[np.concatenate(ranges)] if ranges else np.zeros(0, np.int64)
        if self.stream.keep is not None and ranges:
            labels = labels[self.stream.keep[np.concatenate(ranges)]]
        return np.bincount(labels[labels >= 0], minlength=int(self.labels.max()) + 1)

    def _add(self, item: RawSample, classes: OrderedDict[int, list[RawSample]], ready: deque[list[RawSample]],
             local: np.ndarray) -> int:
        """Put ``item`` in its class buffer; move a complete class to ``ready``. The change in buffered images."""
        label = int(self.labels[item.index])
        members = classes.setdefault(label, [])
        members.append(item)
        if len(members) < min(self.k, int(local[label])):
            return 1
        del classes[label]
        ready.append(members)
        return 1 - len(members)

    def _batch(self, group: list[list[RawSample]], number: int, problems: list[Problem]) -> dict[str, Any]:
        """Batch ``number`` of the epoch: each class's images repeated to K, decoded under seeded draws."""
        if number < self.start:  # trained before the checkpoint this epoch resumed from
            return {"problems": [], "skipped": True}
        raws = [members[i % len(members)] for members in group for i in range(self.k)]
        seeds = draw_seeds(self.seed, (self.epoch, number, self.rank), len(raws))
        with torch.random.fork_rng(devices=[], enabled=get_worker_info() is None):
            samples = []
            for raw, draw in zip(raws, seeds):
                torch.default_generator.manual_seed(draw)
                samples.append(self.stream.decode(raw))
        return collate([*problems, *samples])
