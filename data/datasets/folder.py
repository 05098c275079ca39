"""Bring your own dataset: a CSV of labelled image paths, a folder tree whose names are the labels, or
split folders of Market-1501-named images.
Also the helpers that every file-based adapter shares (listing images, keys from paths, text lists).

Three layouts, chosen by what ``--root`` is and what its split folders hold:

* a CSV file with a header row and the columns ``path,pid,camid`` and optionally ``viewid`` and
  ``split``. ``path`` is relative to the CSV's folder. Empty ``pid``/``camid``/``viewid`` cells mean
  unknown (``None``); rows without a ``split`` column (or with an empty cell) go to ``train``. Every
  other column is kept as a string attribute in each sample's json.
* a folder ``<root>/<split>/<pid>/<camid>/*.jpg`` (also ``.jpeg``/``.png``): ``pid`` and ``camid`` are
  integer folder names, taken as they are (camids 0-based, like every adapter's).
* a folder ``<root>/<split>/*.jpg`` of Market-1501-named files (torchreid's flat
  ``{train,query,gallery}/`` copies), e.g. ``0002_c1s1_000451_03.jpg``: a split folder that holds
  image files directly is read this way. The names are parsed by the Market-1501 adapter's
  ``market_records`` (``data/datasets/market1501.py``, torchreid's regex ``([-\\d]+)_c(\\d)``): pid as
  named, camid = camera - 1, pid -1 (junk) dropped, pid 0 (distractors) kept. Cameras 1-9 are
  accepted (all that ``c(\\d)`` can name: Market-1501 has 6, DukeMTMC-reID 8). A name that does not
  match fails in one line naming the file and the regex; so does a split folder that holds both
  images and sub-folders.

Labels are stored as given: the shard writer relabels ``train`` pids to 0..N-1 and keeps the raw pids
of every other split (``query``/``gallery`` for the Market-1501 evaluation protocol). Keys are the
image paths relative to the CSV's folder (or to the split folder), without the suffix, with ``/`` and
any character other than letters, digits, ``_`` and ``-`` replaced by ``_``; two paths that give the
same key are an error. The dataset is named after ``--name`` (default: the folder's name).

Adding a dataset of your own as a subcommand of ``data/build_shards.py`` takes one small class in a
new file under ``data/datasets/`` (it is registered when the package is imported). For a dataset whose
file names hold the labels, e.g. ``<root>/{train,query,gallery}/<vid>_<cam>_<n>.jpg`` with 1-based
cameras::

    from reidforge.data.source import DatasetAdapter, FileRecord, FileSource, register, require

    LAYOUT = "<root>/{train,query,gallery}/<vid>_<cam>_<n>.jpg"


    @register
    class MyCars(DatasetAdapter):
        name = "mycars"
        summary = f"my vehicle dataset: {LAYOUT}"
        root_help = LAYOUT  # adds a required --root; add_arguments() adds any other option

        def sources(self):
            root = self.args.root
            require(root, "train", "query", "gallery", dataset=self.name, layout=LAYOUT)
            splits = {}
            for split in ("train", "query", "gallery"):
                records = []
                for path in sorted((root / split).glob("*.jpg")):
                    vid, cam, _ = path.stem.split("_")
                    records.append(FileRecord(path, path.stem, pid=int(vid), camid=int(cam) - 1))
                splits[split] = FileSource(self.name, records, root)
            return {self.name: splits}

Then ``python data/build_shards.py mycars --root DIR --out shards``. Check the layout in
``sources()`` and fail with a one-line ``DatasetError`` (``require`` does it for missing paths); call
``check_counts`` with the published figures to warn about partial downloads.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, register
from reidforge.shared.text import printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TREE_LAYOUT = "<root>/<split>/<pid>/<camid>/*.jpg (integer pid and camid folders)"
FLAT_LAYOUT = "<root>/<split>/*.jpg named as Market-1501's (PID_cCAM..., e.g. 0002_c1s1_000451_03.jpg)"
# The most cameras a Market-style name can hold: c(\d) is one digit, cameras 1-9.
FLAT_CAMERAS = 9
CSV_LAYOUT = "a CSV with columns path,pid,camid[,viewid][,split], paths relative to the CSV's folder"
REQUIRED_COLUMNS = ("path", "pid", "camid")
# Meta fields the writer or the sample contract owns; a CSV column may not override them.
RESERVED_COLUMNS = frozenset({"index", "key", "dataset", "source", "raw_pid"})

_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name so that every build lists them alike.

    An entry with an image name that is not a regular file (a FIFO, socket, device or directory, which
    reading would hang on or fail) is named in one line on stderr and skipped.
    """
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if entry.is_file():  # follows symlinks: a link to a regular file is kept
                found.append(folder / entry.name)
            else:
                print(f"skipped {printable(str(folder / entry.name))}: {_kind(folder / entry.name)}, not an image file",
                      file=sys.stderr)
    return sorted(found)


def _kind(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a dangling link"
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def key_of(relative: Path) -> str:
    """A sample key from an image path: its parts without the suffix joined by ``_``, other characters
    than letters, digits, ``_`` and ``-`` replaced by ``_`` (keys may hold no dots or slashes)."""
    return _NOT_KEY.sub("_", "_".join(relative.with_suffix("").parts))


def read_fields(path: Path) -> list[tuple[str, list[str]]]:
    """``("<file>:<line>", fields)`` for every non-blank line of a whitespace-separated text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return [(f"{path}:{n}", line.split()) for n, line in enumerate(lines, 1) if line.strip()]


def check_unique_keys(records: Sequence[FileRecord], where: str) -> None:
    """Fail in one line when two records of one split share a key."""
    seen: dict[str, Path] = {}
    for record in records:
        if record.key in seen:
            raise DatasetError(f"{where}: {seen[record.key]} and {record.path} both give the key {record.key!r}")
        seen[record.key] = record.path


def _label(text: str | None, where: str) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{where}: {text!r} is not an integer label") from None


def _read_csv(path: Path, name: str) -> dict[str, list[FileRecord]]:
    base = path.parent
    splits: dict[str, list[FileRecord]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(f"{name}: {path} lacks the column(s) {', '.join(missing)}; "
                               f"expected layout: {CSV_LAYOUT}")
        reserved = sorted(RESERVED_COLUMNS.intersection(columns))
        if reserved:
            raise DatasetError(f"{name}: {path} has reserved column(s) {', '.join(reserved)}; rename them")
        reader.fieldnames = columns
        extra = [c for c in columns if c not in (*REQUIRED_COLUMNS, "viewid", "split")]
        for row in reader:
            where = f"{path}:{reader.line_num}"
            cell = {c: (row.get(c) or "").strip() for c in columns}  # short rows read as empty cells
            image = base / cell["path"]
            if not cell["path"] or not image.is_file():  # is_file: a FIFO or directory is refused too
                raise DatasetError(f"{where}: image {image} not found (paths are relative to the CSV's folder)")
            record = FileRecord(
                path=image, key=key_of(Path(cell["path"])), pid=_label(cell["pid"], where),
                camid=_label(cell["camid"], where), viewid=_label(cell.get("viewid"), where),
                attributes={c: cell[c] or None for c in extra})
            splits.setdefault(cell.get("split") or "train", []).append(record)
    return splits


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.iterdir())


def _flat_records(split_dir: Path, name: str) -> list[FileRecord]:
    # Imported here: market1501 imports this module's helpers at its top.
    from reidforge.data.datasets.market1501 import market_records

    subfolder = next((p for p in sorted(split_dir.iterdir()) if p.is_dir()), None)
    if subfolder is not None:
        raise DatasetError(f"{name}: {split_dir} holds both images and the folder {subfolder.name}; "
                           f"expected layout: {FLAT_LAYOUT}, or {TREE_LAYOUT}")
    return market_records(split_dir, dataset=name, cameras=FLAT_CAMERAS)


def _tree_records(split_dir: Path, name: str) -> list[FileRecord]:
    records = []
    for pid_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        pid = _label(pid_dir.name, f"{name}: pid folder {pid_dir}")
        for cam_dir in sorted(p for p in pid_dir.iterdir() if p.is_dir()):
            camid = _label(cam_dir.name, f"{name}: camid folder {cam_dir}")
            records += [FileRecord(path, key_of(path.relative_to(split_dir)), pid, camid)
                        for path in image_files(cam_dir)]
    return records


def _read_tree(root: Path, name: str) -> dict[str, list[FileRecord]]:
    splits: dict[str, list[FileRecord]] = {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        flat = _holds_images(split_dir)
        records = _flat_records(split_dir, name) if flat else _tree_records(split_dir, name)
        if not records:
            raise DatasetError(f"{name}: no images under {split_dir}{' but junk (pid -1)' if flat else ''}; "
                               f"expected layout: {TREE_LAYOUT}, or {FLAT_LAYOUT}")
        splits[split_dir.name] = records
    if not splits:
        raise DatasetError(f"{name}: no split folders in {root}; expected layout: {TREE_LAYOUT}, or {FLAT_LAYOUT}")
    return splits


@register
class FolderAdapter(DatasetAdapter):
    name = "folder"
    summary = f"your own dataset: {CSV_LAYOUT}, or a folder {TREE_LAYOUT}, or {FLAT_LAYOUT}"
    root_help = "the CSV file, or the root of the folder tree"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", help="dataset name, the output folder under --out (default: the folder's name)")

    def sources(self) -> Sources:
        root: Path = self.args.root
        if root.is_file():
            records, base = _read_csv(root, self.name), root.parent
        elif root.is_dir():
            records, base = _read_tree(root, self.name), root
        else:
            raise DatasetError(f"{self.name}: --root {root} not found; expected {CSV_LAYOUT}, or {TREE_LAYOUT}, "
                               f"or {FLAT_LAYOUT}")
        dataset = self.args.name or key_of(Path(base.resolve().name))
        for split, split_records in records.items():
            check_unique_keys(split_records, f"{dataset}/{split}")
        return {dataset: {split: FileSource(dataset, split_records, base) for split, split_records in records.items()}}
