"""Hybrid memory (pretrain/memory.py) step time and memory at LUPerson scale, the SpCL formula in the same run.

    python launch/bench/memory.py [--slots 2500000 --dim 512 --batch 64] [--ref-slots N] [--steps 3]
        [--chunk-size N] [--threads T] [--out runs/bench/memory.json]

On a machine shared with other jobs, ``--threads 1`` gives steadier figures: with more intra-op threads
than free cores every parallel kernel waits for a descheduled thread.

One training step = forward (loss) + backward (gradient to the batch features) + the momentum update of
the batch's slots, for a batch of ``--batch`` L2-normalised features on random distinct slots.

Label structure (realistic for SpCL on CFS-LUPerson): half the slots in clusters of 2-30 members
(uniform sizes, ~16 on average), the other half un-clustered singletons, shuffled over the slots; so
C = clusters + singletons ~= 0.53 x slots classes (1.33M at 2.5M slots). Cluster members are a shared
random centre plus noise, singletons random; all L2-normalised.

Measured, each in a fresh process so that its peak RSS is its own:
  * ``HybridMemory`` with float32 and float16 storage at ``--slots``;
  * the straightforward SpCL formula (``reference_loss`` / ``reference_update`` of tests/test_memory.py:
    B x N similarities, index_add into a B x C class table, masked softmax, autograd backward, the
    per-sample update loop) on a float32 bank at ``--ref-slots`` (default ``--slots``), and, when that is
    smaller, ``HybridMemory`` float32 at the same size for the ratio. The first step's loss of the two
    at the same size and seed is compared (|delta| asserted <= 1e-4).
Reported: ms per step (median of ``--steps`` after one warm-up step; forward and backward+update
apart), peak RSS of the process, and the extra RSS during the steps over the RSS with the bank built
(sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30
_FILL = 1 << 16


def _test_module(name: str) -> ModuleType:
    """A module of tests/ by path (the references live with the tests that check against them)."""
    spec = importlib.util.spec_from_file_location(f"reference_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class _PeakRss:
    """Max RSS sampled by a thread while the ``with`` block runs."""

    def __enter__(self) -> _PeakRss:
        self.peak, self._stop = _rss_now(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_now())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())


def synthetic_labels(num_slots: int, seed: int) -> np.ndarray:
    """Half the slots in clusters of 2-30 (ids 0..K-1), the rest singletons (ids K, K+1, ...), shuffled."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 31, num_slots // 16 + 2)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), num_slots // 2)) + 1]
    clustered = np.repeat(np.arange(len(sizes)), sizes)[: num_slots // 2]
    labels = np.concatenate([clustered, np.arange(len(sizes), len(sizes) + num_slots - len(clustered))])
    return labels[rng.permutation(num_slots)]


def _fill(write, labels: torch.Tensor, dim: int, seed: int) -> None:
    """Calls ``write(start, rows)`` with the bank's raw features, a block at a time (bounded memory)."""
    g = torch.Generator().manual_seed(seed)
    num_clusters = int(labels.max()) + 1 - int((torch.bincount(labels) == 1).sum())
    centres = torch.randn(num_clusters, dim, generator=g)
    for a in range(0, len(labels), _FILL):
        lab = labels[a:a + _FILL]
        rows = torch.randn(len(lab), dim, generator=g)
        member = lab < num_clusters
        rows[member] = centres[lab[member]] + 0.7 * rows[member]
        write(a, rows)


def _batches(labels: torch.Tensor, batch: int, dim: int, count: int, seed: int, bank_row) -> list:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(count):
        idx = torch.randperm(len(labels), generator=g)[:batch]
        out.append((F.normalize(bank_row(idx) + 0.5 * torch.randn(batch, dim, generator=g) / dim**0.5, dim=1), idx))
    return out


def _run_case(method: str, slots: int, dim: int, batch: int, dtype: str, steps: int, chunk: int, threads: int,
              seed: int) -> dict:
    """Runs in a fresh process: build the bank, then time ``steps`` + 1 training steps."""
    torch.set_num_threads(threads)
    labels = torch.from_numpy(synthetic_labels(slots, seed))
    start = time.perf_counter()
    if method == "ours":
        from reidforge.pretrain.memory import HybridMemory

        memory = HybridMemory(slots, dim, dtype=getattr(torch, dtype), chunk_size=chunk)
        _fill(lambda a, rows: memory.initialize(rows, torch.arange(a, a + len(rows))), labels, dim, seed)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        memory.set_labels(labels)
        labels_s = time.perf_counter() - start
        bank_row = lambda idx: memory.features[idx].float()  # noqa: E731
        extra = {"classes": memory.num_classes, "clusters": memory.num_clusters, "bytes": memory.memory_bytes()}
    else:
        ref = _test_module("test_memory")
        bank = torch.empty(slots, dim)

        def write(a: int, rows: torch.Tensor) -> None:
            bank[a:a + len(rows)] = F.normalize(rows, dim=1)

        _fill(write, labels, dim, seed)
        build_s, labels_s = time.perf_counter() - start, 0.0
        bank_row = lambda idx: bank[idx]  # noqa: E731
        extra = {"classes": int(torch.unique(labels).numel())}
    batches = _batches(labels, batch, dim, steps + 1, seed, bank_row)
    rss_built = _rss_now()
    fwd, bwd, losses = [], [], []
    with _PeakRss() as peak:
        for feats, idx in batches:
            f = feats.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = memory(f, idx) if method == "ours" else ref.reference_loss(bank, labels, f, idx)
            t1 = time.perf_counter()
            loss.backward()
            if method != "ours":
                ref.reference_update(bank, feats, idx)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            losses.append(loss.item())
    step = [a + b for a, b in zip(fwd, bwd)][1:]
    return {"method": method, "slots": slots, "dim": dim, "batch": batch, "dtype": dtype, "threads": threads,
            "ms_per_step": 1e3 * statistics.median(step), "ms_steps": [1e3 * s for s in step],
            "ms_forward": 1e3 * statistics.median(fwd[1:]), "ms_backward_update": 1e3 * statistics.median(bwd[1:]),
            "first_loss": losses[0], "losses": losses, "build_s": build_s, "set_labels_s": labels_s,
            "rss_built": rss_built, "step_extra_rss": peak.peak - rss_built,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra}


def _in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run_case, *args).result()


def _reference_need(slots: int, dim: int, batch: int) -> float:
    """Bytes the reference holds at once: the bank plus about a dozen B x N float32 temporaries."""
    return slots * dim * 4 + 12 * batch * slots * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=2_500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ref-slots", type=int, help="size for the SpCL-formula baseline (default: --slots)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median)")
    parser.add_argument("--chunk-size", type=int, help="HybridMemory chunk_size (default: its own choice)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory.json"))
    args = parser.parse_args()
    ref_slots = args.ref_slots or args.slots
    need = _reference_need(ref_slots, args.dim, args.batch)
    if need > 0.8 * _available_memory():
        raise SystemExit(f"the SpCL-formula baseline needs about {need / GB:.1f} GB at {ref_slots:,} slots, only "
                         f"{_available_memory() / GB:.1f} GB is available: lower --ref-slots")

    common = (args.dim, args.batch)
    tail = (args.steps, args.chunk_size, args.threads, args.seed)
    runs = {"ours_fp32": _in_fresh_process("ours", args.slots, *common, "float32", *tail),
            "ours_fp16": _in_fresh_process("ours", args.slots, *common, "float16", *tail),
            "reference": _in_fresh_process("reference", ref_slots, *common, "float32", *tail)}
    if ref_slots != args.slots:
        runs["ours_fp32_at_ref"] = _in_fresh_process("ours", ref_slots, *common, "float32", *tail)
    same_size = runs["ours_fp32_at_ref" if ref_slots != args.slots else "ours_fp32"]
    ref = runs["reference"]
    delta = abs(same_size["first_loss"] - ref["first_loss"])
    assert delta <= 1e-4, f"HybridMemory's loss differs from the SpCL formula by {delta}"

    rows = []
    for name, r in runs.items():
        method = "SpCL formula (B x N + index_add)" if name == "reference" else f"HybridMemory {r['dtype']}"
        faster = round(ref["ms_per_step"] / r["ms_per_step"], 2) if r["slots"] == ref["slots"] and r is not ref else ""
        notes = (f"fwd {r['ms_forward']:.0f} ms, bwd+update {r['ms_backward_update']:.0f} ms; "
                 f"+{r['step_extra_rss'] / 2**20:.0f} MB RSS in steps; {r['classes']:,} classes")
        if name == "reference":
            notes += f"; |delta first loss| vs ours {delta:.1e}"
        rows.append([f"{r['slots']:,} x {r['dim']}, B={r['batch']}", method, round(r["ms_per_step"], 1),
                     round(r["peak_rss"] / GB, 2), faster, notes])
    print(format_table(["size", "method", "ms / step", "peak RSS GB", "ours faster by", "notes"], rows))
    print(f"threads: {args.threads}; chunk_size: {args.chunk_size or 'default'}; "
          f"median of {args.steps} steps after a warm-up")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                 "abs_delta_first_loss": delta})


if __name__ == "__main__":
    main()
