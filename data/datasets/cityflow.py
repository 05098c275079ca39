"""CityFlow-ReID, the vehicle re-ID track of the AI City Challenge 2020 (Tang et al., "CityFlow: a
city-scale benchmark for multi-target multi-camera vehicle tracking and re-identification", CVPR 2019):
666 vehicles (333 train / 333 test) seen by 40 cameras.

Layout (``--root``: the ``AIC20_ReID`` folder, or a folder that holds ``AIC20_track2/AIC20_ReID`` or
``AIC20_ReID``)::

    image_train/  image_query/  image_test/   <6-digit image id>.jpg, e.g. 000123.jpg
    train_label.xml                           <Item imageName vehicleID cameraID/>, declared gb2312
    train_track_id.txt  test_track_id.txt     one track per line: the integer image ids in it

Identity and camera exist only in ``train_label.xml`` (read by :func:`reidforge.data.datasets.veri776.read_label_xml`,
which decodes the gb2312 that expat refuses): pid is the raw ``vehicleID``, camid maps
``c001``..``c040`` to 0..39. Each sample's json holds ``track_id``, the 0-based line of the image's
track in its track file (None for query images, which belong to no track).

Test labels are withheld (the challenge server scores rank-100 mAP of submissions), so the splits are:

* ``train``: the training vehicles less a validation carve-out of ``--val-ids`` vehicles (default 100,
  as the FNC paper: 233 train / 100 validation), drawn with ``np.random.default_rng(--seed)``;
* ``query`` / ``gallery``: the validation vehicles split Market-1501 style, one random image of every
  (vehicle, camera) in the query and the rest in the gallery (same random stream);
* ``challenge_query`` / ``challenge_gallery``: image_query and image_test in file-name order, with pid
  and camid None, to rank for a submission.

``--val-ids 0`` trains on all 333 vehicles and writes no query/gallery: the only test split is then the
challenge one. ``finetune/evaluate.py --query <out>/cityflow/challenge_query --gallery
<out>/cityflow/challenge_gallery`` (or training with those as ``data.query``/``data.gallery``) finds no
labels there and writes ``track2.txt``, the AI City track-2 submission (one line per query image in
name order, the ids of its 100 nearest test images), instead of metrics; the labelled carve-out
(``query``/``gallery``) is the split to evaluate locally and, as ``data.val_query``/``data.val_gallery``,
the one that selects ``model_best``. Published: 333 train vehicles with 36,935 images, 1,052 query and
18,290 test images; other counts warn with both numbers.

Deviations from the reference loaders and the FNC paper:

* The carve-out is a seeded random draw: the paper does not list its validation vehicles (12,208
  images), and third-party loaders hard-code lists of their own, so image counts differ from theirs.
* A validation vehicle seen by one camera only gives queries without a match in another camera, which
  the Market-1501 evaluation skips.
* A training image missing from ``train_label.xml`` fails the build: nothing else labels it (DMT keeps
  1-based camera ids; they are 0-based here).
* ``name_*.txt`` are not read; images are listed in file-name order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from reidforge.data.datasets.folder import image_files, read_fields
from reidforge.data.datasets.veri776 import item_labels, read_label_xml
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, check_counts, register, require

LAYOUT = ("AIC20_ReID/{image_train,image_query,image_test}/<image id>.jpg + train_label.xml + "
          "train_track_id.txt + test_track_id.txt")
NESTED = ("AIC20_track2/AIC20_ReID", "AIC20_ReID")
PUBLISHED = {"image_train": {"images": 36_935, "ids": 333}, "image_query": {"images": 1_052},
             "image_test": {"images": 18_290}}


def _image_id(path: Path) -> int:
    if not path.stem.isdigit():
        raise DatasetError(f"{path}: not named <image id>.jpg; expected layout: {LAYOUT}")
    return int(path.stem)


def _tracks(path: Path) -> dict[int, int]:
    """Image id -> the 0-based line of its track."""
    track_of: dict[int, int] = {}
    for track, (where, fields) in enumerate(read_fields(path)):
        for field in fields:
            if not field.isdigit():
                raise DatasetError(f"{where}: {field!r} is not an image id")
            if int(field) in track_of:
                raise DatasetError(f"{where}: image {field} is already in track {track_of[int(field)]}")
            track_of[int(field)] = track
    return track_of


def _market_query(records: list[FileRecord], rng: np.random.Generator) -> set[int]:
    """Positions of one random record per (pid, camid), the Market-1501 query rule."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.pid, r.camid), []).append(i)
    return {members[rng.integers(len(members))] for _, members in sorted(groups.items())}


@register
class CityFlowAdapter(DatasetAdapter):
    name = "cityflow"
    summary = ("CityFlow-ReID / AI City 2020 track 2 vehicles: train, a seeded validation carve-out as "
               "query/gallery, and the unlabeled challenge_query/challenge_gallery")
    root_help = f"the AIC20_ReID folder: {LAYOUT}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--val-ids", type=int, default=100,
                            help="training vehicles held out as query/gallery (default 100; 0: none)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the carve-out and query picks (default 0)")

    def sources(self) -> Sources:
        root: Path = next((self.args.root / n for n in NESTED if (self.args.root / n).is_dir()), self.args.root)
        require(root, "image_train", "image_query", "image_test", "train_label.xml", "train_track_id.txt",
                "test_track_id.txt", dataset=self.name, layout=LAYOUT)
        labels = read_label_xml(root / "train_label.xml", ("vehicleID", "cameraID"))
        train_tracks, test_tracks = _tracks(root / "train_track_id.txt"), _tracks(root / "test_track_id.txt")
        records = []
        for path in image_files(root / "image_train"):
            item = labels.get(path.name)
            if item is None:
                raise DatasetError(f"{path}: not in train_label.xml, the only source of its identity and camera")
            pid, camid = item_labels(item, f"{root / 'train_label.xml'} ({path.name})")
            records.append(FileRecord(path, path.stem, pid, camid,
                                      attributes={"track_id": train_tracks.get(_image_id(path))}))
        challenge = {
            split: [FileRecord(path, path.stem, None, None, attributes={"track_id": tracks.get(_image_id(path))})
                    for path in image_files(root / folder)]
            for split, folder, tracks in (("challenge_query", "image_query", {}),
                                          ("challenge_gallery", "image_test", test_tracks))}
        found = {"image_train": records, "image_query": challenge["challenge_query"],
                 "image_test": challenge["challenge_gallery"]}
        for folder, folder_records in found.items():
            if not folder_records:
                raise DatasetError(f"{self.name}: no images in {root / folder}; expected layout: {LAYOUT}")
            counts = {"images": len(folder_records), "ids": len({r.pid for r in folder_records} - {None})}
            check_counts(self.name, folder, counts, PUBLISHED[folder])

        ids = sorted({r.pid for r in records})
        if not 0 <= self.args.val_ids < len(ids):
            raise DatasetError(f"{self.name}: --val-ids must be 0..{len(ids) - 1} (there are {len(ids)} training "
                               f"vehicles), got {self.args.val_ids}")
        rng = np.random.default_rng(self.args.seed)
        held_out = set(rng.choice(ids, self.args.val_ids, replace=False).tolist())
        splits = {"train": [r for r in records if r.pid not in held_out]}
        if held_out:
            validation = [r for r in records if r.pid in held_out]
            query = _market_query(validation, rng)
            splits["query"] = [r for i, r in enumerate(validation) if i in query]
            splits["gallery"] = [r for i, r in enumerate(validation) if i not in query]
            if not splits["gallery"]:
                raise DatasetError(f"{self.name}: the validation vehicles have one image per camera each, which "
                                   "leaves no gallery; change --val-ids or --seed")
        splits.update(challenge)
        return {self.name: {split: FileSource(self.name, split_records, root)
                            for split, split_records in splits.items()}}
