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

from reidforge.shared.progress import RunProgress

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("faults", REPO / "launch" / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses resolve the module's annotations through it
_spec.loader.exec_module(faults)


def test_phases_are_read_from_progress_lines_and_files() -> None:
    log = faults.OutputLog()
    files = faults.Files()
    log.feed("config:\n  epochs: 2\n")
    assert faults.run_phase(log.events, files, 2) == ("startup", "")
    run = RunProgress(2, 3, enabled=False)  # the lines a run prints, from the formatter itself
    run.set_phase("train")
    log.feed(run.line() + "\n[train] epoch 1/2  iter 2/6 (33%)  loss 4.1")
    assert faults.run_phase(log.events, files, 2) == ("training", "e1")
    log.feed("00  2.0 it/s  eta 2s\n[eval] epoch 1/2  iter 3/6 (50%)  loss 4.100  2.0 it/s  eta 2s\n")
    assert faults.run_phase(log.events, files, 2) == ("evaluation", "e1")
    log.feed("[eval] embedding query  0/1 batch (0%)\n[eval] embedding query  1/1 batch (100%)  done in 0s\n")
    assert faults.run_phase(log.events, files, 2) == ("evaluation", "e1")  # a pass inside the phase
    log.feed("epoch 1 test: mAP 0.1672  R1 0.0000\n[checkpoint] epoch 1/2  iter 3/6 (50%)  2.0 it/s  eta 2s\n")
    assert faults.run_phase(log.events, files, 2) == ("checkpoint", "e1")
    assert faults.run_phase(log.events, faults.Files(".epoch-0001.tmp"), 2) == ("checkpoint", "epoch-0001")
    assert faults.run_phase(log.events, faults.Files(export_tmp=True), 2) == ("export", "")
    run.start_epoch(1)
    run.set_phase("export")
    log.feed(run.line() + "\n")
    assert faults.run_phase(log.events, files, 2) == ("export", "")
    log.feed(run.line(done=True) + "\n")
    assert faults.run_phase(log.events, files, 2) == ("exit", "")
    assert log.lines == ["config:", "epochs: 2", "epoch 1 test: mAP 0.1672  R1 0.0000"]

    spcl = faults.OutputLog()  # passes before the run's first line are its startup
    spcl.feed("[extract] memory features  0/4 batch (0%)\n[extract] memory features  4/4 batch (100%)  done in 0s\n")
    assert faults.run_phase(spcl.events, files, 2) == ("startup", "")
    spcl.feed("[cluster] epoch 1/2  iter 0/6 (0%)\n")
    assert faults.run_phase(spcl.events, files, 2) == ("clustering", "e1")
    spcl.feed("[train] epoch 1/2  iter 0/6 (0%)\nepoch 1  clusters 14  outliers 95  loss 3.8\n"
              "[checkpoint] epoch 1/2  iter 3/6 (50%)  1.0 it/s  eta 3s\n")
    assert faults.run_phase(spcl.events, files, 2) == ("checkpoint", "e1")
    spcl.feed("[extract] epoch 2/2  iter 3/6 (50%)  1.0 it/s  eta 3s\n[extract] memory features  0/4 batch (0%)\n")
    assert faults.run_phase(spcl.events, files, 2) == ("clustering", "e2")  # re-extraction, then clustering

    shards = faults.OutputLog()
    shards.feed("[shards] synthetic_person/train  0/72 img (0%)\n")
    assert faults.shards_phase(shards.events, files, 0) == ("shards", "synthetic_person/train")
    shards.feed("[shards] synthetic_person/train  72/72 img (100%)  90.0 img/s  done in 1s\n")
    assert faults.shards_phase(shards.events, files, 0) == ("index", "synthetic_person/train")
    shards.feed("| dataset | split |\n")
    assert faults.shards_phase(shards.events, files, 0) == ("exit", "")
    cfs = faults.OutputLog()
    cfs.feed("model A: ...\n[score] CFS  0/240 img (0%)\n")
    assert faults.cfs_phase(cfs.events, files, 0) == ("scoring", "")
    cfs.feed("[score] CFS  240/240 img (100%)  80.0 img/s  done in 3s\n")
    assert faults.cfs_phase(cfs.events, files, 0) == ("writing", "")
    cfs.feed("240 images scored (0 lost); CFS median 0.5\n")
    assert faults.cfs_phase(cfs.events, files, 0) == ("exit", "")


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
