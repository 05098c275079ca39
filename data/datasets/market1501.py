"""Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015), and the
Market-style folder parsing that DukeMTMC-reID and CUHK03-NP's Market-format copy share.

Layout handled (ROOT is ``Market-1501-v15.09.15/`` or the folder that contains it; both work)::

    ROOT/bounding_box_train/*.jpg   train   (751 ids, 12,936 images)
    ROOT/query/*.jpg                query   (750 ids, 3,368 images)
    ROOT/bounding_box_test/*.jpg    gallery (750 ids + pid 0, 15,913 images once junk is dropped)
    ROOT/images/*.jpg               the 500k distractor set, read only with --with-distractors

Names ``PPPP_cCsS_FFFFFF_BB.jpg`` are parsed with torchreid's regex ``([-\\d]+)_c(\\d)``; camid = C - 1
(cameras 1-6). As in torchreid and FastReID, pid -1 (junk boxes) is dropped and pid 0 (distractors:
background and bad boxes) stays in the gallery as a negative. Keys are the file stems. Train pids are
relabelled 0..N-1 by the shard writer; query and gallery keep the raw pids.

Deviations from torchreid / FastReID:

* every image file of a folder is listed (``.jpg``, ``.jpeg``, ``.png``: CUHK03-NP's copy is PNG; torchreid
  globs ``*.jpg``), in name order (glob order depends on the filesystem), so indices are reproducible;
* the writer relabels train pids in sorted raw-pid order (torchreid: the iteration order of a set);
* a root without the version folder is accepted silently (torchreid warns that it is deprecated);
* ``--with-distractors`` (torchreid/FastReID ``market1501_500k``): torchreid parses ``images/`` like the
  other folders and keeps each name's pid; here every non-junk image of that folder is stored as pid 0,
  since the set holds no test identity by construction, and keyed ``500k_<stem>`` so that it can never
  collide with a ``bounding_box_test`` key;
* a name that does not match the regex, or a camera out of range, fails in one line naming the file
  (torchreid: an AttributeError or an assert).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from reidforge.data.datasets.folder import check_unique_keys, image_files, key_of
from reidforge.data.source import (DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, check_counts, register,
                         require)

MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")
JUNK_PID = -1
DISTRACTOR_PID = 0
CAMERAS = 6
# Market-style split folders: the gallery is bounding_box_test.
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

VERSION_FOLDER = "Market-1501-v15.09.15"
DISTRACTOR_FOLDER = "images"
LAYOUT = (f"ROOT[/{VERSION_FOLDER}]/{{bounding_box_train,query,bounding_box_test}}/*.jpg "
          f"(+ {DISTRACTOR_FOLDER}/*.jpg with --with-distractors)")
PUBLISHED = {"train": {"images": 12_936, "ids": 751}, "query": {"images": 3_368, "ids": 750},
             "gallery": {"images": 15_913, "ids": 751}}


def find_data_dir(root: Path, folder: str) -> Path:
    """``root/folder`` when it exists (root is its parent), else ``root`` (root is the folder itself)."""
    return root / folder if (root / folder).is_dir() else root


def market_records(folder: Path, *, dataset: str, cameras: int) -> list[FileRecord]:
    """Every image of ``folder`` named ``PID_cCAM...``, in sorted order, without junk (pid -1)."""
    records = []
    for path in image_files(folder):
        match = MARKET_PATTERN.search(path.name)
        if match is None or not re.fullmatch(r"-?\d+", match[1]):
            raise DatasetError(f"{dataset}: {path} is not named PID_cCAM... (regex {MARKET_PATTERN.pattern})")
        pid, camera = int(match[1]), int(match[2])
        if not 1 <= camera <= cameras:
            raise DatasetError(f"{dataset}: {path} has camera {camera}, outside 1-{cameras}")
        if pid == JUNK_PID:
            continue
        records.append(FileRecord(path=path, key=key_of(Path(path.name)), pid=pid, camid=camera - 1))
    return records


def file_source(dataset: str, split: str, records: Sequence[FileRecord], root: Path, where: Path,
                published: Mapping[str, int]) -> FileSource:
    """The checks every split goes through (not empty, unique keys), then a warning for each count that
    differs from the published one. ``where`` names the split's origin (a folder, a list)."""
    if not records:
        raise DatasetError(f"{dataset}/{split}: no images in {where}")
    check_unique_keys(records, f"{dataset}/{split}")
    check_counts(dataset, split, {"images": len(records), "ids": len({r.pid for r in records})}, published)
    return FileSource(dataset, records, root)


def market_style_splits(dataset: str, data_dir: Path, *, cameras: int, layout: str,
                        published: Mapping[str, Mapping[str, int]],
                        extra_gallery: Sequence[FileRecord] = ()) -> dict[str, FileSource]:
    """train/query/gallery from ``bounding_box_train``, ``query`` and ``bounding_box_test`` of ``data_dir``."""
    require(data_dir, *SPLIT_FOLDERS.values(), dataset=dataset, layout=layout)
    records = {split: market_records(data_dir / folder, dataset=dataset, cameras=cameras)
               for split, folder in SPLIT_FOLDERS.items()}
    records["gallery"] += extra_gallery
    return {split: file_source(dataset, split, recs, data_dir, data_dir / SPLIT_FOLDERS[split], published[split])
            for split, recs in records.items()}


@register
class Market1501Adapter(DatasetAdapter):
    name = "market1501"
    summary = ("Market-1501 (Zheng et al. ICCV'15): bounding_box_train, query, bounding_box_test, with or without "
               f"the {VERSION_FOLDER}/ folder; junk (pid -1) dropped, distractors (pid 0) kept in the gallery")
    root_help = f"{VERSION_FOLDER}/ or the folder that contains it"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--with-distractors", action="store_true",
                            help=f"add {DISTRACTOR_FOLDER}/ (the 500k distractor set, torchreid's market1501_500k) "
                                 "to the gallery, every image as pid 0")

    def sources(self) -> Sources:
        data_dir = find_data_dir(self.args.root, VERSION_FOLDER)
        published = dict(PUBLISHED)
        extra: list[FileRecord] = []
        if self.args.with_distractors:
            require(data_dir, *SPLIT_FOLDERS.values(), DISTRACTOR_FOLDER, dataset=self.name, layout=LAYOUT)
            extra = [replace(r, key=f"500k_{r.key}", pid=DISTRACTOR_PID)
                     for r in market_records(data_dir / DISTRACTOR_FOLDER, dataset=self.name, cameras=CAMERAS)]
            published["gallery"] = {"ids": PUBLISHED["gallery"]["ids"]}  # the image count is no longer Market's
        return {self.name: market_style_splits(self.name, data_dir, cameras=CAMERAS, layout=LAYOUT,
                                               published=published, extra_gallery=extra)}
