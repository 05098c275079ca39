"""Damaged weights files: one line naming the file, from the loader and from every command that reads them."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import reidforge.shared.io
from reidforge.finetune.evaluate import main as evaluate_main
from reidforge.finetune.export_onnx import main as export_main
from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import main as spcl_main
from reidforge.shared.weights import METADATA_KEY, WeightsError, export_model, read_checkpoint, read_export_metadata


def _good(path: Path) -> Path:
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path),
              metadata={METADATA_KEY: json.dumps({"kind": "model", "architecture": "osnet"})})
    return path


def _damaged(tmp: Path) -> dict[str, Path]:
    good = _good(tmp / "good.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    files = {
        "random": b"\x93\x11" * 300,
        "truncated": good[:-40],
        "header_past_end": struct.pack("<Q", len(good) * 10) + good[8:],
        "wrong_shape": (lambda h: struct.pack("<Q", len(h)) + h)(b'["not", "a", "header"]'),
        "bad_metadata": None,
    }
    out = {}
    for name, data in files.items():
        path = tmp / f"{name}.safetensors"
        if data is None:
            save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: "{not json"})
        else:
            path.write_bytes(data)
        out[name] = path
    assert header_len > 0
    return out


@pytest.mark.parametrize("kind", ["random", "truncated", "header_past_end", "wrong_shape", "bad_metadata"])
def test_loader_names_the_damaged_file(tmp_path: Path, kind: str) -> None:
    path = _damaged(tmp_path)[kind]
    with pytest.raises(WeightsError, match=str(path.name)) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)
    if kind != "truncated":  # the header alone is sound in a truncated file
        with pytest.raises(WeightsError, match=str(path.name)):
            read_export_metadata(path)


def _one_line(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path.name in err, err


@pytest.mark.parametrize("kind", ["truncated", "header_past_end", "bad_metadata"])
def test_every_command_refuses_a_damaged_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          tiny_shards: Path, kind: str) -> None:
    bad = _damaged(tmp_path)[kind]
    split = tiny_shards / "synthetic_person"
    assert evaluate_main(["--weights", str(bad), "--query", str(split / "query"),
                          "--gallery", str(split / "gallery")]) == 2
    _one_line(capsys, bad)
    assert export_main(["--weights", str(bad)]) == 2
    _one_line(capsys, bad)
    common = [f"output_dir={tmp_path / 'runs'}"]
    assert train_main(["--config", "launch/configs/dm_osnet_tiny.yaml", *common, f"model.weights={bad}",
                       f"data.train=[{split / 'train'}]", f"data.query={split / 'query'}",
                       f"data.gallery={split / 'gallery'}"]) == 2
    _one_line(capsys, bad)
    assert spcl_main(["--config", "launch/configs/spcl_tiny.yaml", *common, f"model.weights={bad}",
                      f"data.train=[{tiny_shards / 'synthetic_lup' / 'pool'}]",
                      f"data.query={split / 'query'}", f"data.gallery={split / 'gallery'}"]) == 2
    _one_line(capsys, bad)


def test_export_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 2)
    path = tmp_path / "model_final.safetensors"
    export_model(model, path, {"kind": "model"})
    before = path.read_bytes()

    real_fsync = reidforge.shared.io.os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reidforge.shared.io.os, "fsync", full)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(WeightsError, match="model_final.safetensors: No space left"):
        export_model(model, path, {"kind": "model"})
    monkeypatch.setattr(reidforge.shared.io.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.safetensors"]
