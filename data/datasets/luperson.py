"""LUPerson (Fu et al., "Unsupervised pre-training for person re-identification", CVPR 2021): about
4.18M unlabelled person crops from street videos, the pool for self-supervised pre-training.

Four layouts of ``--root``, told apart by what it holds:

1. the released LMDB: ``<root>/lmdb/`` (values are the encoded JPEG bytes) and ``<root>/keys.pkl``,
   either a list of keys (as ``convert_lmdb.py`` writes it) or a dict with ``keys`` and optionally
   ``pids`` / ``vids`` (as the lup_moco and FastReID-fork loaders read it);
2. TransReID-SSL's ``LUP/`` (its README's "Prepare Datasets" tree: ``LUP/images/`` beside
   ``LUP/CFS_list.pkl``; ``main_dino.py`` reads the ranked names from ``LUP/images/``): the images are
   read from ``<root>/images/`` as in layout 3, and ``<root>/CFS_list.pkl`` (or, failing that, a
   ``CFS_list.pkl`` beside ``<root>``), when there and ``--cfs`` is not given, is the CFS ranking (one
   printed line names the ranking file used);
3. a flat folder ``<root>/<key>.jpg`` (TransReID-SSL's ``LUP/images/`` itself);
4. the extracted tree ``<root>/<country>/<city>/<video>/*.jpg``, keyed as ``convert_lmdb.py`` keys it:
   by positions in sorted folder listings (the image number is the file's ordinal in its video
   folder, not its frame).

One split, ``pool``. Keys read ``{country:02d}_{city:02d}_{video:04d}_{img:08d}`` (city within the
country, video within the city). Each sample's json has pid, camid and viewid None, and its provenance:
``country`` and ``city`` as in the key, and ``video``, the video's index over the pool (as in
``synthetic_lup``); these are None for keys of another form. A video is a scene, not a camera. The
``pids`` / ``vids`` of a keys.pkl dict (LUPerson-NL's tracklet pseudo-identities) are kept as the
attributes ``noisy_pid`` / ``vid``, never as labels. Published: 4,180,243 images; other pool sizes
warn with both numbers.

CFS selection (Luo et al., TransReID-SSL): ``--cfs FILE`` (or layout 2's ``CFS_list.pkl``, which an
explicit ``--cfs`` overrides) ranks the pool best first, as the released ``CFS_list.pkl`` (a list of
image names such as ``34_01_0341_00001865.jpg``) or a text file with one key or image name per line.
``--keep F`` (default 0.5) writes the first ``ceil(F * n)`` of the ``n`` ranked images that the pool
holds (0.5 and 0.6 of all 4,180,243 give the released 2,090,122 and 2,508,146). Kept images are
written in pool order, not rank order, so that the LMDB is read front to back; each one's json
holds its 0-based ``cfs_rank``. Pool images that the ranking omits are dropped.

Pickles (keys.pkl, CFS_list.pkl) are read by an unpickler that refuses every global: only plain lists,
dicts, tuples, strings, bytes and numbers load, and anything else (a class, or a call such as
``os.system``) fails in one line before it can run.

The LMDB source opens the environment lazily, once per process (a handle must not cross a fork; the
source itself pickles without one), and copies each value's bytes.

Deviations from the reference loaders:

* nothing is decoded at build time (lup_moco decodes with cv2 and converts to RGB when loading; the
  shard readers decode here);
* keys that the LMDB holds but keys.pkl does not list are not written;
* a city folder holding images directly (the per-city output of ``extract.py``, which the LUPerson
  README calls untested) is refused: ``convert_lmdb.py`` expects video folders, and so does this.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from reidforge.data.datasets.folder import IMAGE_SUFFIXES, image_files, key_of, read_fields
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, check_counts, register, require

DATASET = "luperson"
LAYOUT = ("<root>/lmdb/ + <root>/keys.pkl (the released LMDB), or <root>/images/<key>.jpg [+ <root>/CFS_list.pkl] "
          "(TransReID-SSL's LUP/), or <root>/<key>.jpg (flat), or <root>/<country>/<city>/<video>/*.jpg")
# TransReID-SSL's LUP/ folder (README, "Prepare Datasets"): the images, and the released CFS ranking beside them.
LUP_IMAGES, CFS_LIST = "images", "CFS_list.pkl"
PUBLISHED = {"images": 4_180_243}
KEY = re.compile(r"(\d{2,})_(\d{2,})_(\d{4,})_(\d{8,})")
# Missing values in the per-image int columns (any int, negative ones included, is a value).
MISSING = np.iinfo(np.int64).min
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


class PlainUnpickler(pickle.Unpickler):
    """Loads only what needs no global: lists, dicts, tuples, str, bytes, numbers, None, booleans."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names the global {module}.{name}")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`PlainUnpickler`; a refusal or a corrupt file fails in one line."""
    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f).load()
    except Exception as e:  # a corrupt pickle can raise nearly any exception type
        raise DatasetError(f"{path}: refused to unpickle ({e}); only plain lists/dicts of str, bytes and "
                           "ints are read") from None


def _as_keys(entries: Any, where: Path) -> list[str]:
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, (str, bytes)) for e in entries):
        raise DatasetError(f"{where}: expected a list of keys (str or bytes), got {type(entries).__name__}")
    try:
        return [e.decode() if isinstance(e, bytes) else e for e in entries]
    except UnicodeDecodeError:
        raise DatasetError(f"{where}: holds a key that is not UTF-8 text") from None


def read_keys_pkl(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """The keys of keys.pkl and the int columns it adds (``noisy_pid``, ``vid``), from either format."""
    content = load_plain_pickle(path)
    if not isinstance(content, dict):
        content = {"keys": content}
    if "keys" not in content:
        raise DatasetError(f"{path}: a dict without 'keys' (it has {', '.join(map(str, content))})")
    keys = _as_keys(content["keys"], path)
    if not keys:
        raise DatasetError(f"{path}: lists no keys")
    columns = {}
    for field, column in (("pids", "noisy_pid"), ("vids", "vid")):
        if field in content:
            values = content[field]
            if (not isinstance(values, (list, tuple)) or len(values) != len(keys)
                    or not all(isinstance(v, int) for v in values)):
                raise DatasetError(f"{path}: '{field}' must be a list of {len(keys)} ints, one per key")
            columns[column] = list(values)
    return keys, columns


def read_ranking(path: Path) -> list[str]:
    """The keys of a CFS ranking, best first: a pickled list of image names, or one name per line."""
    if not path.is_file():
        raise DatasetError(f"{DATASET}: --cfs file {path} not found")
    if path.suffix == ".pkl":
        names = _as_keys(load_plain_pickle(path), path)
    else:
        lines = read_fields(path)
        bad = next((where for where, fields in lines if len(fields) != 1), None)
        if bad is not None:
            raise DatasetError(f"{bad}: expected one key or image name per line")
        names = [fields[0] for _, fields in lines]
    # Names are image files relative to LUP/images/; keys are their stems.
    return [Path(n).stem if Path(n).suffix.lower() in IMAGE_SUFFIXES else Path(n).name for n in names]


def cfs_selection(keys: Sequence[str], ranking: Sequence[str], keep: float,
                  where: Path) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the pool of the kept images, in pool order; their 0-based CFS ranks)."""
    if len(set(ranking)) != len(ranking):
        raise DatasetError(f"{where}: ranks some image more than once")
    position = {k: i for i, k in enumerate(keys)}
    ranked = np.array([position[k] for k in ranking if k in position], np.int64)
    if len(ranked) == 0:
        raise DatasetError(f"{where}: ranks none of the {len(keys):,} pool images (keys such as {keys[0]!r})")
    if len(ranked) < len(ranking):
        warnings.warn(f"{DATASET}: {len(ranking) - len(ranked):,} of the {len(ranking):,} images ranked in {where} "
                      "are not in the pool", stacklevel=2)
    # Rounded first: 0.3 * 10 is 3.0000000000000004 in floating point, whose ceiling would keep 4.
    kept = ranked[:math.ceil(round(keep * len(ranked), 6))]
    order = np.argsort(kept)
    return kept[order], order


def provenance(keys: Sequence[str]) -> dict[str, np.ndarray]:
    """``country``, ``city`` and ``video`` (the video's index over these keys) per key; MISSING where a
    key is not ``{country}_{city}_{video}_{img}``."""
    triples = np.full((len(keys), 3), MISSING, np.int64)
    for i, key in enumerate(keys):
        match = KEY.fullmatch(key)
        if match:
            triples[i] = int(match[1]), int(match[2]), int(match[3])
    video = np.full(len(keys), MISSING, np.int64)
    parsed = triples[:, 0] != MISSING
    if parsed.any():
        video[parsed] = np.unique(triples[parsed], axis=0, return_inverse=True)[1].ravel()
    return {"country": triples[:, 0], "city": triples[:, 1], "video": video}


def _row(columns: dict[str, np.ndarray], i: int) -> dict[str, int | None]:
    return {name: None if column[i] == MISSING else int(column[i]) for name, column in columns.items()}


def _image_ext(data: bytes) -> str | None:
    return "jpg" if data.startswith(JPEG_MAGIC) else "png" if data.startswith(PNG_MAGIC) else None


# One handle per LMDB and process: py-lmdb refuses to open the same files twice in a process, and a
# handle inherited through a fork must not be used, so the child closes its copy and opens its own.
_HANDLES: dict[str, tuple[int, lmdb.Environment]] = {}


def open_lmdb(path: Path) -> lmdb.Environment:
    """This process's read-only handle on the LMDB at ``path``, opened on first use."""
    name = str(path.resolve())
    owner, env = _HANDLES.get(name, (os.getpid(), None))
    if env is not None and owner == os.getpid():
        return env
    if env is not None:
        env.close()
    try:
        env = lmdb.open(name, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as e:
        raise DatasetError(f"{path}: cannot open the LMDB ({e}); expected layout: {LAYOUT}") from None
    _HANDLES[name] = (os.getpid(), env)
    return env


class LmdbSource:
    """The pool in an LMDB whose values are encoded images, copied as they are.

    It holds only the path, the keys and the attribute columns, so it pickles small; the LMDB is
    opened on the first ``image`` call in each process (:func:`open_lmdb`), worker processes included.
    """

    dataset = DATASET

    def __init__(self, path: Path, keys: Sequence[str], columns: dict[str, np.ndarray]):
        self.path = path
        self.keys = np.array([k.encode() for k in keys])  # fixed-width bytes: compact for millions of keys
        self.columns = columns

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def meta(self, i: int) -> dict[str, Any]:
        return {"pid": None, "camid": None, "viewid": None, "source": f"lmdb:{self.key(i)}", **_row(self.columns, i)}

    def image(self, i: int) -> tuple[bytes, str]:
        with open_lmdb(self.path).begin() as txn:
            data = txn.get(bytes(self.keys[i]))
        if data is None:
            raise DatasetError(f"{self.path}: key {self.key(i)} not found")
        ext = _image_ext(data)
        if ext is None:
            raise DatasetError(f"{self.path}: the value of key {self.key(i)} is neither a JPEG nor a PNG")
        return data, ext


def _check_lmdb(path: Path, keys: Sequence[str]) -> None:
    """Fail in one line unless the LMDB opens and holds every key (reads keys only, not images)."""
    with open_lmdb(path).begin() as txn:
        stored = set(txn.cursor().iternext(keys=True, values=False))
    missing = [k for k in keys if k.encode() not in stored]
    if missing:
        raise DatasetError(f"{path}: {len(missing):,} key(s) of keys.pkl are not in the LMDB, e.g. {missing[0]!r}")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _tree(root: Path) -> tuple[list[str], list[Path]]:
    """Keys and paths of ``<root>/<country>/<city>/<video>/*.jpg``, keyed as convert_lmdb.py keys them."""
    keys, paths = [], []
    for c, country in enumerate(_subdirs(root)):
        for t, city in enumerate(_subdirs(country)):
            if image_files(city):
                raise DatasetError(f"{DATASET}: images directly in {city} (extract.py's per-city output); "
                                   f"expected layout: {LAYOUT}")
            for v, video in enumerate(_subdirs(city)):
                for i, path in enumerate(image_files(video)):
                    keys.append(f"{c:02d}_{t:02d}_{v:04d}_{i:08d}")
                    paths.append(path)
    return keys, paths


def _check_keys(keys: Sequence[str], where: Path) -> None:
    bad = next((k for k in keys if not k or "." in k or "/" in k), None)
    if bad is not None:
        raise DatasetError(f"{where}: key {bad!r} is empty or holds a dot or slash")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        raise DatasetError(f"{where}: key {next(k for k in keys if k in seen or seen.add(k))!r} appears twice")


@register
class LUPersonAdapter(DatasetAdapter):
    name = DATASET
    summary = ("LUPerson, unlabelled (LMDB + keys.pkl, TransReID-SSL's LUP/ with images/ and CFS_list.pkl, a flat "
               "folder or country/city/video folders), optionally CFS-filtered")
    root_help = f"the LUPerson folder: {LAYOUT}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cfs", type=Path, metavar="FILE",
                            help="CFS ranking, best first: CFS_list.pkl or a text file with one key per line "
                                 f"(default: <root>/{CFS_LIST} when <root>/{LUP_IMAGES}/ holds the images)")
        parser.add_argument("--keep", type=float, metavar="F",
                            help="with a CFS ranking: the fraction of the ranked images to write (default 0.5)")

    def sources(self) -> Sources:
        root: Path = self.args.root
        require(root, dataset=self.name, layout=LAYOUT)
        lmdb_layout = (root / "keys.pkl").exists() or (root / "lmdb").exists()
        images = root if lmdb_layout or not (root / LUP_IMAGES).is_dir() else root / LUP_IMAGES
        cfs = self.args.cfs
        if cfs is None and images != root:  # in LUP/ as TransReID-SSL's README has it, or beside LUP/
            cfs = next((p for p in (root / CFS_LIST, root.parent / CFS_LIST) if p.is_file()), None)
        keep = 0.5 if self.args.keep is None else self.args.keep
        if self.args.keep is not None and cfs is None:
            raise DatasetError(f"{self.name}: --keep needs --cfs (the ranking to keep the best of), "
                               f"or {CFS_LIST} beside {LUP_IMAGES}/ in --root")
        if not 0 < keep <= 1:
            raise DatasetError(f"{self.name}: --keep must be in (0, 1], got {keep}")
        paths: list[Path] | None = None  # None: the LMDB layout
        if lmdb_layout:
            require(root, "keys.pkl", "lmdb/data.mdb", dataset=self.name, layout=LAYOUT)
            keys, extra = read_keys_pkl(root / "keys.pkl")
            _check_keys(keys, root / "keys.pkl")
            _check_lmdb(root / "lmdb", keys)
        else:
            extra = {}
            paths = image_files(images)
            keys = [key_of(Path(p.name)) for p in paths]
            if not paths and images == root:
                keys, paths = _tree(root)
            if not paths:
                raise DatasetError(f"{self.name}: no images under {images}; expected layout: {LAYOUT}")
            _check_keys(keys, images)
        check_counts(self.name, "pool", {"images": len(keys)}, PUBLISHED)

        chosen = np.arange(len(keys))
        columns = {name: np.asarray(values, np.int64) for name, values in extra.items()}
        if cfs is not None:
            print(f"{self.name}: CFS ranking {cfs} ({'--cfs' if cfs == self.args.cfs else f'found with --root {root}'})")
            chosen, ranks = cfs_selection(keys, read_ranking(cfs), keep, cfs)
            columns = {name: values[chosen] for name, values in columns.items()}
            columns["cfs_rank"] = ranks
        keys = [keys[i] for i in chosen]
        columns = {**provenance(keys), **columns}
        if paths is None:
            return {DATASET: {"pool": LmdbSource(root / "lmdb", keys, columns)}}
        records = [FileRecord(paths[j], key, None, None, attributes=_row(columns, i))
                   for i, (j, key) in enumerate(zip(chosen, keys))]
        # Sources relative to the images' folder: --root LUP and --root LUP/images write the same shards.
        return {DATASET: {"pool": FileSource(DATASET, records, images)}}
