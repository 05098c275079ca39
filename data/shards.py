"""The shard contract: writing a split as webdataset tar shards with a manifest and a random-access index.

Layout of one split (``<out>/<dataset>/<split>/``)::

    <split>-000000.tar ...   webdataset shards; one sample = ``<key>.jpg`` (original encoded bytes)
                             + ``<key>.json`` ({"index", "pid", "camid", "viewid", "dataset", "source", ...})
    manifest.json            schema version, status, counts, pid map, cameras, shards with size and sha256
    index.npy                one row per sample, in ``index`` order: shard, byte offsets and sizes of the
                             image and json members, pid, camid, viewid and the crc32 of the two members
                             (structured array, no pickle); its sha256 is in the manifest
    index.wids.json          the same shard list in the wids shard-index format

``index`` is the sample's position 0..N-1 in its split: the same on every rank and run.

Writing is atomic and resumable. Shard ``k`` always holds samples ``[k*S, (k+1)*S)``, so a re-run
regenerates exactly the shards that are missing or whose sha256 differs from the manifest, and
skips the rest. A shard is written to a hidden temporary file and renamed when complete; the manifest
is rewritten (atomically) after each shard, so an interrupted build leaves only whole, vouched-for
shards visible. Tar headers are normalised (mtime 0, root owner, mode 0444), so the same source gives
byte-identical shards.

Trust: every output path stays under the split directory (dataset, split and sample-key names are
single path components, checked before anything is written); a build holds an exclusive lock on its
split directory; cleanup deletes only shard names of the split's own numbering. The index is vouched
for by its sha256 in the manifest (checked on open) and every sample by its crc32 (checked on read),
so a shifted label or a flipped image bit is found without hashing whole shards.
"""

from __future__ import annotations

import contextlib
import errno
import io
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reidforge.data.source import RecordSource
from reidforge.shared.text import printable
from reidforge.shared.io import atomic_open, atomic_write_json
from reidforge.shared.progress import Progress

SCHEMA_VERSION = 2  # 2: per-sample crc32 in the index, the index's sha256 in the manifest
MANIFEST = "manifest.json"
INDEX = "index.npy"
WIDS_INDEX = "index.wids.json"
IMAGE_EXTS = ("jpg", "png")

INDEX_DTYPE = np.dtype(
    [
        ("shard", "<i4"),
        ("image_offset", "<i8"),
        ("image_size", "<i8"),
        ("json_offset", "<i8"),
        ("json_size", "<i8"),
        ("pid", "<i8"),
        ("camid", "<i4"),
        ("viewid", "<i4"),
        ("ext", "<u1"),
        ("crc32", "<u4"),  # zlib.crc32 of the json member's bytes, continued from that of the image's
    ]
)
# A name that becomes one path component (dataset, split) or a tar member stem (sample key).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


def safe_name(name: str, what: str) -> str:
    """``name`` when it is one harmless path component; else a one-line ShardError naming it."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ShardError(f"{what} {name!r} is not a plain name (letters, digits, _ . = + -, no leading dot, "
                         "no '..' or slash): it would write outside the output directory")
    return name


def sample_crc(image: bytes, meta: bytes) -> int:
    """The checksum the index keeps for one sample's two stored members."""
    return zlib.crc32(meta, zlib.crc32(image))


class ShardError(RuntimeError):
    """A shard build or read problem, described in one line."""


@dataclass(frozen=True)
class WriteOptions:
    samples_per_shard: int = 10_000
    workers: int = 1
    chunk: int = 256  # samples per task handed to a worker: the unit of progress
    progress: bool = True


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # one encoder: json.dumps builds one per call


def encode_json(meta: dict[str, Any]) -> bytes:
    return _JSON.encode(meta).encode()


def check_writable_dir(out: str | Path) -> Path:
    """Fail in one line, before any work, when ``out`` cannot be created or written."""
    out = Path(out)
    parent = out if out.exists() else out.parent
    if not parent.exists():
        raise ShardError(f"output parent directory does not exist: {parent}")
    if not parent.is_dir():
        raise ShardError(f"output path is not a directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ShardError(f"output directory is not writable: {parent}")
    return out


def _label(value: Any) -> int:
    return -1 if value is None else int(value)


class _Kept:
    """The records of a source that its ``problem`` screen let through, renumbered 0..n-1."""

    def __init__(self, source: RecordSource, keep: Sequence[int]):
        self.source, self.keep, self.dataset = source, list(keep), source.dataset
        self.fingerprint = getattr(source, "fingerprint", "")

    def __len__(self) -> int:
        return len(self.keep)

    def key(self, i: int) -> str:
        return self.source.key(self.keep[i])

    def meta(self, i: int) -> dict[str, Any]:
        return self.source.meta(self.keep[i])

    def image(self, i: int) -> tuple[bytes, str]:
        return self.source.image(self.keep[i])


def _screen(source: RecordSource, progress: bool) -> tuple[RecordSource, list[list[str]]]:
    """The source without the records its ``problem`` method rejects, and ``[source, reason]`` of each."""
    problem = getattr(source, "problem", None)
    if problem is None:
        return source, []
    keep, skipped = [], []
    with Progress(len(source), f"{source.dataset}: checking images", "check", unit="img", enabled=progress) as bar:
        for i in bar.wrap(range(len(source))):
            reason = problem(i)
            if reason is None:
                keep.append(i)
            else:
                skipped.append([str(source.meta(i).get("source", source.key(i))), reason])
    return (source if not skipped else _Kept(source, keep)), skipped


def _plan(source: RecordSource, split: str, relabel: bool) -> tuple[list[dict[str, Any]], list[bytes], dict[str, Any]]:
    """Read every record's meta (cheap) and derive the stored json (encoded once) and the split facts."""
    metas = []
    for i in range(len(source)):
        meta = dict(source.meta(i))
        for field in ("pid", "camid", "viewid"):
            meta.setdefault(field, None)
        meta["dataset"] = source.dataset
        meta.setdefault("source", source.dataset)
        metas.append(meta)
    pid_map: dict[str, int] = {}
    if relabel:
        raw = sorted({m["pid"] for m in metas if m["pid"] is not None})
        pid_map = {str(p): i for i, p in enumerate(raw)}
        for m in metas:
            if m["pid"] is not None:
                m["raw_pid"] = m["pid"]
                m["pid"] = pid_map[str(m["pid"])]
    for i, m in enumerate(metas):
        m["index"], m["key"] = i, safe_name(source.key(i), f"{source.dataset}/{split}: sample key")
    pids = {m["pid"] for m in metas if m["pid"] is not None}
    cams = sorted({m["camid"] for m in metas if m["camid"] is not None})
    encoded = [encode_json(m) for m in metas]
    fingerprint = hashlib.sha256(getattr(source, "fingerprint", "").encode())
    fingerprint.update(b"\n".join(encoded))
    facts = {
        "dataset": source.dataset,
        "split": split,
        "num_samples": len(metas),
        "num_pids": len(pids),
        "num_cameras": len(cams),
        "cameras": cams,
        "pid_map": pid_map,
        "fingerprint": fingerprint.hexdigest(),
    }
    return metas, encoded, facts


_worker: tuple[RecordSource, Sequence[bytes]] | None = None


def _init_worker(source: RecordSource, encoded: Sequence[bytes]) -> None:
    global _worker
    _worker = (source, encoded)


def _encode_range(bounds: tuple[int, int], job: tuple[RecordSource, Sequence[bytes]] | None = None
                  ) -> tuple[bytes, np.ndarray]:
    """Samples ``bounds`` as ready-to-append tar bytes, and each member's data offset within them.

    Workers build whole runs of members, so the writing process only appends, hashes and counts.
    """
    source, encoded = job if job is not None else _worker
    parts: list[bytes] = []
    rows = np.empty((bounds[1] - bounds[0], 6), dtype=np.int64)
    offset = 0
    for row, i in enumerate(range(*bounds)):
        data, ext = source.image(i)
        if ext not in IMAGE_EXTS:
            raise ShardError(f"{source.dataset}: record {source.key(i)} has unsupported image type {ext!r}")
        key, meta = source.key(i), encoded[i]
        image_header, meta_header = _tar_header(f"{key}.{ext}", len(data)), _tar_header(f"{key}.json", len(meta))
        image_pad, meta_pad = _ZEROS[:-len(data) % 512], _ZEROS[:-len(meta) % 512]
        image_at = offset + len(image_header)
        meta_at = image_at + len(data) + len(image_pad) + len(meta_header)
        parts += (image_header, data, image_pad, meta_header, meta, meta_pad)
        offset = meta_at + len(meta) + len(meta_pad)
        rows[row] = image_at, len(data), meta_at, len(meta), IMAGE_EXTS.index(ext), sample_crc(data, meta)
    return b"".join(parts), rows


_FIXED = b"0000444\x000000000\x000000000\x00"  # mode 0444, uid 0, gid 0
_MTIME = b"00000000000\x00"
_MAGIC = b"ustar\x0000"
# The checksum is the byte sum of the header with its own field as 8 spaces: all but name and size is fixed.
_FIXED_SUM = sum(_FIXED) + sum(_MTIME) + 8 * 32 + ord("0") + sum(_MAGIC)
_ZEROS = bytes(tarfile.RECORDSIZE)


def _tar_header(name: str, size: int) -> bytes:
    """A normalised tar header (mode 0444, owner 0, mtime 0): ustar, or pax for names over 100 bytes."""
    raw = name.encode()
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o444
        return info.tobuf(tarfile.PAX_FORMAT)
    size_field = b"%011o\x00" % size
    checksum = b"%06o\x00 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, _ZEROS[:100 - len(raw)], _FIXED, size_field, _MTIME, checksum, b"0", _ZEROS[:100],
                     _MAGIC, _ZEROS[:247]))


class _TarWriter:
    """Appends runs of members to an open file, hashing every byte and counting the offset."""

    def __init__(self, f: Any):
        self.f, self.sha256, self.offset = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def close(self) -> None:
        end = self.offset + 1024  # two zero blocks, then padding to a whole record, as tar does
        self.write(_ZEROS[:1024 + (-end) % tarfile.RECORDSIZE])


def _chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


class _Encoder:
    """Yields encoded runs of samples for index ranges, in order, in this process or from a worker pool."""

    def __init__(self, source: RecordSource, encoded: Sequence[bytes], workers: int):
        self.job = (source, encoded)
        self.pool = (
            multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=self.job)
            if workers > 1
            else None
        )

    def __call__(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[bytes, np.ndarray]]:
        if self.pool is None:
            return (_encode_range(r, self.job) for r in ranges)
        return self.pool.imap(_encode_range, ranges)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _write_shard(path: Path, runs: Iterator[tuple[bytes, np.ndarray]], first: int, bar: Progress
                 ) -> tuple[dict[str, Any], np.ndarray]:
    offsets: list[np.ndarray] = []
    try:
        with atomic_open(path, "wb") as f:
            tar = _TarWriter(f)
            for blob, rows in runs:
                rows[:, [0, 2]] += tar.offset
                offsets.append(rows)
                tar.write(blob)
                bar.update(len(rows))
            tar.close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ShardError(f"disk full while writing {path}; no partial shard was left") from None
        raise ShardError(f"cannot write {path}: {e.strerror or e}") from None
    rows = np.concatenate(offsets)
    entry = {"name": path.name, "num_samples": len(rows), "first_index": first, "size": tar.offset,
             "sha256": tar.sha256.hexdigest()}
    return entry, rows


def _vouched(split_dir: Path, facts: dict[str, Any], samples_per_shard: int) -> dict[str, dict[str, Any]]:
    """Shards that an earlier run of the same build finished and whose bytes still match the manifest."""
    path = split_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("fingerprint") != facts["fingerprint"] or old.get("samples_per_shard") != samples_per_shard:
        return {}
    good = {}
    for entry in old.get("shards", []):
        shard = split_dir / entry["name"]
        if shard.is_file() and shard.stat().st_size == entry["size"] and sha256_file(shard) == entry["sha256"]:
            good[entry["name"]] = entry
    return good


def _scan_shard(path: Path, num_samples: int) -> np.ndarray:
    """Member offsets and checksums of a shard written by an earlier run (its sha256 was just checked)."""
    rows = np.zeros((num_samples, 6), dtype=np.int64)
    i = 0
    image = b""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            ext = member.name.rpartition(".")[2]
            if i >= num_samples:
                break
            data = tar.extractfile(member).read()
            if ext == "json":
                rows[i, 2:4] = member.offset_data, member.size
                rows[i, 5] = sample_crc(image, data)
                i += 1
            else:
                rows[i, 0:2] = member.offset_data, member.size
                rows[i, 4] = IMAGE_EXTS.index(ext)
                image = data
    if i != num_samples:
        raise ShardError(f"{path}: holds {i} samples, the manifest says {num_samples}")
    return rows


def _build_index(shards: list[dict[str, Any]], offsets: list[np.ndarray], metas: Sequence[dict[str, Any]]) -> np.ndarray:
    index = np.zeros(len(metas), dtype=INDEX_DTYPE)
    rows = np.concatenate(offsets)
    index["shard"] = np.repeat(np.arange(len(shards)), [s["num_samples"] for s in shards])
    for column, name in enumerate(("image_offset", "image_size", "json_offset", "json_size", "ext", "crc32")):
        index[name] = rows[:, column]
    index["pid"] = [_label(m["pid"]) for m in metas]
    index["camid"] = [_label(m["camid"]) for m in metas]
    index["viewid"] = [_label(m["viewid"]) for m in metas]
    return index


def write_split(source: RecordSource, split_dir: str | Path, split: str, *, relabel: bool = False,
                options: WriteOptions = WriteOptions()) -> dict[str, Any]:
    """Write ``source`` as the shards of one split; return the manifest. Skips shards already vouched for."""
    split_dir = Path(split_dir)
    safe_name(split, "split name")
    if options.samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be >= 1, got {options.samples_per_shard}")
    if len(source) == 0:
        raise ShardError(f"{source.dataset}/{split}: the source has no samples")
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"cannot create {split_dir}: {e.strerror or e}") from None
    if not os.access(split_dir, os.W_OK | os.X_OK):
        raise ShardError(f"output directory is not writable: {split_dir}")
    with _locked(split_dir):
        return _write_locked(source, split_dir, split, relabel, options)


@contextlib.contextmanager
def _locked(split_dir: Path) -> Iterator[None]:
    """Hold the split directory's build lock; a second build into it fails at once, in one line."""
    fd = os.open(split_dir, os.O_RDONLY)  # flock on the directory itself: nothing is left behind
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardError(f"{split_dir}: another build is writing this split; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_json(path: Path, obj: Any) -> None:
    try:
        atomic_write_json(path, obj)
    except OSError as e:
        raise ShardError(f"cannot write {path}: {e.strerror or e}; the split stays resumable") from None


def _write_locked(source: RecordSource, split_dir: Path, split: str, relabel: bool, options: WriteOptions
                  ) -> dict[str, Any]:
    for leftover in split_dir.glob(".*.tmp"):  # temporaries of a build that was killed outright
        leftover.unlink()
    source, skipped = _screen(source, options.progress)
    for where, reason in skipped[:10]:
        print(f"skipped {printable(where)}: {reason}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"... and {len(skipped) - 10} more images skipped (listed in {split_dir / MANIFEST})", file=sys.stderr)
    if len(source) == 0:
        raise ShardError(f"{split_dir}: every image of the split was skipped (first: {skipped[0][0]}: {skipped[0][1]})")
    metas, encoded, facts = _plan(source, split, relabel)
    facts["skipped"] = skipped
    n, size = len(metas), options.samples_per_shard
    done = _vouched(split_dir, facts, size)
    manifest = {"schema_version": SCHEMA_VERSION, "status": "partial", "samples_per_shard": size, **facts}
    shards: list[dict[str, Any]] = []
    offsets: list[np.ndarray] = []
    encoder = _Encoder(source, encoded, options.workers)
    try:
        with Progress(n, f"{source.dataset}/{split}", "shards", unit="img", enabled=options.progress) as bar:
            for k, first in enumerate(range(0, n, size)):
                name = shard_name(split, k)
                last = min(first + size, n)
                if name in done:
                    shards.append(done[name])
                    offsets.append(_scan_shard(split_dir / name, last - first))
                    bar.update(last - first)
                    continue
                entry, rows = _write_shard(split_dir / name, encoder(_chunks(first, last, options.chunk)), first, bar)
                shards.append(entry)
                offsets.append(rows)
                # Vouch for what is finished so far: a crash after this line never loses this shard.
                _write_json(split_dir / MANIFEST, {**manifest, "shards": shards})
    finally:
        encoder.close()
    # Only this split's own numbering beyond the new shard count: a smaller rebuild's leftovers.
    numbered = re.compile(re.escape(split) + r"-(\d{6})\.tar")
    for stale in split_dir.iterdir():
        match = numbered.fullmatch(stale.name)
        if match and int(match.group(1)) >= len(shards) and stale.is_file():
            stale.unlink()
    index = _build_index(shards, offsets, metas)
    try:
        with atomic_open(split_dir / INDEX, "wb") as f:
            np.save(f, index, allow_pickle=False)
    except OSError as e:
        raise ShardError(f"cannot write {split_dir / INDEX}: {e.strerror or e}; the split stays resumable") from None
    manifest["index_sha256"] = sha256_file(split_dir / INDEX)
    _write_json(split_dir / WIDS_INDEX, {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": f"{source.dataset}/{split}",
        "shardlist": [{"url": s["name"], "nsamples": s["num_samples"]} for s in shards],
    })
    manifest.update(status="complete", shards=shards, reused_shards=len(done))
    _write_json(split_dir / MANIFEST, manifest)
    return manifest


# A split given as a URL prefix, read through webdataset's gopen: ``<prefix>/manifest.json``,
# ``<prefix>/index.npy`` and ``<prefix>/<shard name>``. For ``pipe:`` the member name is appended to the
# command, so its last word must be the URL (``pipe:curl -sf https://host/pool``).
URL_SCHEMES = ("http://", "https://", "pipe:", "file:")


def is_url(split_dir: str | Path) -> bool:
    """Whether a split is given as a URL prefix rather than a local directory."""
    return isinstance(split_dir, str) and split_dir.startswith(URL_SCHEMES)


def split_location(split_dir: str | Path) -> str | Path:
    """The split as it is addressed: the URL string unchanged (a Path would fold its ``//``), else a Path."""
    return split_dir.rstrip("/") if is_url(split_dir) else Path(split_dir)


def split_member(split_dir: str | Path, name: str) -> str | Path:
    """Where member ``name`` of a split lives: ``<prefix>/<name>`` for a URL, a path for a directory."""
    location = split_location(split_dir)
    return f"{location}/{name}" if isinstance(location, str) else location / name


def open_member(where: str | Path) -> Any:
    """A binary stream of one split member, local or through webdataset's gopen (curl for http(s))."""
    if not isinstance(where, str):
        return open(where, "rb")
    import webdataset as wds  # only URL splits need it here
    return wds.gopen(where, "rb")


def fetch(url: str) -> bytes:
    """All bytes at ``url``; a one-line ShardError naming it when they cannot be had."""
    try:
        stream = open_member(url)
        try:
            data = stream.read()
        finally:
            stream.close()  # a pipe's (curl's) exit status is checked here
    except Exception as e:  # curl's or the pipe command's failure, a missing file: all one line
        raise ShardError(f"cannot fetch {url}: {_fetch_reason(e)}") from None
    return data


def _fetch_reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    match = re.search(r"exit (\d+)", str(error))
    if match:  # curl -f: 22 is an HTTP error status (404 ...), 6/7 an unknown host / refused connection
        return f"the reading command exited with status {match.group(1)} (curl: 22 = HTTP error, 7 = cannot connect)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _read_member(split_dir: str | Path, name: str, missing: str) -> bytes:
    """Member ``name`` of a split; ``missing`` is the one-line error when a local split lacks it."""
    where = split_member(split_dir, name)
    if isinstance(where, str):
        return fetch(where)
    if not where.is_file():
        raise ShardError(missing)
    try:
        return where.read_bytes()
    except OSError as e:
        raise ShardError(f"{where}: cannot read ({e.strerror or e})") from None


def load_manifest(split_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete split (a local directory or a URL prefix, see :func:`is_url`); a
    one-line error when it is missing, partial or foreign."""
    path = split_member(split_dir, MANIFEST)
    raw = _read_member(split_dir, MANIFEST, f"no {MANIFEST} in {split_dir}: not a shard split directory "
                                            "(build it with data/build_shards.py)")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: a manifest is a JSON object, this holds a {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = "; re-run the build command (vouched shards are reused)" if isinstance(version, int) else ""
        raise ShardError(f"{path}: schema_version {version!r}, expected {SCHEMA_VERSION}{hint}")
    if manifest.get("status") != "complete":
        raise ShardError(f"{path}: the build of this split did not finish; re-run the same build command to complete it")
    _check_shape(manifest, path)
    return manifest


# The keys a complete manifest must hold, with their JSON types.
_MANIFEST_KEYS = {"dataset": str, "split": str, "num_samples": int, "num_pids": int, "num_cameras": int,
                  "cameras": list, "pid_map": dict, "shards": list, "index_sha256": str}
_SHARD_KEYS = {"name": str, "num_samples": int, "first_index": int, "size": int, "sha256": str}


def _check_shape(manifest: dict[str, Any], path: str | Path) -> None:
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise ShardError(f"{path}: key '{key}' missing or not a {kind.__name__}")
    for k, entry in enumerate(manifest["shards"]):
        bad = [key for key, kind in _SHARD_KEYS.items() if not isinstance(entry, dict)
               or not isinstance(entry.get(key), kind)]
        if bad:
            raise ShardError(f"{path}: shards[{k}] key '{bad[0]}' missing or of the wrong type")
        safe_name(entry["name"], f"{path}: shard name")


def load_index(split_dir: str | Path, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """The split's index, checked against the manifest's sha256 and shard count (one line when not)."""
    manifest = manifest if manifest is not None else load_manifest(split_dir)
    path = split_member(split_dir, INDEX)
    raw = _read_member(split_dir, INDEX, f"no {INDEX} in {split_dir}; re-run the build command to write it")
    if hashlib.sha256(raw).hexdigest() != manifest["index_sha256"]:
        raise ShardError(f"{path}: sha256 differs from the manifest (tampered or corrupted index)")
    index = np.load(io.BytesIO(raw), allow_pickle=False)
    if index.dtype != INDEX_DTYPE:
        raise ShardError(f"{path}: unexpected index layout {index.dtype}")
    shards = index["shard"]
    if len(index) and (shards.min() < 0 or shards.max() >= len(manifest["shards"])):
        raise ShardError(f"{path}: shard numbers outside 0..{len(manifest['shards']) - 1}")
    return index


def verify_split(split_dir: str | Path) -> list[str]:
    """Check the index and every shard's size and sha256 against the manifest; one line per problem."""
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    problems = []
    try:
        load_index(split_dir, manifest)
    except ShardError as e:
        problems.append(str(e))
    for entry in manifest["shards"]:
        shard = split_dir / entry["name"]
        if not shard.is_file():
            problems.append(f"{shard}: missing")
        elif shard.stat().st_size != entry["size"] or sha256_file(shard) != entry["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest (tampered or corrupted)")
    return problems
