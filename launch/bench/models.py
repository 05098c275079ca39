"""Training-step throughput of every registered model, and DL-MHSA against full MHSA, in one run.

    python launch/bench/models.py [--models a,b] [--batch 8] [--threads N] [--only models|attention]
                                  [--out runs/bench/models.json]

1. models: one forward + backward pass in train mode of a batch of ``--batch`` random images at each
   model's ``input_size``, after one untimed warm-up pass, on the CPU with torch's default intra-op
   threads unless ``--threads`` sets them (1 gives a per-core figure that other load disturbs least).
   The loss is the sum of the mean squares of all train outputs, so that every output's backward runs.
   Ratios are against ``bot_resnet50``, measured in the same run.
2. attention: forward + backward time and peak tensor memory of DL-MHSA (DM-OSNet's attention,
   ``reidforge.shared.backbones.dm_osnet.DLMHSA``: 8x8-pixel windows, K/V pooled by 8) against full MHSA over all
   H*W positions, at 64 channels and 2 heads (DM-OSNet's conv2 stage) on 64x32 (the stage's map at
   256x128 input) and 128x64 maps. The baseline of the ratios is full MHSA with explicit
   softmax(QK^T/sqrt(d))V matrices, the O((HW)^2) cost the paper compares against; full MHSA also runs
   through the fused ``scaled_dot_product_attention`` CPU kernel (contiguous Q, K, V), which never holds
   the HW x HW matrix. The CPU allocator keeps no statistics, so peak memory is the high-water mark of
   the bytes of the tensor storages that the pass creates (activations, saved tensors, gradients),
   tracked per operator; scratch buffers inside a fused kernel are not seen.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reidforge.finetune.models import MODELS, build_model
from reidforge.shared.backbones.dm_osnet import DLMHSA
from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

BASELINE_MODEL = "bot_resnet50"
NUM_CLASSES = 751  # Market-1501's training identities: the size of the classifier in the timed step


class TensorMemory(TorchDispatchMode):
    """High-water mark of the bytes held by the tensor storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.live.get(storage.data_ptr())
                if known is None or known[0].expired():  # a freed address may come back as a new storage
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


class FullMHSA(nn.Module):
    """Global multi-head self-attention over all H*W positions of an (N, C, H, W) map, DL-MHSA's shape:
    BN, 1x1 qkv conv, attention, 1x1 output projection of (attention + input). ``fused`` selects the
    fused attention kernel, otherwise the HW x HW attention matrix is materialised."""

    def __init__(self, dim: int, head_dim: int = 32, fused: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.fused = dim // head_dim, head_dim, fused
        self.norm = nn.BatchNorm2d(dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, self.head_dim, h * w).transpose(-2, -1).unbind(1)
        if self.fused:  # the fused CPU kernel needs a unit stride on the head dimension, else SDPA falls back
            out = nn.functional.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1) @ v
        return self.proj(out.transpose(-2, -1).reshape(n, c, h, w) + x)


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)  # every step allocates its gradients, as a training step does
    x.grad = None
    out = model(x)
    outputs = out.values() if isinstance(out, dict) else [out]
    sum(o.float().pow(2).mean() for o in outputs).backward()


def _timed(fn: Callable[[], None]) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_models(names: list[str], batch: int) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        try:
            model = build_model(name, NUM_CLASSES).train()
            x = torch.randn(batch, 3, *model.input_size)
            seconds = _timed(lambda: _step(model, x))
        except Exception as e:  # one broken model must not cost the others' figures
            print(f"  {name}: FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        results[name] = {"input": list(model.input_size), "seconds": seconds, "images_per_s": batch / seconds}
        print(f"  {name}: {batch / seconds:.1f} images/s", flush=True)
    return results


def bench_attention(batch: int) -> dict[str, dict[str, Any]]:
    modules: dict[str, Callable[[], nn.Module]] = {
        "full MHSA": lambda: FullMHSA(64),
        "full MHSA (fused SDPA)": lambda: FullMHSA(64, fused=True),
        "DL-MHSA": lambda: DLMHSA(64),
    }
    results = {}
    for h, w in ((64, 32), (128, 64)):
        for label, make in modules.items():
            module = make().train()
            x = torch.randn(batch, 64, h, w, requires_grad=True)
            seconds = _timed(lambda: _step(module, x))
            memory = TensorMemory()
            with memory:
                _step(module, x)
            results[f"{label} @ {h}x{w}"] = {"module": label, "map": [h, w], "seconds": seconds,
                                            "peak_bytes": memory.peak}
            print(f"  {label} @ {h}x{w}: {seconds * 1e3:.1f} ms, {memory.peak / 2**20:.1f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated registered names (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed step")
    parser.add_argument("--attention-batch", type=int, default=2, help="maps per attention step")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--only", choices=("models", "attention"), help="run one of the two parts")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/models.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}

    if args.only != "attention":
        names = args.models.split(",") if args.models else MODELS.names()
        if BASELINE_MODEL not in names:
            names.insert(0, BASELINE_MODEL)
        print(f"forward+backward, batch {args.batch}, {torch.get_num_threads()} CPU threads")
        models = bench_models(names, args.batch)
        base = models[BASELINE_MODEL]["images_per_s"]
        for r in models.values():
            r["ratio_vs_baseline"] = r["images_per_s"] / base
        report["models"] = {"batch": args.batch, "baseline": BASELINE_MODEL, "results": models}
        print(format_table(["model", "input", "s / step", "images/s", f"vs {BASELINE_MODEL}"],
                           [[n, "x".join(map(str, r["input"])), round(r["seconds"], 3), round(r["images_per_s"], 2),
                             round(r["ratio_vs_baseline"], 2)] for n, r in models.items()]))

    if args.only != "models":
        print(f"\nattention, forward+backward, batch {args.attention_batch}, 64 channels, 2 heads")
        attention = bench_attention(args.attention_batch)
        rows = []
        for r in attention.values():
            base = attention[f"full MHSA @ {r['map'][0]}x{r['map'][1]}"]
            r["time_ratio_vs_full"] = r["seconds"] / base["seconds"]
            r["memory_ratio_vs_full"] = r["peak_bytes"] / base["peak_bytes"]
            rows.append([r["module"], "x".join(map(str, r["map"])), round(r["seconds"] * 1e3),
                         round(r["peak_bytes"] / 2**20, 1), round(r["time_ratio_vs_full"], 3),
                         round(r["memory_ratio_vs_full"], 3)])
        report["attention"] = {"batch": args.attention_batch, "channels": 64, "heads": 2, "results": attention}
        print(format_table(["module", "map", "ms", "peak MiB", "time vs full", "memory vs full"], rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
