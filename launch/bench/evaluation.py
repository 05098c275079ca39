"""Evaluation speed and memory on synthetic re-ID features, every baseline measured in the same run.

    python launch/bench/evaluation.py [--query 3368 --gallery 15913] [--msmt-fraction 1.0]
        [--torchreid-cy DIR] [--out runs/bench/evaluation.json]

Features: 512-d, around 1,501 identity centres (Market-1501's count: 751 of them appear in the gallery and
750 in the query set, the others only as pid-0 distractors, 17.6% of the gallery as in Market), 6 cameras
that each add a fixed shift, Gaussian noise, L2-normalised. Distances are squared Euclidean, float32.

(a) ``rank_metrics`` at Market size (3,368 x 15,913) against the per-query float64 reference of
    tests/test_metrics.py (|delta| <= 1e-6 asserted) and, with ``--torchreid-cy``, torchreid's compiled
    evaluator (a directory holding a built ``rank_cy`` extension; without it the published 3.0 s on a
    2-core machine is the comparison). Also timed on uniform random distances, the worst case, where
    every query's positives are spread over the whole list.
(b) ``re_rank`` against the dense original (the port in tests/test_rerank.py, run with float32 D and V as
    the port keeps them), each in a fresh process so that peak RSS is its own; |delta mAP| <= 1e-4
    asserted.
(c) ``re_rank`` and ``rank_metrics`` at MSMT17 size (11,659 x 82,161; 4,101 identity centres), peak RSS
    asserted <= 6 GB. ``--msmt-fraction f`` (< 1) runs f and f/2 of Q and G instead and extrapolates:
    time by 1/f^2 (the N^2 neighbour pass dominates); memory as the Q x G float32 result at full size plus
    the rest fitted as a + b*N through the two runs. The table says when figures are extrapolated.

Sizes are flags, so ``--query 600 --gallery 3000 --msmt-fraction 0.1`` gives a quick run.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType

import numpy as np

from reidforge.shared.io import atomic_write_json
from reidforge.shared.metrics import rank_metrics
from reidforge.shared.rerank import re_rank
from reidforge.shared.table import format_table

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_CYTHON_S = 3.0  # torchreid rank_cy on synthetic Market-size distances, 2-core machine
MSMT = (11_659, 82_161)
GB = 2**30


def _test_module(name: str) -> ModuleType:
    """A module of tests/ by path (the references live with the tests that check against them)."""
    spec = importlib.util.spec_from_file_location(f"reference_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic(num_query: int, num_gallery: int, num_ids: int, dim: int, noise: float,
               seed: int) -> dict[str, np.ndarray]:
    """Query and gallery features, pids and camids as described in the module docstring."""
    rng = np.random.default_rng(seed)
    test_ids = num_ids // 2 + 1
    centres = rng.standard_normal((num_ids, dim))
    cam_shift = 0.6 * rng.standard_normal((6, dim))
    distractors = int(0.176 * num_gallery)
    ids = {"q": rng.integers(1, test_ids, num_query),
           "g": np.r_[rng.integers(0, test_ids, num_gallery - distractors),
                      rng.integers(test_ids, num_ids, distractors)]}
    out = {}
    for side, side_ids in ids.items():
        cams = rng.integers(0, 6, len(side_ids))
        x = centres[side_ids] + cam_shift[cams] + noise * rng.standard_normal((len(side_ids), dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[f"{side}_feats"] = x.astype(np.float32)
        out[f"{side}_pids"] = np.where(side_ids < test_ids, side_ids + 1, 0)  # pid 0: distractor
        out[f"{side}_cams"] = cams
    return out


def _sq_dists(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.maximum((q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2 * q @ g.T, 0)


def _labels(data: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    return data["q_pids"], data["g_pids"], data["q_cams"], data["g_cams"]


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _isolated(method: str, data_path: str, out_path: str | None) -> dict[str, float]:
    """Runs in a fresh process: one re-ranking (plus, without ``out_path``, the metrics on its result)."""
    data = dict(np.load(data_path))
    start_rss = _rss_now()
    start = time.perf_counter()
    if method == "ours":
        dist = re_rank(data["q_feats"], data["g_feats"])
    else:  # float32 D and V, as in the port
        dist = _test_module("test_rerank")._re_rank_dense(data["q_feats"], data["g_feats"], dtype=np.float32)
    result = {"seconds": time.perf_counter() - start}
    if out_path:
        np.save(out_path, dist.astype(np.float32, copy=False))
    else:
        start = time.perf_counter()
        result["mAP"] = rank_metrics(dist, *_labels(data))["mAP"]
        result["metrics_seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["start_rss"] = start_rss
    return result


def _in_fresh_process(*args) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_isolated, *args).result()


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _load_cython(directory: Path | None) -> ModuleType | None:
    """torchreid's ``rank_cy`` extension, built outside this project from its ``rank_cylib/rank_cy.pyx``."""
    if directory is None:
        return None
    (path,) = directory.glob("rank_cy*.so")
    spec = importlib.util.spec_from_file_location("rank_cy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_metrics(args: argparse.Namespace, rows: list, report: dict) -> None:
    data = _synthetic(args.query, args.gallery, 1501, args.dim, args.noise, seed=0)
    dist = _sq_dists(data["q_feats"], data["g_feats"])
    labels = _labels(data)
    cases = {"clustered": dist, "random": np.random.default_rng(1).random(dist.shape, dtype=np.float32)}
    cython = _load_cython(args.torchreid_cy)
    size = f"{args.query:,} x {args.gallery:,}"
    report["metrics"] = {"size": [args.query, args.gallery]}
    for case, d in cases.items():
        task = f"metrics {size}, {case} distances"
        ours_s, ours = _best_time(lambda: rank_metrics(d, *labels), args.repeats)
        entry = {"ours_s": ours_s, "mAP": ours["mAP"], "rank1": float(ours["cmc"][0]), "mINP": ours["mINP"]}
        rows.append([task, "rank_metrics", round(ours_s, 3), "", "", f"mAP {ours['mAP']:.4f}"])
        if cython is not None:
            cy_s, (_, cy_map) = _best_time(lambda: cython.evaluate_cy(d, *labels, 50), 1)
            entry.update(cython_s=cy_s, cython_abs_delta_mAP=abs(float(cy_map) - ours["mAP"]))
            rows.append([task, "torchreid rank_cy (this run)", round(cy_s, 2), "", round(cy_s / ours_s, 1),
                         f"|delta mAP| {entry['cython_abs_delta_mAP']:.1e} (its float32 sums)"])
        else:
            rows.append([task, "torchreid rank_cy (published)", PUBLISHED_CYTHON_S, "",
                         round(PUBLISHED_CYTHON_S / ours_s, 1), "2-core machine, synthetic Market-size features"])
        if case == "clustered":
            ref_s, ref = _best_time(lambda: _test_module("test_metrics")._reference(d, *labels), 1)
            delta = max(abs(ours["mAP"] - ref["mAP"]), abs(ours["mINP"] - ref["mINP"]),
                        float(np.abs(ours["cmc"] - ref["cmc"]).max()))
            assert delta <= 1e-6, f"rank_metrics differs from the reference by {delta}"
            entry.update(reference_s=ref_s, max_abs_delta_vs_reference=delta)
            rows.append([task, "float64 per-query reference", round(ref_s, 2), "", round(ref_s / ours_s, 1),
                         f"max |delta| of mAP, mINP, CMC {delta:.1e}"])
        report["metrics"][case] = entry


def bench_rerank(args: argparse.Namespace, rows: list, report: dict, tmp: Path) -> None:
    data = _synthetic(args.rerank_query, args.rerank_gallery, 1501, args.dim, args.noise, seed=2)
    n = args.rerank_query + args.rerank_gallery
    need = 6.5 * n * n * 4  # the dense original: N x N float32 D, V, query-expanded V, int32 ranks, int64 argsort
    if need > 0.9 * _available_memory():
        raise SystemExit(f"the dense original needs about {need / GB:.1f} GB, only {_available_memory() / GB:.1f} GB "
                         "is available: lower --rerank-query/--rerank-gallery")
    np.savez(tmp / "market.npz", **data)
    runs = {m: _in_fresh_process(m, str(tmp / "market.npz"), str(tmp / f"{m}.npy")) for m in ("ours", "dense")}
    dists = {m: np.load(tmp / f"{m}.npy") for m in runs}
    maps = {m: rank_metrics(d, *_labels(data))["mAP"] for m, d in dists.items()}
    before = rank_metrics(_sq_dists(data["q_feats"], data["g_feats"]), *_labels(data))["mAP"]
    delta_map, delta_dist = abs(maps["ours"] - maps["dense"]), float(np.abs(dists["ours"] - dists["dense"]).max())
    assert delta_map <= 1e-4, f"re-ranked mAP differs from the dense original by {delta_map}"
    report["rerank"] = {"size": [args.rerank_query, args.rerank_gallery], "runs": runs, "mAP": maps,
                        "mAP_before": before, "abs_delta_mAP": delta_map, "max_abs_delta_dist": delta_dist}
    task = f"re-ranking {args.rerank_query:,} x {args.rerank_gallery:,}"
    ours, dense = runs["ours"], runs["dense"]
    rows.append([task, "re_rank (sparse)", round(ours["seconds"], 1), round(ours["peak_rss"] / GB, 2), "",
                 f"mAP {before:.4f} -> {maps['ours']:.4f}"])
    rows.append([task, "dense original", round(dense["seconds"], 1), round(dense["peak_rss"] / GB, 2),
                 round(dense["seconds"] / ours["seconds"], 1),
                 f"{dense['peak_rss'] / ours['peak_rss']:.1f}x the memory; |delta mAP| {delta_map:.1e}, "
                 f"max |delta dist| {delta_dist:.1e}"])


def bench_msmt(args: argparse.Namespace, rows: list, report: dict, tmp: Path) -> None:
    fractions = [1.0] if args.msmt_fraction >= 1 else [args.msmt_fraction / 2, args.msmt_fraction]
    runs = []
    for f in fractions:
        num_q, num_g = round(MSMT[0] * f), round(MSMT[1] * f)
        np.savez(tmp / "msmt.npz", **_synthetic(num_q, num_g, 4101, args.dim, args.noise, seed=3))
        run = _in_fresh_process("ours", str(tmp / "msmt.npz"), None)
        # memory beyond the process's start and the Q x G float32 result: what grows with N
        run.update(size=[num_q, num_g], fraction=f, working=run["peak_rss"] - run["start_rss"] - 4 * num_q * num_g)
        runs.append(run)
    last = runs[-1]
    if len(runs) == 1:
        seconds, peak, how = last["seconds"], last["peak_rss"], "measured"
    else:
        # time ~ N^2 (the neighbour pass); working memory ~ a + b N, fitted through the two runs
        seconds = last["seconds"] / last["fraction"] ** 2
        slope = (last["working"] - runs[0]["working"]) / (last["fraction"] - runs[0]["fraction"])
        working = last["working"] + slope * (1 - last["fraction"])
        peak = last["start_rss"] + working + 4 * MSMT[0] * MSMT[1]
        how = f"extrapolated from {last['size'][0]:,} x {last['size'][1]:,} and half that"
    report["msmt"] = {"runs": runs, "seconds": seconds, "peak_rss": peak, "how": how}
    assert peak <= 6 * GB, f"re-ranking at MSMT size peaks at {peak / GB:.2f} GB"
    dense_gb = 6.5 * sum(MSMT) ** 2 * 4 / GB
    rows.append([f"re-ranking {MSMT[0]:,} x {MSMT[1]:,}", "re_rank (sparse)", round(seconds, 1), round(peak / GB, 2),
                 "", f"{how}; the dense original would hold {dense_gb:.0f} GB"])
    rows.append([f"metrics {last['size'][0]:,} x {last['size'][1]:,}, re-ranked", "rank_metrics",
                 round(last["metrics_seconds"], 2), "", "", f"measured; mAP {last['mAP']:.4f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--rerank-query", type=int, help="re-ranking comparison size (default: --query)")
    parser.add_argument("--rerank-gallery", type=int, help="(default: --gallery)")
    parser.add_argument("--msmt-fraction", type=float, default=1.0, help="scale of the MSMT17-size run (0 skips it)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.0, help="feature noise around the identity centres")
    parser.add_argument("--repeats", type=int, default=3, help="timings of rank_metrics; the best is reported")
    parser.add_argument("--torchreid-cy", type=Path, help="directory with a built torchreid rank_cy extension")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/evaluation.json"))
    args = parser.parse_args()
    args.rerank_query = args.rerank_query or args.query
    args.rerank_gallery = args.rerank_gallery or args.gallery

    rows: list[list] = []
    report: dict[str, object] = {"dim": args.dim, "noise": args.noise}
    bench_metrics(args, rows, report)
    with tempfile.TemporaryDirectory() as tmp:
        bench_rerank(args, rows, report, Path(tmp))
        if args.msmt_fraction > 0:
            bench_msmt(args, rows, report, Path(tmp))
    print(format_table(["task", "method", "seconds", "peak RSS GB", "ours faster by", "notes"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
