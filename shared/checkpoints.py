"""Run checkpoints that a crash can never corrupt, shared by the pretraining and fine-tuning loops.

A checkpoint is a directory ``<root>/epoch-NNNN/`` (``epoch-NNNN-step-SSSSSSS`` for one taken after
iteration S of the epoch after N; names sort in training order) holding accelerate's state (model, optimiser, RNG of
every rank), ``trainer_state.json`` (the loop's JSON-able state) and any named tensor groups as
``<group>.safetensors``. It is written under a hidden temporary name and renamed when complete; the
``latest`` pointer file is replaced by rename too, so a kill at any moment leaves the previous
checkpoint intact and findable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file


class Checkpoints:
    """Versioned, atomically renamed checkpoint directories with a ``latest`` pointer; keeps the last ``keep``."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, accelerator: Accelerator, epoch: int, state: dict[str, Any],
             tensors: dict[str, dict[str, torch.Tensor]] | None = None, step: int = 0) -> Path:
        """Collective: every rank calls it; rank 0 writes the JSON state and the tensor groups."""
        name = f"epoch-{epoch:04d}" + (f"-step-{step:07d}" if step else "")
        tmp, final = self.root / f".{name}.tmp", self.root / name
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
            for group, values in (tensors or {}).items():
                if values:
                    save_file({k: v.detach().cpu().contiguous() for k, v in values.items()},
                              str(tmp / f"{group}.safetensors"))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            (self.root / ".latest.tmp").write_text(name)
            (self.root / ".latest.tmp").rename(self.root / "latest")
            for old in sorted(self.root.glob("epoch-*"))[:-self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def restore(self, accelerator: Accelerator) -> tuple[Path, dict[str, Any]]:
        """Load the latest checkpoint's accelerate state; returns its directory and the loop's JSON state."""
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.root}")
        accelerator.load_state(str(path))
        return path, json.loads((path / "trainer_state.json").read_text())

    @staticmethod
    def tensors(path: Path, group: str) -> dict[str, torch.Tensor]:
        """A tensor group saved with ``save`` (empty when the checkpoint has none)."""
        file = path / f"{group}.safetensors"
        return load_file(str(file)) if file.is_file() else {}
