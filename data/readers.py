"""Reading shards: streaming (sequential passes) and indexed (random access by ``index``).

Both readers yield the same sample: ``{"image", "pid", "camid", "viewid", "index", "key"}`` where
``image`` is a uint8 CHW RGB tensor (or whatever the transform makes of it) and a missing label is -1.

- :class:`StreamingShards` is a webdataset pipeline: the shard list is split by node (rank) and by
  DataLoader worker, each shard is read as a tar stream and its sha256 checked on the fly.
- :class:`IndexedShards` reads one sample with two ``pread`` calls at the offsets in ``index.npy``,
  which is what P×K identity sampling needs; its ``pids``/``camids`` arrays feed the samplers.

Bad data never kills a pass. A sample that cannot be decoded, a tar member that is broken or a
shard that ends early becomes a :class:`Problem` in the stream instead of a sample. :func:`collate`
moves problems out of the batch, and :class:`SampleTally` counts them, aborts with one line once more
than ``max_bad_fraction`` of the split is lost, and reports them at the end of the pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset, default_collate

from reidforge.data.images import MAX_IMAGE_PIXELS, BadImage, decode, image_size  # noqa: F401  (part of this API)
from reidforge.data.shards import (IMAGE_EXTS, ShardError, load_index, load_manifest, open_member, sample_crc,
                                   split_location, split_member)

Transform = Callable[[torch.Tensor], torch.Tensor]


class Problem(NamedTuple):
    """A sample (or a run of samples) that a pass could not deliver, or a warning about a shard.

    ``index`` is the sample's index in its split when the problem is one known sample, else -1.
    """

    where: str
    reason: str
    lost: int = 1
    index: int = -1


class TooManyBadSamples(ShardError):
    pass


CRC_MISMATCH = "checksum mismatch: corrupted sample (its bytes differ from the index's crc32)"


def make_sample(data: bytes, labels: dict[str, Any], key: str, transform: Transform | None) -> dict[str, Any]:
    """The sample both readers yield. Raises on undecodable bytes; callers turn that into a Problem."""
    image = decode(data)
    if transform is not None:
        image = transform(image)
    sample = {name: -1 if labels.get(name) is None else int(labels[name]) for name in ("pid", "camid", "viewid")}
    return {"image": image, **sample, "index": int(labels["index"]), "key": key}


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, f: io.BufferedReader):
        self.f, self.sha256 = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if hasattr(self.f, "readinto"):
            n = self.f.readinto(buffer)
        else:  # webdataset's Pipe (curl, pipe: commands) only reads
            data = self.f.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self.sha256.update(memoryview(buffer)[:n])
        return n

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


class StreamingShards(IterableDataset):
    """Sequential pass over one split (or several, as one pool), sharded across ranks and DataLoader
    workers by webdataset (``split_by_node`` / ``split_by_worker`` over the shards of all the splits).

    A split is a local directory or a URL prefix (``http(s)://``, ``pipe:``, ``file:``; see
    ``data/shards.py`` ``is_url``). With several splits, split ``k``'s sample ``i`` carries the global
    ``index`` ``offsets[k] + i`` (as :class:`ConcatShards` numbers them; labels are not shifted).
    ``keep`` (global indices) restricts the pass to those samples: the others are skipped before their
    image is decoded, and shards holding none of them are not read at all.
    """

    def __init__(self, split_dir: str | Path | Sequence[str | Path], transform: Transform | None = None, *,
                 shuffle_shards: bool = False, seed: int = 0, verify: bool = True,
                 keep: np.ndarray | None = None):
        splits = list(split_dir) if isinstance(split_dir, (list, tuple)) else [split_dir]
        self.splits = [split_location(s) for s in splits]
        self.split_dir = self.splits[0]
        self.manifests = [load_manifest(s) for s in self.splits]
        self.manifest = self.manifests[0]
        sizes = [int(m["num_samples"]) for m in self.manifests]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Only the checksums are kept (4 bytes a sample): the stream finds its offsets in the tar itself.
        self.crc32 = (np.concatenate([load_index(s, m)["crc32"] for s, m in zip(self.splits, self.manifests)])
                      if verify else None)
        self.keep: np.ndarray | None = None
        if keep is not None:
            keep = np.asarray(keep, dtype=np.int64)
            if len(keep) and (keep.min() < 0 or keep.max() >= self.offsets[-1]):
                raise ShardError(f"{self.split_dir}: keep holds indices outside 0..{int(self.offsets[-1]) - 1}")
            self.keep = np.zeros(int(self.offsets[-1]), dtype=bool)
            self.keep[keep] = True
        self.transform, self.shuffle_shards, self.seed, self.verify = transform, shuffle_shards, seed, verify
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.keep is None else int(self.keep.sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_shards(self, order_key: Sequence[int] | None = None) -> list[tuple[int, dict[str, Any]]]:
        """``(split number, shard entry)`` of every shard with a kept sample, in split order or shuffled by
        ``order_key`` (default ``(seed, epoch)`` when ``shuffle_shards``)."""
        shards = [(k, s) for k, m in enumerate(self.manifests) for s in m["shards"]
                  if self.keep is None or self._kept(k, s).any()]
        if self.shuffle_shards or order_key is not None:
            key = list(order_key) if order_key is not None else [self.seed, self.epoch]
            order = np.random.default_rng(key).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards

    def _kept(self, split: int, shard: dict[str, Any], skip: int = 0) -> np.ndarray:
        """The keep mask over a shard's samples from its ``skip``-th on (all True without ``keep``)."""
        first = int(self.offsets[split]) + shard["first_index"] + skip
        count = shard["num_samples"] - skip
        return np.ones(count, dtype=bool) if self.keep is None else self.keep[first:first + count]

    def my_count(self) -> int:
        """How many kept samples the shards of this rank (all its DataLoader workers) hold."""
        return sum(int(self._kept(k, shard).sum()) for k, shard in wds.split_by_node(self.all_shards()))

    def my_shards(self, order_key: Sequence[int] | None = None) -> list[tuple[int, dict[str, Any]]]:
        """The shards this rank and DataLoader worker read (webdataset's split_by_node, split_by_worker)."""
        return list(wds.split_by_worker(wds.split_by_node(self.all_shards(order_key))))

    def __iter__(self) -> Iterator[dict[str, Any] | Problem]:
        for split, shard in self.my_shards():
            for item in self.read_raw(split, shard):
                yield item if isinstance(item, Problem) else self.decode(item)

    def read_raw(self, split: int, shard: dict[str, Any]) -> Iterator[RawSample | Problem]:
        """The kept samples of one shard, undecoded, in order, with problems in their place."""
        path = split_member(self.splits[split], shard["name"])
        seen = 0
        try:
            with open_member(path) as raw:
                reader = _HashingReader(raw)
                files = wds.tariterators.tar_file_iterator(io.BufferedReader(reader))
                for group in wds.tariterators.group_by_keys({**f, "__url__": str(path)} for f in files):
                    seen += 1
                    item = self._raw(group, path, split)
                    if item is not None:
                        yield item
                if self.verify and reader.finish() != shard["sha256"]:
                    yield Problem(str(path), "sha256 differs from the manifest (tampered or corrupted shard)", 0)
        except Exception as e:  # a broken member or a truncated shard ends this shard, not the pass
            yield Problem(str(path), f"unreadable after {seen} samples: {str(e).splitlines()[0]}", 0)
        if seen < shard["num_samples"]:
            yield Problem(str(path), f"delivered {seen} of {shard['num_samples']} samples",
                          int(self._kept(split, shard, seen).sum()))

    def _raw(self, group: dict[str, Any], path: str | Path, split: int) -> RawSample | Problem | None:
        """One tar group as a checked, undecoded sample; None when ``keep`` leaves it out."""
        key = group["__key__"]
        index = -1
        try:
            labels = json.loads(group["json"])
            index = int(self.offsets[split]) + int(labels["index"])
            if self.keep is not None and not (0 <= index < len(self.keep) and self.keep[index]):
                return None
            data = next(group[ext] for ext in IMAGE_EXTS if ext in group)
            if self.crc32 is not None and not (0 <= index < len(self.crc32)
                                               and sample_crc(data, group["json"]) == self.crc32[index]):
                return Problem(f"{path}:{key}", CRC_MISMATCH, index=index)
            return RawSample(index, data, labels, key, f"{path}:{key}")
        except StopIteration:
            return Problem(f"{path}:{key}", "no image member", index=index)
        except Exception as e:
            return Problem(f"{path}:{key}", str(e).splitlines()[0] if str(e) else type(e).__name__, index=index)

    def decode(self, raw: RawSample) -> dict[str, Any] | Problem:
        """The sample of a raw one (its image decoded and transformed), or the Problem decoding met."""
        try:
            sample = make_sample(raw.data, raw.labels, raw.key, self.transform)
        except Exception as e:
            return Problem(raw.where, str(e).splitlines()[0] if str(e) else type(e).__name__, index=raw.index)
        sample["index"] = raw.index
        return sample


class RawSample(NamedTuple):
    """A streamed sample before decoding: its global index, image bytes, json labels and key."""

    index: int
    data: bytes
    labels: dict[str, Any]
    key: str
    where: str


def stream_json(split_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample's json labels of a split in index order, read as a tar stream (local or URL)."""
    location = split_location(split_dir)
    for shard in load_manifest(location)["shards"]:
        path = split_member(location, shard["name"])
        try:
            with open_member(path) as raw:
                for name, data in _json_members(raw):
                    try:
                        yield json.loads(data)
                    except ValueError:
                        raise ShardError(f"{path}: member {name} is not readable json; check it with "
                                         "data/build_shards.py verify") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot read ({e.strerror or e})") from None


def _json_members(raw: Any) -> Iterator[tuple[str, bytes]]:
    for member in wds.tariterators.tar_file_iterator(io.BufferedReader(_HashingReader(raw))):
        if member["fname"].endswith(".json"):
            yield member["fname"], member["data"]


class IndexedShards(Dataset):
    """Random access by ``index`` over one split's shards, through the byte offsets in ``index.npy``.

    A URL split (``data/shards.py`` ``is_url``) opens for its labels (``pids``, ``camids``, the
    manifest) only: reading its images by index needs local files, so that raises a ShardError.
    """

    def __init__(self, split_dir: str | Path, transform: Transform | None = None):
        self.split_dir = split_location(split_dir)
        self.manifest = load_manifest(self.split_dir)
        self.index = load_index(self.split_dir, self.manifest)
        if len(self.index) != self.manifest["num_samples"]:
            raise ShardError(f"{self.split_dir}: index has {len(self.index)} rows, manifest {self.manifest['num_samples']}")
        self.paths = [split_member(self.split_dir, s["name"]) for s in self.manifest["shards"]]
        self.transform = transform
        self._fds: dict[int, int] = {}
        self._owner = -1

    def __len__(self) -> int:
        return len(self.index)

    @property
    def pids(self) -> np.ndarray:
        return self.index["pid"]

    @property
    def camids(self) -> np.ndarray:
        return self.index["camid"]

    def _fd(self, shard: int) -> int:
        if self._owner != os.getpid():  # descriptors are opened per process (DataLoader workers fork)
            self._fds, self._owner = {}, os.getpid()
        if shard not in self._fds:
            if isinstance(self.paths[shard], str):
                raise ShardError(f"{self.paths[shard]}: reading by index needs local shards; stream a URL split "
                                 "(StreamingShards)")
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def read_bytes(self, index: int) -> tuple[bytes, bytes]:
        """The stored image bytes and json bytes of sample ``index``, checked against its crc32."""
        row = self.index[index]
        fd = self._fd(int(row["shard"]))
        image = os.pread(fd, int(row["image_size"]), int(row["image_offset"]))
        meta = os.pread(fd, int(row["json_size"]), int(row["json_offset"]))
        if sample_crc(image, meta) != int(row["crc32"]):
            raise BadImage(CRC_MISMATCH)
        return image, meta

    def __getitem__(self, index: int) -> dict[str, Any] | Problem:
        if not 0 <= index < len(self.index):
            raise IndexError(f"index {index} out of range for {self.split_dir} ({len(self.index)} samples)")
        row = self.index[index]
        where = f"{self.paths[int(row['shard'])]}@{index}"
        try:
            data, meta = self.read_bytes(index)
            labels = json.loads(meta)
            return make_sample(data, labels, labels["key"], self.transform)
        except ShardError:  # a URL split: a usage error, never a lost sample
            raise
        except OSError as e:
            return Problem(where, f"cannot read: {e.strerror or e}", index=index)
        except Exception as e:
            return Problem(where, str(e).splitlines()[0] if str(e) else type(e).__name__, index=index)


def collate(items: Sequence[dict[str, Any] | Problem]) -> dict[str, Any]:
    """Stack samples into a batch; problems travel beside it in ``batch["problems"]``."""
    samples = [s for s in items if not isinstance(s, Problem)]
    batch: dict[str, Any] = {"problems": [p for p in items if isinstance(p, Problem)]}
    if samples:
        # default_collate stacks straight into shared memory inside DataLoader workers (no extra copy).
        batch["image"] = default_collate([s["image"] for s in samples])
        for name in ("pid", "camid", "viewid", "index"):
            batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
        batch["key"] = [s["key"] for s in samples]
    return batch


class SampleTally:
    """Counts delivered and lost samples over a pass; aborts when too many are lost.

    ``expected`` is the number of distinct samples the pass can draw. A sample is counted lost once
    however often a sampler draws it (a P x K sampler may draw one bad image many times an epoch);
    problems that are not one known sample (a broken run of a shard) count their ``lost`` each time.
    """

    def __init__(self, expected: int, max_bad_fraction: float = 0.01, name: str = "pass"):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.expected, self.max_bad_fraction, self.name = max(expected, 1), max_bad_fraction, name
        self.delivered = 0
        self.lost = 0
        self.problems: list[Problem] = []
        self._bad: set[int] = set()

    def update(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.delivered += len(batch.get("index", ()))
        for problem in batch["problems"]:
            if problem.index >= 0:
                if problem.index in self._bad:
                    continue
                self._bad.add(problem.index)
            self.lost += problem.lost
            self.problems.append(problem)
        if self.lost > self.max_bad_fraction * self.expected:
            first = self.problems[0]
            raise TooManyBadSamples(
                f"{self.name}: {self.lost} of {self.expected} samples lost ({100 * self.lost / self.expected:.2f}%), "
                f"over max_bad_fraction={self.max_bad_fraction}; first: {first.where}: {first.reason}")
        return batch

    def wrap(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield non-empty batches, counting problems as they pass."""
        for batch in batches:
            self.update(batch)
            if "index" in batch:
                yield batch

    def summary(self) -> str:
        lines = [f"{self.name}: {self.delivered} samples delivered, {self.lost} lost, {len(self.problems)} problems"]
        lines += [f"  {p.where}: {p.reason}" for p in self.problems[:10]]
        if len(self.problems) > 10:
            lines.append(f"  ... and {len(self.problems) - 10} more")
        return "\n".join(lines)


class ConcatShards(Dataset):
    """Several indexed splits as one training set, with pids and camids that never collide.

    Split ``k``'s labels are shifted past those of splits ``0..k-1`` (pid offset = their pid count,
    camid offset = their camera count); -1 (unknown) stays -1. Indices are global: split ``k``'s
    sample ``i`` is ``offsets[k] + i``. Use it for multi-dataset training from train splits, whose
    pids the writer relabelled to 0..N-1.
    """

    def __init__(self, parts: Sequence[IndexedShards]):
        if not parts:
            raise ValueError("ConcatShards needs at least one split")
        self.parts = list(parts)
        sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        pid_counts = [int(p.pids.max()) + 1 if (p.pids >= 0).any() else 0 for p in self.parts]
        cam_counts = [int(p.camids.max()) + 1 if (p.camids >= 0).any() else 0 for p in self.parts]
        self.pid_offsets = np.concatenate([[0], np.cumsum(pid_counts)]).astype(np.int64)
        self.cam_offsets = np.concatenate([[0], np.cumsum(cam_counts)]).astype(np.int64)
        self._pids = _shifted([p.pids for p in self.parts], self.pid_offsets)
        self._camids = _shifted([p.camids for p in self.parts], self.cam_offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def pids(self) -> np.ndarray:
        return self._pids

    @property
    def camids(self) -> np.ndarray:
        return self._camids

    def __getitem__(self, index: int) -> dict[str, Any] | Problem:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} combined samples")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        sample = self.parts[k][index - int(self.offsets[k])]
        if isinstance(sample, Problem):
            return sample._replace(index=index) if sample.index >= 0 else sample
        sample["index"], sample["pid"], sample["camid"] = index, int(self._pids[index]), int(self._camids[index])
        return sample


def _shifted(values: Sequence[np.ndarray], offsets: np.ndarray) -> np.ndarray:
    """Concatenate label arrays, adding ``offsets[k]`` to part ``k``'s known (>= 0) labels."""
    return np.concatenate([np.where(v >= 0, v + offsets[k], -1) for k, v in enumerate(values)]).astype(np.int64)


def split_keys(split_dir: str | Path) -> list[str]:
    """The key of every sample of a split, in index order, from the json members alone (no image is read
    from a local split; a URL split is streamed whole)."""
    split_dir = split_location(split_dir)
    if isinstance(split_dir, str):
        return [str(meta["key"]) for meta in stream_json(split_dir)]
    manifest = load_manifest(split_dir)
    index = load_index(split_dir)
    if len(index) != manifest["num_samples"]:
        raise ShardError(f"{split_dir}: index has {len(index)} rows, manifest {manifest['num_samples']}")
    keys: list[str] = []
    for shard in manifest["shards"]:
        path = split_dir / shard["name"]
        rows = index[shard["first_index"]:shard["first_index"] + shard["num_samples"]]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"{path}: cannot open ({e.strerror or e})") from None
        try:
            for offset, size in zip(rows["json_offset"].tolist(), rows["json_size"].tolist()):
                try:
                    keys.append(json.loads(os.pread(fd, size, offset))["key"])
                except (ValueError, KeyError, TypeError):
                    raise ShardError(f"{path}: sample {len(keys)} has no readable json key; check it with "
                                     "data/build_shards.py verify") from None
        finally:
            os.close(fd)
    return keys
