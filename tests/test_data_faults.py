"""Shards and datasets under attack or damage: confinement, integrity, odd files and bad images."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reidforge.data.images as images_module
import reidforge.data.readers as readers
import reidforge.shared.io
from reidforge.data.build_shards import main as build_main
from reidforge.data.readers import CRC_MISMATCH, BadImage, IndexedShards, SampleTally, StreamingShards, collate, decode
from reidforge.data.shards import (INDEX, MANIFEST, ShardError, WriteOptions, _locked, load_index, load_manifest,
                         verify_split, write_split)

REPO = Path(__file__).resolve().parents[1]
OPTS = WriteOptions(samples_per_shard=16, progress=False)


def _jpeg(colour: tuple[int, int, int] = (200, 100, 50), size: tuple[int, int] = (16, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _csv_tree(root: Path, rows: list[tuple[str, int, int, str]]) -> Path:
    (root / "img").mkdir(parents=True)
    lines = ["path,pid,camid,split"]
    for name, pid, cam, split in rows:
        (root / "img" / name).write_bytes(_jpeg())
        lines.append(f"img/{name},{pid},{cam},{split}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


# -- confinement -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["../../victim/train", "/abs/train", "..", ".hidden", "a/b"])
def test_a_split_name_cannot_reach_outside_the_output(tmp_path: Path, split: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim" / "train"
    victim.mkdir(parents=True)
    for name in ("train-backup.tar", "train-000007.tar"):
        (victim / name).write_bytes(b"precious")
    csv = _csv_tree(tmp_path / "src", [("a.jpg", 1, 0, split), ("b.jpg", 2, 0, "train")])
    out = tmp_path / "out" / "shards"
    out.parent.mkdir()
    assert build_main(["folder", "--root", str(csv), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and repr(split) in err, err
    assert sorted(p.name for p in victim.iterdir()) == ["train-000007.tar", "train-backup.tar"]
    assert not out.exists()  # refused before anything was written


def test_a_dataset_name_cannot_reach_outside_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv_tree(tmp_path / "src", [("a.jpg", 1, 0, "train")])
    assert build_main(["folder", "--root", str(csv), "--out", str(tmp_path / "out"), "--name", "../../x",
                       "--no-progress"]) == 2
    assert "'../../x'" in capsys.readouterr().err
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "out").exists()


def test_a_sample_key_cannot_become_a_path(tmp_path: Path, toy_source) -> None:
    class Escaping(type(toy_source)):
        def key(self, i: int) -> str:
            return "../../evil" if i == 3 else super().key(i)

    with pytest.raises(ShardError, match="sample key '../../evil'"):
        write_split(Escaping(), tmp_path / "train", "train", options=OPTS)


def test_cleanup_deletes_only_the_splits_own_leftover_shards(tmp_path: Path, toy_source) -> None:
    split = tmp_path / "train"
    write_split(toy_source, split, "train", options=OPTS)
    for name in ("train-backup.tar", "train-000099.tar", "train-1.tar", "other-000009.tar"):
        (split / name).write_bytes(b"keep?")
    write_split(toy_source, split, "train", options=WriteOptions(samples_per_shard=64, progress=False))
    left = sorted(p.name for p in split.iterdir() if p.suffix == ".tar")
    # the old shards 1..2 and the stray 000099 of this numbering go; names of any other form stay
    assert left == ["other-000009.tar", "train-000000.tar", "train-1.tar", "train-backup.tar"]
    assert verify_split(split) == []


# -- integrity ------------------------------------------------------------------------------------------------
def _rewrite_index(split: Path, change, rehash: bool) -> None:
    index = np.load(split / INDEX)
    change(index)
    with open(split / INDEX, "wb") as f:
        np.save(f, index, allow_pickle=False)
    if rehash:  # a consistent forgery: the manifest's hash follows the index
        manifest = json.loads((split / MANIFEST).read_text())
        manifest["index_sha256"] = hashlib.sha256((split / INDEX).read_bytes()).hexdigest()
        (split / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", ["shift_pids", "swap_offsets"])
def test_a_tampered_index_is_found_on_open_and_by_verify(toy_split: Path, change: str) -> None:
    def edit(index: np.ndarray) -> None:
        if change == "shift_pids":
            index["pid"] += 1
        else:
            index[["image_offset", "image_size"]][[0, 1]] = index[["image_offset", "image_size"]][[1, 0]]

    _rewrite_index(toy_split, edit, rehash=False)
    with pytest.raises(ShardError, match="index.npy: sha256 differs from the manifest"):
        IndexedShards(toy_split)
    assert any("index.npy: sha256 differs" in line for line in verify_split(toy_split))


def test_swapped_offsets_under_a_forged_hash_are_caught_per_sample(toy_split: Path) -> None:
    def swap(index: np.ndarray) -> None:
        a, b = index[0].copy(), index[1].copy()
        for name in ("image_offset", "image_size"):
            index[name][0], index[name][1] = b[name], a[name]

    _rewrite_index(toy_split, swap, rehash=True)
    dataset = IndexedShards(toy_split)
    assert dataset[0] == readers.Problem(f"{dataset.paths[0]}@0", CRC_MISMATCH, index=0)
    assert not isinstance(dataset[2], readers.Problem)


def test_a_negative_shard_number_is_refused(toy_split: Path) -> None:
    _rewrite_index(toy_split, lambda index: index["shard"].__setitem__(0, -1), rehash=True)
    with pytest.raises(ShardError, match="shard numbers outside 0..2"):
        IndexedShards(toy_split)


def _flip_image_byte(split: Path, index: int) -> None:
    row = load_index(split)[index]
    shard = split / load_manifest(split)["shards"][int(row["shard"])]["name"]
    with open(shard, "r+b") as f:
        at = int(row["image_offset"]) + int(row["image_size"]) // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_a_bit_flipped_image_that_still_decodes_is_a_problem_not_a_sample(toy_split: Path) -> None:
    data, _ = IndexedShards(toy_split).read_bytes(5)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    decode(bytes(flipped))  # the damage is invisible to the decoder
    _flip_image_byte(toy_split, 5)
    indexed = IndexedShards(toy_split)
    assert indexed[5].reason == CRC_MISMATCH and indexed[5].index == 5
    streamed = [s for s in StreamingShards(toy_split, verify=True) if isinstance(s, readers.Problem)]
    assert [p.reason for p in streamed][0] == CRC_MISMATCH and streamed[0].index == 5


@pytest.mark.parametrize("content", ["[]", '{"schema_version": 2, "status": "complete"}',
                                     '{"schema_version": 2, "status": "complete", "dataset": 3}'])
def test_a_manifest_of_the_wrong_shape_is_one_line(toy_split: Path, content: str) -> None:
    (toy_split / MANIFEST).write_text(content)
    with pytest.raises(ShardError, match=r"manifest.json: (a manifest is a JSON object|key 'dataset')") as e:
        load_manifest(toy_split)
    assert "\n" not in str(e.value)


def test_an_older_schema_says_to_rebuild(toy_split: Path) -> None:
    manifest = json.loads((toy_split / MANIFEST).read_text())
    (toy_split / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(ShardError, match="schema_version 1, expected 2; re-run the build command"):
        load_manifest(toy_split)


def test_a_full_disk_while_writing_the_index_names_it_and_the_build_resumes(tmp_path: Path, toy_source,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    split = tmp_path / "train"
    real = reidforge.shared.io.os.fsync
    calls = {"n": 0}

    def full_on_index(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2].startswith(f".{INDEX}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        real(fd)

    monkeypatch.setattr(reidforge.shared.io.os, "fsync", full_on_index)
    with pytest.raises(ShardError, match=f"cannot write {split / INDEX}: No space left on device"):
        write_split(toy_source, split, "train", options=OPTS)
    assert not (split / INDEX).exists() and not list(split.glob(".*.tmp"))
    with pytest.raises(ShardError, match="did not finish"):
        load_manifest(split)
    monkeypatch.setattr(reidforge.shared.io.os, "fsync", real)
    assert write_split(toy_source, split, "train", options=OPTS)["reused_shards"] == 3
    assert verify_split(split) == []


def test_a_second_build_into_the_same_split_fails_at_once(tmp_path: Path, toy_source) -> None:
    split = tmp_path / "train"
    split.mkdir()
    with _locked(split):
        with pytest.raises(ShardError, match="another build is writing this split"):
            write_split(toy_source, split, "train", options=OPTS)
    write_split(toy_source, split, "train", options=OPTS)


# -- odd files in a dataset tree -----------------------------------------------------------------------------
def test_fifos_and_directories_named_like_images_are_named_and_skipped(tmp_path: Path) -> None:
    cam = tmp_path / "tree" / "train" / "1" / "0"
    cam.mkdir(parents=True)
    (cam / "a.jpg").write_bytes(_jpeg())
    os.mkfifo(cam / "b.jpg")
    (cam / "c.jpg").mkdir()
    done = subprocess.run([sys.executable, "data/build_shards.py", "folder", "--root", str(tmp_path / "tree"),
                           "--out", str(tmp_path / "out"), "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"skipped {cam / 'b.jpg'}: a FIFO, not an image file" in done.stderr
    assert f"skipped {cam / 'c.jpg'}: a directory, not an image file" in done.stderr
    assert load_manifest(tmp_path / "out" / "tree" / "train")["num_samples"] == 1


# -- bad images ------------------------------------------------------------------------------------------------
def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


RGB = Image.new("RGB", (6, 4), (200, 100, 50))


@pytest.mark.parametrize("data, pixel", [
    pytest.param(_encoded(Image.new("L", (6, 4), 200), "PNG"), [200, 200, 200], id="grey png"),
    pytest.param(_encoded(Image.new("L", (6, 4), 200), "JPEG"), [200, 200, 200], id="grey jpeg"),
    pytest.param(_encoded(RGB.convert("P"), "PNG"), None, id="palette png"),
    pytest.param(_encoded(RGB.convert("RGBA"), "PNG"), [200, 100, 50], id="rgba png"),
    pytest.param(_encoded(Image.new("LA", (6, 4), (200, 255)), "PNG"), [200, 200, 200], id="grey+alpha png"),
    pytest.param(_encoded(Image.fromarray(np.full((4, 6), 200 * 257, np.uint16)), "PNG"), [200, 200, 200], id="16-bit png"),
    pytest.param(_encoded(RGB.convert("CMYK"), "JPEG"), [200, 100, 50], id="cmyk jpeg"),
])
def test_every_image_mode_decodes_to_uint8_rgb(data: bytes, pixel: list[int] | None) -> None:
    image = decode(data)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 4, 6)
    expected = pixel or list(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0])
    assert (image[:, 1, 2] - torch.tensor(expected)).abs().max() <= 1


def test_empty_truncated_garbage_and_huge_images_are_bad_images(monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = _jpeg(size=(64, 64))
    with pytest.raises(BadImage, match="empty image"):
        decode(b"")
    for data in (jpeg[:40], b"\x00garbage" * 10):
        with pytest.raises(BadImage, match="undecodable image"):
            decode(data)
    huge = _encoded(Image.new("L", (10_000, 10_000), 0), "PNG")
    assert len(huge) < 200_000
    monkeypatch.setattr(images_module, "decode_image", lambda *a, **k: pytest.fail("decoded a 100 MP image"))
    with pytest.raises(BadImage, match="10000x10000 pixels is over the 50,000,000-pixel limit"):
        decode(huge)
    big_jpeg = bytearray(jpeg)
    sof = big_jpeg.index(b"\xff\xc0")
    big_jpeg[sof + 5:sof + 9] = struct.pack(">HH", 20_000, 20_000)
    with pytest.raises(BadImage, match="20000x20000"):
        decode(bytes(big_jpeg))


# -- the bad-sample budget -------------------------------------------------------------------------------------
def _batch(*bad: int) -> dict:
    return collate([readers.Problem(f"x@{i}", "broken", index=i) for i in bad])


def test_one_bad_image_drawn_many_times_is_one_loss() -> None:
    tally = SampleTally(200, 0.01, "training")
    for _ in range(50):
        tally.update(_batch(7))
    assert tally.lost == 1 and len(tally.problems) == 1


def test_two_percent_of_distinct_samples_bad_aborts_in_one_line() -> None:
    tally = SampleTally(200, 0.01, "training")
    tally.update(_batch(*range(2)))
    with pytest.raises(readers.TooManyBadSamples, match=r"training: 4 of 200 samples lost \(2.00%\)") as e:
        tally.update(_batch(*range(2, 4)))
    assert "\n" not in str(e.value)


def test_bad_samples_never_stop_a_worker(toy_split: Path) -> None:
    _flip_image_byte(toy_split, 0)
    loader = torch.utils.data.DataLoader(IndexedShards(toy_split), batch_size=8, num_workers=2, collate_fn=collate)
    tally = SampleTally(40, 0.5)
    batches = list(tally.wrap(loader))
    assert tally.lost == 1 and sum(len(b["index"]) for b in batches) == 39


def test_the_builder_stores_every_decodable_image_and_skips_the_rest_by_name(tmp_path: Path) -> None:
    cam = tmp_path / "tree" / "train" / "1" / "0"
    cam.mkdir(parents=True)
    good = {
        "grey.png": _encoded(Image.new("L", (6, 4), 200), "PNG"),
        "cmyk.jpg": _encoded(RGB.convert("CMYK"), "JPEG"),
        "deep.png": _encoded(Image.fromarray(np.full((4, 6), 200 * 257, np.uint16)), "PNG"),
        "rgb.jpg": _jpeg(size=(6, 4)),
    }
    bad = {
        "empty.jpg": (b"", "empty image (0 bytes)"),
        "fake.jpg": (b"GIF89a not a jpeg", "not a JPG file"),
        "huge.png": (_encoded(Image.new("L", (10_000, 10_000), 0), "PNG"), "10000x10000 pixels is over"),
    }
    for name, data in good.items():
        (cam / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (cam / name).write_bytes(data)
    done = subprocess.run([sys.executable, "data/build_shards.py", "folder", "--root", str(tmp_path / "tree"),
                           "--out", str(tmp_path / "out"), "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    split = tmp_path / "out" / "tree" / "train"
    skipped = dict(load_manifest(split)["skipped"])
    assert sorted(skipped) == sorted(f"train/1/0/{name}" for name in bad)
    for name, (_, reason) in bad.items():
        assert reason in skipped[f"train/1/0/{name}"] and f"skipped train/1/0/{name}: " in done.stderr
    dataset = IndexedShards(split)
    images = {Path(dataset[i]["key"]).name: dataset[i]["image"] for i in range(len(dataset))}
    assert len(images) == len(good)
    for image in images.values():
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert (image[:, 1, 2].int() - torch.tensor([200, 200, 200] if image[0, 1, 2] == image[1, 1, 2]
                                                    else [200, 100, 50])).abs().max() <= 2
