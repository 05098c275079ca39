"""What every dataset hands the shard writer: record sources, and the adapter registry that finds them.

- A :class:`RecordSource` is one split of one dataset, random access by position. Random access lets a
  resumed build regenerate exactly the samples of the shards still missing, and lets several
  processes encode in parallel.
- A :class:`DatasetAdapter` is one dataset: the command-line arguments that locate it and the
  ``{dataset: {split: source}}`` it builds. Registering a subclass with :func:`register` makes it a
  subcommand of ``data/build_shards.py``. Adding a dataset is one small class in one file (see
  ``data/datasets/folder.py`` for the generic CSV / folder-tree adapter).
- :class:`FileSource` serves records that are image files on disk, copying their encoded bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from PIL import Image

from reidforge.data.images import MAX_IMAGE_PIXELS, header_problem


@runtime_checkable
class RecordSource(Protocol):
    """One split of one dataset, addressable by position 0..len-1 (the sample's future ``index``).

    ``meta(i)`` must be cheap (no image decoding or rendering): the writer reads every record's meta
    before writing to relabel pids and count cameras. It holds ``pid``, ``camid``, ``viewid`` (None
    when unknown), ``source`` (where the image came from) and any attributes. ``image(i)`` returns
    the encoded bytes exactly as they are to be stored and their extension (``"jpg"`` or ``"png"``).

    A source may also have a ``fingerprint`` string naming whatever its images depend on beyond
    their meta (a renderer version, a config): a resumed build reuses shards only when it matches,
    and a ``problem(i)`` method that says (cheaply, from the file's first bytes) why record ``i``
    cannot be stored, or None: the writer then skips that record and names it in the manifest.
    """

    dataset: str

    def __len__(self) -> int: ...

    def key(self, i: int) -> str: ...

    def meta(self, i: int) -> dict[str, Any]: ...

    def image(self, i: int) -> tuple[bytes, str]: ...


Sources = Mapping[str, Mapping[str, RecordSource]]  # dataset -> split -> source


class DatasetAdapter(ABC):
    """One dataset on disk (or generated): its arguments and its splits.

    Subclasses set ``name`` (the subcommand) and ``summary`` (its ``--help`` line); one that reads a
    dataset from disk sets ``root_help`` (the expected layout), which adds a required ``--root``. They
    may add further arguments in :meth:`add_arguments`, and build their sources in :meth:`sources`. A subclass that sets
    ``config_schema`` (a dataclass) gets ``--config YAML`` and ``key=value`` overrides, loaded into
    ``self.config``. Every check of the input (missing files, wrong layout) happens in
    :meth:`sources`, before any shard is written, and raises a one-line ``DatasetError``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    root_help: ClassVar[str | None] = None
    config_schema: ClassVar[type | None] = None

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config: Any = None
        if self.config_schema is not None:
            from reidforge.shared.config import load_config

            self.config = load_config(self.config_schema, args.config, args.overrides)

    @classmethod
    def dataset_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Every argument that locates and shapes this dataset: ``--root`` (when read from disk), then
        the adapter's own."""
        if cls.root_help is not None:
            parser.add_argument("--root", type=Path, required=True, help=cls.root_help)
        cls.add_arguments(parser)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Arguments beyond the common ones (``--out``, ``--root``, ``--splits``, ``--workers``, ...)."""

    @abstractmethod
    def sources(self) -> Sources: ...


class DatasetError(ValueError):
    """A dataset that is not where or what it should be, described in one line."""


class CountMismatchWarning(UserWarning):
    """A split whose counts differ from the published ones (a partial download, another version)."""


def require(root: Path, *relative: str, dataset: str, layout: str) -> None:
    """Fail in one line when ``root`` lacks any of ``relative``, naming it and the expected layout."""
    if not root.is_dir():
        raise DatasetError(f"{dataset}: --root {root} is not a directory; expected layout: {layout}")
    for rel in relative:
        if not (root / rel).exists():
            raise DatasetError(f"{dataset}: {root / rel} not found; expected layout: {layout}")


def check_counts(dataset: str, split: str, found: Mapping[str, int], published: Mapping[str, int]) -> list[str]:
    """Warn (with both numbers) for every count that differs from the published one; return the warnings."""
    messages = [f"{dataset}/{split}: {name} = {found[name]:,}, published {value:,}"
                for name, value in published.items() if name in found and found[name] != value]
    for message in messages:
        warnings.warn(message, CountMismatchWarning, stacklevel=2)
    return messages


ADAPTERS: dict[str, type[DatasetAdapter]] = {}


def register(cls: type[DatasetAdapter]) -> type[DatasetAdapter]:
    """Class decorator: make ``cls`` available as ``data/build_shards.py <cls.name>``."""
    if cls.name in ADAPTERS and ADAPTERS[cls.name] is not cls:
        raise ValueError(f"dataset adapter name {cls.name!r} is registered twice")
    ADAPTERS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class FileRecord:
    """An image file and its labels. ``key`` must be unique in its split, without dots or slashes."""

    path: Path
    key: str
    pid: int | None
    camid: int | None
    viewid: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


JPEG_SUFFIXES = (".jpg", ".jpeg")


class FileSource:
    """Records that are image files. JPEG and PNG bytes are copied as they are; other formats are
    re-encoded once to JPEG (quality 95). ``source`` in the meta is the path relative to ``root``."""

    def __init__(self, dataset: str, records: Sequence[FileRecord], root: Path):
        self.dataset, self.records, self.root = dataset, list(records), Path(root)
        self._prefix = f"{self.root}{os.sep}"  # string slicing: Path.relative_to costs more than reading a file

    def __len__(self) -> int:
        return len(self.records)

    def key(self, i: int) -> str:
        return self.records[i].key

    def meta(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        source = str(r.path)
        if source.startswith(self._prefix):
            source = source[len(self._prefix):]
        return {"pid": r.pid, "camid": r.camid, "viewid": r.viewid, "source": source, **r.attributes}

    def problem(self, i: int) -> str | None:
        """Why record ``i`` cannot be stored (unreadable, not a regular file, empty, not its suffix's
        format, over the pixel limit), from ``stat`` and its first 64 KiB; None when it can."""
        path = self.records[i].path
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return "not a regular file"
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if path.suffix.lower() not in (*JPEG_SUFFIXES, ".png"):
                with Image.open(path) as image:  # reads the header only
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        return f"image of {image.width}x{image.height} pixels is over the limit"
        except OSError as e:
            return f"cannot read: {e.strerror or e}"
        except (Image.DecompressionBombError, SyntaxError, ValueError) as e:
            return f"not an image PIL can read ({str(e).splitlines()[0]})"
        return header_problem(head, path.suffix)

    def image(self, i: int) -> tuple[bytes, str]:
        path = self.records[i].path
        data = read_file(path)
        suffix = path.suffix.lower()
        if suffix in JPEG_SUFFIXES:
            return data, "jpg"
        if suffix == ".png":
            return data, "png"
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"


def read_file(path: Path) -> bytes:
    """A whole file's bytes: one ``os.read`` of the size ``fstat`` gives (half the cost of ``read_bytes``)."""
    # O_NONBLOCK: opening a FIFO named like an image must not wait for a writer (no effect on files).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        size = info.st_size
        data = os.read(fd, size)
        while len(data) < size:  # a short read (rare on local files)
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise OSError(f"{path}: file shrank while being read")
            data += chunk
        return data
    finally:
        os.close(fd)
