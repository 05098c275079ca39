"""The TensorBoard record of a training loop: scalar means, throughput, data wait, memory, config and hparams.

Both loops (``finetune/engine.py``, ``pretrain/spcl.py``) write through accelerate's ``tensorboard``
tracker, into ``<run>/tensorboard``, and only on the main process. Each training scalar is written twice:

* ``train/<name>``: its mean over the iterations since the previous log point, every ``log_every``
  iterations (step = iteration);
* ``epoch/<name>``: its mean over the epoch, at every epoch end (step = epoch, counted from 1), so a run
  of a few short epochs has a curve too.

Names: ``lr``, ``loss`` (the total) and ``loss/<term>`` (each weighted term; the terms sum to the total),
``accuracy`` (identity-classifier top-1, where the model has a classifier), ``grad_norm`` (the total L2 norm
of the gradients before clipping), ``images_per_s`` (all processes), ``data_wait`` (the fraction of the
iteration time spent blocked on the DataLoader) and, on CUDA, ``gpu_mem_gib`` (the largest allocation,
a maximum rather than a mean). Device values are summed on the device and read once per log point, so
the step loop gains no host-device synchronisation; with several processes the means are averaged over
the ranks at those points.

At each evaluation the fine-tuning loop adds pictures (``<split>/ranked``, ``<split>/cmc``) and a
projector sample (``<split>/embedding``: up to ``PROJECTOR_POINTS`` query and as many gallery features,
seeded, with pid, camid and set as metadata); SpCL adds a projector of the memory features coloured by
pseudo-label and, where the pool has them, by the true identities.

At start the resolved config is written as text (``config``); at the end of a run the flattened config
goes to the HParams dashboard with the run's final metrics (``torch.utils.tensorboard.summary.hparams``,
as ``SummaryWriter.add_hparams`` writes it, but into the run's own event file instead of a new sub-run).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.tensorboard.summary import hparams

T = TypeVar("T")
PROJECTOR_POINTS = 256  # per set: the projector files (text) stay ~1 MB per evaluation at 512-d
Scalar = torch.Tensor | float


class _Sums:
    """Running sums of one span (a log window or an epoch): values where they were produced, plus timings."""

    def __init__(self) -> None:
        self.values: dict[str, Scalar] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.seconds, self.wait, self.peak = 0, 0.0, 0.0, 0.0

    def add(self, values: Mapping[str, Scalar], seconds: float, wait: float) -> None:
        for k, v in values.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.values[k] = self.values[k] + v if k in self.values else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.seconds += seconds
        self.wait += wait


class TrainScalars:
    """Per-iteration training scalars of one loop, written as window means and epoch means (module docstring).

    Every process calls the same methods at the same iterations (the means are reduced over the ranks)::

        scalars.start_epoch()
        for batch in scalars.timed(loader):
            ...
            scalars.step(iteration, {"lr": lr, "loss": loss, ...})
        scalars.end_epoch(epoch + 1)
    """

    def __init__(self, accelerator: Accelerator, log_every: int, images_per_step: int):
        self.acc, self.log_every = accelerator, log_every
        self.images = images_per_step * accelerator.num_processes
        self.cuda = accelerator.device.type == "cuda"
        self.window, self.epoch = _Sums(), _Sums()
        self._last, self._wait = time.perf_counter(), 0.0

    def start_epoch(self) -> None:
        """Begin an epoch: the time since the last step (evaluation, clustering) is no iteration's."""
        self.epoch = _Sums()
        self._last, self._wait = time.perf_counter(), 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.acc.device)

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, with the time each ``next`` blocks counted as the next step's data wait."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._wait += time.perf_counter() - start
            yield batch

    def step(self, iteration: int, values: Mapping[str, Scalar]) -> None:
        """Record one iteration's values (device tensors stay on the device); write the window every
        ``log_every`` iterations."""
        now = time.perf_counter()
        for span in (self.window, self.epoch):
            span.add(values, now - self._last, self._wait)
        self._last, self._wait = now, 0.0
        if iteration % self.log_every == 0:
            self._write(self.window, "train", iteration)
            self.window = _Sums()

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Write the epoch's means under ``epoch/`` at step ``epoch``; returns them (empty without a step)."""
        means = self._write(self.epoch, "epoch", epoch)
        self.epoch = _Sums()
        return means

    def _peak(self) -> None:
        """Fold the CUDA allocator's peak since the last read into both spans (a host-side read)."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.acc.device)
            self.window.peak, self.epoch.peak = max(self.window.peak, peak), max(self.epoch.peak, peak)

    def _write(self, span: _Sums, prefix: str, step: int) -> dict[str, float]:
        self._peak()
        if not span.steps:
            return {}
        names = sorted(span.values)
        # one vector, one transfer: the device sums, then the host ones
        sums = torch.stack([torch.as_tensor(span.values[k], dtype=torch.float64, device=self.acc.device).reshape(())
                            for k in names] + [torch.tensor(x, dtype=torch.float64, device=self.acc.device)
                                               for x in (span.seconds, span.wait, span.peak)])
        if self.acc.num_processes > 1:
            sums = self.acc.reduce(sums, reduction="mean")
        *totals, seconds, wait, peak = sums.tolist()
        means = {k: total / span.counts[k] for k, total in zip(names, totals)}
        means["images_per_s"] = self.images * span.steps / max(seconds, 1e-12)
        means["data_wait"] = wait / max(seconds, 1e-12)
        if self.cuda:
            means["gpu_mem_gib"] = peak
        self.acc.log({f"{prefix}/{k}": v for k, v in means.items()}, step=step)
        return means


def grad_norm(accelerator: Accelerator, parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, unscaled first under fp16 (as clipping does), on the
    device (fused per-device norms, no synchronisation)."""
    accelerator.unscale_gradients()
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def flatten_config(cfg: Any) -> dict[str, bool | int | float | str]:
    """A config dataclass as dotted keys with the values HParams takes (lists, dicts and None as JSON text)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, bool | int | float | str):
            flat[key] = value
        else:
            flat[key] = json.dumps(value)

    walk(dataclasses.asdict(cfg), "")
    return flat


def write_config_text(accelerator: Accelerator, config_file: Path) -> None:
    """The resolved config (the run's ``config.yaml``) as the ``config`` text, indented so that it shows verbatim."""
    if accelerator.is_main_process:
        text = "\n".join("    " + line for line in config_file.read_text().splitlines())
        accelerator.log({"config": text}, step=0)


def write_hparams(accelerator: Accelerator, cfg: Any, metrics: Mapping[str, float], step: int) -> None:
    """The flattened config with the run's final ``metrics``, each named by a scalar tag the run has written."""
    if not accelerator.is_main_process:
        return
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for summary in hparams(flatten_config(cfg), dict(metrics)):
        writer.file_writer.add_summary(summary, step)
    writer.flush()


def _writer(accelerator: Accelerator) -> Any:
    return accelerator.get_tracker("tensorboard", unwrap=True)


def write_embedding(accelerator: Accelerator, tag: str, features: torch.Tensor,
                    columns: Mapping[str, Sequence[Any]], step: int, seed: int = 0) -> None:
    """A seeded sample of at most ``PROJECTOR_POINTS`` rows of ``features`` for the projector, with one
    metadata column per entry of ``columns`` (pid, camid, pseudo-label ...)."""
    if not accelerator.is_main_process or not len(features):
        return
    keep = np.sort(np.random.default_rng(seed).permutation(len(features))[:PROJECTOR_POINTS])
    rows = [[str(values[i]) for values in columns.values()] for i in keep]
    _writer(accelerator).add_embedding(features[torch.from_numpy(keep)].float().cpu(), metadata=rows,
                                       metadata_header=list(columns), tag=tag, global_step=step)


def write_picture(accelerator: Accelerator, tag: str, png: Path, step: int) -> None:
    """A rendered PNG as an image summary."""
    if accelerator.is_main_process:
        with Image.open(png) as image:
            _writer(accelerator).add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
