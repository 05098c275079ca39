"""The LUPerson adapter on TransReID-SSL's own layout, ``LUP/images/<key>.jpg`` with the released
``LUP/CFS_list.pkl`` beside ``images/`` (its README's "Prepare Datasets" tree), built through
``data/build_shards.py luperson``: the ranking found there is used and named, ``--cfs`` overrides it,
and the found pickle goes through the same refusing unpickler."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from vehicle_fixtures import jpeg, write_jpeg

from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.readers import IndexedShards

pytestmark = pytest.mark.filterwarnings("ignore::reidforge.data.source.CountMismatchWarning")

KEYS = ["00_00_0000_00000000", "00_00_0000_00000001", "00_00_0001_00000002", "01_00_0000_00000003"]
# Best first, as image names relative to LUP/images/ (the released file's form).
RANKING = [f"{KEYS[i]}.jpg" for i in (2, 0, 3, 1)]


def lup(root: Path, ranking: object = RANKING) -> Path:
    """``root/images/<key>.jpg`` (image i is jpeg(i)) and, unless ``ranking`` is None, ``root/CFS_list.pkl``."""
    for i, key in enumerate(KEYS):
        write_jpeg(root / "images" / f"{key}.jpg", i)
    if ranking is not None:
        (root / "CFS_list.pkl").write_bytes(pickle.dumps(ranking))
    return root


def build(root: Path, out: Path, *argv: str) -> int:
    return build_shards_main(["luperson", "--root", str(root), "--out", str(out), "--no-progress", *argv])


def written(out: Path) -> list[dict]:
    """Every stored sample's json (without the index), checking its image is the file's bytes."""
    shards = IndexedShards(out / "luperson" / "pool")
    samples = []
    for i in range(len(shards)):
        image, meta = shards.read_bytes(i)
        meta = json.loads(meta)
        assert image == jpeg(KEYS.index(meta["key"]))
        samples.append({k: meta[k] for k in ("key", "source", "cfs_rank", "pid", "camid") if k in meta})
    return samples


def ranking_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("luperson: CFS ranking")]


def test_lup_root_reads_images_and_its_cfs_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = lup(tmp_path / "LUP")
    assert build(root, tmp_path / "shards") == 0
    assert ranking_lines(capsys.readouterr().out) == [
        f"luperson: CFS ranking {root / 'CFS_list.pkl'} (found with --root {root})"]
    # --keep defaults to 0.5: the best 2 of 4 (KEYS[2] rank 0, KEYS[0] rank 1), written in pool order.
    assert written(tmp_path / "shards") == [
        {"key": KEYS[0], "source": f"{KEYS[0]}.jpg", "cfs_rank": 1, "pid": None, "camid": None},
        {"key": KEYS[2], "source": f"{KEYS[2]}.jpg", "cfs_rank": 0, "pid": None, "camid": None}]

    assert build(root, tmp_path / "keep", "--keep", "0.75") == 0  # --keep applies to the found ranking
    assert [(s["key"], s["cfs_rank"]) for s in written(tmp_path / "keep")] == [
        (KEYS[0], 1), (KEYS[2], 0), (KEYS[3], 2)]


def test_explicit_cfs_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = lup(tmp_path / "LUP")
    mine = tmp_path / "mine.txt"
    mine.write_text("".join(f"{KEYS[i]}\n" for i in (3, 1, 0, 2)))
    assert build(root, tmp_path / "shards", "--cfs", str(mine)) == 0
    assert ranking_lines(capsys.readouterr().out) == [f"luperson: CFS ranking {mine} (--cfs)"]
    assert [(s["key"], s["cfs_rank"]) for s in written(tmp_path / "shards")] == [(KEYS[1], 1), (KEYS[3], 0)]


def test_lup_root_without_ranking_matches_the_images_folder(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = lup(tmp_path / "LUP", ranking=None)
    assert build(root, tmp_path / "from_lup") == 0
    assert build(root / "images", tmp_path / "from_images") == 0
    assert ranking_lines(capsys.readouterr().out) == []
    pool = written(tmp_path / "from_lup")
    assert [s["key"] for s in pool] == KEYS and "cfs_rank" not in pool[0]
    assert pool == written(tmp_path / "from_images")  # same keys, sources and bytes either way

    # A CFS_list.pkl beside the images folder given as --root is not looked for: only LUP/'s own is.
    (root / "CFS_list.pkl").write_bytes(pickle.dumps(RANKING))
    assert build(root / "images", tmp_path / "flat_again") == 0
    assert len(written(tmp_path / "flat_again")) == 4


class Exploit:
    """Unpickling this with the plain pickle module would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_found_ranking_is_read_safely_and_faults_are_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    root = lup(tmp_path / "LUP", ranking=[RANKING[0], Exploit(marker)])
    assert build(root, tmp_path / "shards") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root / 'CFS_list.pkl'}: refused to unpickle (it names the global" in err
    assert not marker.exists()

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    assert build(empty, tmp_path / "shards") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"luperson: no images under {empty / 'images'}; expected layout:" in err

    bare = lup(tmp_path / "bare", ranking=None)
    assert build(bare, tmp_path / "shards", "--keep", "0.5") == 2
    assert "--keep needs --cfs (the ranking to keep the best of), or CFS_list.pkl beside images/ in --root" in (
        capsys.readouterr().err)


def test_a_ranking_beside_lup_is_found_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = lup(tmp_path / "data" / "LUP", ranking=None)
    (tmp_path / "data" / "CFS_list.pkl").write_bytes(pickle.dumps(RANKING))
    assert build(root, tmp_path / "shards") == 0
    assert ranking_lines(capsys.readouterr().out) == [
        f"luperson: CFS ranking {tmp_path / 'data' / 'CFS_list.pkl'} (found with --root {root})"]
    assert [s["key"] for s in written(tmp_path / "shards")] == [KEYS[0], KEYS[2]]
