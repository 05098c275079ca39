"""SpCL clustering speed and memory on synthetic re-ID features: the dense reference against the sparse step.

    python launch/bench/clustering.py [--msmt 32621] [--msmt-dim 2048] [--dense-size N] [--hard 12936]
        [--sizes 10000,50000,200000,1000000] [--dim 512] [--approx-above 100000] [--ari 50000]
        [--knn ivf] [--nprobe 8] [--knn-device auto] [--features reid]
        [--out runs/bench/clustering.json]
    python launch/bench/clustering.py --recall 1000000 512 [--knn ivf --nprobe 64] [--ari 200000]

Features: identities of geometrically distributed sizes (>= 3 images), centres random unit vectors (a
third of them look-alikes of another identity, cosine ~0.7), images = centre + isotropic Gaussian noise of
norm 0.6-1.1 (per identity: cosine to the centre ~0.7-0.85, between images of an identity ~0.45-0.75),
plus un-clustered images in random directions; L2-normalised, float32. So DBSCAN has real work: look-alikes
merge at the loose eps, noisy identities fragment, and the criteria reject some.

(1) MSMT17-train size (32,621 x 2048, ~31 images per identity, 10 % un-clustered): the dense reference
    of tests/dense_clustering.py (dense Jaccard with float32 V as SpCL keeps it, three dense DBSCANs,
    label-matrix IoUs in row blocks of 1,024 instead of SpCL's five whole N x N float matrices) and
    ``SelfPacedClustering`` with exact and with int8 kNN, each in a fresh process whose peak RSS is
    counted from after the features' generation (the features, and the libraries loaded, count); labels
    compared. The reference ranks neighbours in float64 (it is the tests' oracle); the same dense steps
    after SpCL's own float32 faiss search are timed too, as the speed SpCL's code would have. The dense
    reference needs about 3 N x N float32 (13 GB at full size); if that does not fit in 80 % of the
    available memory, or with ``--dense-size n``, it runs at n and n/2 instead (the sparse step at n as
    well, for the label comparison) and is extrapolated: time by (N/n)^2, peak RSS as a + b N^2 through
    the two runs; the float32-kNN run is skipped. The table says when figures are extrapolated.
(2) Hard features (``--hard n``, 12,936 x 2048 by default, 0 skips): ``centers[pid] + s[pid] * noise``,
    centres and noise standard normal, n/20 identities, s uniform in [2.6, 3.8] per identity, so an
    image's cosine to its centre is only ~0.25-0.36 and its neighbours are barely above the noise: many
    pairs share k-reciprocal support. The sparse step (exact kNN, ``jaccard_distance(...,
    max_distance=0.62)``, the three DBSCANs) against SpCL's own ``compute_jaccard_distance`` path (faiss
    float32 search, dense float32 Jaccard, the same DBSCANs), both in the same run: time ratio, labels
    compared.
(3) Scale curve of the sparse step at ``--sizes`` (512-d, ~16 per identity, 20 % un-clustered): exact
    kNN below ``--approx-above``, ``--knn`` above (kNN recall@30 against brute force on 2,000 queries
    reported); targets 1M in <= 20 min and <= 8 GB. ``--ari n`` also clusters n images with exact and
    with ``--knn`` search and reports the adjusted Rand index between the two labelings (0 skips it).
(4) ``--recall N D``: only the approximate search (``--knn``, ``--nprobe``) of N x D features (``--features
    reid``: the scale curve's; ``hard``: those of (2)), in a fresh process: recall@30 on 2,000 queries,
    seconds and peak RSS; with ``--ari n``, the labels' ARI against exact search at n as well. Nothing
    else runs.

Sizes are flags, so ``--msmt 4000 --hard 2000 --sizes 10000,50000 --ari 0`` is a quick run.
``--knn-device`` is the sparse step's ``ClusterConfig.knn_device`` (where the exact/int8 scan runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType

import faiss
import numpy as np
from sklearn.metrics import adjusted_rand_score

from reidforge.pretrain.clustering import ClusterConfig, SelfPacedClustering
from reidforge.pretrain.knn import DEVICES, INDICES, knn_table
from reidforge.shared.io import atomic_write_json
from reidforge.shared.table import format_table

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30
MSMT_TRAIN = 32_621
CHUNK = 1 << 15  # rows of features generated at once


def _dense_module() -> ModuleType:
    """tests/dense_clustering.py by path (the reference lives with the tests that check against it)."""
    spec = importlib.util.spec_from_file_location("reference_dense_clustering", ROOT / "tests" / "dense_clustering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic(n: int, dim: int, mean_size: float, unclustered: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features as in the module docstring and the identity of each (-1: un-clustered)."""
    rng = np.random.default_rng(seed)
    n_clustered = int(round(n * (1 - unclustered)))
    sizes = 2 + rng.geometric(1 / (mean_size - 2), size=n_clustered // 3 + 1)  # >= 3 each: enough of them
    sizes = sizes[:int(np.searchsorted(np.cumsum(sizes), n_clustered)) + 1]
    sizes[-1] -= sizes.sum() - n_clustered  # the last identity keeps >= 1 member
    num_ids = len(sizes)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    alike = rng.random(num_ids) < 1 / 3
    centres[alike] += centres[rng.integers(0, num_ids, np.count_nonzero(alike))]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.6, 1.1, num_ids).astype(np.float32)
    owner = np.r_[np.repeat(np.arange(num_ids), sizes), np.full(n - n_clustered, -1)][rng.permutation(n)]
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, CHUNK):
        own = owner[s:s + CHUNK]
        member = own >= 0
        block = rng.standard_normal((len(own), dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        block[member] = block[member] * spread[own[member], None] + centres[own[member]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + CHUNK] = block
    return x, owner


def hard(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The hard features of the module docstring, (2), and the identity of each."""
    rng = np.random.default_rng(seed)
    num_ids = max(1, n // 20)
    owner = rng.permutation(np.arange(n) % num_ids)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    spread = rng.uniform(2.6, 3.8, num_ids).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, CHUNK):
        own = owner[s:s + CHUNK]
        block = centres[own] + spread[own, None] * rng.standard_normal((len(own), dim), dtype=np.float32)
        x[s:s + CHUNK] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, owner


def features(kind: str, n: int, dim: int, mean_size: float, unclustered: float) -> np.ndarray:
    """``synthetic`` (``kind="reid"``) or ``hard`` features."""
    return (hard(n, dim) if kind == "hard" else synthetic(n, dim, mean_size, unclustered))[0]


def _reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: /proc/self/clear_refs), so that the features' generation
    does not count as clustering memory; the features themselves stay resident and count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _isolated(method: str, n: int, dim: int, mean_size: float, unclustered: float, knn: str,
              labels_path: str | None, nprobe: int = 8, device: str = "auto", kind: str = "reid") -> dict[str, float]:
    """Runs in a fresh process: generate the features, cluster them once (``method="search"``: only the
    kNN search), report time and peak RSS."""
    x = features(kind, n, dim, mean_size, unclustered)
    _reset_peak_rss()
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result: dict[str, float] = {}
    start = time.perf_counter()
    labels = None
    if method == "search":
        knn_table(x, ClusterConfig().k1, knn, result, nprobe, device)
    elif method == "sparse":
        out = SelfPacedClustering(ClusterConfig(knn=knn, ivf_nprobe=nprobe, knn_device=device))(x)
        labels = out.labels
        result.update(out.stats)
    else:
        dense = _dense_module()
        cfg = ClusterConfig()
        if knn == "faiss":  # SpCL's own search: faiss float32 inner products, ties in faiss's order
            index = faiss.IndexFlatIP(dim)
            index.add(x)
            ranks = index.search(x, cfg.k1)[1]
        else:  # the tests' oracle: float64 similarities, ties by index
            ranks = dense.dense_knn(x, cfg.k1)
        result["knn_s"] = time.perf_counter() - start
        jaccard = dense.dense_jaccard(x, cfg.k1, cfg.k2, dtype=np.float32, initial_rank=ranks)
        result["jaccard_s"] = time.perf_counter() - start - result["knn_s"]
        spcl, thres = dense.dense_spcl_labels(jaccard, cfg.eps, cfg.eps_gap, cfg.min_samples, iou_block=1024)
        labels = dense.canonical(spcl)
        result["indep_threshold"] = thres
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["start_rss"] = start_rss
    if labels_path and labels is not None:
        np.save(labels_path, labels)
    return result


def _in_fresh_process(*args) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(_isolated, *args).result()
    # progress of a long run, one line per process
    print(f"{args[0]} {args[1]:,} x {args[2]} ({args[5]}): {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_rss'] / GB:.2f} GB", file=sys.stderr, flush=True)
    return result


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def bench_msmt(args: argparse.Namespace, rows: list, report: dict, tmp: Path) -> None:
    n, dim = args.msmt, args.msmt_dim
    shape = (dim, 31.0, 0.1)
    need = 3.3 * n * n * 4  # dense V, its query expansion (then the Jaccard matrix), float32, plus DBSCAN's share
    dense_n = args.dense_size or (n if need <= 0.8 * _available_memory() else None)
    if dense_n is None:
        fit = np.sqrt(0.8 * _available_memory() / (3.3 * 4))
        dense_n = int(fit) // 1000 * 1000
    sizes = [dense_n] if dense_n >= n else [dense_n // 2, dense_n]
    dense_runs = [_in_fresh_process("dense", m, *shape, "exact", str(tmp / f"dense_{m}.npy")) for m in sizes]
    ref = np.load(tmp / f"dense_{dense_n}.npy")
    last = dense_runs[-1]
    if len(dense_runs) == 1:
        dense_s, dense_peak, how = last["seconds"], last["peak_rss"], "measured"
        stages = {k: last[k] for k in ("knn_s", "jaccard_s")}
    else:
        scale = (n / dense_n) ** 2
        dense_s = last["seconds"] * scale
        slope = (last["peak_rss"] - dense_runs[0]["peak_rss"]) / (dense_n**2 - sizes[0] ** 2)
        dense_peak = last["peak_rss"] + slope * (n**2 - dense_n**2)
        stages = {k: last[k] * scale for k in ("knn_s", "jaccard_s")}
        how = f"extrapolated from {sizes[0]:,} and {dense_n:,} (the full size needs ~{need / GB:.0f} GB)"
    report["msmt"] = {"n": n, "dim": dim, "dense_runs": dense_runs, "compared_at": dense_n, "dense_seconds": dense_s,
                      "dense_peak_rss": dense_peak, "how": how}
    task = f"SpCL clustering {n:,} x {dim}"
    rows.append([task, "dense reference", round(dense_s, 1), round(dense_peak / GB, 2), "",
                 f"{how}; kNN {stages['knn_s']:.1f} s (float64, blocks of 1,024 rows), Jaccard "
                 f"{stages['jaccard_s']:.1f} s (targets for the sparse step: >= 20x faster, <= 1/10 of the memory)"])
    spcl_s = None
    if dense_n == n:  # the same dense steps after SpCL's own float32 faiss search
        spcl = _in_fresh_process("dense", n, *shape, "faiss", str(tmp / "dense_faiss.npy"))
        spcl_s = spcl["seconds"]
        same = int(np.count_nonzero(np.load(tmp / "dense_faiss.npy") != ref))
        report["msmt"]["dense_faiss_knn"] = spcl | {"differing_labels": same}
        rows.append([task, "dense, float32 faiss kNN", round(spcl_s, 1), round(spcl["peak_rss"] / GB, 2), "",
                     f"SpCL's own search: kNN {spcl['knn_s']:.1f} s, Jaccard {spcl['jaccard_s']:.1f} s; labels "
                     f"{'identical to the reference' if not same else f'{same} differ from the reference'}"])
    for knn in ("exact", "int8"):
        check = _in_fresh_process("sparse", dense_n, *shape, knn, str(tmp / f"sparse_{knn}_{dense_n}.npy"),
                                  args.nprobe, args.knn_device)
        ours = np.load(tmp / f"sparse_{knn}_{dense_n}.npy")
        differing = int(np.count_nonzero(ref != ours))
        ari = float(adjusted_rand_score(ref, ours))
        sparse = check if dense_n == n else _in_fresh_process("sparse", n, *shape, knn, None, args.nprobe,
                                                              args.knn_device)
        rest = sparse["seconds"] - sparse["knn_s"]
        report["msmt"][knn] = {"run": sparse, "label_check": check, "differing_labels": differing, "ari": ari,
                               "speedup": dense_s / sparse["seconds"],
                               "speedup_after_knn": (dense_s - stages["knn_s"]) / rest,
                               "memory_ratio": sparse["peak_rss"] / dense_peak}
        recall = f", recall@30 {sparse['knn_recall']:.5f}" if "knn_recall" in sparse else ""
        rows.append([task, f"sparse ({knn} kNN)", round(sparse["seconds"], 1), round(sparse["peak_rss"] / GB, 2),
                     round(dense_s / sparse["seconds"], 1),
                     f"kNN {sparse['knn_s']:.1f} s{recall}, Jaccard {sparse['jaccard_s']:.1f} s, DBSCAN x3 + criteria "
                     f"{sparse['cluster_s']:.1f} s; {dense_peak / sparse['peak_rss']:.1f}x less memory; "
                     f"{sparse['num_clusters']:,.0f} clusters, {sparse['fraction_clustered']:.1%} clustered; labels at "
                     f"{dense_n:,}: {'identical' if not differing else f'{differing} differ'} (ARI {ari:.6f})"
                     + (f"; {spcl_s / sparse['seconds']:.1f}x faster than the float32-kNN dense run" if spcl_s else "")])


def bench_hard(args: argparse.Namespace, rows: list, report: dict, tmp: Path) -> None:
    n, shape = args.hard, (args.hard_dim, 20.0, 0.0)
    ours = _in_fresh_process("sparse", n, *shape, "exact", str(tmp / "hard_sparse.npy"), args.nprobe,
                             args.knn_device, "hard")
    spcl = _in_fresh_process("dense", n, *shape, "faiss", str(tmp / "hard_dense.npy"), args.nprobe,
                             args.knn_device, "hard")
    differing = int(np.count_nonzero(np.load(tmp / "hard_sparse.npy") != np.load(tmp / "hard_dense.npy")))
    ratio = spcl["seconds"] / ours["seconds"]
    report["hard"] = {"n": n, "dim": args.hard_dim, "sparse": ours, "spcl_faiss": spcl, "speedup": ratio,
                      "differing_labels": differing}
    print(f"hard features {n:,} x {args.hard_dim}: ours {ours['seconds']:.1f} s, SpCL's float32 faiss path "
          f"{spcl['seconds']:.1f} s: {ratio:.1f}x; labels {'identical' if not differing else f'{differing} differ'}",
          file=sys.stderr, flush=True)
    rows.append([f"hard features {n:,} x {args.hard_dim}", "sparse (exact kNN)", round(ours["seconds"], 1),
                 round(ours["peak_rss"] / GB, 2), round(ratio, 1),
                 f"kNN {ours['knn_s']:.1f} s, Jaccard {ours['jaccard_s']:.1f} s ({ours['v_nnz_per_row']:.0f} "
                 f"weights and {ours['graph_nnz_per_row']:.0f} stored distances per row), DBSCAN x3 + criteria "
                 f"{ours['cluster_s']:.1f} s; SpCL's float32 faiss path {spcl['seconds']:.1f} s, "
                 f"{spcl['peak_rss'] / GB:.2f} GB; labels {'identical' if not differing else f'{differing} differ'}"])


def _agreement(args: argparse.Namespace, rows: list, report: dict, shape: tuple) -> None:
    """Labels of exact and of ``--knn`` search at ``--ari`` images: their adjusted Rand index."""
    n = args.ari
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: _in_fresh_process("sparse", n, *shape, k, f"{tmp}/{k}.npy", args.nprobe, args.knn_device,
                                     args.features) for k in ("exact", args.knn)}
        labels = {k: np.load(f"{tmp}/{k}.npy") for k in runs}
    ari = float(adjusted_rand_score(labels["exact"], labels[args.knn]))
    fast = runs[args.knn]
    report["agreement"] = {"n": n, "knn": args.knn, "ari": ari, "runs": runs}
    rows.append([f"{args.knn} vs exact kNN, {n:,} x {shape[0]}", "sparse", round(fast["seconds"], 1),
                 round(fast["peak_rss"] / GB, 2), round(runs["exact"]["seconds"] / fast["seconds"], 1),
                 f"labels ARI {ari:.4f} (target >= 0.95); recall@30 {fast['knn_recall']:.3f}; clusters "
                 f"{fast['num_clusters']:,.0f} vs {runs['exact']['num_clusters']:,.0f}" + _settings(fast)])


def _settings(run: dict[str, float]) -> str:
    """The approximate index's own settings among a run's stats (``ivf_nlist``, ``ivf_nprobe``, ...)."""
    found = [f"{k} {v:g}" for k, v in run.items() if k.startswith(("ivf_", "hnsw_"))]
    return f"; {', '.join(found)}" if found else ""


def bench_recall(args: argparse.Namespace, rows: list, report: dict) -> None:
    n, dim = args.recall
    run = _in_fresh_process("search", n, dim, 16.0, 0.2, args.knn, None, args.nprobe, args.knn_device, args.features)
    met = run["knn_recall"] >= 0.95 and run["seconds"] <= 20 * 60 and run["peak_rss"] <= 8 * GB
    report["recall"] = run | {"n": n, "dim": dim, "knn": args.knn, "features": args.features}
    rows.append([f"{args.knn} search {n:,} x {dim} ({args.features})", "kNN only", round(run["seconds"], 1),
                 round(run["peak_rss"] / GB, 2), "",
                 f"recall@30 {run['knn_recall']:.4f} on {run['knn_recall_queries']:,.0f} queries" + _settings(run)
                 + (f"; target recall >= 0.95 in <= 20 min and <= 8 GB {'met' if met else 'MISSED'}"
                    if n >= 1_000_000 else "")])


def bench_scale(args: argparse.Namespace, rows: list, report: dict) -> None:
    shape = (args.dim, 16.0, 0.2)
    report["scale"] = []
    for n in args.sizes:
        knn = "exact" if n < args.approx_above else args.knn
        run = _in_fresh_process("sparse", n, *shape, knn, None, args.nprobe, args.knn_device)
        run.update(n=n, knn=knn)
        report["scale"].append(run)
        notes = (f"kNN {run['knn_s']:.1f} s, Jaccard {run['jaccard_s']:.1f} s, DBSCAN x3 + criteria "
                 f"{run['cluster_s']:.1f} s; features alone {n * args.dim * 4 / GB:.2f} GB; "
                 f"{run['num_clusters']:,.0f} clusters, {run['fraction_clustered']:.1%} clustered")
        if n >= 1_000_000:
            met = run["seconds"] <= 20 * 60 and run["peak_rss"] <= 8 * GB
            notes += f"; target <= 20 min and <= 8 GB {'met' if met else 'MISSED'}"
        if knn != "exact":
            notes += f"; recall@30 {run['knn_recall']:.3f}" + _settings(run)
        rows.append([f"scale {n:,} x {args.dim}", f"sparse ({knn} kNN)", round(run["seconds"], 1),
                     round(run["peak_rss"] / GB, 2), "", notes])
    if args.ari:
        _agreement(args, rows, report, shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msmt", type=int, default=MSMT_TRAIN, help="size of comparison (1); 0 skips it")
    parser.add_argument("--msmt-dim", type=int, default=2048)
    parser.add_argument("--hard", type=int, default=12_936, help="size of the hard-feature comparison (2); 0 skips it")
    parser.add_argument("--hard-dim", type=int, default=2048)
    parser.add_argument("--dense-size", type=int, help="run the dense reference at this size and extrapolate")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=[10_000, 50_000, 200_000, 1_000_000], help="scale-curve sizes, comma-separated ('' skips)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--approx-above", type=int, default=100_000, help="IVF instead of exact kNN from this size")
    parser.add_argument("--ari", type=int, default=50_000, help="labels of exact vs --knn search at this size (0 skips)")
    parser.add_argument("--knn", choices=[i for i in INDICES if i not in ("exact", "auto")], default="ivf",
                        help="the approximate search of (3) and (4) (ClusterConfig.knn)")
    parser.add_argument("--recall", type=int, nargs=2, metavar=("N", "D"),
                        help="only the --knn search of N x D features: recall@30, time, peak RSS (4)")
    parser.add_argument("--features", choices=("reid", "hard"), default="reid",
                        help="features of --recall and --ari: the scale curve's or the hard ones of (2)")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF lists each point probes (ClusterConfig.ivf_nprobe)")
    parser.add_argument("--knn-device", choices=DEVICES, default="auto",
                        help="where the exact/int8 kNN scan runs (ClusterConfig.knn_device)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/clustering.json"))
    args = parser.parse_args()

    rows: list[list] = []
    report: dict[str, object] = {"argv": vars(args) | {"out": str(args.out)}}
    if args.recall:  # the search alone, and with --ari the labels' agreement
        bench_recall(args, rows, report)
        if args.ari:
            _agreement(args, rows, report, (args.recall[1], 16.0, 0.2))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if args.msmt:
                bench_msmt(args, rows, report, Path(tmp))
            if args.hard:
                bench_hard(args, rows, report, Path(tmp))
        if args.sizes or args.ari:
            bench_scale(args, rows, report)
    print(format_table(["task", "method", "seconds", "peak RSS GB", "sparse faster by", "notes"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
