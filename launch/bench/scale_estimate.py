"""What SpCL on LUPerson costs: each step's time and memory per epoch and for the whole run, projected.

    python launch/bench/scale_estimate.py [--gpu-json runs/bench/gpu_check.json] [--world 8] [--epochs 30]
        [--sizes 2090122,4180243] [--dims 512,2048] [--measure-n 16384] [--threads 1]
        [--out runs/bench/scale_estimate.json]

Sizes: the CFS top half of LUPerson (2,090,122 images, ``launch/configs/spcl_dm_osnet_lup.yaml``) and all
of it (4,180,243), at 512-d (DM-OSNet) and 2048-d (a ResNet-50 encoder, SpCL's), on ``--world`` GPUs.
An epoch is the LUPerson recipe's: extract every image (``cluster_features: reextract``), cluster, then
one pass over the pool in iterations of 16 images per GPU (DM-OSNet §4.2), ``--epochs`` of them (§4.2: 30).

Per-block costs are measured here, on one CPU thread, on the clustering benchmark's synthetic re-ID
features (``launch/bench/clustering.py``) at ``--measure-n`` images: the float64 re-ranking per row, the
fraction of rows the certified search widens or computes whole (with the GPU scan's float16 operands,
emulated), the Jaccard step per image, DBSCAN x 3
+ criteria per graph entry, the clustering's peak host memory per image, its clusters' sizes, and the
hybrid memory's bytes per slot at that label structure. The GPU terms come from stated assumptions (a
GPU's FLOP/s and bandwidth, images/s), replaced by gpu_check's measurements with ``--gpu-json`` (the
kNN scan's seconds per block pair, images/s of training and extraction, DataLoader images/s). How each
term scales with N is printed beside it: the kNN scan ~ N^2 d / world (sharded over the GPUs), the
re-ranking ~ N k d / world, Jaccard ~ N k1^2 x min(1, 2 / world) (shared by the ranks, whose walks
overlap), DBSCAN ~ graph entries ~ N on one host thread of rank 0, extraction and training ~ N / world.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from reidforge.pretrain import knn
from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering
from reidforge.pretrain.memory import HybridMemory
from reidforge.shared.io import atomic_write_json
from reidforge.shared.progress import duration
from reidforge.shared.table import format_table

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
LUPERSON_CFS, LUPERSON = 2_090_122, 4_180_243  # the recipe's pool (CFS top 50 %) and all of LUPerson
K1, K2 = 30, 6  # SpCL's k1, k2 (ClusterConfig defaults)
TAKE = K1 + knn._MARGIN  # columns of the blocked scan
WIDE = K1 + knn._WIDE_MARGIN  # columns of the widened search
ENCODERS = {512: "dm_osnet", 2048: "bot_resnet50"}  # the gpu_check row that stands for each feature width


@dataclass
class Measured:
    """Per-block costs measured here on one CPU thread (``measure``)."""

    n: int  # images of the measurement
    rank_row_s: dict[int, float]  # float64 re-ranking of TAKE candidates, seconds per row, by feature width
    full_cell_s: float  # whole-row float64 fallback, seconds per (row, column) at 512-d
    widened_fraction: float  # rows the certified search widens to WIDE candidates (float16 scan, as on a GPU)
    full_fraction: float  # rows it computes whole
    jaccard_row_s: float  # Jaccard step (V, expansion, shared support, graph), seconds per image
    dbscan_entry_s: float  # DBSCAN x 3 + criteria, seconds per stored graph entry
    graph_entries_per_row: float
    host_bytes_per_image: float  # the clustering's peak RSS above its start, per image (features excluded)
    clustered_fraction: float
    mean_cluster_size: float
    memory_bytes_per_slot: dict[int, float]  # HybridMemory float16 at the measured label structure
    scan_pair_s: dict[int, float]  # blocked scan, seconds per block pair (for reference: the GPU's is assumed)


@dataclass
class Assumptions:
    """What the projection takes as given; every one is printed beside the figures."""

    world: int = 8
    epochs: int = 30  # DM-OSNet §4.2
    images_per_gpu: int = 16  # DM-OSNet §4.2: batch 16 per GPU
    gpu_flops: float = 989e12  # dense float16 tensor FLOP/s, H100 SXM datasheet
    flops_efficiency: float = 0.6  # of that, for 2048 x 2048 x d GEMMs
    gpu_bandwidth: float = 3.35e12  # HBM bytes/s, H100 SXM datasheet
    bandwidth_efficiency: float = 0.7
    pair_latency_s: float = 100e-6  # per block pair: ~16 kernel launches and 2 host syncs (torch.nonzero)
    pair_s: dict[int, float] | None = None  # measured seconds per block pair, by width (from --gpu-json)
    train_images_per_s: dict[int, float] | None = None  # per GPU, by feature width
    extract_images_per_s: dict[int, float] | None = None
    loader_images_per_s_per_worker: float = 1000.0  # LUPerson JPEGs, decode + transforms (assumed)
    workers: int = 8  # DataLoader workers per GPU (the recipe's data.workers)
    gpu_memory: float = 80 * GIB
    source: str = "assumed"  # where pair_s and the images/s come from

    def __post_init__(self) -> None:
        # assumed H100 rates at 256x128, bf16: DM-OSNet (depthwise convolutions) and ResNet-50
        self.train_images_per_s = self.train_images_per_s or {512: 1500.0, 2048: 2500.0}
        self.extract_images_per_s = self.extract_images_per_s or {512: 5000.0, 2048: 8000.0}


@dataclass
class Step:
    name: str
    epoch_s: float
    gpu_bytes: float  # peak per GPU while the step runs (the memory bank, resident, included)
    host_bytes: float  # peak per host process (rank 0 for the clustering steps)
    how: str


def block_pairs(n: int) -> int:
    """Block pairs of the symmetric blocked scan over N rows: B (B + 1) / 2, B = ceil(N / 2048)."""
    b = -(-n // knn._BLOCK)
    return b * (b + 1) // 2


def pair_seconds(d: int, a: Assumptions) -> float:
    """GPU seconds per block pair: measured (``--gpu-json``, at its width; a wider one adds the GEMM's extra
    FLOPs), else GEMM FLOPs at the assumed rate + the selection's bytes at the bandwidth + the latency."""
    gemm = 2 * knn._BLOCK**2 / (a.gpu_flops * a.flops_efficiency)
    if a.pair_s:
        width = min(a.pair_s, key=lambda w: abs(w - d))
        return a.pair_s[width] + gemm * (d - width)
    selection = knn._BLOCK**2 * 14 / (a.gpu_bandwidth * a.bandwidth_efficiency)  # product + 2 compares + masks
    return gemm * d + selection + a.pair_latency_s


def project(n: int, d: int, m: Measured, a: Assumptions) -> list[Step]:
    """Each SpCL step's time per epoch and peak memory at N x d on ``a.world`` GPUs (module docstring)."""
    w, bw = a.world, a.gpu_bandwidth * a.bandwidth_efficiency
    bank = n * m.memory_bytes_per_slot[d]
    loader = a.loader_images_per_s_per_worker * a.workers
    extract_rate = min(a.extract_images_per_s[d], loader)
    steps = [Step("extract", n / (w * extract_rate), bank + 2 * GIB, 2 * n * d * 4,
                  f"N / (world x {extract_rate:,.0f} images/s: min(model {a.extract_images_per_s[d]:,.0f}, "
                  f"loader {a.workers} x {a.loader_images_per_s_per_worker:,.0f})); host: the gathered features, twice")]
    pairs, t_pair = block_pairs(n), pair_seconds(d, a)
    held = n / w * TAKE * (knn._HOLD + 1) * 12  # a rank's rows' candidates: int32 row, col, float32 value
    steps.append(Step("kNN scan", pairs / w * t_pair, bank + n * d * 2 + held + 5 * knn._BLOCK**2, n * d * 4,
                      f"{pairs:,} block pairs / world x {1e3 * t_pair:.3f} ms ({a.source}); ~ N^2 d / world; "
                      f"GPU: all rows in float16 + the rank's candidates"))
    rows = n / w
    rerank = rows * m.rank_row_s[d] * (1 + m.widened_fraction * WIDE / TAKE)
    per_read = max(1, knn._FULL_ROW_CHUNK // n)  # widened rows per full read of the operand
    wide_gpu = rows * m.widened_fraction / per_read * (n * d * 2 / bw)
    full = rows * m.full_fraction * n * m.full_cell_s * d / 512
    steps.append(Step("kNN re-rank + certify", rerank + wide_gpu + full, bank + n * d * 2, n * d * 4 + n * (TAKE * 12 + K1 * 16),
                      f"N / world rows x {1e6 * m.rank_row_s[d]:.1f} us float64 (1 host thread per rank); "
                      f"{m.widened_fraction:.1%} widened ({per_read} per GPU read of all rows, {wide_gpu:.0f} s), "
                      f"{m.full_fraction:.2%} whole rows in float64 ({full:.0f} s); ~ N k d / world"))
    # Shared by the ranks (pretrain/distributed_clustering.py); each rank's pair walk still visits both
    # directions of its columns, and 2 ranks measured no faster than 1: taken as min(1, 2 / world) of one.
    share = min(1.0, 2 / w)
    steps.append(Step("Jaccard", n * m.jaccard_row_s * share, bank, n * d * 4 + n * m.host_bytes_per_image,
                      f"N x {1e6 * m.jaccard_row_s:.0f} us x min(1, 2 / world) = {share:.2f}, 1 thread per rank; "
                      f"~ N k1^2 / world (k1 {K1}, k2 {K2}); "
                      f"host: {m.host_bytes_per_image / 1024:.1f} kB per image"))
    entries = n * m.graph_entries_per_row
    steps.append(Step("DBSCAN x 3 + criteria", entries * m.dbscan_entry_s, bank, n * d * 4 + n * m.host_bytes_per_image,
                      f"{entries:,.0f} graph entries ({m.graph_entries_per_row:.1f} per image) x "
                      f"{1e9 * m.dbscan_entry_s:.0f} ns on rank 0; ~ N"))
    iters = math.ceil(n / (a.images_per_gpu * w))
    clusters = n * m.clustered_fraction / m.mean_cluster_size
    classes = n * (1 - m.clustered_fraction) + clusters
    memory_s = 2 * classes * d * 2 / bw  # the forward's two passes over the class vectors (float16)
    step_s = a.images_per_gpu / a.train_images_per_s[d] + memory_s
    steps.append(Step("train", iters * step_s, bank + 8 * GIB, 2 * GIB,
                      f"{iters:,} iterations of {a.images_per_gpu} per GPU x ({1e3 * a.images_per_gpu / a.train_images_per_s[d]:.1f} ms "
                      f"encoder at {a.train_images_per_s[d]:,.0f} images/s + {1e3 * memory_s:.2f} ms memory loss: "
                      f"{classes:,.0f} classes read twice); GPU: bank {bank / GIB:.1f} GiB + 8 GiB training (assumed)"))
    return steps


def _bench_module(name: str) -> ModuleType:
    """A sibling benchmark script by path (launch/bench is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "launch" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_call(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@contextlib.contextmanager
def _scan_format(fmt: torch.dtype) -> Iterator[None]:
    """The CPU scan's operand format set to ``fmt`` inside the block."""
    before = knn._SCAN_FORMAT["cpu"]
    knn._SCAN_FORMAT["cpu"] = fmt
    try:
        yield
    finally:
        knn._SCAN_FORMAT["cpu"] = before


def measure(n: int) -> Measured:
    """The per-block costs at ``n`` images (seconds, on the current torch thread count)."""
    synthetic = _bench_module("clustering").synthetic
    peak_rss = _bench_module("memory")._PeakRss
    x, _ = synthetic(n, 512, 16.0, 0.2)
    # The GPU scan's float16 operands, emulated on CPU as pretrain/knn.py's tests do (float16 values held in
    # float32): its error bound, 12x the float32 one, decides how many rows the certified search widens.
    with _scan_format(knn._SCAN_FORMAT["cuda"]), peak_rss() as rss:  # first: nothing freed before hides its peak
        start = rss.peak
        result = SelfPacedClustering(ClusterConfig(knn="exact", knn_device="cpu"))(x)
    s = result.stats  # its kNN search's counts included
    rows = np.arange(min(n, 4096))
    rank_row, pair = {}, {}
    for d in (512, 2048):
        xd = x if d == 512 else synthetic(2 * knn._BLOCK, d, 16.0, 0.2)[0]
        cand = np.random.default_rng(0).integers(0, len(xd), (len(rows), TAKE))
        rank_row[d] = _per_call(knn._rank, xd, rows, cand) / len(rows)
        feat = torch.from_numpy(xd[:2 * knn._BLOCK])
        pair[d] = _per_call(knn._blocked_top, feat, TAKE) / block_pairs(len(feat))
    full_rows = np.arange(8)
    full_cell = _per_call(knn._full_rows, x, full_rows, K1) / (len(full_rows) * n)
    sizes = np.bincount(result.labels[result.labels < result.num_clusters]) if result.num_clusters else np.ones(1)
    memory = HybridMemory(n, 512, dtype=torch.float16)
    memory.initialize(torch.from_numpy(x))
    memory.set_labels(torch.from_numpy(result.labels))
    per_slot = memory.memory_bytes()["total"] / n
    return Measured(
        n=n, rank_row_s=rank_row, full_cell_s=full_cell, widened_fraction=s["knn_rows_widened"] / n,
        full_fraction=s["knn_rows_full"] / n, jaccard_row_s=s["jaccard_s"] / n,
        dbscan_entry_s=s["cluster_s"] / (n * s["graph_nnz_per_row"]), graph_entries_per_row=s["graph_nnz_per_row"],
        host_bytes_per_image=max(rss.peak - start, 0) / n,
        clustered_fraction=float(s["fraction_clustered"]), mean_cluster_size=float(sizes.mean()),
        # the features scale with d, the labels and derived tables (sums: K x d) with N
        memory_bytes_per_slot={512: per_slot, 2048: per_slot + 2 * 1536 + 4 * 1536 * len(sizes) / n},
        scan_pair_s=pair)


def from_gpu_check(path: Path, a: Assumptions) -> Assumptions:
    """The assumptions with gpu_check's measurements in place of the assumed rates."""
    report = json.loads(path.read_text())
    rows = report.get("rows")
    if not isinstance(rows, list):
        raise SystemExit(f"--gpu-json {path}: no 'rows' list (is it gpu_check.py's JSON?)")
    scans = [r for r in rows if r.get("kind") == "knn_torch" and r.get("seconds")]
    if not scans:
        raise SystemExit(f"--gpu-json {path}: no measured 'knn_torch' row")
    largest = max(scans, key=lambda r: r["n"])
    train, extract = {}, {}
    for d, model in ENCODERS.items():
        row = next((r for r in rows if r.get("kind") == "finetune" and r.get("model") == model), None)
        if row is None:
            raise SystemExit(f"--gpu-json {path}: no 'finetune' row for {model} (the {d}-d encoder)")
        train[d], extract[d] = row["images_per_s"], row["extract_images_per_s"]
    loader = next((r for r in rows if r.get("kind") == "dataloader"), None)
    if loader is None:
        raise SystemExit(f"--gpu-json {path}: no 'dataloader' row")
    per_worker = loader["images_per_s"] / max(loader["workers"], 1)
    return replace(a, pair_s={largest["dim"]: largest["seconds_per_block_pair"]}, train_images_per_s=train,
                   extract_images_per_s=extract, loader_images_per_s_per_worker=per_worker,
                   source=f"gpu_check {report.get('size')} on {report.get('gpu') or report.get('device')}")


def _gib(v: float) -> str:
    return f"{v / GIB:,.1f}"


def tables(sizes: list[int], dims: list[int], m: Measured, a: Assumptions) -> tuple[str, list[dict[str, Any]]]:
    """The printed tables, one per (N, d), and their rows for the JSON."""
    out, rows = [], []
    for n in sizes:
        for d in dims:
            steps = project(n, d, m, a)
            total = sum(s.epoch_s for s in steps)
            body = [[s.name, duration(s.epoch_s), duration(a.epochs * s.epoch_s), _gib(s.gpu_bytes), _gib(s.host_bytes),
                     s.how] for s in steps]
            gpu_peak, host_peak = max(s.gpu_bytes for s in steps), max(s.host_bytes for s in steps)
            fits = "" if gpu_peak <= a.gpu_memory else f"; over the {a.gpu_memory / GIB:.0f} GiB of a GPU"
            body.append(["epoch", duration(total), duration(a.epochs * total), _gib(gpu_peak), _gib(host_peak),
                         f"{a.epochs} epochs on {a.world} GPUs{fits}"])
            out.append(f"{n:,} x {d}, {a.world} GPUs\n" + format_table(
                ["step", "per epoch", f"whole run ({a.epochs} epochs)", "GPU GiB", "host GiB", "how"], body))
            rows.append({"n": n, "dim": d, "epoch_s": total, "run_s": a.epochs * total, "gpu_peak_bytes": gpu_peak,
                         "host_peak_bytes": host_peak, "steps": [asdict(s) for s in steps]})
    return "\n\n".join(out), rows


def assumption_lines(m: Measured, a: Assumptions) -> list[str]:
    lines = [f"GPU: {a.gpu_flops / 1e12:.0f} TFLOP/s float16 x {a.flops_efficiency}, {a.gpu_bandwidth / 1e12:.2f} TB/s x "
             f"{a.bandwidth_efficiency} (H100 SXM datasheet), {a.gpu_memory / GIB:.0f} GiB; world {a.world}, "
             f"{a.images_per_gpu} images per GPU per iteration, {a.epochs} epochs, one pass over the pool per epoch",
             "kNN scan per block pair: " + (f"{', '.join(f'{1e3 * v:.3f} ms at {k}-d' for k, v in a.pair_s.items())} "
                                             f"({a.source})" if a.pair_s else
                                             f"GEMM at the rate above + 14 bytes per product at the bandwidth + "
                                             f"{1e6 * a.pair_latency_s:.0f} us latency (assumed)"),
             "images/s per GPU (" + a.source + "): " + "; ".join(
                 f"{d}-d ({ENCODERS[d]}) train {a.train_images_per_s[d]:,.0f}, extract {a.extract_images_per_s[d]:,.0f}"
                 for d in sorted(a.train_images_per_s)) + f"; loader {a.workers} workers x "
             f"{a.loader_images_per_s_per_worker:,.0f}",
             "clustering: kNN scan, re-ranking and Jaccard shared by the ranks (Jaccard at min(1, 2 / world) of one process, as 2 ranks measured no faster than 1); DBSCAN and the criteria on rank 0, one thread",
             f"measured here (1 CPU thread, {m.n:,} synthetic re-ID features): re-rank "
             + ", ".join(f"{1e6 * v:.1f} us/row at {d}-d" for d, v in m.rank_row_s.items())
             + f"; widened {m.widened_fraction:.1%}, whole {m.full_fraction:.2%} of rows (taken as is at N: the "
             f"unrelated neighbours crowd more at larger N); Jaccard {1e6 * m.jaccard_row_s:.0f} us/image; DBSCAN "
             f"{1e9 * m.dbscan_entry_s:.0f} ns/entry; {m.host_bytes_per_image / 1024:.1f} kB host per image; "
             f"{m.clustered_fraction:.0%} clustered, mean cluster {m.mean_cluster_size:.1f}; bank "
             f"{m.memory_bytes_per_slot[512]:.0f} B/slot at 512-d (float16); CPU scan "
             + ", ".join(f"{1e3 * v:.0f} ms/pair at {d}-d" for d, v in m.scan_pair_s.items())]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-json", type=Path, help="gpu_check.py's JSON: its measured rates replace the assumed ones")
    parser.add_argument("--world", type=int, default=8, help="GPUs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[LUPERSON_CFS, LUPERSON])
    parser.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[512, 2048])
    parser.add_argument("--measure-n", type=int, default=16384, help="images the per-block costs are measured on")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads of the measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale_estimate.json"))
    args = parser.parse_args(argv)
    if args.gpu_json and not args.gpu_json.is_file():
        parser.error(f"--gpu-json: no such file {args.gpu_json}")
    bad = [d for d in args.dims if d not in ENCODERS]
    if bad:
        parser.error(f"--dims: {bad[0]} is not one of {', '.join(map(str, ENCODERS))}")
    if args.world < 1 or args.epochs < 1 or min(args.sizes) < 2 or args.measure_n < 2 * knn._BLOCK:
        parser.error(f"--world, --epochs must be >= 1, --sizes >= 2 and --measure-n >= {2 * knn._BLOCK}; got "
                     f"{args.world}, {args.epochs}, {min(args.sizes)}, {args.measure_n}")
    assumptions = Assumptions(world=args.world, epochs=args.epochs)
    if args.gpu_json:
        assumptions = from_gpu_check(args.gpu_json, assumptions)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    measured = measure(args.measure_n)
    seconds = time.perf_counter() - start
    text, rows = tables(args.sizes, args.dims, measured, assumptions)
    print(text)
    print("\nassumptions:\n" + "\n".join(f"- {line}" for line in assumption_lines(measured, assumptions)))
    print(f"(measured in {seconds:.0f} s)")
    report = {"measured": asdict(measured), "measure_seconds": seconds, "assumptions": asdict(assumptions),
              "projections": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
