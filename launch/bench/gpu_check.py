"""The GPU check: what one accelerator does on the steps that decide SpCL's and fine-tuning's cost.

    python launch/bench/gpu_check.py [--size gpu|tiny] [--device auto|cuda|cpu] [--models a,b] [--workers 8]
        [--knn-sizes 1000000,4000000] [--threads N] [--budget-s 480] [--out runs/bench/gpu_check.json]

Rows, each saying its size and the device it ran on (all data synthetic and rendered here: nothing is
downloaded):

1. finetune <model>: training images/s of each seed model of the fine-tuning registry (dm_osnet, fnc,
   lka_reid, bot_resnet50, osnet, coursework_seresnext50 (the seresnext50 recipes' model), mbr_4b):
   forward under bf16 autocast + the model's own loss terms (``finetune/losses.py`` ``Criterion``) +
   backward + an Adam step, channels_last, a P x K batch (16 x 4, BoT's) at the model's input size;
   and extraction images/s (eval mode, no gradient, bf16, batch 256), the rate SpCL's memory
   extraction runs at. Peak device memory of the training step on CUDA.
2. dataloader: images/s of the fine-tuning input pipeline, P x K batches read by offset from shards
   (``IndexedShards`` + ``PKSampler``, BoT's 256x128 train transforms), moved to the device and
   normalised there, with ``--workers`` DataLoader workers.
3. spcl epoch: one epoch of ``launch/configs/spcl_tiny.yaml`` (ResNet-18, 64x32, re-extraction and
   clustering each epoch) on a rendered synthetic LUPerson-like pool, through ``reidforge.pretrain``
   (``pretrain/spcl.py``'s ``pretrain``; in a child process that cannot see the GPU for ``--device cpu``
   beside one); bf16 on CUDA.
4. knn: exact kNN at ``--knn-sizes`` x 512 (k1 30 + the search's margin of 8 = 38 columns) on the
   clustering benchmark's synthetic re-ID features (``launch/bench/clustering.py``): the blocked scan of
   ``pretrain/knn.py`` (float16 operands, float32 sums on CUDA; float32 on CPU), the O(N^2 d) part of its
   certified search (the float64 re-ranking after it runs on the host and is not timed), against
   faiss's brute force on the same device (``GpuIndexFlatIP`` with float16 storage, the scan's operand
   format, where faiss has GPU support, else a row saying it is absent; ``IndexFlatIP`` on CPU), with
   the fraction of the two tables' k1 = 30 ids that agree on 1,000 sampled rows.

``--budget-s`` keeps the whole check within its time: the kNN sizes run last, and a size is skipped
(its row says so, with the projection) when the previous size's times scaled by (N / N_prev)^2, and
its features' generation by N / N_prev, exceed the time left. ``--size tiny`` runs every row at tiny sizes on the CPU in seconds (CI runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from reidforge.data.readers import IndexedShards, collate
from reidforge.data.samplers import PKSampler
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.data.transforms import Normalize, TransformConfig, build_transforms
from reidforge.finetune.losses import Criterion
from reidforge.finetune.models import build_model
from reidforge.pretrain import knn
from reidforge.pretrain.spcl import SpCLConfig, pretrain
from reidforge.shared.config import load_config
from reidforge.shared.io import atomic_write_json
from reidforge.shared.progress import progress_options
from reidforge.shared.table import format_table

ROOT = Path(__file__).resolve().parents[2]
SEED_MODELS = ("dm_osnet", "fnc", "lka_reid", "bot_resnet50", "osnet", "coursework_seresnext50", "mbr_4b")
DIM = 512
K1 = 30  # SpCL's k1: the table the clustering needs
AGREEMENT_ROWS = 1000
NUM_CLASSES = 751  # Market-1501's training identities: the classifier of the timed step


# Every size of the check; ``tiny`` is the CPU/CI variant of ``gpu``.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"p": 16, "k": 4, "extract_batch": 256, "input_scale": 1, "warmup": 3, "steps": 10,
            "loader_images": 8000, "pool_images": 4000, "knn_sizes": [1_000_000, 4_000_000], "workers": 8},
    "tiny": {"p": 2, "k": 2, "extract_batch": 4, "input_scale": 4, "warmup": 1, "steps": 1,
             "loader_images": 96, "pool_images": 120, "knn_sizes": [2048, 4096], "workers": 0,
             # the large-trunk models as their tiny recipes build them (launch/configs/*_tiny.yaml)
             "options": {name: {"trunk": "resnet18", "input_size": (64, 64)} for name in ("fnc", "lka_reid", "mbr_4b")}},
}


def _bench_module(name: str) -> ModuleType:
    """A sibling benchmark script by path (launch/bench is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "launch" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _channels_last(model: nn.Module) -> nn.Module:
    """channels_last for the 4-D weights only (``Module.to(memory_format=...)`` refuses models with 5-D ones)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def _size_text(n: int, *dims: int) -> str:
    return " x ".join(f"{v:,}" for v in (n, *dims))


def check_model(name: str, size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One fine-tuning model's training step and extraction rates (module docstring, row 1)."""
    p, k = size["p"], size["k"]
    options = size.get("options", {}).get(name)
    model = _channels_last(build_model(name, NUM_CLASSES, **(options or {})).to(device))
    h, w = model.input_size if options else (v // size["input_scale"] for v in model.input_size)
    images = torch.randn(p * k, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    pids = torch.arange(p, device=device).repeat_interleave(k)
    meta = torch.zeros(p * k, dtype=torch.long, device=device)  # camera/view 0: valid wherever embedded
    model.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # output widths, for the criterion
        dims = {key: int(v.shape[1]) for key, v in model(images, camids=meta, viewids=meta).items()}
    criterion = Criterion(model.loss_terms, NUM_CLASSES, dims).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *criterion.parameters()], lr=3.5e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = criterion(model(images, camids=meta, viewids=meta), pids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = _timed(step, device, size["warmup"], size["steps"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    m = size["extract_batch"]
    batch = torch.randn(m, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    no_meta = torch.zeros(m, dtype=torch.long, device=device)

    @torch.no_grad()
    def extract() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(batch, camids=no_meta, viewids=no_meta)

    extract_s = _timed(extract, device, size["warmup"], size["steps"])
    print(f"  {name}: {p * k / train_s:,.1f} training images/s", flush=True)
    return {"kind": "finetune", "name": f"finetune {name}", "model": name, "device": device.type,
            "size": f"batch {p} x {k} at {h}x{w}", "input": [h, w], "batch": p * k, "options": options or {},
            "seconds": train_s, "images_per_s": p * k / train_s,
            "extract_batch": m, "extract_images_per_s": m / extract_s, "peak_bytes": peak,
            "notes": f"bf16 autocast, channels_last, Adam; extraction {m / extract_s:,.0f} images/s (batch {m})"
                     + (f"; peak {peak / 2**30:.1f} GiB" if peak else "")
                     + (f"; {options}" if options else "")}


def check_loader(split_dir: Path, size: dict[str, Any], workers: int, device: torch.device) -> dict[str, Any]:
    tcfg = TransformConfig()  # BoT's 256x128 train transforms
    dataset = IndexedShards(split_dir, build_transforms(tcfg, train=True))
    sampler = PKSampler(dataset.pids, dataset.camids, p=size["p"], k=size["k"], seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    normalize = Normalize(tcfg.mean, tcfg.std).to(device)
    for i, _ in enumerate(loader):  # a warm-up pass: workers started, page cache filled
        if i == 2:
            break
    start, n = time.perf_counter(), 0
    for batch in loader:
        normalize(batch["image"].to(device, non_blocking=True))
        n += len(batch["index"])
    _sync(device)
    seconds = time.perf_counter() - start
    return {"kind": "dataloader", "name": "dataloader", "device": device.type,
            "size": f"{n:,} images, {tcfg.height}x{tcfg.width}, batch {size['p']} x {size['k']}",
            "images": n, "workers": workers, "seconds": seconds, "images_per_s": n / seconds,
            "notes": f"IndexedShards + PKSampler, {workers} workers, decode + transforms + to device + normalise"}


def check_spcl(pool: Path, size_name: str, size: dict[str, Any], device: torch.device, out: Path,
               workers: int) -> dict[str, Any]:
    recipe = ROOT / "launch" / "configs" / "spcl_tiny.yaml"
    n = size["pool_images"]
    iters = 2 if size_name == "tiny" else n // 64  # tiny: two batches; else one pass over the pool's images
    overrides = [f"output_dir={out}", "run_name=spcl_check", "epochs=1", f"data.train=[{pool}]", "data.query=''",
                 "data.gallery=''", f"data.max_images={n}", f"data.workers={workers}", f"iters_per_epoch={iters}"]
    if size_name == "tiny":
        overrides += ["bn_calibration_batches=1", "data.p=4", "data.k=4", "data.test_batch_size=64",
                      "cluster.k1=10", "cluster.k2=3"]
    if device.type == "cuda":
        overrides.append("amp=bf16")
    start = time.perf_counter()
    if device.type == ("cuda" if torch.cuda.is_available() else "cpu"):  # the device the trainer picks itself
        with progress_options(enabled=False), contextlib.redirect_stdout(io.StringIO()):
            pretrain(load_config(SpCLConfig, recipe, overrides))
    else:  # --device cpu beside a GPU: a child process that cannot see it
        command = [sys.executable, "-m", "reidforge.pretrain.spcl", "--config", str(recipe), "--no-progress", *overrides]
        done = subprocess.run(command, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"spcl epoch: {' '.join(command)} exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    seconds = time.perf_counter() - start
    history = json.loads((out / "spcl_check" / "metrics.json").read_text())["history"]
    row = history[-1]
    return {"kind": "spcl_epoch", "name": "spcl epoch", "device": device.type,
            "size": f"{n:,} pool images, {iters} iterations", "images": n, "iterations": iters,
            "seconds": seconds, "cluster_seconds": row["cluster_seconds"], "clusters": row["clusters"],
            "loss": row["loss"],
            "notes": f"spcl_tiny.yaml, 1 epoch{' bf16' if device.type == 'cuda' else ''}: start-up, BN calibration, "
                     f"extraction, clustering {row['cluster_seconds']:.1f} s ({row['clusters']} clusters), "
                     f"training, export; loss {row['loss']:.3f}"}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    rows = np.random.default_rng(0).choice(len(a), min(len(a), AGREEMENT_ROWS), replace=False)
    return float(np.mean([len(np.intersect1d(a[r], b[r])) for r in rows]) / a.shape[1])


def _torch_scan(x: np.ndarray, take: int, device: torch.device) -> tuple[float, np.ndarray, int | None]:
    """Seconds of pretrain/knn.py's blocked scan of ``x`` (operands rounded on the device included), its
    top-``take`` ids, and the device's peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    feat, _ = knn._scan_operand(x, "exact", device)
    with knn._full_precision():
        _, ids = knn._blocked_top(feat, take)
    ids = ids.cpu().numpy()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del feat
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, ids, peak


def _faiss_scan(x: np.ndarray, take: int, device: torch.device) -> tuple[float, np.ndarray, str]:
    """Seconds of faiss's brute-force inner-product search of every row among all rows (index built
    and filled included), its ids, and what ran."""
    start = time.perf_counter()
    if device.type == "cuda":
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = device.index or 0
        config.useFloat16 = True
        index = faiss.GpuIndexFlatIP(resources, x.shape[1], config)
        what = "faiss GpuIndexFlatIP, float16 storage"
    else:
        index = faiss.IndexFlatIP(x.shape[1])
        what = "faiss IndexFlatIP, float32"
    index.add(x)
    _, ids = index.search(x, take)
    return time.perf_counter() - start, ids, what


def _faiss_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def check_knn(sizes: list[int], device: torch.device, deadline: float) -> list[dict[str, Any]]:
    synthetic = _bench_module("clustering").synthetic
    take = K1 + knn._MARGIN
    rows: list[dict[str, Any]] = []
    previous: dict[str, tuple[int, float]] = {}  # method -> (N, seconds) of its last measured size
    generated: tuple[int, float] | None = None  # (N, seconds) of the last features' generation: ~ N
    for n in sizes:
        left = deadline - time.perf_counter()
        projected = {m: s * (n / m_n) ** 2 for m, (m_n, s) in previous.items()}
        features_s = generated[1] * n / generated[0] if generated else 0.0
        if projected and sum(projected.values()) + features_s > left:
            note = (f"not run: the previous size's times scaled by (N/N_prev)^2 (features ~ N) project "
                    f"{sum(projected.values()) + features_s:.0f} s, {left:.0f} s left of --budget-s")
            rows += [{"kind": f"knn_{m}", "name": f"knn {m}", "device": device.type, "size": _size_text(n, DIM),
                      "n": n, "dim": DIM, "seconds": None, "projected_seconds": projected.get(m), "notes": note}
                     for m in ("torch", "faiss")]
            continue
        start = time.perf_counter()
        x, _ = synthetic(n, DIM, 16.0, 0.2)
        generated = (n, time.perf_counter() - start)
        seconds, torch_ids, peak = _torch_scan(x, take, device)
        previous["torch"] = (n, seconds)
        pairs = -(-n // knn._BLOCK)
        pairs = pairs * (pairs + 1) // 2
        fmt = knn._SCAN_FORMAT[device.type]
        rows.append({"kind": "knn_torch", "name": "knn torch blocked scan", "device": device.type,
                     "size": _size_text(n, DIM), "n": n, "dim": DIM, "take": take, "seconds": seconds,
                     "block_pairs": pairs, "seconds_per_block_pair": seconds / pairs, "peak_bytes": peak,
                     "notes": f"pretrain/knn.py blocked scan, {str(fmt).removeprefix('torch.')} operands, top {take}; "
                              f"{pairs:,} block pairs, {1e3 * seconds / pairs:.3f} ms each"
                              + (f"; peak {peak / 2**30:.1f} GiB" if peak else "")})
        print(f"  knn torch {n:,} x {DIM}: {seconds:.1f} s", flush=True)
        if device.type == "cuda" and not _faiss_gpu():
            rows.append({"kind": "knn_faiss", "name": "knn faiss-gpu", "device": device.type,
                         "size": _size_text(n, DIM), "n": n, "dim": DIM, "seconds": None,
                         "notes": f"faiss-gpu absent: faiss {faiss.__version__} has no GPU support here"})
            continue
        f_seconds, faiss_ids, what = _faiss_scan(x, take, device)
        previous["faiss"] = (n, f_seconds)
        agree = _agreement(torch_ids[:, :K1], faiss_ids[:, :K1])
        rows.append({"kind": "knn_faiss", "name": "knn faiss brute force", "device": device.type,
                     "size": _size_text(n, DIM), "n": n, "dim": DIM, "take": take, "seconds": f_seconds,
                     "agreement_at_30": agree,
                     "notes": f"{what}, top {take}; the torch scan takes {seconds / f_seconds:.2f}x its time; top-30 ids "
                              f"agree {agree:.4f} on {min(n, AGREEMENT_ROWS):,} rows"})
        print(f"  knn faiss {n:,} x {DIM}: {f_seconds:.1f} s", flush=True)
        del x, torch_ids, faiss_ids
    return rows


def _render(root: Path, size: dict[str, Any]) -> tuple[Path, Path]:
    """The synthetic person train split (the loader's) and LUPerson-like pool (SpCL's), as shards."""
    cfg = SyntheticConfig(train_ids=max(size["loader_images"] // 12, 8), images_per_train_id=12,
                          pool_images=size["pool_images"], pool_images_per_id=10)
    sources = build_sources(cfg)
    options = WriteOptions(samples_per_shard=1000, workers=max(1, min(8, os.cpu_count() or 1)), progress=False)
    write_split(sources["synthetic_person"]["train"], root / "train", "train", relabel=True, options=options)
    write_split(sources["synthetic_lup"]["pool"], root / "pool", "pool", relabel=False, options=options)
    return root / "train", root / "pool"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="gpu", help="gpu: full sizes; tiny: CPU/CI sizes")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where every row runs (auto: CUDA when torch sees one)")
    parser.add_argument("--models", help="comma-separated fine-tuning models (default: the seed models)")
    parser.add_argument("--knn-sizes", type=lambda s: [int(v) for v in s.split(",") if v],
                        help="kNN sizes x 512, comma-separated ('' skips; default: 1M,4M, tiny 2048,4096)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 8, tiny 0)")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole check may take")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    small = [n for n in args.knn_sizes or [] if n <= K1 + knn._MARGIN]
    if small:
        parser.error(f"--knn-sizes: {small[0]} rows, the scan needs more than k1 + {knn._MARGIN} = {K1 + knn._MARGIN}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.perf_counter() + args.budget_s
    size = SIZES[args.size]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True  # fixed shapes: the fastest convolution algorithms
    names = args.models.split(",") if args.models else list(SEED_MODELS)
    workers = size["workers"] if args.workers is None else args.workers
    knn_sizes = size["knn_sizes"] if args.knn_sizes is None else args.knn_sizes
    torch.manual_seed(0)
    report: dict[str, Any] = {"size": args.size, "device": device.type, "torch": torch.__version__,
                              "faiss": faiss.__version__, "faiss_gpu": _faiss_gpu(), "cpus": os.cpu_count(),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        train, pool = _render(Path(tmp), size)
        print(f"fine-tuning steps ({args.size}, {device.type})", flush=True)
        for name in names:
            rows.append(check_model(name, size, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next model starts from an empty cache
        rows.append(check_loader(train, size, workers, device))
        rows.append(check_spcl(pool, args.size, size, device, Path(tmp) / "runs", workers))
    rows += check_knn(knn_sizes, device, deadline)
    report["rows"] = rows
    report["seconds"] = args.budget_s - (deadline - time.perf_counter())
    print(format_table(["check", "size", "device", "seconds", "images/s", "notes"],
                       [[r["name"], r["size"], r["device"], "" if r["seconds"] is None else round(r["seconds"], 4),
                         round(r["images_per_s"], 1) if "images_per_s" in r else "", r["notes"]] for r in rows]))
    print(f"{report['seconds']:.0f} s in all; wrote {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
