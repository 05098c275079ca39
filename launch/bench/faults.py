"""Fault injection: SIGKILL every long-running command at seeded points, resume it, compare with a whole run.

    python launch/bench/faults.py [--trials 3] [--seed 0] [--size small|medium] [--commands a,b]
                                  [--points cmd:phase[@occurrence],...] [--threads 1] [--quick]
                                  [--out runs/bench/faults.json] [--work DIR --keep]

Commands, all on a freshly rendered synthetic world, CPU only, each trial in its own directory:

| command       | what runs                                                        | after a kill                   |
|---------------|------------------------------------------------------------------|--------------------------------|
| `shards`      | `data/build_shards.py synthetic` (2 encoding workers)            | the same command (it resumes)  |
| `cfs`         | `pretrain/cfs.py score` of the pool (A: init export, B: finetune) | the same command (it restarts) |
| `spcl`        | `pretrain/spcl.py` with `spcl_tiny.yaml`, re-extraction, eval    | `--resume`                     |
| `spcl-iters`  | the same with `checkpoint_every_iters=1` (mid-epoch checkpoints) | `--resume`                     |
| `finetune`    | `finetune/train.py` with `dm_osnet_tiny.yaml`, `data.workers=0`  | `--resume`                     |
| `finetune-w2` | the same with `data.workers=2`                                   | `--resume`                     |

A training command killed before its first checkpoint has nothing to resume: its run directory is
removed and the command started again, as a user would.

Each command first runs once uninterrupted (the reference), with its output parsed into a timeline of
phases (startup, training, clustering, evaluation, checkpoint, export, ...: the plain progress lines of
``reidforge.shared.progress``, which name each phase as it begins; a checkpoint write is seen as the
hidden ``.epoch-*.tmp`` directory, an export as the hidden ``.<name>.safetensors.<random>.tmp`` file).
A trial starts the command in its own process group and SIGKILLs the group

- at a seeded random time: the child's first output plus u x the reference's span from its first
  output to its end, u ~ U(0, 1) (startup, before any output, writes nothing worth killing), or
- with ``--points``: inside a named phase, at a seeded fraction of that phase's duration in the
  reference (``@N``: its N-th occurrence, 0-based; default a seeded one),

then re-runs it until it finishes and compares the outputs file by file with the reference's. The
phase recorded for a trial is the one the child was in when it died, read from everything it printed
and the files it left. Outcomes:

- ``identical``: every file byte-identical, except fields that record the wall clock or the
  invocation (``*seconds`` keys in JSON, a manifest's ``reused_shards``), TensorBoard event files and
  the run's ``log.txt``;
  safetensors and optimiser files compared tensor by tensor with ``torch.equal``;
- ``within tolerance``: every float tensor and JSON number within ``|a - b| <= atol + rtol * |b|``
  (``--rtol 1e-3 --atol 1e-5``), everything else identical;
- ``failed``: anything else, a resumed run that exits non-zero, or one that hangs (5x the reference).

With ``--threads 1`` (the default: OMP_NUM_THREADS=1) only ``identical`` passes; with more threads,
floating-point reductions may vary, and ``within tolerance`` passes too. The command exits 1 when any
trial does not pass. It prints the matrix (command x phase: trials, points hit, outcomes, the first
failure's first line) and writes it with every trial to ``--out``.

``--quick`` (for CI): the small world, one trial at each of the points that matter (shard writing,
CFS scoring, SpCL training, clustering and checkpoint writing, SpCL with mid-epoch checkpoints killed
in epoch 1's closing checkpoint (so it resumes mid-epoch), fine-tuning training, evaluation and
export, fine-tuning with DataLoader workers in training).
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from reidforge.shared.io import atomic_write_json
from reidforge.shared.runlog import LOG_NAME
from reidforge.shared.table import format_table

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "configs"
COMMANDS = ("shards", "cfs", "spcl", "spcl-iters", "finetune", "finetune-w2")
QUICK_POINTS = ("shards:shards", "cfs:scoring", "spcl:training@1", "spcl:clustering@1", "spcl:checkpoint@0",
                "spcl-iters:checkpoint@2", "finetune:training@1", "finetune:evaluation@1", "finetune:export",
                "finetune-w2:training@1")
POLL_S = 0.003

# Sizes: the synthetic world (launch/configs/synthetic.yaml keys) and the training lengths. Small keeps
# every run to seconds on 2 cores; medium gives longer phases and more shards.
SIZES: dict[str, dict[str, Any]] = {
    "small": {"world": ["train_ids=12", "images_per_train_id=6", "test_ids=6", "images_per_test_id=6",
                        "distractors=6", "pool_images=240", "pool_images_per_id=10", "vehicle_train_ids=2",
                        "vehicle_test_ids=2", "images_per_vehicle_id=4"],
              "samples_per_shard": 16, "finetune": ["epochs=2", "iters_per_epoch=3", "data.p=4", "data.k=4"],
              "spcl": ["epochs=2", "iters_per_epoch=3", "data.p=4", "data.k=4", "eval_every=2"]},
    "medium": {"world": ["train_ids=32", "images_per_train_id=8", "test_ids=12", "images_per_test_id=8",
                         "distractors=20", "pool_images=600", "pool_images_per_id=10", "vehicle_train_ids=4",
                         "vehicle_test_ids=4", "images_per_vehicle_id=6"],
               "samples_per_shard": 32, "finetune": ["epochs=3", "iters_per_epoch=6", "data.p=8", "data.k=4"],
               "spcl": ["epochs=4", "iters_per_epoch=6", "data.p=8", "data.k=4", "eval_every=2"]},
}


# -- the child's output as events ------------------------------------------------------------------
# The children print reidforge.shared.progress's plain lines (child_env: REIDFORGE_PROGRESS=lines): a training
# run's "[phase] epoch E/N  iter ...", any other pass's "[phase] description  n/total ...", and the closing
# line of either ends "  done in <time>". Each is printed as its phase begins.
PROGRESS = re.compile(r"^\[(?P<phase>[a-z]+)\] (?P<desc>.+?)  \S.*?(?P<done>  done in \S+)?$")
RUN = re.compile(r"epoch (\d+)/\d+")


@dataclass(frozen=True)
class Event:
    kind: str  # "run" (a training run's progress line), "pass" (another pass's), "line" (anything else)
    text: str  # run: "epoch E/N"; pass: its description; line: the line
    phase: str = ""  # run and pass: the phase in brackets
    done: bool = False  # run and pass: the closing line


class OutputLog:
    """Everything a child printed (stdout and stderr merged), one event per line."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lines: list[str] = []  # the lines that are not progress
        self._tail = ""

    def feed(self, text: str) -> None:
        *parts, self._tail = (self._tail + text).split("\n")
        for part in parts:
            self._line(part)

    def close(self) -> None:
        self._line(self._tail)
        self._tail = ""

    def _line(self, part: str) -> None:
        text = part.strip()
        if not text:
            return
        match = PROGRESS.match(text)
        if match:
            kind = "run" if RUN.fullmatch(match["desc"]) else "pass"
            self.events.append(Event(kind, match["desc"], match["phase"], bool(match["done"])))
        else:
            self.events.append(Event("line", text))
            self.lines.append(text)


@dataclass(frozen=True)
class Files:
    """What a training run has left on disk that tells its phase."""

    checkpoint_tmp: str = ""  # name of the hidden checkpoint directory being written
    export_tmp: bool = False


def _run_files(run_dir: Path) -> Files:
    try:
        names = os.listdir(run_dir / "checkpoints")
    except FileNotFoundError:
        names = []
    tmp = next((n for n in names if n.startswith(".epoch-") and n.endswith(".tmp")), "")
    try:
        export_tmp = any(re.fullmatch(r"\..+\.safetensors\..*\.tmp", n) for n in os.listdir(run_dir))
    except FileNotFoundError:
        export_tmp = False
    return Files(tmp, export_tmp)


def _last(events: Sequence[Event], wanted: Callable[[Event], bool]) -> Event | None:
    return next((e for e in reversed(events) if wanted(e)), None)


# A run's progress phases as the bench names them: SpCL's re-extraction and its clustering are one phase.
RUN_PHASES = {"train": "training", "extract": "clustering", "cluster": "clustering", "eval": "evaluation",
              "checkpoint": "checkpoint", "export": "export"}


def run_phase(events: Sequence[Event], files: Files, epochs: int) -> tuple[str, str]:
    """finetune/engine.py and pretrain/spcl.py: the phase of the run's last progress line, with its epoch
    (train, evaluation, checkpoint; SpCL's clustering); a checkpoint or export being written, seen in the
    files. Before the run's first line 'startup' (SpCL's BatchNorm calibration and the memory's first
    fill are passes of their own), after its closing line or 'run directory:' 'exit'."""
    if files.checkpoint_tmp:
        return "checkpoint", files.checkpoint_tmp[1:-4]
    if files.export_tmp:
        return "export", ""
    last = _last(events, lambda e: e.kind == "run" or e.text.startswith("run directory:"))
    if last is None:
        return "startup", ""
    if last.kind == "line" or last.done:
        return "exit", ""
    phase = RUN_PHASES.get(last.phase, last.phase)
    return phase, "" if phase == "export" else f"e{RUN.fullmatch(last.text)[1]}"


def shards_phase(events: Sequence[Event], files: Files, epochs: int) -> tuple[str, str]:
    """data/build_shards.py: one pass per split while its shards are written; after it closes the split's
    index and manifest and the next split's plan; the summary table at the end."""
    last = _last(events, lambda e: e.kind == "pass" or e.text.startswith("| dataset"))
    if last is None:
        return "startup", ""
    if last.kind == "line":
        return "exit", ""
    return ("index" if last.done else "shards"), last.text


def cfs_phase(events: Sequence[Event], files: Files, epochs: int) -> tuple[str, str]:
    """pretrain/cfs.py score: the models load, one 'CFS' pass over the split, the outputs are written."""
    last = _last(events, lambda e: (e.kind == "pass" and e.phase == "score") or " images scored " in e.text)
    if last is None:
        return "startup", ""
    if last.kind == "line":
        return "exit", ""
    return ("writing" if last.done else "scoring"), ""


# -- commands --------------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    argv: list[str]  # run in the trial directory
    output: str  # the directory (relative to the trial's) compared with the reference's
    phase: Callable[[Sequence[Event], Files, int], tuple[str, str]]
    resumes: bool  # True: re-run with --resume (a training run); False: re-run the same command
    epochs: int = 0


def _overrides_value(overrides: Sequence[str], key: str) -> int:
    return int(next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")))


def world_argv(size: str, python: str = sys.executable) -> list[str]:
    s = SIZES[size]
    return [python, str(REPO / "data" / "build_shards.py"), "synthetic", "--out", "shards", "--config",
            str(CONFIGS / "synthetic.yaml"), "--workers", "2", "--samples-per-shard", str(s["samples_per_shard"]),
            "seed=0", *s["world"]]


def shards_command(size: str) -> Command:
    return Command("shards", world_argv(size), "shards", shards_phase, resumes=False)


def finetune_command(shards: Path, size: str, workers: int = 0, name: str = "finetune",
                     extra: Sequence[str] = ()) -> Command:
    person = shards / "synthetic_person"
    overrides = ["output_dir=runs", "run_name=run", f"data.train=[{person / 'train'}]", f"data.query={person / 'query'}",
                 f"data.gallery={person / 'gallery'}", f"data.workers={workers}", "data.test_batch_size=64",
                 "data.transform.height=64", "data.transform.width=32", "eval_every=1", "checkpoint_every=1",
                 "keep_checkpoints=2", *SIZES[size]["finetune"], *extra]
    return Command(name, [sys.executable, str(REPO / "finetune" / "train.py"), "--config",
                          str(CONFIGS / "dm_osnet_tiny.yaml"), *overrides], "runs/run", run_phase,
                   resumes=True, epochs=_overrides_value(overrides, "epochs"))


def spcl_command(shards: Path, size: str, name: str = "spcl", extra: Sequence[str] = ()) -> Command:
    person = shards / "synthetic_person"
    overrides = ["output_dir=runs", "run_name=run", f"data.train=[{shards / 'synthetic_lup' / 'pool'}]",
                 f"data.query={person / 'query'}", f"data.gallery={person / 'gallery'}", "data.workers=0",
                 "data.test_batch_size=64", "bn_calibration_batches=1", "cluster.k1=10", "cluster.k2=3",
                 "checkpoint_every=1", "keep_checkpoints=2", *SIZES[size]["spcl"], *extra]
    return Command(name, [sys.executable, str(REPO / "pretrain" / "spcl.py"), "--config",
                          str(CONFIGS / "spcl_tiny.yaml"), *overrides], "runs/run", run_phase,
                   resumes=True, epochs=_overrides_value(overrides, "epochs"))


def cfs_command(shards: Path, pretrained: Path, finetuned: Path) -> Command:
    return Command("cfs", [sys.executable, str(REPO / "pretrain" / "cfs.py"), "score",
                           str(shards / "synthetic_lup" / "pool"), "--arch", "dm_osnet", "--pretrained", str(pretrained),
                           "--finetuned", str(finetuned), "--workers", "0", "--batch-size", "16", "--out", "cfs"],
                   "cfs", cfs_phase, resumes=False)


# -- running a child -------------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "REIDFORGE_PROGRESS": "lines"}


@dataclass
class Point:
    """Where to kill: ``at`` seconds after the child's first output, or inside ``phase``'s
    ``occurrence``-th entry (0-based), ``delay`` seconds after it began."""

    at: float | None = None
    phase: str = ""
    occurrence: int = 0
    delay: float = 0.0


@dataclass
class Run:
    returncode: int | None
    seconds: float
    first_output: float | None  # seconds from start to the first event
    timeline: list[tuple[float, str, str]]  # (seconds, phase, detail) at each change
    killed: bool
    phase: tuple[str, str]  # where the child was when it ended (or was killed)
    output: list[str]
    hung: bool = False


def run_child(command: Command, cwd: Path, threads: int, point: Point | None = None, timeout: float = 600.0,
              extra: Sequence[str] = ()) -> Run:
    """Run ``command`` in ``cwd`` in its own process group; SIGKILL the group at ``point`` (or on timeout)."""
    proc = subprocess.Popen([*command.argv, *extra], cwd=cwd, env=child_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    lock = threading.Lock()

    def pump() -> None:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            with lock:
                chunks.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    log, run_dir = OutputLog(), cwd / command.output
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character's bytes may straddle reads
    start = time.monotonic()
    first: float | None = None
    timeline: list[tuple[float, str, str]] = []
    entries, entered, killed, hung = 0, None, False, False
    while True:
        now = time.monotonic() - start
        with lock:
            fresh, chunks[:] = b"".join(chunks), []
        if fresh:
            log.feed(decoder.decode(fresh))
        events = log.events
        if first is None and events:
            first = now
        phase = command.phase(events, _run_files(run_dir), command.epochs)
        if not timeline or timeline[-1][1:] != phase:
            if point is not None and point.phase and phase[0] == point.phase and (
                    not timeline or timeline[-1][1] != point.phase):
                if entries == point.occurrence:
                    entered = now
                entries += 1
            timeline.append((now, *phase))
        due = (point is not None and ((point.at is not None and first is not None and now >= first + point.at)
                                      or (entered is not None and now >= entered + point.delay)))
        if proc.poll() is not None:
            break
        if due or now > timeout:
            killed, hung = True, not due
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(POLL_S)
    reader.join(timeout=30)
    with lock:
        log.feed(decoder.decode(b"".join(chunks), final=True))
    log.close()
    seconds = time.monotonic() - start
    final = command.phase(log.events, _run_files(run_dir), command.epochs)
    return Run(None if killed else proc.returncode, seconds, first, timeline, killed, final, log.lines, hung)


# -- comparing outputs ------------------------------------------------------------------------------
IDENTICAL, WITHIN, FAILED = "identical", "within tolerance", "failed"
VOLATILE_KEYS = ("reused_shards",)  # a manifest's count of the shards this invocation found done
DIGESTS = "files.json"  # a checkpoint's own list of its files' sizes and sha256


@dataclass
class Comparison:
    outcome: str
    first: str = ""  # the first failure (or the first tolerated difference)
    details: list[str] = field(default_factory=list)

    def add(self, outcome: str, line: str) -> None:
        rank = {IDENTICAL: 0, WITHIN: 1, FAILED: 2}
        if rank[outcome] > rank[self.outcome]:
            self.outcome, self.first = outcome, line
        if outcome != IDENTICAL:
            self.details.append(line)


def _compared_files(root: Path) -> list[str]:
    """Regular files under ``root``, without hidden temporaries, TensorBoard events and the run's log.txt
    (wall-clock stamped, and a resumed run's log holds both invocations); exports first, then checkpoints,
    so a failure names the most telling file."""
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))
             and "tensorboard" not in f.split("/") and f.rsplit("/", 1)[-1] != LOG_NAME]
    return sorted(files, key=lambda f: (f.count("/") > 0, not f.endswith(".safetensors"), f))


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not k.endswith("seconds") and k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _digests(path: Path) -> dict[str, Any]:
    """A checkpoint's files.json without the digests of files that hold wall-clock fields (trainer_state.json's
    timings): those files are compared themselves, scrubbed; every other digest must match."""
    entries = json.loads(path.read_text())
    return {k: (v if k.endswith((".safetensors", ".bin", ".pkl")) else "compared separately")
            for k, v in entries.items()}


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b) or (math.isnan(a) and math.isnan(b))


def _json_diff(a: Any, b: Any, rtol: float, atol: float, where: str = "") -> tuple[str, str] | None:
    """The first difference of two JSON values: (outcome, path and values), None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return FAILED, f"{where or '/'}: keys {sorted(set(a) ^ set(b))} differ"
        worst = None
        for key in sorted(a):
            diff = _json_diff(a[key], b[key], rtol, atol, f"{where}/{key}")
            if diff and diff[0] == FAILED:
                return diff
            worst = worst or diff
        return worst
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return FAILED, f"{where}: {len(a)} entries vs {len(b)}"
        worst = None
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _json_diff(x, y, rtol, atol, f"{where}[{i}]")
            if diff and diff[0] == FAILED:
                return diff
            worst = worst or diff
        return worst
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    outcome = WITHIN if numbers and isinstance(a, float) and _close(a, b, rtol, atol) else FAILED
    return outcome, f"{where}: {a!r} vs {b!r} (reference)"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    flat: dict[str, torch.Tensor] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{prefix}[{i}]")
        else:
            flat[prefix] = torch.tensor([float(value)]) if isinstance(value, (int, float)) else value
    walk(torch.load(path, map_location="cpu", weights_only=True), "")
    return flat


def _tensor_diff(name: str, a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float) -> tuple[str, str] | None:
    if a.keys() != b.keys():
        return FAILED, f"{name}: tensor names differ ({sorted(set(a) ^ set(b))[:3]})"
    differ = [k for k in sorted(a) if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    if not differ:
        return None
    first = differ[0]
    x, y = a[first], b[first]
    tolerated = all(isinstance(a[k], torch.Tensor) and a[k].is_floating_point() and a[k].shape == b[k].shape
                    and torch.allclose(a[k].double(), b[k].double(), rtol, atol, equal_nan=True) for k in differ)
    if isinstance(x, torch.Tensor) and x.shape == y.shape and x.is_floating_point():
        delta = f"max |diff| {(x.double() - y.double()).abs().max().item():.3g}"
    elif isinstance(x, torch.Tensor) and x.shape == y.shape:
        delta = f"{int((x != y).sum())} of {x.numel()} values differ"
    else:
        delta = "shapes or values differ"
    return (WITHIN if tolerated else FAILED), f"{name}: {len(differ)}/{len(a)} tensors differ, first {first} ({delta})"


def compare_outputs(reference: Path, trial: Path, rtol: float = 1e-3, atol: float = 1e-5) -> Comparison:
    """Compare a trial's output directory with the reference's (see the module docstring for the rules)."""
    result = Comparison(IDENTICAL)
    if not trial.is_dir():
        result.add(FAILED, f"{trial.name}: no output directory")
        return result
    ref_files, trial_files = _compared_files(reference), _compared_files(trial)
    for name in [f for f in ref_files if f not in trial_files]:
        result.add(FAILED, f"{name}: missing after the resumed run")
    for name in [f for f in trial_files if f not in ref_files]:
        result.add(FAILED, f"{name}: not in the reference run")
    for name in [f for f in ref_files if f in trial_files]:
        a, b = trial / name, reference / name
        if a.read_bytes() == b.read_bytes():
            continue
        suffix = a.suffix
        try:
            if a.name == DIGESTS:
                diff = _json_diff(*(_digests(path) for path in (a, b)), rtol, atol)
                diff = diff and (FAILED, f"{name}: {diff[1]}")
            elif suffix == ".json":
                diff = _json_diff(_scrub(json.loads(a.read_text())), _scrub(json.loads(b.read_text())), rtol, atol)
                diff = diff and (diff[0], f"{name}: {diff[1]}")
            elif suffix in (".safetensors", ".bin"):
                diff = _tensor_diff(name, _tensors(a), _tensors(b), rtol, atol)
                if diff is None and suffix == ".safetensors":
                    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                        meta = _json_diff(fa.metadata(), fb.metadata(), rtol, atol)
                    diff = meta and (FAILED, f"{name}: metadata {meta[1]}")
            elif suffix == ".npy":
                x, y = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
                same = x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))
                diff = None if same else (FAILED, f"{name}: arrays differ")
            else:
                diff = (FAILED, f"{name}: bytes differ")
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
            # an unreadable file is a failed outcome, named, not a crash of the harness
            diff = (FAILED, f"{name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if diff:
            result.add(*diff)
    return result


# -- references and trials -------------------------------------------------------------------------
@dataclass
class Reference:
    command: Command
    root: Path  # the trial-like directory it ran in
    run: Run

    @property
    def span(self) -> float:
        return self.run.seconds - (self.run.first_output or 0.0)

    def occurrences(self, phase: str) -> list[tuple[float, float]]:
        """(start, duration) of each entry into ``phase`` in the reference's timeline."""
        spans, line = [], self.run.timeline + [(self.run.seconds, "end", "")]
        for (t, p, _), (t_next, _, _) in itertools.pairwise(line):
            if p == phase and (not spans or spans[-1][2] != t):
                spans.append([t, t_next - t, t_next])
            elif p == phase:
                spans[-1][1:] = [spans[-1][1] + t_next - t, t_next]
        return [(s, d) for s, d, _ in spans]


def reference(command: Command, root: Path, threads: int = 1) -> Reference:
    """The uninterrupted run every trial is compared with."""
    root.mkdir(parents=True, exist_ok=True)
    run = run_child(command, root, threads)
    if run.returncode != 0:
        raise RuntimeError(f"reference run of {command.name} exited {run.returncode}: "
                           f"{run.output[-1] if run.output else '(no output)'}")
    return Reference(command, root, run)


@dataclass
class Trial:
    command: str
    target: str  # "random" or the phase aimed at
    phase: str  # the phase hit
    detail: str
    outcome: str
    first: str
    kill_at: float  # seconds after the child's first output (random), or after it entered the aimed phase
    attempts: int
    details: list[str] = field(default_factory=list)


def _first_error(run: Run) -> str:
    lines = [line for line in run.output if line.startswith(("error", "Traceback")) or "Error" in line]
    return (lines[-1] if lines else run.output[-1] if run.output else "(no output)")[:200]


def plan_point(ref: Reference, rng: random.Random, phase: str = "", occurrence: int | None = None) -> Point:
    """A seeded kill point: a random time of the reference's span, or inside one of ``phase``'s entries."""
    if not phase:
        return Point(at=rng.random() * ref.span)
    spans = ref.occurrences(phase)
    if not spans:
        raise ValueError(f"{ref.command.name}: the reference run never entered phase {phase!r} "
                         f"(it went through {sorted({p for _, p, _ in ref.run.timeline})})")
    index = rng.randrange(len(spans)) if occurrence is None else min(occurrence, len(spans) - 1)
    return Point(phase=phase, occurrence=index, delay=rng.random() * spans[index][1])


def trial(ref: Reference, root: Path, point: Point, threads: int = 1, rtol: float = 1e-3,
          atol: float = 1e-5, keep: bool = False) -> Trial:
    """Kill the command at ``point``, re-run it until it finishes, compare with the reference."""
    command = ref.command
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    timeout = 5 * ref.run.seconds + 60
    killed = run_child(command, root, threads, point, timeout)
    phase, detail = killed.phase if killed.killed else ("(finished)", "")
    attempts, outcome = 1, None
    if killed.hung:
        outcome = Comparison(FAILED, f"hung: no end after {timeout:.0f} s in phase {phase}")
    elif not killed.killed and killed.returncode != 0:
        outcome = Comparison(FAILED, f"exited {killed.returncode} before the kill: {_first_error(killed)}")
    elif killed.killed:
        extra: list[str] = []
        run_dir = root / command.output
        if command.resumes:
            if any(re.fullmatch(r"epoch-\d+(-step-\d+)?", p.name) for p in (run_dir / "checkpoints").glob("epoch-*")):
                extra = ["--resume"]
            else:  # killed before its first checkpoint: nothing to resume, start again
                shutil.rmtree(run_dir, ignore_errors=True)
        again = run_child(command, root, threads, None, timeout, extra)
        attempts += 1
        if again.hung:
            outcome = Comparison(FAILED, f"resumed run hung (no end after {timeout:.0f} s)")
        elif again.returncode != 0:
            outcome = Comparison(FAILED, f"{' '.join(extra) or 're-run'} exited {again.returncode}: "
                                         f"{_first_error(again)}")
    if outcome is None:
        outcome = compare_outputs(ref.root / command.output, root / command.output, rtol, atol)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    target = point.phase or "random"
    at = point.at if point.at is not None else point.delay
    return Trial(command.name, target, phase, detail, outcome.outcome, outcome.first, round(at, 3), attempts,
                 outcome.details[:5])


# -- the bench ----------------------------------------------------------------------------------------
class Bench:
    """The references of every command on one synthetic world, built on demand."""

    def __init__(self, work: Path, size: str, threads: int):
        self.work, self.size, self.threads = work, size, threads
        self.refs: dict[str, Reference] = {}

    @property
    def shards(self) -> Path:
        return self.ref("shards").root / "shards"

    def command(self, name: str) -> Command:
        if name == "shards":
            return shards_command(self.size)
        if name == "finetune":
            return finetune_command(self.shards, self.size, 0)
        if name == "finetune-w2":
            return finetune_command(self.shards, self.size, 2, name)
        if name == "spcl":
            return spcl_command(self.shards, self.size)
        if name == "spcl-iters":
            return spcl_command(self.shards, self.size, name, ["checkpoint_every_iters=1"])
        if name == "cfs":
            init = finetune_command(self.shards, self.size, 0, "init", ["epochs=0"])
            init_ref = self.refs.get("init") or reference(init, self.work / "ref" / "init", self.threads)
            self.refs["init"] = init_ref
            return cfs_command(self.shards, init_ref.root / "runs" / "run" / "model_final.safetensors",
                               self.ref("finetune").root / "runs" / "run" / "model_final.safetensors")
        raise ValueError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")

    def ref(self, name: str) -> Reference:
        if name not in self.refs:
            self.refs[name] = reference(self.command(name), self.work / "ref" / name, self.threads)
        return self.refs[name]


def parse_points(text: str) -> list[tuple[str, str, int | None]]:
    """``cmd:phase[@N],...`` -> (command, phase, occurrence or None)."""
    points = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        match = re.fullmatch(r"([\w-]+):(\w+)(?:@(\d+))?", item)
        if not match or match[1] not in COMMANDS:
            raise ValueError(f"--points: {item!r} is not COMMAND:PHASE[@N] with COMMAND one of {', '.join(COMMANDS)}")
        points.append((match[1], match[2], int(match[3]) if match[3] else None))
    return points


def matrix(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """One row per command and phase hit: trials, distinct points hit, outcomes, the first failure."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for t in trials:
        row = rows.setdefault((t.command, t.phase), {"command": t.command, "phase": t.phase, "trials": 0,
                                                     "aimed": 0, "points": set(), IDENTICAL: 0, WITHIN: 0,
                                                     FAILED: 0, "first_failure": ""})
        row["trials"] += 1
        row["aimed"] += t.target == t.phase
        row["points"].add(t.detail or "-")
        row[t.outcome] += 1
        if t.outcome != IDENTICAL and not row["first_failure"]:
            row["first_failure"] = t.first
    order = {c: i for i, c in enumerate(COMMANDS)}
    return [{**r, "points": sorted(r["points"])} for _, r in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))]


def format_matrix(rows: Sequence[dict[str, Any]]) -> str:
    return format_table(["command", "phase", "trials", "aimed", "points hit", "identical", "within tol", "failed",
                         "first failure"],
                        [[r["command"], r["phase"], r["trials"], r["aimed"], ",".join(r["points"]), r[IDENTICAL],
                          r[WITHIN], r[FAILED], r["first_failure"][:110]] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="random kills per command (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, of {', '.join(COMMANDS)}")
    parser.add_argument("--points", default="", help="targeted kills, e.g. spcl:checkpoint,finetune:evaluation@1; "
                                                     "each gets --trials trials")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the commands (1: exact)")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--quick", action="store_true", help="CI preset: small world, one trial per key point")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/faults.json"))
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep every trial's files")
    args = parser.parse_args(argv)
    try:
        commands = [c for c in args.commands.split(",") if c]
        unknown = [c for c in commands if c not in COMMANDS]
        if unknown or args.trials < 0 or args.threads < 1:
            raise ValueError(f"unknown command(s) {unknown}" if unknown else "--trials must be >= 0, --threads >= 1")
        aimed = parse_points(",".join(QUICK_POINTS) if args.quick else args.points)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size, random_trials, per_point = ("small", 0, 1) if args.quick else (args.size, args.trials, max(args.trials, 1))
    work = args.work or Path(tempfile.mkdtemp(prefix="faults-"))
    bench = Bench(work, size, args.threads)
    plan = [(c, "", None) for c in commands for _ in range(random_trials)]
    plan += [p for p in aimed if args.quick or p[0] in commands for _ in range(per_point)]
    trials: list[Trial] = []
    start = time.perf_counter()
    try:
        for i, (name, phase, occurrence) in enumerate(plan):
            ref = bench.ref(name)
            rng = random.Random(f"{args.seed}:{name}:{phase}:{occurrence}:{i}")
            point = plan_point(ref, rng, phase, occurrence)
            t = trial(ref, work / "trials" / f"{i:03d}-{name}", point, args.threads, args.rtol, args.atol, args.keep)
            trials.append(t)
            print(f"[{i + 1}/{len(plan)}] {name}: aimed {t.target}, hit {t.phase} {t.detail}: {t.outcome}"
                  + (f" ({t.first})" if t.first else ""), flush=True)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = matrix(trials)
    passing = {IDENTICAL} if args.threads == 1 else {IDENTICAL, WITHIN}
    passed = sum(t.outcome in passing for t in trials)
    print(format_matrix(rows))
    required = "identical" if args.threads == 1 else f"identical or within rtol {args.rtol:g}, atol {args.atol:g}"
    print(f"{passed}/{len(trials)} trials passed ({required} required; OMP_NUM_THREADS={args.threads}); size {size}, "
          f"seed {args.seed}, {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {
        "size": size, "seed": args.seed, "threads": args.threads, "rtol": args.rtol, "atol": args.atol,
        "quick": args.quick, "references": {n: {"seconds": r.run.seconds, "timeline": r.run.timeline}
                                            for n, r in bench.refs.items()},
        "matrix": rows, "trials": [asdict(t) for t in trials], "passed": passed})
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
