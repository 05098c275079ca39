"""The vehicle adapters (VeRi-776, VehicleID, CityFlow-ReID) and the bring-your-own adapter, on fixture
trees with the real layouts, names and traps."""

from __future__ import annotations

import argparse
import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vehicle_fixtures import (adapter_sources, labels, make_cityflow, make_vehicleid, make_veri, orientation_file,
                              write_jpeg)

import reidforge.data.datasets.folder as folder_module
import reidforge.data.source
from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.datasets.veri776 import FileNameLabelWarning, read_label_xml
from reidforge.data.readers import IndexedShards
from reidforge.data.shards import load_index, load_manifest
from reidforge.data.source import CountMismatchWarning, DatasetError
from reidforge.shared.metrics import vehicleid_draws

# Tiny fixtures never have the published counts; the tests that check those warnings record them anyway.
pytestmark = pytest.mark.filterwarnings("ignore::reidforge.data.source.CountMismatchWarning")

VERI_TRAIN = {"0001_c001_00016450_0.jpg": (1, 4), "0001_c002_00016460_0.jpg": (1, 4),
              "0003_c002_00020110_0.jpg": (10, 1), "0003_c004_00020500_0.jpg": (10, 1),
              "0007_c005_00040000_0.jpg": None}  # not in train_label.xml
VERI_QUERY = ["0002_c002_00030600_0.jpg", "0005_c020_00086000_0.jpg"]
VERI_TEST = {"0002_c002_00030600_0.jpg": (5, 2), "0002_c003_00031000_0.jpg": (5, 2),
             "0005_c011_00087000_0.jpg": (7, 9), "0005_c012_00088000_0.jpg": None,
             "0005_c020_00086000_0.jpg": (7, 9)}


@pytest.fixture
def veri(tmp_path: Path) -> Path:
    return make_veri(tmp_path / "VeRi", VERI_TRAIN, VERI_QUERY, VERI_TEST)


def test_gb2312_label_file_is_decoded_not_refused(veri: Path) -> None:
    raw = (veri / "train_label.xml").read_bytes()
    with pytest.raises(ValueError, match="multi-byte encodings are not supported"):
        ET.fromstring(raw)  # the trap: expat refuses the declared encoding
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # and the Chinese comment is not UTF-8
    items = read_label_xml(veri / "train_label.xml", ("vehicleID", "cameraID", "colorID", "typeID"))
    assert list(items) == [n for n, a in VERI_TRAIN.items() if a]
    assert items["0003_c002_00020110_0.jpg"] == {"imageName": "0003_c002_00020110_0.jpg", "vehicleID": "0003",
                                                  "cameraID": "c002", "colorID": "10", "typeID": "1"}


def test_veri_labels_attributes_views_and_file_name_fallback(veri: Path) -> None:
    orient = [orientation_file(veri / "keypoint_orient_train.txt", "image_train",
                               {"0001_c001_00016450_0.jpg": 3, "0003_c002_00020110_0.jpg": 1}),
              orientation_file(veri / "keypoint_orient_test.txt", "image_test", {"0002_c002_00030600_0.jpg": 6})]
    with pytest.warns(UserWarning) as caught:
        splits = adapter_sources("veri776", "--root", str(veri), "--orientation", *map(str, orient))["veri776"]
    messages = [str(w.message) for w in caught]
    assert ("veri776/train: 1 image(s) of image_train are not in train_label.xml; labelled from their file names "
            "(e.g. 0007_c005_00040000_0.jpg)") in messages
    assert any("veri776/gallery: 1 image(s) of image_test" in m for m in messages)
    assert {w.category for w in caught} == {FileNameLabelWarning, CountMismatchWarning}
    assert "veri776/train: images = 5, published 37,778" in messages
    assert "veri776/query: ids = 2, published 200" in messages

    assert list(splits) == ["train", "query", "gallery"]
    assert labels(splits["train"]) == [("0001_c001_00016450_0", 1, 0), ("0001_c002_00016460_0", 1, 1),
                                       ("0003_c002_00020110_0", 3, 1), ("0003_c004_00020500_0", 3, 3),
                                       ("0007_c005_00040000_0", 7, 4)]
    assert labels(splits["query"]) == [("0002_c002_00030600_0", 2, 1), ("0005_c020_00086000_0", 5, 19)]
    assert labels(splits["gallery"]) == [("0002_c002_00030600_0", 2, 1), ("0002_c003_00031000_0", 2, 2),
                                         ("0005_c011_00087000_0", 5, 10), ("0005_c012_00088000_0", 5, 11),
                                         ("0005_c020_00086000_0", 5, 19)]
    train = splits["train"]
    assert train.meta(2) == {"pid": 3, "camid": 1, "viewid": 4, "source": "image_train/0003_c002_00020110_0.jpg",
                             "color_id": 9, "color": "black", "type_id": 0, "type": "sedan", "label_source": "xml"}
    assert train.meta(0)["viewid"] == 7 and train.meta(1)["viewid"] is None  # left front -> front-left bin
    assert {k: train.meta(4)[k] for k in ("color_id", "color", "type_id", "label_source")} == {
        "color_id": None, "color": None, "type_id": None, "label_source": "filename"}
    query = splits["query"]
    assert (query.meta(0)["viewid"], query.meta(0)["color"], query.meta(0)["type"]) == (1, "red", "suv")
    assert (query.meta(1)["color_id"], query.meta(1)["type_id"], query.meta(1)["type"]) == (6, 8, "estate")


def test_veri_build_end_to_end(veri: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with pytest.warns(UserWarning):
        assert build_shards_main(["veri776", "--root", str(veri), "--out", str(out), "--no-progress",
                                  "--samples-per-shard", "2", "--workers", "2"]) == 0
    train = load_manifest(out / "veri776" / "train")
    assert (train["status"], train["num_samples"], train["num_pids"]) == ("complete", 5, 3)
    assert train["cameras"] == [0, 1, 3, 4]
    assert train["pid_map"] == {"1": 0, "3": 1, "7": 2} and len(train["shards"]) == 3
    index = load_index(out / "veri776" / "train")
    assert index["pid"].tolist() == [0, 0, 1, 1, 2] and index["camid"].tolist() == [0, 1, 1, 3, 4]
    gallery = load_index(out / "veri776" / "gallery")
    assert gallery["pid"].tolist() == [2, 2, 5, 5, 5] and gallery["camid"].tolist() == [1, 2, 10, 11, 19]
    assert load_manifest(out / "veri776" / "query")["pid_map"] == {}  # raw pids
    shards = IndexedShards(out / "veri776" / "gallery")
    image, meta = shards.read_bytes(3)
    assert image == (veri / "image_test" / "0005_c012_00088000_0.jpg").read_bytes()  # bytes copied as they are
    assert json.loads(meta)["label_source"] == "filename" and json.loads(meta)["key"] == "0005_c012_00088000_0"


def test_veri_bad_input_fails_in_one_line(veri: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "not_veri"
    wrong.mkdir()
    assert build_shards_main(["veri776", "--root", str(wrong), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{wrong / 'image_train'} not found" in err and "expected layout" in err
    (veri / "list_color.txt").write_text("1 yellow\n")
    with pytest.raises(DatasetError, match=r"\(0003_c002_00020110_0.jpg\): colorID 10 is not in list_color.txt"):
        adapter_sources("veri776", "--root", str(veri))
    (veri / "list_color.txt").unlink()
    bad = orientation_file(veri / "orient.txt", "image_train", {"0001_c001_00016450_0.jpg": 8})
    with pytest.raises(DatasetError, match=r"orient.txt:1: expected .*<orientation 0-7>"):
        adapter_sources("veri776", "--root", str(veri), "--orientation", str(bad))
    write_jpeg(veri / "image_train" / "stray.jpg")
    with pytest.raises(DatasetError, match=r"stray.jpg: not in train_label.xml and not named VVVV_cCCC"):
        adapter_sources("veri776", "--root", str(veri))
    (veri / "train_label.xml").write_bytes(b'<?xml version="1.0" encoding="gb2312"?>\n<TrainingImages><Items>')
    with pytest.raises(DatasetError, match=r"train_label.xml: not well-formed XML"):
        adapter_sources("veri776", "--root", str(veri))


# VehicleID: (image id, vehicle id). Test vehicles have 3, 2, 1 and 4 images.
VID_TRAIN = [(1, 10), (2, 10), (3, 11), (4, 12)]
VID_TEST = [(11, 20), (12, 20), (13, 20), (14, 21), (15, 21), (16, 22), (17, 23), (18, 23), (19, 23), (20, 23)]


@pytest.fixture
def vehicleid(tmp_path: Path) -> Path:
    return make_vehicleid(tmp_path / "VehicleID", VID_TRAIN, {800: VID_TEST, 1600: VID_TEST[:5]})


def _draws(root: Path, *argv: str) -> dict[str, list[tuple[str, int, int]]]:
    with pytest.warns(CountMismatchWarning):
        splits = adapter_sources("vehicleid", "--root", str(root), *argv)["vehicleid"]
    return {split: labels(source) for split, source in splits.items()}


def test_vehicleid_seeded_draws(vehicleid: Path) -> None:
    with pytest.warns(CountMismatchWarning) as caught:
        adapter_sources("vehicleid", "--root", str(vehicleid))
    assert [str(w.message) for w in caught] == [
        "vehicleid/train_test_split/train_list.txt: images = 4, published 110,178",
        "vehicleid/train_test_split/train_list.txt: ids = 3, published 13,134",
        "vehicleid/train_test_split/test_list_800.txt: images = 10, published 7,332",
        "vehicleid/train_test_split/test_list_800.txt: ids = 4, published 800"]

    splits = _draws(vehicleid, "--draws", "3", "--seed", "7")
    assert list(splits) == ["train", "query_0", "gallery_0", "query_1", "gallery_1", "query_2", "gallery_2"]
    assert splits["train"] == [("0000001", 10, 0), ("0000002", 10, 0), ("0000003", 11, 0), ("0000004", 12, 0)]
    test = {(f"{image:07d}", vid) for image, vid in VID_TEST}
    for d in range(3):
        query, gallery = splits[f"query_{d}"], splits[f"gallery_{d}"]
        assert sorted(pid for _, pid, _ in gallery) == [20, 21, 22, 23]  # every test vehicle exactly once
        assert len(query) == 6 and {c for *_, c in query} == {0} and {c for *_, c in gallery} == {1}
        assert {(k, p) for k, p, _ in query + gallery} == test and not {k for k, *_ in query} & {k for k, *_ in gallery}
        assert ("0000016", 22, 0) not in query  # a single-image vehicle is only a gallery image
    assert len({tuple(splits[f"gallery_{d}"]) for d in range(3)}) > 1  # draws differ
    assert _draws(vehicleid, "--draws", "3", "--seed", "7") == splits  # same seed, same splits
    assert _draws(vehicleid, "--draws", "2", "--seed", "7") == {k: v for k, v in splits.items() if not k.endswith("2")}
    other = _draws(vehicleid, "--draws", "3", "--seed", "8")
    assert [other[f"gallery_{d}"] for d in range(3)] != [splits[f"gallery_{d}"] for d in range(3)]
    # the builder's draws are the metric's: reidforge.shared.metrics.vehicleid_draws over the test list's vehicle ids
    for d, (q, g) in enumerate(vehicleid_draws([vid for _, vid in VID_TEST], 3, seed=7)):
        for split, rows in ((f"query_{d}", q), (f"gallery_{d}", g)):
            assert [(k, p) for k, p, _ in splits[split]] == [(f"{VID_TEST[i][0]:07d}", VID_TEST[i][1]) for i in rows]
    small = _draws(vehicleid, "--test-size", "1600", "--draws", "1")
    assert sorted(k for k, *_ in small["query_0"] + small["gallery_0"]) == [f"{i:07d}" for i in range(11, 16)]


def test_vehicleid_bad_input(vehicleid: Path) -> None:
    with pytest.raises(DatasetError, match=r"test_list_2400.txt not found; expected layout: .*<image id> <vehicle id>"):
        adapter_sources("vehicleid", "--root", str(vehicleid), "--test-size", "2400")
    (vehicleid / "image" / "0000013.jpg").unlink()
    with pytest.raises(DatasetError, match=r"0000013.jpg not found \(1 image\(s\) of .*test_list_800.txt missing\)"):
        adapter_sources("vehicleid", "--root", str(vehicleid))
    (vehicleid / "train_test_split" / "train_list.txt").write_text("0000001 10\n0000002\n")
    with pytest.raises(DatasetError, match=r"train_list.txt:2: expected '<image id> <vehicle id>'"):
        adapter_sources("vehicleid", "--root", str(vehicleid))


# CityFlow: 6 vehicles with 4 images each, 2 per camera; one track per (vehicle, camera).
CF_VEHICLES = {1: (1, 2), 2: (2, 3), 5: (3, 40), 10: (5, 6), 11: (6, 7), 12: (7, 8)}
CF_TRAIN = {4 * k + j + 1: (vid, cams[j // 2]) for k, (vid, cams) in enumerate(CF_VEHICLES.items()) for j in range(4)}
CF_TRACKS = [[i, i + 1] for i in range(1, 25, 2)]
CF_TEST_TRACKS = [[1, 2, 3], [4, 5], [6]]


@pytest.fixture
def cityflow(tmp_path: Path) -> Path:
    return make_cityflow(tmp_path / "cityflow", CF_TRAIN, CF_TRACKS, 3, CF_TEST_TRACKS)


def _cityflow(root: Path, *argv: str) -> dict:
    with pytest.warns(CountMismatchWarning):
        return adapter_sources("cityflow", "--root", str(root), *argv)["cityflow"]


def test_cityflow_carve_out_and_challenge_splits(cityflow: Path) -> None:
    with pytest.warns(CountMismatchWarning) as caught:
        splits = adapter_sources("cityflow", "--root", str(cityflow), "--val-ids", "2")["cityflow"]
    assert [str(w.message) for w in caught] == ["cityflow/image_train: images = 24, published 36,935",
                                                "cityflow/image_train: ids = 6, published 333",
                                                "cityflow/image_query: images = 3, published 1,052",
                                                "cityflow/image_test: images = 6, published 18,290"]
    assert list(splits) == ["train", "query", "gallery", "challenge_query", "challenge_gallery"]
    train, query, gallery = (labels(splits[s]) for s in ("train", "query", "gallery"))
    train_ids, val_ids = {p for _, p, _ in train}, {p for _, p, _ in query}
    assert len(train_ids) == 4 and len(val_ids) == 2 and train_ids | val_ids == set(CF_VEHICLES)
    assert {p for _, p, _ in gallery} == val_ids and not train_ids & val_ids
    assert (len(train), len(query), len(gallery)) == (16, 4, 4)
    assert sorted((p, c) for _, p, c in query) == sorted((v, c - 1) for v in val_ids for c in CF_VEHICLES[v])
    expected = {f"{i:06d}": (vid, cam - 1) for i, (vid, cam) in CF_TRAIN.items()}
    assert all(expected[k] == (p, c) for k, p, c in train + query + gallery)
    assert expected["000012"] == (5, 39)  # c040 -> 39
    assert splits["train"].meta(0)["track_id"] == 0 and splits["train"].meta(3)["track_id"] == 1
    assert labels(splits["challenge_query"]) == [("000001", None, None), ("000002", None, None), ("000003", None, None)]
    gallery_tracks = [splits["challenge_gallery"].meta(i)["track_id"] for i in range(6)]
    assert gallery_tracks == [0, 0, 0, 1, 1, 2] and splits["challenge_query"].meta(0)["track_id"] is None

    assert labels(_cityflow(cityflow, "--val-ids", "2")["query"]) == query  # seeded
    carve_outs = {frozenset(p for _, p, _ in labels(_cityflow(cityflow, "--val-ids", "2", "--seed", str(s))["query"]))
                  for s in range(6)}
    assert len(carve_outs) > 1
    everything = _cityflow(cityflow, "--val-ids", "0")
    assert list(everything) == ["train", "challenge_query", "challenge_gallery"] and len(everything["train"]) == 24


def test_cityflow_bad_input(cityflow: Path) -> None:
    with pytest.raises(DatasetError, match=r"--val-ids must be 0..5 \(there are 6 training vehicles\), got 100"):
        _cityflow(cityflow)
    data = cityflow / "AIC20_track2" / "AIC20_ReID"
    write_jpeg(data / "image_train" / "000099.jpg")
    with pytest.raises(DatasetError, match=r"000099.jpg: not in train_label.xml"):
        adapter_sources("cityflow", "--root", str(data), "--val-ids", "2")  # AIC20_ReID itself is a valid root too
    (data / "test_track_id.txt").unlink()
    with pytest.raises(DatasetError, match=r"test_track_id.txt not found; expected layout: AIC20_ReID/"):
        adapter_sources("cityflow", "--root", str(cityflow))


def test_folder_adapter_csv_and_tree(tmp_path: Path) -> None:
    base = tmp_path / "mycars"
    for name in ("imgs/a.jpg", "imgs/b.v2.jpg", "q/c.jpg", "g/d.jpg", "g/e.png"):
        write_jpeg(base / name)
    (base / "labels.csv").write_text("path,pid,camid,viewid,split,color\n"
                                     "imgs/a.jpg,4,0,,train,red\nimgs/b.v2.jpg,9,1,2,train,\n"
                                     "q/c.jpg,5,0,,query,blue\ng/d.jpg,5,1,,gallery,blue\ng/e.png,,,,gallery,\n")
    splits = adapter_sources("folder", "--root", str(base / "labels.csv"))["mycars"]
    assert {s: labels(src) for s, src in splits.items()} == {
        "train": [("imgs_a", 4, 0), ("imgs_b_v2", 9, 1)], "query": [("q_c", 5, 0)],
        "gallery": [("g_d", 5, 1), ("g_e", None, None)]}
    assert splits["train"].meta(1) == {"pid": 9, "camid": 1, "viewid": 2, "source": "imgs/b.v2.jpg", "color": None}
    assert splits["gallery"].image(1)[1] == "png"

    tree = tmp_path / "tree"
    for name in ("train/0001/0/x.jpg", "train/0001/2/y.jpg", "train/0042/1/z.jpg", "query/7/0/q.jpg",
                 "gallery/7/1/g.jpg", "gallery/0/3/junk.jpg"):
        write_jpeg(tree / name)
    splits = adapter_sources("folder", "--root", str(tree), "--name", "cars")["cars"]
    assert {s: labels(src) for s, src in splits.items()} == {
        "gallery": [("0_3_junk", 0, 3), ("7_1_g", 7, 1)], "query": [("7_0_q", 7, 0)],
        "train": [("0001_0_x", 1, 0), ("0001_2_y", 1, 2), ("0042_1_z", 42, 1)]}

    (base / "bad.csv").write_text("path,pid\nimgs/a.jpg,1\n")
    with pytest.raises(DatasetError, match=r"bad.csv lacks the column\(s\) camid; expected layout: a CSV"):
        adapter_sources("folder", "--root", str(base / "bad.csv"))
    (base / "bad.csv").write_text("path,pid,camid\nimgs/a.jpg,1,0\nimgs/nope.jpg,1,0\n")
    with pytest.raises(DatasetError, match=r"bad.csv:3: image .*nope.jpg not found"):
        adapter_sources("folder", "--root", str(base / "bad.csv"))
    write_jpeg(tree / "train" / "car7" / "0" / "w.jpg")
    with pytest.raises(DatasetError, match=r"pid folder .*car7: 'car7' is not an integer label"):
        adapter_sources("folder", "--root", str(tree))


def test_folder_docstring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "add your own dataset" example in data/datasets/folder.py works as printed."""
    doc = folder_module.__doc__
    code = textwrap.dedent(doc[doc.index("    from reidforge.data.source"):doc.index("Then ``python")])
    monkeypatch.setattr(reidforge.data.source, "ADAPTERS", {})  # keep the example out of the real registry
    namespace: dict = {}
    exec(compile(code, "folder-docstring-example", "exec"), namespace)
    for name in ("train/0003_1_0.jpg", "query/0005_2_0.jpg", "gallery/0005_1_0.jpg"):
        write_jpeg(tmp_path / name)
    parser = argparse.ArgumentParser()
    reidforge.data.source.ADAPTERS["mycars"].dataset_arguments(parser)  # root_help gives it --root
    splits = reidforge.data.source.ADAPTERS["mycars"](parser.parse_args(["--root", str(tmp_path)])).sources()["mycars"]
    assert {s: labels(src) for s, src in splits.items()} == {
        "train": [("0003_1_0", 3, 0)], "query": [("0005_2_0", 5, 1)], "gallery": [("0005_1_0", 5, 0)]}
