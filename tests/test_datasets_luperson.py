"""The LUPerson adapter: its three layouts, both keys.pkl formats, CFS selection and refusing pickles
that would run code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
from vehicle_fixtures import adapter_sources, jpeg, write_jpeg

from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.datasets.luperson import LmdbSource
from reidforge.data.readers import IndexedShards
from reidforge.data.shards import load_index, load_manifest
from reidforge.data.source import CountMismatchWarning, DatasetError

pytestmark = pytest.mark.filterwarnings("ignore::reidforge.data.source.CountMismatchWarning")

# Two countries; the first has two cities, the first city two videos.
KEYS = ["00_00_0000_00000000", "00_00_0000_00000001", "00_00_0001_00000002", "00_01_0000_00000003",
        "01_00_0000_00000004", "01_00_0000_00000005"]
VIDEOS = [0, 0, 1, 2, 3, 3]  # index of the video over the pool
COUNTRIES, CITIES = [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]


class Exploit:
    """Unpickling this with the plain pickle module would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def make_lmdb(root: Path, keys: list[str], keys_pkl: object) -> Path:
    """``root/lmdb`` holding a JPEG per key (as convert_lmdb.py writes it) and ``root/keys.pkl``."""
    root.mkdir(parents=True)
    with lmdb.open(str(root / "lmdb"), map_size=1 << 22) as env, env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            txn.put(key.encode(), jpeg(i))
    (root / "keys.pkl").write_bytes(pickle.dumps(keys_pkl))
    return root


def _pool(root: Path, *argv: str):
    return adapter_sources("luperson", "--root", str(root), *argv)["luperson"]["pool"]


def _provenance(source) -> list[tuple]:
    return [(source.key(i), source.meta(i)["country"], source.meta(i)["city"], source.meta(i)["video"])
            for i in range(len(source))]


EXPECTED = list(zip(KEYS, COUNTRIES, CITIES, VIDEOS))


def test_lmdb_with_keys_as_list_and_as_dict(tmp_path: Path) -> None:
    with pytest.warns(CountMismatchWarning, match="luperson/pool: images = 6, published 4,180,243"):
        pool = _pool(make_lmdb(tmp_path / "list", KEYS, KEYS))
    assert isinstance(pool, LmdbSource) and _provenance(pool) == EXPECTED
    assert pool.meta(3) == {"pid": None, "camid": None, "viewid": None, "source": "lmdb:00_01_0000_00000003",
                            "country": 0, "city": 1, "video": 2}
    assert [pool.image(i) for i in range(6)] == [(jpeg(i), "jpg") for i in range(6)]  # stored bytes, untouched
    clone = pickle.loads(pickle.dumps(pool))  # as sent to a worker: no LMDB handle travels with it
    assert len(pickle.dumps(pool)) < 2000 and clone.image(5) == (jpeg(5), "jpg")

    pids, vids = [7, 7, -1, 8, 9, 9], [0, 0, 1, 2, 3, 3]
    pool = _pool(make_lmdb(tmp_path / "dict", KEYS, {"keys": [k.encode() for k in KEYS], "pids": pids, "vids": vids}))
    assert _provenance(pool) == EXPECTED
    assert [pool.meta(i)["noisy_pid"] for i in range(6)] == pids and pool.meta(0)["pid"] is None
    assert [pool.meta(i)["vid"] for i in range(6)] == vids

    with pytest.raises(DatasetError, match=r"keys.pkl: 'pids' must be a list of 6 ints, one per key"):
        _pool(make_lmdb(tmp_path / "short", KEYS, {"keys": KEYS, "pids": pids[:3]}))
    with pytest.raises(DatasetError, match=r"lmdb: 1 key\(s\) of keys.pkl are not in the LMDB, e.g. '99_00_0000_0"):
        _pool(make_lmdb(tmp_path / "extra", KEYS, [*KEYS, "99_00_0000_00000000"]))
    with pytest.raises(DatasetError, match=r"keys.pkl: a dict without 'keys' \(it has names\)"):
        _pool(make_lmdb(tmp_path / "nokeys", KEYS, {"names": KEYS}))


def test_lmdb_build_end_to_end(tmp_path: Path) -> None:
    root = make_lmdb(tmp_path / "lup", KEYS, {"keys": KEYS})
    out = tmp_path / "shards"
    with pytest.warns(CountMismatchWarning):
        assert build_shards_main(["luperson", "--root", str(root), "--out", str(out), "--no-progress",
                                  "--samples-per-shard", "4", "--workers", "2"]) == 0
    split = out / "luperson" / "pool"
    manifest = load_manifest(split)
    assert (manifest["num_samples"], manifest["num_pids"], manifest["num_cameras"]) == (6, 0, 0)
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 2]
    index = load_index(split)
    assert index["pid"].tolist() == [-1] * 6 and index["camid"].tolist() == [-1] * 6
    shards = IndexedShards(split)
    for i, key in enumerate(KEYS):
        image, meta = shards.read_bytes(i)
        assert image == jpeg(i)
        assert {k: json.loads(meta)[k] for k in ("key", "index", "video", "dataset")} == {
            "key": key, "index": i, "video": VIDEOS[i], "dataset": "luperson"}


def test_flat_folder_and_video_tree(tmp_path: Path) -> None:
    flat = tmp_path / "images"
    for i, key in enumerate(reversed(KEYS)):
        write_jpeg(flat / f"{key}.jpg", i)
    (flat / "notes.txt").write_text("not an image")
    pool = _pool(flat)
    assert _provenance(pool) == EXPECTED and pool.meta(0)["source"] == "00_00_0000_00000000.jpg"

    tree = tmp_path / "tree"
    for i, name in enumerate(["China/Beijing/vid_a/00000010_0001.jpg", "China/Beijing/vid_a/00000020_0000.jpg",
                              "China/Beijing/vid_b/00000005_0002.jpg", "China/Shanghai/x9/00000001_0000.jpg",
                              "France/Paris/p1/00000100_0000.jpg", "France/Paris/p1/00000101_0000.jpg"]):
        write_jpeg(tree / name, i)
    pool = _pool(tree)
    # The image number is the ordinal within its video folder, as convert_lmdb.py numbers it.
    assert _provenance(pool) == [("00_00_0000_00000000", 0, 0, 0), ("00_00_0000_00000001", 0, 0, 0),
                                 ("00_00_0001_00000000", 0, 0, 1), ("00_01_0000_00000000", 0, 1, 2),
                                 ("01_00_0000_00000000", 1, 0, 3), ("01_00_0000_00000001", 1, 0, 3)]
    assert pool.meta(2)["source"] == "China/Beijing/vid_b/00000005_0002.jpg" and pool.image(2) == (jpeg(2), "jpg")

    write_jpeg(tree / "China" / "Beijing" / "00000030_0000.jpg")
    with pytest.raises(DatasetError, match=r"images directly in .*China/Beijing \(extract.py's per-city output\)"):
        _pool(tree)


def test_cfs_keeps_the_best_fraction_in_pool_order(tmp_path: Path) -> None:
    root = make_lmdb(tmp_path / "lup", KEYS, KEYS)
    # Best first; one ranked image is not in the pool and one pool image (KEYS[1]) is not ranked.
    ranking = [f"{KEYS[i]}.jpg" for i in (4, 0, 5, 2, 3)] + ["07_00_0000_00000009.jpg"]
    cfs = tmp_path / "CFS_list.pkl"
    cfs.write_bytes(pickle.dumps(ranking))
    with pytest.warns(UserWarning, match=r"luperson: 1 of the 6 images ranked in .*CFS_list.pkl are not in the pool"):
        pool = _pool(root, "--cfs", str(cfs), "--keep", "0.5")
    # ceil(0.5 * 5 ranked images in the pool) = 3 kept: ranks 0, 1, 2, written in pool order.
    assert [(pool.key(i), pool.meta(i)["cfs_rank"]) for i in range(len(pool))] == [
        (KEYS[0], 1), (KEYS[4], 0), (KEYS[5], 2)]
    assert pool.meta(1)["video"] == 1 and pool.image(1) == (jpeg(4), "jpg")  # provenance over the kept pool

    text = tmp_path / "cfs.txt"
    text.write_text("".join(f"LUP/images/{KEYS[i]}.jpg\n" for i in range(6)))
    assert len(_pool(root, "--cfs", str(text), "--keep", "0.5")) == 3
    text.write_text("".join(f"{KEYS[i]}\n" for i in (5, 4, 3, 2, 1, 0)) * 1)
    pool = _pool(root, "--cfs", str(text))  # --keep defaults to 0.5
    assert [pool.key(i) for i in range(len(pool))] == KEYS[3:]
    flat = tmp_path / "flat"
    for i in range(10):
        write_jpeg(flat / f"00_00_0000_{i:08d}.jpg", i)
    text.write_text("".join(f"00_00_0000_{i:08d}\n" for i in range(10)))
    assert len(_pool(flat, "--cfs", str(text), "--keep", "0.3")) == 3  # not 4: 0.3 * 10 is 3.0000000000000004

    with pytest.raises(DatasetError, match=r"--keep needs --cfs"):
        _pool(root, "--keep", "0.5")
    with pytest.raises(DatasetError, match=r"--keep must be in \(0, 1\], got 1.5"):
        _pool(root, "--cfs", str(cfs), "--keep", "1.5")
    text.write_text("a b\n")
    with pytest.raises(DatasetError, match=r"cfs.txt:1: expected one key or image name per line"):
        _pool(root, "--cfs", str(text))


def test_pickles_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps([KEYS[0], Exploit(marker)])
    root = make_lmdb(tmp_path / "lup", KEYS, KEYS)
    (root / "keys.pkl").write_bytes(evil)
    with pytest.raises(DatasetError, match=r"keys.pkl: refused to unpickle \(it names the global posix.system\)"):
        _pool(root)
    cfs = tmp_path / "CFS_list.pkl"
    cfs.write_bytes(evil)
    (root / "keys.pkl").write_bytes(pickle.dumps(KEYS))
    with pytest.raises(DatasetError, match=r"CFS_list.pkl: refused to unpickle"):
        _pool(root, "--cfs", str(cfs))
    cfs.write_bytes(pickle.dumps(np.array(KEYS)))  # numpy arrays need globals too
    with pytest.raises(DatasetError, match=r"refused to unpickle \(it names the global numpy"):
        _pool(root, "--cfs", str(cfs))
    cfs.write_bytes(b"\x80\x04truncated")
    with pytest.raises(DatasetError, match=r"CFS_list.pkl: refused to unpickle"):
        _pool(root, "--cfs", str(cfs))
    assert not marker.exists()


def test_wrong_root_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert build_shards_main(["luperson", "--root", str(missing), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--root {missing} is not a directory; expected layout: <root>/lmdb/" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no images under .*empty; expected layout"):
        _pool(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "keys.pkl").write_bytes(pickle.dumps(KEYS))
    with pytest.raises(DatasetError, match=r"half/lmdb/data.mdb not found; expected layout: <root>/lmdb/ \+"):
        _pool(tmp_path / "half")
