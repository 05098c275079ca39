"""Commands run as child processes in dependency order: finished ones skipped, killed trainings resumed.

A :class:`Stage` is one command (a platform script) with the stages it needs. :class:`Runner` runs a list
of them ``jobs`` at a time, each child with ``THREADS`` intra-op thread, its output shown line by line
and kept in ``<out>/logs/<stage>.log``. ``<out>/stages/<stage>.json`` vouches for a finished stage by a
fingerprint of its command, its upstream stages' fingerprints and the thread count: a stage whose
fingerprint matches is skipped, so a changed setting reruns the stage it reaches and every stage after it.
A training stage (``run_dir`` set) that was killed after its first checkpoint, with the same fingerprint,
resumes (``--resume``); one with other settings, or killed earlier, starts afresh (``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidforge.shared.io import atomic_open, atomic_write_json

# Intra-op threads of every stage: fixed, so that each stage's arithmetic is too. With one thread per
# process a seeded run is bit-identical from run to run (with two, reductions vary in their last bits),
# and independent stages keep the cores busy instead.
THREADS = 1
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Stage:
    name: str  # also a file name under <out>/stages and <out>/logs
    command: list[str]
    after: tuple[str, ...] = ()
    run_dir: Path | None = None  # a training run: resumed from its checkpoints, else replaced by a fresh one


class StageError(RuntimeError):
    pass


def shown(command: list[str], root: Path) -> list[str]:
    """The command as a user would type it from ``root``."""
    return ["python" if part == sys.executable else part.replace(f"{root}/", "") for part in command]


class Runner:
    """Runs stages from ``cwd``, ``jobs`` at a time in dependency order, skipping finished ones (see the
    module docstring); ``timings`` holds ``[name, seconds, reused]`` per stage after :meth:`run_all`."""

    def __init__(self, out: Path, cwd: Path, env: dict[str, str] | None = None):
        self.out, self.cwd = out, cwd
        self.env = {**(env or os.environ), **{name: str(THREADS) for name in THREAD_VARIABLES}}
        self.state_dir, self.log_dir = out / "stages", out / "logs"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprints: dict[str, str] = {}
        self.timings: dict[str, list[Any]] = {}
        self._print = threading.Lock()

    def say(self, line: bytes | str) -> None:
        with self._print:
            sys.stdout.buffer.write(line.encode() if isinstance(line, str) else line)
            sys.stdout.flush()

    def run_all(self, todo: list[Stage], jobs: int) -> None:
        """Every stage of ``todo`` (listed after the stages it needs), up to ``jobs`` at once."""
        for stage in todo:
            upstream = [self.fingerprints[name] for name in stage.after]
            self.fingerprints[stage.name] = hashlib.sha256(
                json.dumps([stage.command, upstream, THREADS]).encode()).hexdigest()
        number = {stage.name: i for i, stage in enumerate(todo, 1)}
        waiting, finished, failures = list(todo), set(), []
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            running: dict[Future, Stage] = {}
            while waiting or running:
                for stage in [s for s in waiting if set(s.after) <= finished] if not failures else []:
                    if len(running) == jobs:
                        break
                    waiting.remove(stage)
                    running[pool.submit(self.run, stage, number[stage.name], len(todo) + 1)] = stage
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    stage = running.pop(future)
                    try:
                        future.result()
                        finished.add(stage.name)
                    except StageError as e:
                        failures.append(str(e))
        if failures:
            raise StageError("; ".join(failures))
        self.timings = {stage.name: self.timings[stage.name] for stage in todo}

    def forget(self, name: str) -> None:
        """Make stage ``name`` run again next time (its outputs are replaced then, not now)."""
        (self.state_dir / f"{name}.json").unlink(missing_ok=True)
        (self.state_dir / f"{name}.started").unlink(missing_ok=True)

    def run(self, stage: Stage, number: int, total: int) -> None:
        fingerprint = self.fingerprints[stage.name]
        done, started = self.state_dir / f"{stage.name}.json", self.state_dir / f"{stage.name}.started"
        record = json.loads(done.read_text()) if done.is_file() else {}
        if record.get("fingerprint") == fingerprint:
            self.say(f"[{number}/{total}] {stage.name}: finished by a previous run, skipped\n")
            self.timings[stage.name] = [stage.name, record["seconds"], "yes"]
            return
        done.unlink(missing_ok=True)
        command = list(stage.command)
        if stage.run_dir is not None:
            resumable = started.is_file() and started.read_text() == fingerprint
            if resumable and any((stage.run_dir / "checkpoints").glob("epoch-*")):
                command.append("--resume")
            elif stage.run_dir.exists():  # other settings, or killed before its first checkpoint: start afresh
                command.append("--overwrite")
        with atomic_open(started, "w") as f:
            f.write(fingerprint)
        self.say(f"[{number}/{total}] {stage.name}: {' '.join(shown(command, self.cwd))}\n")
        start = time.perf_counter()
        log = self.log_dir / f"{stage.name}.log"
        prefix = f"  {stage.name} | ".encode()
        with open(log, "wb") as sink:
            proc = subprocess.Popen(command, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=self.env)
            assert proc.stdout is not None
            for line in proc.stdout:  # the platform's scripts print plain lines when their output is a pipe
                self.say(prefix + line)
                sink.write(line)
            code = proc.wait()
        if code != 0:
            raise StageError(f"stage {stage.name} failed with exit status {code}; its output is in {log}")
        seconds = time.perf_counter() - start
        atomic_write_json(done, {"fingerprint": fingerprint, "seconds": seconds, "command": shown(command, self.cwd)})
        self.timings[stage.name] = [stage.name, round(seconds, 1), "no"]
