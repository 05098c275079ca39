"""The shard contract: round trip, determinism, atomic and resumable writing, bad data, bad input."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import ToySource

import reidforge.data.shards as shards
from reidforge.data.build_shards import main as build_shards_main
from reidforge.data.readers import IndexedShards, Problem, SampleTally, StreamingShards, TooManyBadSamples, collate, decode
from reidforge.data.shards import ShardError, WriteOptions, load_index, load_manifest, verify_split, write_split

OPTS = WriteOptions(samples_per_shard=16, progress=False)


def test_round_trip_bytes_and_labels(toy_split: Path, toy_source: ToySource) -> None:
    indexed = IndexedShards(toy_split)
    assert len(indexed) == 40
    for i in range(len(toy_source)):
        image, meta = indexed.read_bytes(i)
        assert image == toy_source.image(i)[0]  # stored bytes are the original encoded bytes
        labels = json.loads(meta)
        assert labels["index"] == i and labels["key"] == toy_source.key(i)
        assert labels["raw_pid"] == 100 + i // 4 and labels["pid"] == i // 4  # train pids relabelled 0..N-1
        assert labels["camid"] == i % 3 and labels["viewid"] is None and labels["colour"] == "red"
    streamed = list(StreamingShards(toy_split))
    assert [s["index"] for s in streamed] == list(range(40))
    for s in streamed:
        assert torch.equal(s["image"], decode(toy_source.image(s["index"])[0]))
        assert s["key"] == toy_source.key(s["index"]) and s["viewid"] == -1
    manifest = load_manifest(toy_split)
    assert manifest["num_pids"] == 10 and manifest["num_cameras"] == 3
    assert manifest["pid_map"]["100"] == 0 and len(manifest["shards"]) == 3
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8]


def test_written_offsets_agree_with_a_tar_reader(toy_split: Path) -> None:
    index = load_index(toy_split)
    for k, entry in enumerate(load_manifest(toy_split)["shards"]):
        with tarfile.open(toy_split / entry["name"]) as tar:
            members = tar.getmembers()
        rows = index[index["shard"] == k]
        assert [m.offset_data for m in members] == [int(v) for r in rows for v in (r["image_offset"], r["json_offset"])]
        assert [m.name for m in members[:2]] == ["0000_c1s1_000000_00.jpg", "0000_c1s1_000000_00.json"] or k > 0
        assert all(m.mode == 0o444 and m.mtime == 0 and m.uid == 0 for m in members)


def test_shards_are_byte_identical_across_builds(tmp_path: Path, toy_source: ToySource) -> None:
    a = write_split(toy_source, tmp_path / "a", "train", options=OPTS)
    b = write_split(toy_source, tmp_path / "b", "train", options=WriteOptions(samples_per_shard=16, workers=2,
                                                                              chunk=5, progress=False))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (load_index(tmp_path / "a") == load_index(tmp_path / "b")).all()


def test_index_is_stable_across_ranks(toy_split: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single = {s["index"]: s["key"] for s in StreamingShards(toy_split)}
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({s["index"]: s["key"] for s in StreamingShards(toy_split)})
    assert per_rank[0] and per_rank[1] and not per_rank[0].keys() & per_rank[1].keys()
    assert {**per_rank[0], **per_rank[1]} == single
    indexed = IndexedShards(toy_split)
    assert all(indexed[i]["key"] == key for i, key in single.items())


def test_streaming_through_dataloader_workers(toy_split: Path) -> None:
    loader = torch.utils.data.DataLoader(StreamingShards(toy_split), batch_size=8, num_workers=2, collate_fn=collate)
    tally = SampleTally(expected=40)
    seen = sorted(i for batch in tally.wrap(loader) for i in batch["index"].tolist())
    assert seen == list(range(40)) and tally.lost == 0


class _FailingSource(ToySource):
    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at

    def image(self, i: int) -> tuple[bytes, str]:
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().image(i)


def test_interrupted_build_leaves_only_whole_shards_and_resumes(tmp_path: Path, toy_source: ToySource) -> None:
    split_dir = tmp_path / "train"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_split(_FailingSource(fail_at=20), split_dir, "train", options=OPTS)
    assert sorted(p.name for p in split_dir.iterdir()) == ["manifest.json", "train-000000.tar"]
    partial = json.loads((split_dir / "manifest.json").read_text())
    assert partial["status"] == "partial" and [s["name"] for s in partial["shards"]] == ["train-000000.tar"]
    with pytest.raises(ShardError, match="did not finish"):
        StreamingShards(split_dir)
    (split_dir / ".train-000001.tar.x1y2.tmp").write_bytes(b"half a shard from a killed process")
    resumed = write_split(toy_source, split_dir, "train", options=OPTS)
    assert resumed["reused_shards"] == 1 and resumed["status"] == "complete"
    assert not list(split_dir.glob(".*"))
    clean = write_split(toy_source, tmp_path / "clean", "train", options=OPTS)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]


def test_tampered_shard_is_detected_and_rebuilt(toy_split: Path, toy_source: ToySource) -> None:
    shard = toy_split / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_split(toy_split) == [f"{shard}: sha256 differs from the manifest (tampered or corrupted)"]
    problems = [s for s in StreamingShards(toy_split) if isinstance(s, Problem)]
    assert any("sha256 differs" in p.reason and p.where == str(shard) for p in problems)
    rebuilt = write_split(toy_source, toy_split, "train", relabel=True, options=OPTS)
    assert rebuilt["reused_shards"] == 2 and verify_split(toy_split) == []
    assert build_shards_main(["verify", str(toy_split.parent)]) == 0


class _CorruptSource(ToySource):
    def image(self, i: int) -> tuple[bytes, str]:
        return (b"\xff\xd8 this is not a jpeg" if i == 7 else super().image(i)[0]), "jpg"


def test_corrupt_jpeg_is_skipped_counted_and_reported(tmp_path: Path) -> None:
    write_split(_CorruptSource(), tmp_path / "s", "train", options=OPTS)
    for dataset in (StreamingShards(tmp_path / "s"), IndexedShards(tmp_path / "s")):
        items = [dataset[i] for i in range(40)] if isinstance(dataset, IndexedShards) else list(dataset)
        tally = SampleTally(expected=40, max_bad_fraction=0.05)
        delivered = sum(len(b["index"]) for b in tally.wrap(collate(items[i:i + 8]) for i in range(0, 40, 8)))
        assert delivered == 39 and tally.lost == 1
        assert "0001_c2s1_000007_00" in tally.summary() or "@7" in tally.summary()
        with pytest.raises(TooManyBadSamples, match=r"1 of 40 samples lost \(2.50%\), over max_bad_fraction=0.01"):
            SampleTally(expected=40).update(collate(items))


def test_truncated_shard_counts_the_lost_samples(toy_split: Path) -> None:
    shard = toy_split / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    items = list(StreamingShards(toy_split, verify=False))
    delivered = [s["index"] for s in items if not isinstance(s, Problem)]
    lost = sum(p.lost for p in items if isinstance(p, Problem))
    assert set(range(16)) | set(range(32, 40)) <= set(delivered)
    assert len(delivered) + lost == 40 and lost >= 8
    with pytest.raises(TooManyBadSamples, match="train-000001.tar"):
        SampleTally(expected=40, max_bad_fraction=0.1).update(collate(items))


def test_full_disk_leaves_no_shard_visible(tmp_path: Path, toy_source: ToySource, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shards._TarWriter.write
    calls = {"n": 0}

    def filling_disk(self, data):
        calls["n"] += 1
        if calls["n"] > 3:  # shard 0 (one run of 16 samples + the end blocks), then the first run of shard 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(shards._TarWriter, "write", filling_disk)
    with pytest.raises(ShardError, match=r"disk full while writing .*train-000001.tar; no partial shard was left"):
        write_split(toy_source, tmp_path / "train", "train", options=OPTS)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["manifest.json", "train-000000.tar"]


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_shards_main(["synthetic", "--out", str(tmp_path / "missing" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: output parent directory does not exist: {tmp_path / 'missing'}"
    (tmp_path / "file").write_text("")
    assert build_shards_main(["synthetic", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert build_shards_main(["synthetic", "--out", str(tmp_path / "o"), "--splits", "train,bogus"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown split name(s) bogus; valid: gallery, pool, query, train")
    assert build_shards_main(["synthetic", "--out", str(tmp_path / "o"), "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_shards_main(["imagenet", "--out", str(tmp_path)])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert build_shards_main(["summary", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no shard splits under {tmp_path}"


def test_reader_on_a_non_split_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"no manifest.json in .*: not a shard split directory"):
        IndexedShards(tmp_path)
    os.makedirs(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="unreadable manifest"):
        StreamingShards(tmp_path / "s")


def test_unwritable_output_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Permission bits do not bind root, so the check itself is what is exercised here.
    monkeypatch.setattr(shards.os, "access", lambda path, mode: False)
    assert build_shards_main(["synthetic", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: output directory is not writable: {tmp_path}"


def test_concatenated_splits_never_collide(tmp_path: Path, toy_source: ToySource) -> None:
    from reidforge.data.readers import ConcatShards
    from reidforge.data.samplers import PKSampler

    for name in ("a", "b"):
        write_split(toy_source, tmp_path / name, "train", relabel=True, options=OPTS)
    a, b = IndexedShards(tmp_path / "a"), IndexedShards(tmp_path / "b")
    both = ConcatShards([a, b])
    assert len(both) == 80 and both.pids.tolist() == a.pids.tolist() + (b.pids + 10).tolist()
    assert both.camids.tolist() == a.camids.tolist() + (b.camids + 3).tolist()
    sample = both[45]
    assert (sample["index"], sample["pid"], sample["camid"]) == (45, 5 // 4 + 10 + 0, 5 % 3 + 3)
    assert torch.equal(sample["image"], b[5]["image"])
    batch = next(iter(PKSampler(both.pids, both.camids, p=4, k=2, seed=0)))
    assert len({int(both.pids[i]) for i in batch}) == 4
