"""VeRi-776 (Liu et al., "Large-scale vehicle re-identification in urban surveillance videos", ICME 2016):
776 vehicles seen by 20 cameras, evaluated with the Market-1501 protocol.

Layout (``--root``, the folder usually named ``VeRi``)::

    image_train/  image_query/  image_test/   VVVV_cCCC_TTTTTTTT_K.jpg, e.g. 0002_c002_00030600_0.jpg
    train_label.xml  test_label.xml           <Item imageName vehicleID cameraID colorID typeID/>
    list_color.txt  list_type.txt             optional, "<id> <name>" per line (10 colours, 9 types)

Splits: ``train`` (image_train), ``query`` (image_query) and ``gallery`` (image_test). pid is the raw
``vehicleID``; camid maps ``c001``..``c020`` to 0..19. Query images are test images, so their labels
come from ``test_label.xml``. Each sample's json also holds ``color_id`` and ``type_id``, ``color`` and
``type`` (the names, when the list files are there; else None) and ``label_source`` ("xml" or
"filename"). Published: 576 train / 200 test vehicles; 37,778 train, 1,678 query and 11,579 gallery
images; other counts warn with both numbers.

The label files declare ``encoding="gb2312"``, which expat (every ElementTree parser) refuses: they are
decoded here (as GB18030, a superset of GB2312 and GBK) and parsed as text. :func:`read_label_xml`
does this for CityFlow too.

Optional ``--orientation FILE [FILE ...]``: third-party orientation labels (``keypoint_orient_train.txt``
/ ``keypoint_orient_test.txt`` of Wang et al., "Orientation invariant feature embedding", ICCV 2017),
one line per image: ``<image path> x1 y1 ... x20 y20 <orientation>``. Their 8 orientations (0 front,
1 rear, 2 left, 3 left front, 4 left rear, 5 right, 6 right front, 7 right rear) become viewid in this
toolkit's clockwise bins (0 front, 1 front-right, 2 right, 3 rear-right, 4 rear, 5 rear-left, 6 left,
7 front-left; those of ``synthetic_vehicle``). Images they do not list have viewid None.

Deviations from the reference loaders (torchreid, FastReID):

* An image without an entry in its label file (a third-party loader counts about 32) is labelled from
  its name (``([\\d]+)_c(\\d\\d\\d)``, as the reference loaders label every image), has colour and type
  None and ``label_source`` "filename"; each split warns with how many (:class:`FileNameLabelWarning`).
* ``color_id`` / ``type_id`` are 0-based (the XML's 1-based ids minus one), like camids.
* Images are listed in file-name order; ``name_*.txt``, ``gt_index.txt`` and ``jk_index.txt`` are not
  read (the Market-1501 rule, which drops gallery images of the query's vehicle and camera, is what
  ``jk_index`` lists). The 20 keypoints of the orientation files are not kept.
"""

from __future__ import annotations

import argparse
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from reidforge.data.datasets.folder import check_unique_keys, image_files, key_of, read_fields
from reidforge.data.source import DatasetAdapter, DatasetError, FileRecord, FileSource, Sources, check_counts, register, require
from reidforge.data.synthetic import VEHICLE_VIEWS

LAYOUT = ("<root>/{image_train,image_query,image_test}/VVVV_cCCC_*.jpg + train_label.xml + test_label.xml "
          "[+ list_color.txt, list_type.txt]")
FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
LABEL_FILES = {"train": "train_label.xml", "query": "test_label.xml", "gallery": "test_label.xml"}
PUBLISHED = {"train": {"images": 37_778, "ids": 576}, "query": {"images": 1_678, "ids": 200},
             "gallery": {"images": 11_579, "ids": 200}}
FILE_NAME = re.compile(r"([\d]+)_c(\d\d\d)")
# The orientation files' classes, in their order, named as VEHICLE_VIEWS names the bins.
ORIENTATIONS = ("front", "rear", "left", "front_left", "rear_left", "right", "front_right", "rear_right")
ORIENTATION_TO_VIEW = {str(label): VEHICLE_VIEWS.index(name) for label, name in enumerate(ORIENTATIONS)}

_ENCODING = re.compile(rb"\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9_.-]+)[\"']")
_DECLARATION = re.compile(r"\s*<\?xml[^>]*\?>")
# Decode with a superset: GB18030 reads every GB2312 and GBK file, also ones that claim gb2312 wrongly.
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030"}


class FileNameLabelWarning(UserWarning):
    """Images that their label file does not list, labelled from their file names."""


def read_label_xml(path: Path, fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """``imageName -> attributes`` of every ``<Item>`` of a VeRi or CityFlow label file.

    The bytes are decoded with the encoding the XML declaration names and the declaration dropped
    (it no longer describes the text), so expat never sees the multi-byte encoding it refuses. Every
    item must carry ``imageName`` and ``fields``; a missing one or a repeated name fails in one line.
    """
    raw = path.read_bytes()
    declared = _ENCODING.match(raw)
    encoding = declared.group(1).decode().lower() if declared else "utf-8"
    try:
        text = raw.decode(_SUPERSETS.get(encoding, encoding)).lstrip("\ufeff")
    except (LookupError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot decode it as the declared {encoding} ({e})") from None
    try:
        root = ET.fromstring(_DECLARATION.sub("", text, count=1))
    except ET.ParseError as e:
        raise DatasetError(f"{path}: not well-formed XML ({e})") from None
    items: dict[str, dict[str, str]] = {}
    for item in root.iter("Item"):
        missing = [f for f in ("imageName", *fields) if f not in item.attrib]
        if missing:
            raise DatasetError(f"{path}: an <Item> lacks {', '.join(missing)}: {dict(item.attrib)}")
        name = item.attrib["imageName"]
        if name in items:
            raise DatasetError(f"{path}: imageName {name} appears twice")
        items[name] = dict(item.attrib)
    if not items:
        raise DatasetError(f"{path}: no <Item> elements")
    return items


def item_labels(item: dict[str, str], where: str) -> tuple[int, int]:
    """(pid, camid) of a label-file item: the raw ``vehicleID`` and ``cameraID`` "c001" -> 0."""
    camera = re.fullmatch(r"c(\d+)", item["cameraID"])
    if camera is None or int(camera.group(1)) < 1:
        raise DatasetError(f"{where}: cameraID {item['cameraID']!r} is not c001, c002, ...")
    if not item["vehicleID"].isdigit():
        raise DatasetError(f"{where}: vehicleID {item['vehicleID']!r} is not a number")
    return int(item["vehicleID"]), int(camera.group(1)) - 1


def _names(path: Path) -> dict[str, str]:
    """``"<id>" -> name`` from list_color.txt / list_type.txt; empty when the file is absent."""
    if not path.is_file():
        return {}
    names = {}
    for where, fields in read_fields(path):
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(f"{where}: expected '<id> <name>', got {' '.join(fields)!r}")
        names[str(int(fields[0]))] = fields[1].lower()
    return names


def _orientations(files: Sequence[Path]) -> dict[str, int]:
    """Image name -> viewid from the third-party orientation files."""
    views = {}
    for path in files:
        if not path.is_file():
            raise DatasetError(f"veri776: --orientation file {path} not found")
        for where, fields in read_fields(path):
            if len(fields) < 2 or fields[-1] not in ORIENTATION_TO_VIEW:
                raise DatasetError(f"{where}: expected '<image> [keypoints ...] <orientation 0-7>'")
            views[Path(fields[0]).name] = ORIENTATION_TO_VIEW[fields[-1]]
    return views


def _attribute(item: dict[str, str], field: str, names: dict[str, str], list_file: str,
               where: str) -> tuple[int, str | None]:
    """A 1-based XML id as (0-based id, its name in ``list_file``, or None without that file)."""
    raw = item[field]
    if not raw.isdigit() or int(raw) < 1:
        raise DatasetError(f"{where}: {field} {raw!r} is not a 1-based id")
    if names and str(int(raw)) not in names:
        raise DatasetError(f"{where}: {field} {raw} is not in {list_file}")
    return int(raw) - 1, names.get(str(int(raw)))


@register
class VeRi776Adapter(DatasetAdapter):
    name = "veri776"
    summary = "VeRi-776 vehicles (576 train / 200 test ids, 20 cameras): train, query, gallery (= image_test)"
    root_help = f"the VeRi folder: {LAYOUT}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--orientation", type=Path, nargs="+", default=[], metavar="FILE",
                            help="keypoint_orient_*.txt files whose orientation labels give viewid")

    def sources(self) -> Sources:
        root: Path = self.args.root
        require(root, *FOLDERS.values(), *dict.fromkeys(LABEL_FILES.values()), dataset=self.name, layout=LAYOUT)
        views = _orientations(self.args.orientation)
        colors, types = _names(root / "list_color.txt"), _names(root / "list_type.txt")
        fields = ("vehicleID", "cameraID", "colorID", "typeID")
        labels = {name: read_label_xml(root / name, fields) for name in dict.fromkeys(LABEL_FILES.values())}
        splits = {}
        for split, folder in FOLDERS.items():
            label_file = LABEL_FILES[split]
            records, unlisted = [], []
            for path in image_files(root / folder):
                item = labels[label_file].get(path.name)
                if item is None:
                    match = FILE_NAME.match(path.name)
                    if match is None:
                        raise DatasetError(f"{path}: not in {label_file} and not named VVVV_cCCC_*.jpg")
                    unlisted.append(path.name)
                    pid, camid = int(match.group(1)), int(match.group(2)) - 1
                    attributes = {"color_id": None, "color": None, "type_id": None, "type": None,
                                  "label_source": "filename"}
                else:
                    where = f"{root / label_file} ({path.name})"
                    pid, camid = item_labels(item, where)
                    color_id, color = _attribute(item, "colorID", colors, "list_color.txt", where)
                    type_id, type_name = _attribute(item, "typeID", types, "list_type.txt", where)
                    attributes = {"color_id": color_id, "color": color, "type_id": type_id, "type": type_name,
                                  "label_source": "xml"}
                records.append(FileRecord(path, key_of(Path(path.name)), pid, camid, views.get(path.name), attributes))
            if not records:
                raise DatasetError(f"{self.name}: no images in {root / folder}; expected layout: {LAYOUT}")
            check_unique_keys(records, f"{self.name}/{split}")
            if unlisted:
                warnings.warn(f"{self.name}/{split}: {len(unlisted)} image(s) of {folder} are not in {label_file}; "
                              f"labelled from their file names (e.g. {unlisted[0]})", FileNameLabelWarning,
                              stacklevel=2)
            check_counts(self.name, split, {"images": len(records), "ids": len({r.pid for r in records})},
                         PUBLISHED[split])
            splits[split] = FileSource(self.name, records, root)
        return {self.name: splits}
