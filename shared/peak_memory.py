"""Peak memory of a run's phases, for the ``memory/<phase>_peak_mb`` scalars.

On an accelerator: ``torch.cuda.max_memory_allocated`` since the phase began (the peak is reset at its
start). On a CPU: the process's peak resident set size (``resource.getrusage``), which the kernel keeps
for the process's whole life and cannot reset, so a phase reports the highest RSS reached up to its end.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import torch


class PeakMemory:
    """Measures phases (``with peaks.phase("extract"): ...``) and hands their scalars to the logger."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pending: dict[str, float] = {}

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.pending[f"memory/{name}_peak_mb"] = self.peak_mb()

    def take(self) -> dict[str, float]:
        """The scalars of the phases measured since the last call."""
        out, self.pending = self.pending, {}
        return out
