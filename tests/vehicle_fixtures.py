"""Fixture trees for the vehicle, LUPerson and bring-your-own adapters: the real layouts and file names,
tiny JPEGs, and a way to run an adapter as its subcommand would."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

import reidforge.data.datasets  # noqa: F401  (registers every adapter)
from reidforge.data.source import ADAPTERS, RecordSource, Sources

# A GB2312 comment and attribute, as a Chinese annotation tool would leave them: expat refuses the
# declared encoding, and decoding these bytes as UTF-8 fails.
XML_HEAD = '<?xml version="1.0" encoding="gb2312"?>\n<!-- 车辆重识别 标注文件 -->\n'
XML_NOTE = "北京 交通监控"


@lru_cache(maxsize=None)
def jpeg(seed: int) -> bytes:
    """A distinct 8x8 JPEG per seed."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(seed))
    return path


def write_images(folder: Path, names: Iterable[str]) -> None:
    for seed, name in enumerate(names):
        write_jpeg(folder / name, seed)


def label_xml(path: Path, root_tag: str, items: Sequence[Mapping[str, str]]) -> Path:
    """A VeRi / CityFlow label file, encoded in GB2312 as its header declares."""
    lines = [f'<Item {" ".join(f"{k}={chr(34)}{v}{chr(34)}" for k, v in item.items())} />' for item in items]
    text = (f'{XML_HEAD}<{root_tag} Version="1.0" Note="{XML_NOTE}">\n<Items number="{len(items)}">\n'
            + "\n".join(lines) + f"\n</Items>\n</{root_tag}>\n")
    path.write_bytes(text.encode("gb2312"))
    return path


def veri_item(name: str, color: int, vtype: int) -> dict[str, str]:
    """The label of a VeRi image ``VVVV_cCCC_...``: vehicle and camera as its name says."""
    vid, cam = name.split("_")[:2]
    return {"imageName": name, "vehicleID": vid, "cameraID": cam, "colorID": str(color), "typeID": str(vtype)}


def make_veri(root: Path, train: Mapping[str, tuple[int, int] | None], query: Sequence[str],
              test: Mapping[str, tuple[int, int] | None]) -> Path:
    """A VeRi folder. ``train``/``test`` map image names to (colorID, typeID), or None for an image that
    its label file omits; query images are test images, so test_label.xml labels them."""
    write_images(root / "image_train", train)
    write_images(root / "image_query", query)
    write_images(root / "image_test", test)
    label_xml(root / "train_label.xml", "TrainingImages", [veri_item(n, *a) for n, a in train.items() if a])
    label_xml(root / "test_label.xml", "TestImages", [veri_item(n, *a) for n, a in test.items() if a])
    (root / "list_color.txt").write_text("1 yellow\n2 orange\n3 green\n4 gray\n5 red\n6 blue\n7 white\n"
                                         "8 golden\n9 brown\n10 black\n")
    (root / "list_type.txt").write_text("1 sedan\n2 suv\n3 van\n4 hatchback\n5 mpv\n6 pickup\n7 bus\n"
                                        "8 truck\n9 estate\n")
    return root


def orientation_file(path: Path, folder: str, labels: Mapping[str, int]) -> Path:
    """A keypoint_orient_*.txt: image path, 20 (x, y) keypoints (-1 when unseen), orientation 0-7."""
    points = " ".join(["12 30 -1 -1"] * 10)
    path.write_text("".join(f"VeRi/{folder}/{name} {points} {label}\n" for name, label in labels.items()))
    return path


def make_vehicleid(root: Path, train: Sequence[tuple[int, int]],
                   tests: Mapping[int, Sequence[tuple[int, int]]]) -> Path:
    """A VehicleID folder from (image id, vehicle id) pairs: the images and the list files."""
    split_dir = root / "train_test_split"
    split_dir.mkdir(parents=True)
    lists = {"train_list.txt": train, **{f"test_list_{size}.txt": pairs for size, pairs in tests.items()}}
    for name, pairs in lists.items():
        (split_dir / name).write_text("".join(f"{image:07d} {vid}\n" for image, vid in pairs))
        for image, _ in pairs:
            write_jpeg(root / "image" / f"{image:07d}.jpg", image)
    return root


def make_cityflow(root: Path, train: Mapping[int, tuple[int, int] | None], tracks: Sequence[Sequence[int]],
                  n_query: int, test_tracks: Sequence[Sequence[int]]) -> Path:
    """``root/AIC20_track2/AIC20_ReID``: ``train`` maps image ids to (vehicle id, camera number), or None for
    an image that train_label.xml omits; the test images are those of ``test_tracks``."""
    folder = root / "AIC20_track2" / "AIC20_ReID"
    write_images(folder / "image_train", [f"{i:06d}.jpg" for i in train])
    write_images(folder / "image_query", [f"{i:06d}.jpg" for i in range(1, n_query + 1)])
    write_images(folder / "image_test", [f"{i:06d}.jpg" for track in test_tracks for i in track])
    label_xml(folder / "train_label.xml", "TrainingImages",
              [{"imageName": f"{i:06d}.jpg", "vehicleID": f"{v[0]:04d}", "cameraID": f"c{v[1]:03d}"}
               for i, v in train.items() if v])
    (folder / "train_track_id.txt").write_text("".join(" ".join(map(str, t)) + " \n" for t in tracks))
    (folder / "test_track_id.txt").write_text("".join(" ".join(map(str, t)) + " \n" for t in test_tracks))
    return root


def adapter_sources(name: str, *argv: str) -> Sources:
    """What ``data/build_shards.py <name> *argv`` would write, without writing it."""
    parser = argparse.ArgumentParser()
    ADAPTERS[name].dataset_arguments(parser)
    return ADAPTERS[name](parser.parse_args(list(argv))).sources()


def labels(source: RecordSource) -> list[tuple[str, Any, Any]]:
    """(key, pid, camid) of every record, in order."""
    return [(source.key(i), source.meta(i)["pid"], source.meta(i)["camid"]) for i in range(len(source))]
