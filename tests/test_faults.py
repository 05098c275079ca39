"""Fault injection, the fast cases of launch/bench/faults.py: each command is SIGKILLed (its whole process
group) at a seeded point of a named phase, run again until it finishes, and its outputs must equal an
uninterrupted run's, bit for bit (OMP_NUM_THREADS=1): the shard build killed while writing shards, the
tiny DM-OSNet fine-tuning killed in epoch 2's training with data.workers=0 and =2, SpCL killed while
re-extracting and clustering epoch 2's pseudo labels. The harness's own parser and comparison are
checked on hand-made inputs first."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("faults", REPO / "launch" / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses resolve the module's annotations through it
_spec.loader.exec_module(faults)


def test_phases_are_read_from_progress_bars_lines_and_files() -> None:
    log = faults.OutputLog()
    files = faults.Files()
    log.feed("loading\n")
    assert faults.finetune_phase(log.view(), files, 2) == ("startup", "")
    log.feed("\repoch 1/2:   0%|          | 0/3 [00:00<?, ?it/s]\repoch 1/2:  33%|###       | 1/3 [00:01<00:02]")
    assert faults.finetune_phase(log.view(), files, 2) == ("training", "e1")  # an unterminated redraw counts
    log.feed("\r" + " " * 40 + "\r")  # tqdm erases a finished bar
    assert faults.finetune_phase(log.view(), files, 2) == ("evaluation", "e1")
    log.feed("epoch 1 test: mAP 0.1672  R1 0.0000\n")
    assert faults.finetune_phase(log.view(), files, 2) == ("checkpoint", "e1")
    assert faults.finetune_phase(log.view(), faults.Files(".epoch-0001.tmp"), 2) == ("checkpoint", "epoch-0001")
    assert faults.finetune_phase(log.view(), faults.Files(done_epoch=1), 2) == ("training", "e2")
    log.feed("\repoch 2/2:  33%|###       | 1/3 [00:01<00:02]\r   \repoch 2 test: mAP 0.2\n")
    assert faults.finetune_phase(log.view(), faults.Files(done_epoch=2), 2) == ("export", "")

    spcl = faults.OutputLog()
    spcl.feed("\rmemory features:  50%|#####     | 2/4 [00:00<00:00]")
    assert faults.spcl_phase(spcl.view(), files, 2) == ("startup", "")
    spcl.feed("\r          \r")
    assert faults.spcl_phase(spcl.view(), files, 2) == ("clustering", "e1")
    spcl.feed("\repoch 1/2:  0%|          | 0/3 [00:00<?]\r     \repoch 1  clusters 14  outliers 95  loss 3.8\n")
    assert faults.spcl_phase(spcl.view(), files, 2) == ("checkpoint", "e1")
    assert faults.spcl_phase(spcl.view(), faults.Files(done_epoch=1), 2) == ("clustering", "e2")
    spcl.feed("\rmemory features:  25%|##        | 1/4 [00:00<00:00]")
    assert faults.spcl_phase(spcl.view(), faults.Files(done_epoch=1), 2) == ("clustering", "e2")


def test_comparison_ignores_timings_and_names_the_first_differing_tensor(tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(3), "labels": torch.arange(4)}
    for root, seconds in ((ref, 1.5), (run, 2.5)):
        (root / "checkpoints" / ".epoch-0002.tmp").mkdir(parents=True)  # a killed write: hidden, not compared
        save_file(tensors, str(root / "model_final.safetensors"))
        (root / "metrics.json").write_text(json.dumps({"history": [{"mAP": 0.25, "eval_seconds": seconds}]}))
    assert (faults.compare_outputs(ref, run).outcome, faults.compare_outputs(ref, run).first) == ("identical", "")

    save_file({**tensors, "b.bias": torch.ones(3) + 1e-7}, str(run / "model_final.safetensors"))
    within = faults.compare_outputs(ref, run)
    assert within.outcome == "within tolerance"
    assert within.first.startswith("model_final.safetensors: 1/3 tensors differ, first b.bias (max |diff| 1.19e-07")
    save_file({**tensors, "labels": torch.tensor([0, 1, 3, 2])}, str(run / "model_final.safetensors"))
    (run / "metrics.json").write_text(json.dumps({"history": [{"mAP": 0.26, "eval_seconds": 1.5}]}))
    failed = faults.compare_outputs(ref, run)
    assert failed.outcome == "failed"
    assert failed.first == "model_final.safetensors: 1/3 tensors differ, first labels (2 of 4 values differ)"
    assert failed.details[1] == "metrics.json: /history[0]/mAP: 0.26 vs 0.25 (reference)"
    (ref / "extra.tar").write_bytes(b"x")
    assert "extra.tar: missing after the resumed run" in faults.compare_outputs(ref, run).details


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> faults.Bench:
    """References on one small synthetic world, each run once for the whole module."""
    return faults.Bench(tmp_path_factory.mktemp("faults"), "small", threads=1)


def _killed(bench: faults.Bench, command: str, phase: str, occurrence: int, fraction: float,
            root: Path) -> faults.Trial:
    """Kill ``command`` at ``fraction`` of its ``occurrence``-th entry into ``phase`` (as long as the reference's)."""
    ref = bench.ref(command)
    _, duration = ref.occurrences(phase)[occurrence]
    return faults.trial(ref, root, faults.Point(phase=phase, occurrence=occurrence, delay=fraction * duration))


def test_shard_build_killed_while_writing_resumes_to_identical_shards(bench: faults.Bench, tmp_path: Path) -> None:
    ref = bench.ref("shards")
    for seed in (0, 1):  # two seeded points of the build: a split's shards, at a fraction of their writing
        point = faults.plan_point(ref, random.Random(seed), "shards")
        result = faults.trial(ref, tmp_path / str(seed), point)
        assert result.phase in ("shards", "index")  # killed while a split was written, or just after
        assert result.outcome == "identical", result.details


# workers=0 is the same path without the worker processes: long matrix only, to keep the default suite short
@pytest.mark.parametrize("command", [pytest.param("finetune", marks=pytest.mark.slow), "finetune-w2"])
def test_finetune_killed_in_training_resumes_bit_identical(bench: faults.Bench, tmp_path: Path, command: str) -> None:
    """Killed in epoch 2 of 2 (data.workers=0, then 2): --resume from epoch 1's checkpoint must retrain
    epoch 2 exactly (model_final, the checkpoints' model, optimiser and RNG files, metrics)."""
    result = _killed(bench, command, "training", 1, 0.5, tmp_path)
    assert (result.phase, result.detail) == ("training", "e2")
    assert result.outcome == "identical", result.details


def test_spcl_killed_in_clustering_resumes_bit_identical(bench: faults.Bench, tmp_path: Path) -> None:
    """Killed while epoch 2 re-extracts features and clusters them: --resume from epoch 1's checkpoint
    must give the same labels, memory, backbone and history."""
    result = _killed(bench, "spcl", "clustering", 1, 0.5, tmp_path)
    assert (result.phase, result.detail) == ("clustering", "e2")
    assert result.outcome == "identical", result.details
