"""The person dataset adapters (Market-1501, DukeMTMC-reID, CUHK03-NP, MSMT17) on fixture trees with the
real layouts and names: pids, camids, splits, the traps of each dataset, the one-line layout errors and
the published-count warnings; and Market-1501 and CUHK03 built end to end through build_shards."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest

from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.datasets import cuhk03, dukemtmc, market1501, msmt17
from reidforge.data.readers import IndexedShards
from reidforge.data.shards import IMAGE_EXTS, load_manifest
from reidforge.data.source import ADAPTERS, CountMismatchWarning, DatasetAdapter, DatasetError, RecordSource, Sources
from person_fixtures import cuhk03_config, folder_tree, msmt17_tree, write_image

Triples = set[tuple[str, int, int]]


def adapter(name: str, *argv: str) -> DatasetAdapter:
    """The registered adapter ``name`` with its command-line arguments ``argv``."""
    parser = argparse.ArgumentParser()
    ADAPTERS[name].dataset_arguments(parser)
    return ADAPTERS[name](parser.parse_args(list(argv)))


def load(name: str, *argv: str) -> tuple[Sources, set[str]]:
    """The adapter's sources and the count warnings raised while building them."""
    with pytest.warns(CountMismatchWarning) as caught:
        sources = adapter(name, *argv).sources()
    return sources, {str(w.message) for w in caught}


def triples(source: RecordSource) -> Triples:
    """(key, pid, camid) of every record."""
    return {(source.key(i), source.meta(i)["pid"], source.meta(i)["camid"]) for i in range(len(source))}


def splits_of(sources: Sources, dataset: str) -> dict[str, Triples]:
    assert list(sources) == [dataset]
    return {split: triples(source) for split, source in sources[dataset].items()}


def fails(name: str, *argv: str) -> str:
    """The one-line DatasetError message of a bad input."""
    with pytest.raises(DatasetError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore", CountMismatchWarning)  # from the splits listed before the fault
        adapter(name, *argv).sources()
    assert "\n" not in str(error.value)
    return str(error.value)


# ---------------------------------------------------------------------------------------------
# Market-1501

MARKET_FILES = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_077419_03.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c6s2_000543_00.jpg"],
    "bounding_box_test": ["0001_c2s1_000301_01.jpg", "0003_c5s1_001201_02.jpg", "0000_c6s1_000020_03.jpg",
                          "0000_c1s1_000230_01.jpg", "-1_c1s1_000401_03.jpg", "-1_c4s2_001231_05.jpg"],
    "images": ["0000_c1s1_000230_01.jpg", "0000_c4s3_000010_00.jpg", "-1_c2s1_000050_00.jpg"],
}
MARKET = {
    "train": {("0002_c1s1_000451_03", 2, 0), ("0002_c2s1_000301_01", 2, 1), ("0007_c3s3_077419_03", 7, 2)},
    "query": {("0001_c1s1_001051_00", 1, 0), ("0003_c6s2_000543_00", 3, 5)},
    # pid 0 distractors stay, pid -1 junk is gone.
    "gallery": {("0001_c2s1_000301_01", 1, 1), ("0003_c5s1_001201_02", 3, 4), ("0000_c6s1_000020_03", 0, 5),
                ("0000_c1s1_000230_01", 0, 0)},
}
MARKET_500K = {("500k_0000_c1s1_000230_01", 0, 0), ("500k_0000_c4s3_000010_00", 0, 3)}


def market_tree(root: Path) -> Path:
    tree = folder_tree(root, MARKET_FILES)
    (tree / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")  # stray non-image files are not listed
    return tree


@pytest.mark.parametrize("nested", [True, False], ids=["version-folder", "flat"])
def test_market1501_splits_junk_and_distractors(tmp_path: Path, nested: bool) -> None:
    market_tree(tmp_path / market1501.VERSION_FOLDER if nested else tmp_path)
    sources, warned = load("market1501", "--root", str(tmp_path))
    assert splits_of(sources, "market1501") == MARKET
    assert warned == {"market1501/train: images = 3, published 12,936", "market1501/train: ids = 2, published 751",
                      "market1501/query: images = 2, published 3,368", "market1501/query: ids = 2, published 750",
                      "market1501/gallery: images = 4, published 15,913", "market1501/gallery: ids = 3, published 751"}
    meta = sources["market1501"]["train"].meta(0)
    assert meta["source"] == "bounding_box_train/0002_c1s1_000451_03.jpg" and meta["viewid"] is None


def test_market1501_root_may_be_the_version_folder(tmp_path: Path) -> None:
    root = market_tree(tmp_path / market1501.VERSION_FOLDER)
    sources, _ = load("market1501", "--root", str(root))
    assert splits_of(sources, "market1501") == MARKET


def test_market1501_with_the_500k_distractors(tmp_path: Path) -> None:
    market_tree(tmp_path)
    sources, warned = load("market1501", "--root", str(tmp_path), "--with-distractors")
    # Every non-junk image of images/ joins the gallery as pid 0, under a key that cannot collide.
    assert splits_of(sources, "market1501") == {**MARKET, "gallery": MARKET["gallery"] | MARKET_500K}
    assert not any(w.startswith("market1501/gallery: images") for w in warned)
    assert "market1501/gallery: ids = 3, published 751" in warned


def test_market1501_bad_names_fail_in_one_line(tmp_path: Path) -> None:
    market_tree(tmp_path)
    (tmp_path / "images").rename(tmp_path / "other")
    assert fails("market1501", "--root", str(tmp_path), "--with-distractors") == (
        f"market1501: {tmp_path / 'images'} not found; expected layout: {market1501.LAYOUT}")
    bad = write_image(tmp_path / "query" / "0004_c7s1_000001_00.jpg")
    assert fails("market1501", "--root", str(tmp_path)) == f"market1501: {bad} has camera 7, outside 1-6"
    bad.unlink()
    bad = write_image(tmp_path / "query" / "person.jpg")
    assert fails("market1501", "--root", str(tmp_path)) == (
        f"market1501: {bad} is not named PID_cCAM... (regex {market1501.MARKET_PATTERN.pattern})")
    bad.unlink()
    twin = write_image(tmp_path / "query" / "0001_c1s1_001051_00.png")
    assert fails("market1501", "--root", str(tmp_path)) == (
        f"market1501/query: {twin.with_suffix('.jpg')} and {twin} both give the key '0001_c1s1_001051_00'")


def test_market1501_empty_split_fails_in_one_line(tmp_path: Path) -> None:
    market_tree(tmp_path)
    for path in (tmp_path / "query").iterdir():
        path.unlink()
    assert fails("market1501", "--root", str(tmp_path)) == f"market1501/query: no images in {tmp_path / 'query'}"


def test_market1501_build_end_to_end(tmp_path: Path) -> None:
    market_tree(tmp_path / "data" / market1501.VERSION_FOLDER)
    out = tmp_path / "shards"
    with pytest.warns(CountMismatchWarning):
        code = build_shards_main(["market1501", "--root", str(tmp_path / "data"), "--out", str(out),
                                  "--with-distractors", "--no-progress", "--samples-per-shard", "4"])
    assert code == 0
    train = IndexedShards(out / "market1501" / "train")
    assert train.manifest["pid_map"] == {"2": 0, "7": 1}  # relabelled 0..N-1 by the writer
    assert sorted(train.pids.tolist()) == [0, 0, 1]
    gallery = IndexedShards(out / "market1501" / "gallery")
    assert gallery.manifest["num_samples"] == 6 and gallery.manifest["pid_map"] == {}
    assert sorted(gallery.pids.tolist()) == [0, 0, 0, 0, 1, 3]  # distractors kept, no -1
    query = load_manifest(out / "market1501" / "query")
    assert query["num_pids"] == 2 and query["cameras"] == [0, 5]
    image, meta = gallery.read_bytes(0)
    assert image[:2] == b"\xff\xd8" and json.loads(meta)["dataset"] == "market1501"


# ---------------------------------------------------------------------------------------------
# DukeMTMC-reID

DUKE_FILES = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c6_f0030543.jpg", "0005_c8_f0001234.jpg"],
    "query": ["0003_c1_f0044158.jpg"],
    "bounding_box_test": ["0003_c4_f0055432.jpg", "0004_c7_f0122001.jpg"],
}
DUKE = {
    "train": {("0001_c2_f0046182", 1, 1), ("0001_c6_f0030543", 1, 5), ("0005_c8_f0001234", 5, 7)},
    "query": {("0003_c1_f0044158", 3, 0)},
    "gallery": {("0003_c4_f0055432", 3, 3), ("0004_c7_f0122001", 4, 6)},
}


@pytest.mark.parametrize("nested", [True, False], ids=["DukeMTMC-reID-folder", "flat"])
def test_dukemtmc_splits_and_cameras(tmp_path: Path, nested: bool) -> None:
    folder_tree(tmp_path / dukemtmc.DATA_FOLDER if nested else tmp_path, DUKE_FILES)
    sources, warned = load("dukemtmc", "--root", str(tmp_path))
    assert splits_of(sources, "dukemtmc") == DUKE
    assert "dukemtmc/gallery: ids = 2, published 1,110" in warned
    assert "dukemtmc/train: images = 3, published 16,522" in warned


def test_dukemtmc_help_says_withdrawn(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_shards_main(["dukemtmc", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "WITHDRAWN by its owners (Duke University, 2019)" in help_text
    assert "only to reproduce published results" in help_text


def test_dukemtmc_camera_out_of_range(tmp_path: Path) -> None:
    folder_tree(tmp_path, DUKE_FILES)
    bad = write_image(tmp_path / "query" / "0003_c9_f0044158.jpg")
    assert fails("dukemtmc", "--root", str(tmp_path)) == f"dukemtmc: {bad} has camera 9, outside 1-8"


# ---------------------------------------------------------------------------------------------
# CUHK03-NP

# filelist entry i+1 (1-based), its label and view; the split indices are 1-based like the real configs.
CUHK03_CONFIGS = {
    "labeled": (["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_1_02.png", "1_002_2_06.png",
                 "2_001_1_01.png", "2_001_2_06.png", "2_001_2_07.png"],
                [1, 1, 2, 2, 2, 844, 844, 844],
                {"train": [1, 2], "query": [3, 7], "gallery": [4, 5, 6, 8]}),
    "detected": (["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_06.png", "2_001_1_01.png",
                  "2_001_2_06.png", "2_001_2_08.png"],
                 [1, 1, 2, 2, 844, 844, 844],
                 {"train": [1, 2], "query": [3, 6], "gallery": [4, 5, 7]}),
}
CUHK03 = {
    "labeled": {
        # Index 1 (the first) is 1_001_1_01 and index 8 (the last) 2_001_2_07: an off-by-one shifts both.
        "train": {("1_001_1_01", 1, 0), ("1_001_2_06", 1, 1)},
        "query": {("1_002_1_01", 2, 0), ("2_001_2_06", 844, 1)},
        "gallery": {("1_002_1_02", 2, 0), ("1_002_2_06", 2, 1), ("2_001_1_01", 844, 0), ("2_001_2_07", 844, 1)},
    },
    "detected": {
        "train": {("1_001_1_01", 1, 0), ("1_001_2_06", 1, 1)},
        "query": {("1_002_1_01", 2, 0), ("2_001_2_06", 844, 1)},
        "gallery": {("1_002_2_06", 2, 1), ("2_001_1_01", 844, 0), ("2_001_2_08", 844, 1)},
    },
}
CUHK03_NP_FILES = {
    "labeled": {"bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png"], "query": ["0002_c1_1.png"],
                "bounding_box_test": ["0002_c2_6.png", "0002_c1_2.png"]},
    "detected": {"bounding_box_train": ["0001_c1_1.png"], "query": ["0002_c2_7.png"],
                 "bounding_box_test": ["0002_c1_1.png"]},
}
CUHK03_NP = {
    "labeled": {"train": {("0001_c1_1", 1, 0), ("0001_c2_6", 1, 1)}, "query": {("0002_c1_1", 2, 0)},
                "gallery": {("0002_c2_6", 2, 1), ("0002_c1_2", 2, 0)}},
    "detected": {"train": {("0001_c1_1", 1, 0)}, "query": {("0002_c2_7", 2, 1)}, "gallery": {("0002_c1_1", 2, 0)}},
}


def cuhk03_tree(folder: Path, variants: tuple[str, ...] = cuhk03.VARIANTS) -> Path:
    """torchreid's cuhk03/: the new-protocol configs and the extracted images_<variant>/ PNGs."""
    folder.mkdir(parents=True)
    for variant in variants:
        names, labels, splits = CUHK03_CONFIGS[variant]
        views = [int(name.split("_")[2]) for name in names]
        cuhk03_config(folder / f"cuhk03_new_protocol_config_{variant}.mat", names, labels, views, splits)
        for name in names:
            write_image(folder / f"images_{variant}" / name)
    return folder


@pytest.mark.parametrize("nested", [True, False], ids=["parent", "cuhk03-folder"])
def test_cuhk03_new_protocol_config(tmp_path: Path, nested: bool) -> None:
    folder = cuhk03_tree(tmp_path / "cuhk03")
    root = tmp_path if nested else folder
    sources, warned = load("cuhk03", "--root", str(root))  # labeled by default
    assert splits_of(sources, "cuhk03_labeled") == CUHK03["labeled"]
    assert warned >= {"cuhk03_labeled/train: images = 2, published 7,368",
                      "cuhk03_labeled/gallery: images = 4, published 5,328",
                      "cuhk03_labeled/query: ids = 2, published 700"}
    sources, warned = load("cuhk03", "--root", str(root), "--variant", "detected")
    assert splits_of(sources, "cuhk03_detected") == CUHK03["detected"]
    assert "cuhk03_detected/gallery: images = 3, published 5,332" in warned
    assert sources["cuhk03_detected"]["gallery"].image(0) == ((folder / "images_detected" / "1_002_2_06.png")
                                                              .read_bytes(), "png")


def test_cuhk03_indices_are_1_based(tmp_path: Path) -> None:
    folder = cuhk03_tree(tmp_path / "cuhk03", variants=("labeled",))
    names, labels, splits = CUHK03_CONFIGS["labeled"]
    config = folder / "cuhk03_new_protocol_config_labeled.mat"
    cuhk03_config(config, names, labels, [1] * len(names), {**splits, "query": [0, 3]})
    assert fails("cuhk03", "--root", str(folder)) == f"cuhk03: {config} field query_idx holds 0, outside 1-8"
    cuhk03_config(config, names, labels, [1] * len(names), {**splits, "gallery": [9]})
    assert fails("cuhk03", "--root", str(folder)) == f"cuhk03: {config} field gallery_idx holds 9, outside 1-8"


def test_cuhk03_missing_images_and_fields(tmp_path: Path) -> None:
    folder = cuhk03_tree(tmp_path / "cuhk03", variants=("labeled",))
    (folder / "images_labeled" / "2_001_2_07.png").unlink()
    assert fails("cuhk03", "--root", str(folder)) == (
        f"cuhk03: {folder / 'images_labeled' / '2_001_2_07.png'} (filelist entry 8 of "
        "cuhk03_new_protocol_config_labeled.mat) not found")
    assert fails("cuhk03", "--root", str(folder), "--variant", "detected") == (
        f"cuhk03: no cuhk03_new_protocol_config_detected.mat or cuhk03-np/detected/ under {folder}; "
        f"expected layout: {cuhk03.LAYOUT}")
    config = folder / "cuhk03_new_protocol_config_labeled.mat"
    config.write_bytes(b"not a mat file")
    assert fails("cuhk03", "--root", str(folder)).startswith(f"cuhk03: cannot read {config} as a MATLAB v5 file: ")
    # MATLAB's own v7.3 header (an HDF5 file follows at offset 512): named as such, before anything is read
    config.write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(384))
    assert fails("cuhk03", "--root", str(folder)) == (
        f"cuhk03: {config} is a MATLAB v7.3 (HDF5) file; the release's configs are v5: use the original file, "
        "or re-save it in MATLAB with save(..., '-v7')")


@pytest.mark.parametrize("nested", [True, False], ids=["parent", "cuhk03-np-folder"])
def test_cuhk03_market_format_copy(tmp_path: Path, nested: bool) -> None:
    for variant, files in CUHK03_NP_FILES.items():
        folder_tree(tmp_path / "cuhk03-np" / variant, files)
    root = tmp_path if nested else tmp_path / "cuhk03-np"
    for variant in cuhk03.VARIANTS:
        sources, warned = load("cuhk03", "--root", str(root), "--variant", variant)
        assert splits_of(sources, f"cuhk03_{variant}") == CUHK03_NP[variant]
        assert f"cuhk03_{variant}/query: images = 1, published 1,400" in warned
    assert sources["cuhk03_detected"]["train"].image(0)[1] == "png"


def test_cuhk03_build_stores_png(tmp_path: Path) -> None:
    cuhk03_tree(tmp_path / "cuhk03", variants=("labeled",))
    out = tmp_path / "shards"
    with pytest.warns(CountMismatchWarning):
        assert build_shards_main(["cuhk03", "--root", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    train = IndexedShards(out / "cuhk03_labeled" / "train")
    assert train.manifest["pid_map"] == {"1": 0} and set(train.index["ext"]) == {IMAGE_EXTS.index("png")}
    gallery = IndexedShards(out / "cuhk03_labeled" / "gallery")
    assert sorted(gallery.pids.tolist()) == [2, 2, 844, 844]  # raw labels


# ---------------------------------------------------------------------------------------------
# MSMT17

MSMT_LISTS = {
    "train": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303noon_0020_1.jpg 0",
              "0001/0001_000_15_0113afternoon_0100_0.jpg 1"],
    # pid 0 is the train folder's 0000/, the same person; pid 2 appears only here.
    "val": ["0000/0000_002_03_0302morning_0030_0.jpg 0", "0002/0002_000_07_0114noon_0011_0.jpg 2"],
    # Test pids restart at 0.
    "query": ["0000/0000_000_02_0303morning_0040_0.jpg 0", "0001/0001_000_09_0113noon_0050_0.jpg 1"],
    "gallery": ["0000/0000_001_04_0303afternoon_0045_0.jpg 0", "0001/0001_001_11_0113morning_0051_0_ex.jpg 1",
                "0001/0001_002_09_0113noon_0052_0.jpg 1"],
}
MSMT_OFFSET = 3  # 1 + the largest pid of list_train and list_val
MSMT = {
    "train": {("0000_000_01_0303morning_0015_0", 0, 0), ("0000_001_05_0303noon_0020_1", 0, 4),
              ("0001_000_15_0113afternoon_0100_0", 1, 14)},
    "query": {("0000_000_02_0303morning_0040_0", 0 + MSMT_OFFSET, 1),
              ("0001_000_09_0113noon_0050_0", 1 + MSMT_OFFSET, 8)},
    "gallery": {("0000_001_04_0303afternoon_0045_0", 0 + MSMT_OFFSET, 3),
                ("0001_001_11_0113morning_0051_0_ex", 1 + MSMT_OFFSET, 10),
                ("0001_002_09_0113noon_0052_0", 1 + MSMT_OFFSET, 8)},
}
MSMT_VAL = {("0000_002_03_0302morning_0030_0", 0, 2), ("0002_000_07_0114noon_0011_0", 2, 6)}


def msmt_tree(root: Path, version: str) -> Path:
    return msmt17_tree(root, *msmt17.VERSIONS[version], MSMT_LISTS)


@pytest.mark.parametrize("version", sorted(msmt17.VERSIONS))
@pytest.mark.parametrize("nested", [True, False], ids=["parent", "version-folder"])
def test_msmt17_versions_and_test_pid_offset(tmp_path: Path, version: str, nested: bool) -> None:
    folder = msmt_tree(tmp_path / f"MSMT17_{version}", version)
    sources, warned = load("msmt17", "--root", str(tmp_path if nested else folder))
    splits = splits_of(sources, "msmt17")
    assert splits == MSMT
    train_pids = {pid for _, pid, _ in splits["train"]}
    assert train_pids.isdisjoint(pid for split in ("query", "gallery") for _, pid, _ in splits[split])
    assert warned == {"msmt17/train: images = 3, published 30,248", "msmt17/train: ids = 2, published 1,041",
                      "msmt17/query: images = 2, published 11,659", "msmt17/query: ids = 2, published 3,060",
                      "msmt17/gallery: images = 3, published 82,161", "msmt17/gallery: ids = 2, published 3,060"}
    test_dir = msmt17.VERSIONS[version][1]
    assert sources["msmt17"]["gallery"].meta(0)["source"] == f"{test_dir}/0000/0000_001_04_0303afternoon_0045_0.jpg"


def test_msmt17_with_val(tmp_path: Path) -> None:
    msmt_tree(tmp_path, "V1")
    sources, warned = load("msmt17", "--root", str(tmp_path), "--with-val")
    # Val shares the train pid space (same folders), and the test offset does not move.
    assert splits_of(sources, "msmt17") == {**MSMT, "train": MSMT["train"] | MSMT_VAL}
    assert {"msmt17/train: images = 5, published 32,621", "msmt17/train: ids = 3, published 1,041"} <= warned


def test_msmt17_both_versions_need_a_choice(tmp_path: Path) -> None:
    msmt_tree(tmp_path / "MSMT17_V1", "V1")
    msmt_tree(tmp_path / "MSMT17_V2", "V2")
    assert fails("msmt17", "--root", str(tmp_path)) == (
        f"msmt17: both {tmp_path / 'MSMT17_V1'} (V1) and {tmp_path / 'MSMT17_V2'} (V2) hold MSMT17; pass --version")
    sources, _ = load("msmt17", "--root", str(tmp_path), "--version", "V2")
    assert sources["msmt17"]["train"].meta(0)["source"].startswith("mask_train_v2/")


def test_msmt17_bad_lists_fail_in_one_line(tmp_path: Path) -> None:
    root = msmt_tree(tmp_path, "V1")
    (root / "list_val.txt").unlink()
    assert fails("msmt17", "--root", str(root)) == (
        f"msmt17: {root / 'list_val.txt'} not found; expected layout: {msmt17.LAYOUT}")
    (root / "list_val.txt").write_text("\n0000/0000_002_03_0302morning_0030_0.jpg\n")
    assert fails("msmt17", "--root", str(root)) == (
        f"msmt17: {root / 'list_val.txt'}:2 is not '<pid>/<name>.jpg <pid>' with the camera as the name's "
        "third '_' field: '0000/0000_002_03_0302morning_0030_0.jpg'")
    (root / "list_val.txt").write_text("0000/0000_002_16_0302morning_0030_0.jpg 0\n")
    assert fails("msmt17", "--root", str(root)) == f"msmt17: {root / 'list_val.txt'}:1 has camera 16, outside 1-15"
    (root / "list_val.txt").write_text("0009/0009_000_01_0302morning_0030_0.jpg 9\n")
    assert fails("msmt17", "--root", str(root)) == (
        f"msmt17: {root / 'list_val.txt'}:1 lists {root / 'train' / '0009' / '0009_000_01_0302morning_0030_0.jpg'}, "
        "which is not found")


# ---------------------------------------------------------------------------------------------
# Every adapter: a wrong --root is one line on stderr and exit code 2.

@pytest.mark.parametrize("name, message", [
    ("market1501", "market1501: {root}/bounding_box_train not found; expected layout: " + market1501.LAYOUT),
    ("dukemtmc", "dukemtmc: {root}/bounding_box_train not found; expected layout: " + dukemtmc.LAYOUT),
    ("cuhk03", "cuhk03: no cuhk03_new_protocol_config_labeled.mat or cuhk03-np/labeled/ under {root}; "
               "expected layout: " + cuhk03.LAYOUT),
    ("msmt17", "msmt17: no MSMT17_V1/train/ or MSMT17_V2/mask_train_v2/ under {root}; expected layout: "
               + msmt17.LAYOUT),
])
def test_wrong_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str) -> None:
    root = tmp_path / "datasets"
    root.mkdir()
    assert build_shards_main([name, "--root", str(root), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {message.replace('{root}', str(root))}\n"
    assert build_shards_main([name, "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {name}: --root {tmp_path / 'missing'} is not a directory; "
                                       f"expected layout: {message.rpartition('expected layout: ')[2]}\n")
    assert not (tmp_path / "out").exists()
