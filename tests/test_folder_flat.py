"""The folder adapter on torchreid's flat layout, ``<root>/{train,query,gallery}/*.jpg`` of Market-1501-named
files, built through ``data/build_shards.py folder``: labels parsed from the names as the Market-1501 adapter
parses them, and the one-line errors for names and folders that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from person_fixtures import folder_tree, write_image

from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.readers import IndexedShards

FILES = {
    # The last is a DukeMTMC-reID name: camera 8, which Market's own adapter (6 cameras) would refuse.
    "train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_077419_03.jpg",
              "0005_c8_f0001234.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c6s2_000543_00.jpg"],
    "gallery": ["0001_c2s1_000301_01.jpg", "0003_c5s1_001201_02.jpg", "0000_c6s1_000020_03.jpg",
                "-1_c1s1_000401_03.jpg", "-1_c4s2_001231_05.jpg"],
}


def build(root: Path, out: Path, *argv: str) -> int:
    return build_shards_main(["folder", "--root", str(root), "--out", str(out), "--no-progress", *argv])


def written(split_dir: Path) -> list[tuple[str, int, int, str]]:
    """(key, raw pid, camid, source) of every stored sample, in index order."""
    shards = IndexedShards(split_dir)
    metas = [json.loads(shards.read_bytes(i)[1]) for i in range(len(shards))]
    return [(m["key"], m.get("raw_pid", m["pid"]), m["camid"], m["source"]) for m in metas]


def test_flat_market_named_splits_are_labelled_from_the_names(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "market_flat", FILES)
    (root / "gallery" / "Thumbs.db").write_bytes(b"\0")  # not an image name: not listed
    assert build(root, tmp_path / "shards") == 0
    out = tmp_path / "shards" / "market_flat"
    assert written(out / "train") == [
        ("0002_c1s1_000451_03", 2, 0, "train/0002_c1s1_000451_03.jpg"),
        ("0002_c2s1_000301_01", 2, 1, "train/0002_c2s1_000301_01.jpg"),
        ("0005_c8_f0001234", 5, 7, "train/0005_c8_f0001234.jpg"),
        ("0007_c3s3_077419_03", 7, 2, "train/0007_c3s3_077419_03.jpg")]
    train = IndexedShards(out / "train")
    assert train.manifest["pid_map"] == {"2": 0, "5": 1, "7": 2} and train.pids.tolist() == [0, 0, 1, 2]
    assert written(out / "query") == [("0001_c1s1_001051_00", 1, 0, "query/0001_c1s1_001051_00.jpg"),
                                      ("0003_c6s2_000543_00", 3, 5, "query/0003_c6s2_000543_00.jpg")]
    # Junk (pid -1) is dropped; distractors (pid 0) stay in the gallery, as the market1501 adapter keeps them.
    assert written(out / "gallery") == [("0000_c6s1_000020_03", 0, 5, "gallery/0000_c6s1_000020_03.jpg"),
                                        ("0001_c2s1_000301_01", 1, 1, "gallery/0001_c2s1_000301_01.jpg"),
                                        ("0003_c5s1_001201_02", 3, 4, "gallery/0003_c5s1_001201_02.jpg")]
    gallery = IndexedShards(out / "gallery")
    assert gallery.pids.tolist() == [0, 1, 3] and gallery.camids.tolist() == [5, 1, 4]


def _one_line_error(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert build(root, tmp_path / "shards") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_other_names_in_a_flat_folder_fail_naming_the_first(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_tree(tmp_path / "mixed_names", FILES)
    write_image(root / "query" / "zz_last.jpg")
    write_image(root / "query" / "img_0001.jpg")
    err = _one_line_error(root, tmp_path, capsys)
    assert err == (rf"error: folder: {root / 'query' / 'img_0001.jpg'} is not named PID_cCAM... "
                   r"(regex ([-\d]+)_c(\d))")

    (root / "query" / "zz_last.jpg").unlink()
    (root / "query" / "img_0001.jpg").unlink()
    write_image(root / "train" / "0009_c0s1_000001_00.jpg")
    err = _one_line_error(root, tmp_path, capsys)
    assert err == f"error: folder: {root / 'train' / '0009_c0s1_000001_00.jpg'} has camera 0, outside 1-9"


def test_a_split_folder_with_images_and_folders_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_tree(tmp_path / "both", FILES)
    write_image(root / "gallery" / "0004" / "0" / "a.jpg")  # a pid/camid tree inside a flat split
    err = _one_line_error(root, tmp_path, capsys)
    assert err.startswith(f"error: folder: {root / 'gallery'} holds both images and the folder 0004; "
                          "expected layout: <root>/<split>/*.jpg named as Market-1501's")


def test_tree_and_flat_splits_side_by_side(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "side", {"query": FILES["query"]})
    write_image(root / "train" / "0042" / "1" / "z.jpg")  # the pid/camid tree still reads as before
    assert build(root, tmp_path / "shards") == 0
    assert written(tmp_path / "shards" / "side" / "train") == [("0042_1_z", 42, 1, "train/0042/1/z.jpg")]
    assert [w[:3] for w in written(tmp_path / "shards" / "side" / "query")] == [
        ("0001_c1s1_001051_00", 1, 0), ("0003_c6s2_000543_00", 3, 5)]
