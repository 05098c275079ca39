"""Checkpoints: verified by files.json, fall back past damage, prune in training order, fail cleanly on a
full disk, and never accept an RNG state that did not load."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from reidforge.shared import checkpoints
from reidforge.shared.checkpoints import CheckpointError, Checkpoints
from reidforge.shared.config import ConfigError
from reidforge.shared.io import atomic_open, atomic_write_json


@pytest.fixture
def acc() -> Accelerator:
    return Accelerator(cpu=True)


def _prepared(acc: Accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return acc.prepare(model, optimizer)


def _save_epochs(tmp_path: Path, acc: Accelerator, epochs: list[tuple[int, int]], keep: int = 5) -> Checkpoints:
    _prepared(acc)
    ckpt = Checkpoints(tmp_path / "checkpoints", keep)
    for epoch, step in epochs:
        ckpt.save(acc, epoch, {"epoch": epoch, "step": step},
                  {"memory": {"features": torch.full((4, 2), float(epoch))}}, step)
    return ckpt


def test_keep_checkpoints_below_one_is_a_config_error(tmp_path: Path) -> None:
    for keep in (0, -1):
        with pytest.raises(ConfigError, match=f"config key 'keep_checkpoints': must be >= 1, got {keep}"):
            Checkpoints(tmp_path, keep)


def test_prune_keeps_the_one_just_written_in_training_order(tmp_path: Path, acc: Accelerator) -> None:
    # epoch-0001-step-0000500 comes after epoch-0001 and before epoch-0002 (iteration 500 of the second epoch)
    ckpt = _save_epochs(tmp_path, acc, [(1, 0), (1, 500), (2, 0), (10000, 0)], keep=2)
    assert sorted(p.name for p in ckpt._all()) == ["epoch-0002", "epoch-10000"]
    assert (ckpt.root / "latest").read_text() == "epoch-10000" and ckpt.latest() == ckpt.root / "epoch-10000"

    # keep=1 keeps the new checkpoint, even when an older run's later names sort after it
    ckpt = Checkpoints(ckpt.root, 1)
    ckpt.save(acc, 1, {"epoch": 1})
    assert [p.name for p in ckpt._all()] == ["epoch-0001"] and ckpt.latest() == ckpt.root / "epoch-0001"


def test_files_json_lists_every_file_with_size_and_sha256(tmp_path: Path, acc: Accelerator) -> None:
    ckpt = _save_epochs(tmp_path, acc, [(1, 0)])
    path = ckpt.root / "epoch-0001"
    files = json.loads((path / "files.json").read_text())
    assert set(files) == {p.name for p in path.iterdir()} - {"files.json"}
    assert {"trainer_state.json", "memory.safetensors", "random_states_0.pkl", "optimizer.bin"} <= set(files)
    state = path / "trainer_state.json"
    assert files["trainer_state.json"]["size"] == state.stat().st_size
    assert files["trainer_state.json"]["sha256"] == checkpoints._sha256(state)


@pytest.mark.parametrize("damage", ["truncate model", "truncate optimizer", "truncate state", "truncate memory",
                                    "empty latest", "dangling latest", "deleted directory", "no files.json"])
def test_a_damaged_latest_checkpoint_falls_back_with_one_line(tmp_path: Path, acc: Accelerator, damage: str) -> None:
    ckpt = _save_epochs(tmp_path, acc, [(1, 0), (2, 0)])
    newest = ckpt.root / "epoch-0002"
    files = {"model": "model.safetensors", "optimizer": "optimizer.bin", "state": "trainer_state.json",
             "memory": "memory.safetensors"}
    kind, what = damage.split(" ", 1)
    if kind == "truncate":
        file = newest / files[what]
        os.truncate(file, file.stat().st_size // 2)
    elif damage == "empty latest":
        (ckpt.root / "latest").write_text("")
    elif damage == "dangling latest":
        (ckpt.root / "latest").write_text("epoch-0003")
    elif damage == "deleted directory":
        for file in newest.iterdir():
            file.unlink()
        newest.rmdir()
    else:
        (newest / "files.json").unlink()
    lines: list[str] = []
    good = ckpt.latest(lines.append)
    expected = ckpt.root / ("epoch-0002" if damage.endswith("latest") else "epoch-0001")
    assert good == expected
    assert len(lines) == 1 and lines[0].startswith("checkpoint skipped: ")
    assert lines[0].endswith(f"resuming from {good}")
    path, state = ckpt.restore(acc, good)
    assert state["epoch"] == int(good.name[-4:])
    assert Checkpoints.tensors(path, "memory")["features"][0, 0] == state["epoch"]


def test_no_good_checkpoint_is_one_line_naming_the_files(tmp_path: Path, acc: Accelerator) -> None:
    ckpt = _save_epochs(tmp_path, acc, [(1, 0), (2, 0)])
    for name in ("epoch-0001", "epoch-0002"):
        os.truncate(ckpt.root / name / "optimizer.bin", 10)
    with pytest.raises(CheckpointError) as err:
        ckpt.latest()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no usable checkpoint under {ckpt.root}")
    assert all(str(ckpt.root / n / "optimizer.bin") in message for n in ("epoch-0001", "epoch-0002"))
    assert Checkpoints(tmp_path / "none", 1).latest() is None


def test_a_damaged_rng_file_is_an_error_not_ignored(tmp_path: Path, acc: Accelerator) -> None:
    """A random_states file that files.json vouches for but accelerate cannot load: accelerate skips it
    silently; the digests in trainer_state.json catch it."""
    ckpt = _save_epochs(tmp_path, acc, [(1, 0)])
    path = ckpt.root / "epoch-0001"
    (path / "random_states_0.pkl").write_bytes(b"not a torch file")
    files = json.loads((path / "files.json").read_text())
    files["random_states_0.pkl"] = {"size": 16, "sha256": checkpoints._sha256(path / "random_states_0.pkl")}
    (path / "files.json").write_text(json.dumps(files))
    random.seed(123)  # RNG states other than the saved ones, as a fresh process would have
    np.random.seed(123)
    torch.manual_seed(123)
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl: restored python, numpy, torch RNG state "):
        ckpt.restore(acc)

    # an intact file restores every generator, and the check passes
    ckpt = _save_epochs(tmp_path / "ok", acc, [(1, 0)])
    expected = torch.rand(3), np.random.rand(3), random.random()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt.restore(acc)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


@pytest.mark.parametrize("where", ["accelerate state", "tensor group"])
def test_a_full_disk_leaves_no_tmp_and_the_previous_checkpoint(tmp_path: Path, acc: Accelerator,
                                                               monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    ckpt = _save_epochs(tmp_path, acc, [(1, 0)])
    before = json.loads((ckpt.root / "epoch-0001" / "files.json").read_text())

    def full(*args: object, **kwargs: object) -> None:
        target = ckpt.root / ".epoch-0002.tmp" / "memory.safetensors"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"x" * 1000)  # half-written, as a real full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    if where == "tensor group":
        monkeypatch.setattr(checkpoints, "save_file", full)
    else:
        monkeypatch.setattr(acc, "save_state", full)
    with pytest.raises(CheckpointError) as err:
        ckpt.save(acc, 2, {"epoch": 2}, {"memory": {"features": torch.zeros(4, 2)}})
    message = str(err.value)
    assert "\n" not in message and "disk full" in message
    assert str(ckpt.root / ".epoch-0002.tmp" / "memory.safetensors") in message
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["epoch-0001", "latest"]
    assert ckpt.latest() == ckpt.root / "epoch-0001"
    assert json.loads((ckpt.root / "epoch-0001" / "files.json").read_text()) == before


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_keep_the_umask_permissions(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_open(tmp_path / "a.bin") as f:
            f.write(b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == mode
