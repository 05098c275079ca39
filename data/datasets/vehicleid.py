"""PKU VehicleID (Liu et al., "Deep relative distance learning: tell the difference between similar
vehicles", CVPR 2016): 26,267 vehicles, no camera labels, test sets of 800 / 1,600 / 2,400 vehicles.

Layout (``--root``)::

    image/<7-digit image id>.jpg
    train_test_split/train_list.txt
    train_test_split/test_list_{800,1600,2400,13164}.txt      one "<image id> <vehicle id>" per line

Splits: ``train`` (train_list.txt) and, for the test list of ``--test-size`` (default 800), ``--draws``
(default 10) random query/gallery partitions ``query_0``/``gallery_0`` ... ``query_{N-1}``/
``gallery_{N-1}``. The protocol: each draw puts one random image of every test vehicle in the gallery
and every other image in the query; results are averaged over the draws. The draws are
:func:`reidforge.shared.metrics.vehicleid_draws` of the test list's vehicle ids (draw ``d`` seeded with
``np.random.default_rng([seed, d])``), the function the metric side uses too, so each depends only on
``--seed``, ``d`` and the list file: the same seed gives the same splits, and ``--draws 3`` gives the
first three of ``--draws 10``. Within a split images keep their list-file order; pid is the raw vehicle
id, keys are the image ids. ``finetune/evaluate.py --protocol vehicleid --query <out>/vehicleid/query_{d}
--gallery <out>/vehicleid/gallery_{d}`` (and ``eval_protocol: vehicleid`` in training) evaluates every
draw and reports the mean and per-draw CMC and mAP.

Counts come from the list files and warn against the paper's (train 110,178 images / 13,134 vehicles;
test 800 / 1,600 / 2,400 vehicles with 7,332 / 12,995 / 20,038 images; test_list_13164 only by its
vehicle count), since copies and loaders disagree (FastReID: 13,164 / 113,346 train).

Deviations from the reference loaders:

* There are no cameras. Query images get camid 0 and gallery images camid 1, so the Market-1501
  same-camera filter (drop gallery items with the query's pid *and* camid) never removes the one true
  match. FastReID sets camid = image id instead, to the same effect; train images get camid 0.
* FastReID draws one partition with an unseeded shuffle; here every draw is seeded and written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reidforge.data.datasets.folder import read_fields
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, check_counts, register, require
from reidforge.shared.metrics import vehicleid_draws

TEST_SIZES = (800, 1600, 2400, 13164)
LAYOUT = ("<root>/image/<image id>.jpg + <root>/train_test_split/{train_list.txt,test_list_{800,1600,2400,13164}.txt} "
          "with '<image id> <vehicle id>' lines")
PUBLISHED = {"train": {"images": 110_178, "ids": 13_134}, 800: {"images": 7_332, "ids": 800},
             1600: {"images": 12_995, "ids": 1_600}, 2400: {"images": 20_038, "ids": 2_400}, 13164: {"ids": 13_164}}
TRAIN_CAMID, QUERY_CAMID, GALLERY_CAMID = 0, 0, 1


def _read_list(path: Path) -> list[tuple[str, int]]:
    """(image id, vehicle id) per line; an image listed twice fails."""
    pairs, seen = [], set()
    for where, fields in read_fields(path):
        if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise DatasetError(f"{where}: expected '<image id> <vehicle id>', got {' '.join(fields)!r}")
        if fields[0] in seen:
            raise DatasetError(f"{where}: image {fields[0]} is listed twice")
        seen.add(fields[0])
        pairs.append((fields[0], int(fields[1])))
    if not pairs:
        raise DatasetError(f"{path}: lists no images")
    return pairs


@register
class VehicleIDAdapter(DatasetAdapter):
    name = "vehicleid"
    summary = "PKU VehicleID (no cameras): train and N seeded query/gallery draws of one test list"
    root_help = f"the VehicleID folder: {LAYOUT}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--test-size", type=int, choices=TEST_SIZES, default=800,
                            help="which test list (default 800)")
        parser.add_argument("--draws", type=int, default=10,
                            help="query/gallery draws, written as query_<d>/gallery_<d> (default 10)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")

    def sources(self) -> Sources:
        root: Path = self.args.root
        size, draws = self.args.test_size, self.args.draws
        train_list, test_list = "train_test_split/train_list.txt", f"train_test_split/test_list_{size}.txt"
        require(root, "image", train_list, test_list, dataset=self.name, layout=LAYOUT)
        if draws < 1 or self.args.seed < 0:
            raise DatasetError(f"{self.name}: --draws must be at least 1 and --seed at least 0, got {draws} and "
                               f"{self.args.seed}")
        image_dir = root / "image"
        on_disk = set(os.listdir(image_dir))
        lists = {}
        for published, list_file in (("train", train_list), (size, test_list)):
            pairs = _read_list(root / list_file)
            missing = [image for image, _ in pairs if f"{image}.jpg" not in on_disk]
            if missing:
                raise DatasetError(f"{self.name}: {image_dir / missing[0]}.jpg not found ({len(missing)} image(s) "
                                   f"of {list_file} missing); expected layout: {LAYOUT}")
            check_counts(self.name, list_file, {"images": len(pairs), "ids": len({pid for _, pid in pairs})},
                         PUBLISHED[published])
            lists[published] = pairs

        def source(pairs: list[tuple[str, int]], camid: int) -> FileSource:
            records = [FileRecord(image_dir / f"{image}.jpg", image, pid, camid) for image, pid in pairs]
            return FileSource(self.name, records, root)

        test = lists[size]
        if len({pid for _, pid in test}) == len(test):
            raise DatasetError(f"{self.name}: every vehicle of {test_list} has one image, so no query is left")
        splits = {"train": source(lists["train"], TRAIN_CAMID)}
        for d, (query, gallery) in enumerate(vehicleid_draws([pid for _, pid in test], draws, self.args.seed)):
            splits[f"query_{d}"] = source([test[i] for i in query], QUERY_CAMID)
            splits[f"gallery_{d}"] = source([test[i] for i in gallery], GALLERY_CAMID)
        return {self.name: splits}
