"""Every SpCL pass streams: URL splits over loopback HTTP, the streamed memory fill, streamed P x K training."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import reidforge.pretrain.spcl as spcl
from reidforge.data.readers import ConcatShards, IndexedShards, StreamingShards, split_keys
from reidforge.data.shards import ShardError, WriteOptions, load_manifest, write_split
from reidforge.data.streaming import PseudoIdentityStream
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.pretrain.spcl import SpCLConfig, SpCLTrainer, true_identities
from reidforge.shared.config import load_config
from conftest import killed_in_epoch


@pytest.fixture(scope="module")
def pool_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 unlabelled images of 12 hidden identities in 4 shards of 30."""
    root = tmp_path_factory.mktemp("stream")
    sources = build_sources(SyntheticConfig(pool_images=120, pool_images_per_id=10))
    write_split(sources["synthetic_lup"]["pool"], root / "pool", "pool",
                options=WriteOptions(samples_per_shard=30, progress=False))
    return root


@pytest.fixture(scope="module")
def server(pool_root: Path) -> Iterator[str]:
    """``http://127.0.0.1:<free port>`` serving ``pool_root`` (python -m http.server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(pool_root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/pool/manifest.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def _config(train: str, out: Path, name: str, *extra: str) -> SpCLConfig:
    return load_config(SpCLConfig, None, [
        f"run_name={name}", f"output_dir={out}", "model.name=osnet_x0_25", "model.weights=none", f"data.train=[{train}]",
        "data.p=4", "data.k=4", "data.workers=0", "data.test_batch_size=32", "data.transform.height=64",
        "data.transform.width=32", "epochs=2", "iters_per_epoch=3", "log_every=1", "cluster.k1=10", "cluster.k2=3",
        *extra])


def _trainer(train: str, out: Path, name: str, *extra: str) -> SpCLTrainer:
    torch.manual_seed(0)  # the same random init for every trainer compared
    return SpCLTrainer(_config(train, out, name, *extra))


def test_a_url_split_reads_as_its_directory(pool_root: Path, server: str) -> None:
    url = f"{server}/pool"
    assert load_manifest(url) == load_manifest(pool_root / "pool")
    assert split_keys(url) == split_keys(pool_root / "pool")
    local = [(s["index"], s["key"], s["image"]) for s in StreamingShards(pool_root / "pool", keep=np.arange(10, 70))]
    remote = [(s["index"], s["key"], s["image"]) for s in StreamingShards(url, keep=np.arange(10, 70))]
    assert [i for i, _, _ in remote] == list(range(10, 70))
    assert all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(local, remote))
    # labels for the samplers and the truth for ARI come through the URL too
    pool = ConcatShards([IndexedShards(url)])
    assert np.array_equal(true_identities(pool, np.arange(120)),
                          true_identities(ConcatShards([IndexedShards(pool_root / "pool")]), np.arange(120)))
    with pytest.raises(ShardError, match="reading by index needs local shards"):
        IndexedShards(url)[0]


def test_the_streamed_memory_fill_equals_the_indexed_one_over_http_and_locally(
        pool_root: Path, server: str, tmp_path: Path) -> None:
    # max_images: the slots are a filter on the samples' index, as a CFS selection is
    local = _trainer(str(pool_root / "pool"), tmp_path, "local", "data.max_images=100")
    remote = _trainer(f"{server}/pool", tmp_path, "remote", "data.max_images=100")
    assert np.array_equal(local.slots, np.arange(100)) and bool(local.valid.all())
    assert torch.equal(local.memory.features, remote.memory.features) and torch.equal(local.valid, remote.valid)
    # the old indexed fill: the same features in the same slots, bit for bit
    feats, positions = local._extract(local.test_pool, local.slots, "indexed")
    assert np.array_equal(positions, np.arange(100))
    assert torch.equal(local.memory.features, local.memory.to_storage(feats))
    assert remote.streamed_training and not local.streamed_training


def test_pseudo_identity_stream_emits_p_by_k_batches_and_resumes_at_a_batch(pool_root: Path) -> None:
    stream = StreamingShards(pool_root / "pool")
    labels = np.arange(120) // 10  # 12 classes of 10 images; class 11 trained on none
    labels[110:] = -1
    labels[105:110] = 20  # a class of 5 images split ... within one shard
    labels[5] = 30  # a one-image class

    def batches(start: int = 0, count: int = 12) -> list[dict]:
        s = PseudoIdentityStream(stream, labels, 3, 4, seed=1, epoch=0, start=start, shuffle_buffer=16)
        return [b for _, b in zip(range(count), iter(s))]

    first = batches()
    for batch in first:
        got = labels[batch["index"].numpy()].reshape(3, 4)
        assert batch["image"].shape[0] == 12 and (got == got[:, :1]).all() and (got >= 0).all()
    seen = np.unique(np.concatenate([b["index"].numpy() for b in first]))
    assert 30 in labels[seen] and not (seen >= 110).any()
    again = batches(start=5)
    assert all(b.get("skipped") for b in again[:5])
    assert all(torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
               for a, b in zip(first[5:], again[5:]))


def test_a_short_spcl_run_on_url_shards_trains_streamed_batches_and_resumes(
        pool_root: Path, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{server}/pool"
    whole = spcl.pretrain(_config(url, tmp_path, "whole"))
    assert [r["epoch"] for r in whole["history"]] == [1, 2] and whole["iteration"] == 6
    assert all(np.isfinite(r["loss"]) and -1 <= r["ARI"] <= 1 for r in whole["history"])
    # the streamed path resumes at an epoch boundary to the same run (rank 0 wrote the memory)
    with killed_in_epoch(monkeypatch, spcl.SpCLTrainer, 1):
        spcl.pretrain(_config(url, tmp_path, "killed"))
    resumed = spcl.pretrain(_config(url, tmp_path, "killed"), resume=True)
    assert [r["clusters"] for r in resumed["history"]] == [r["clusters"] for r in whole["history"]]
    assert [round(r["loss"], 5) for r in resumed["history"]] == [round(r["loss"], 5) for r in whole["history"]]
    events = list((tmp_path / "whole" / "tensorboard").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {f"memory/{p}_peak_mb" for p in ("extract", "cluster", "train", "checkpoint")} <= set(tags)


def test_a_bad_url_is_a_one_line_error_naming_it(server: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = f"{server}/no_such_split"
    base = [f"output_dir={tmp_path}", "model.weights=none", f"data.train=[{bad}]"]
    assert spcl.main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot fetch {bad}/manifest.json: ") and "\n" not in err
    assert not (tmp_path / "spcl").exists()  # before any work: no run directory
