"""Run checkpoints that a crash, a full disk or a damaged file can never turn into a wrong resume.

A checkpoint is a directory ``<root>/epoch-NNNN/`` (``epoch-NNNN-step-SSSSSSS`` for one taken after
iteration S of the epoch after N) holding accelerate's state (model, optimiser, RNG of every rank),
``trainer_state.json`` (the loop's JSON-able state) and any named tensor groups as ``<group>.safetensors``.
Names are ordered by their parsed (epoch, step), which is training order.

Writing: everything goes to a hidden ``.<name>.tmp`` directory; ``files.json`` (size and sha256 of every
other file in it) is written last, then the directory is renamed into place and the ``latest`` pointer
replaced by rename. A kill at any moment leaves the previous checkpoint intact and findable; any OSError
(a full disk included) removes the temporary directory and stops with one line naming the path.
Pruning keeps the checkpoint just written and the ``keep - 1`` newest before it.

Reading: :meth:`Checkpoints.latest` returns the newest checkpoint whose ``files.json`` verifies. A
damaged newer one (truncated or missing file, empty or dangling ``latest``, deleted directory) is
reported in one printed line and skipped; when none verifies, one error line names the damaged files.

RNG states: accelerate writes each rank's ``random_states_<rank>.pkl`` with ``torch.save`` and its
``load_state`` reads it with ``accelerate.utils.load`` = ``torch.load(weights_only=True)`` with the safe
globals numpy ``_reconstruct``, ``ndarray``, ``dtype``, ``dtypes.UInt32DType`` and ``codecs.encode``
(accelerate 1.15, ``checkpointing.load_accelerator_state``), inside a ``try/except`` that ignores any
failure. So the file is only read after ``files.json`` (written by this run) has verified it, and the
RNG states are compared after loading with digests kept in ``trainer_state.json``; a mismatch is an error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from reidforge.shared.config import ConfigError

FILES = "files.json"
STATE = "trainer_state.json"
_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?")


class CheckpointError(FileNotFoundError):
    """No usable checkpoint, or one that cannot be written; a FileNotFoundError so that every command
    line reports it in one line."""


def checkpoint_name(epoch: int, step: int = 0) -> str:
    return f"epoch-{epoch:04d}" + (f"-step-{step:07d}" if step else "")


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.fullmatch(path.name)
    assert match is not None
    return int(match[1]), int(match[2] or 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def rng_digests() -> dict[str, str]:
    """sha256 of this process's Python, NumPy, torch CPU and (when present) CUDA generator states."""
    name, keys, *rest = np.random.get_state()
    states = {"python": repr(random.getstate()).encode(),
              "numpy": repr((name, *rest)).encode() + keys.tobytes(),
              "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        states["cuda"] = b"".join(s.numpy().tobytes() for s in torch.cuda.get_rng_state_all())
    return {k: hashlib.sha256(v).hexdigest() for k, v in states.items()}


def _damage(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted, or None when every file matches its files.json."""
    listing = path / FILES
    if not path.is_dir():
        return "directory missing"
    try:
        files = json.loads(listing.read_text())
    except FileNotFoundError:
        return f"{FILES} missing (an unfinished or foreign checkpoint)"
    except (OSError, ValueError) as e:
        return f"{listing} unreadable ({e})"
    if not isinstance(files, dict) or STATE not in files:
        return f"{listing} lists no {STATE}"
    if not all(isinstance(f, dict) and {"size", "sha256"} <= f.keys() for f in files.values()):
        return f"{listing} is not a list of sizes and sha256 digests"
    for name, facts in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{file} missing"
        if file.stat().st_size != facts["size"]:
            return f"{file} has {file.stat().st_size} bytes, {FILES} says {facts['size']}"
        if _sha256(file) != facts["sha256"]:
            return f"{file} does not match its sha256 in {FILES}"
    return None


def _everyone(failure: OSError | None) -> list[tuple[int | None, str, str | None]]:
    """Every rank's write failure (errno, reason, file), gathered on every rank."""
    mine = None if failure is None else (failure.errno, failure.strerror or str(failure), failure.filename)
    return [f for f in gather_object([mine]) if f is not None]


class Checkpoints:
    """Versioned, verified, atomically renamed checkpoint directories with a ``latest`` pointer; keeps ``keep``."""

    def __init__(self, root: Path, keep: int):
        if keep < 1:
            raise ConfigError(f"config key 'keep_checkpoints': must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def _all(self) -> list[Path]:
        """Finished checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _NAME.fullmatch(p.name)), key=_order)

    def latest(self, report: Any = print) -> Path | None:
        """The newest checkpoint that verifies; None when there is none at all. ``report`` gets one line
        when newer ones (or the ``latest`` pointer) were damaged and skipped."""
        pointer = self.root / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else ""
        candidates = self._all()
        if not candidates and not named:
            return None
        problems = []
        if not named:
            problems.append(f"{pointer} missing or empty")
        elif not _NAME.fullmatch(named):
            problems.append(f"{pointer} names {named!r}, not a checkpoint")
        elif not (self.root / named).is_dir():
            problems.append(f"{pointer} names {named}, whose directory is missing")
        for path in reversed(candidates):
            why = _damage(path)
            if why is None:
                if problems:
                    report(f"checkpoint skipped: {'; '.join(problems)}; resuming from {path}")
                return path
            problems.append(f"{path.name}: {why}")
        raise CheckpointError(f"no usable checkpoint under {self.root}: {'; '.join(problems)}")

    def resume_point(self, report: Any = print) -> Path:
        """:meth:`latest` for ``--resume``, which needs one."""
        path = self.latest(report)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.root}")
        return path

    def save(self, accelerator: Accelerator, epoch: int, state: dict[str, Any],
             tensors: dict[str, dict[str, torch.Tensor]] | None = None, step: int = 0) -> Path:
        """Collective: every rank calls it; rank 0 writes the JSON state, the tensor groups and files.json."""
        name = checkpoint_name(epoch, step)
        tmp, final = self.root / f".{name}.tmp", self.root / name
        digests = gather_object([rng_digests()])  # before save_state, which records these very states
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            failure = None
        except OSError as e:
            failure = e
        # Any rank's failure (its RNG file included) fails the checkpoint on every rank, so none waits alone.
        errors = _everyone(failure)
        if not errors and accelerator.is_main_process:
            try:
                self._finish(tmp, final, {**state, "rng": digests}, tensors or {})
            except OSError as e:
                failure = e
        errors = errors or _everyone(failure)
        if errors:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.root / ".latest.tmp").unlink(missing_ok=True)
            code, reason, filename = errors[0]
            what = "disk full" if code == errno.ENOSPC else reason
            raise CheckpointError(f"checkpoint {final} not written: {what} writing {filename or tmp}; the previous "
                                  "checkpoint is intact")
        return final  # the last gather above was the barrier: every rank sees the finished checkpoint

    def _finish(self, tmp: Path, final: Path, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]
                ) -> None:
        (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        for group, values in tensors.items():
            if values:
                save_file({k: v.detach().cpu().contiguous() for k, v in values.items()},
                          str(tmp / f"{group}.safetensors"))
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / FILES).write_text(json.dumps(files, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (self.root / ".latest.tmp").write_text(final.name)
        (self.root / ".latest.tmp").rename(self.root / "latest")
        # The one just written stays whatever the names say; any newer one belongs to a run resumed past it.
        older = [p for p in self._all() if _order(p) < _order(final)]
        for old in [p for p in self._all() if _order(p) > _order(final)] + older[:max(len(older) - self.keep + 1, 0)]:
            shutil.rmtree(old)

    def restore(self, accelerator: Accelerator, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
        """Load checkpoint ``path`` (default: :meth:`resume_point`) into ``accelerator``; returns it and
        the loop's state.

        The RNG states accelerate restored are checked against the digests saved with them.
        """
        path = path or self.resume_point(accelerator.print)
        accelerator.load_state(str(path))
        state = json.loads((path / STATE).read_text())
        saved = state.get("rng", [])
        rank = accelerator.process_index
        wrong = [k for k, v in rng_digests().items() if rank < len(saved) and saved[rank].get(k) != v]
        bad = [(r, w) for r, w in gather_object([(rank, wrong)]) if w]
        if bad:
            r, kinds = bad[0]
            raise CheckpointError(f"{path / f'random_states_{r}.pkl'}: restored {', '.join(kinds)} RNG state does not "
                                  f"match the digest in {path / STATE}")
        return path, state

    @staticmethod
    def tensors(path: Path, group: str) -> dict[str, torch.Tensor]:
        """A tensor group saved with ``save`` (empty when the checkpoint has none)."""
        file = path / f"{group}.safetensors"
        return load_file(str(file)) if file.is_file() else {}
