"""kNN search for SpCL's clustering step: each row's k most similar rows among N L2-normalised features.

The table (step 1 of the Jaccard distance in ``pretrain/clustering.py``): k columns per row, self
included, neighbours ranked by float64 cosine similarity (sums of float64 products of the float32
features), ties by index. SpCL's ``compute_jaccard_distance`` (Ge et al., NeurIPS 2020, code
spcl/utils/faiss_rerank.py, ``search_option=0``) takes it from faiss's float32 brute force, ties in
faiss's order; ``index="exact"`` here gives the float64 ranking, certified; ``"int8"``, ``"ivf"`` and
``"hnsw"`` are approximate and report their recall@k against brute force on a fixed sample of 2,000
queries (``stats["knn_recall"]``, the sample size ``knn_recall_queries``; one pass over the features,
``_sample_top``: ~1e12 multiply-adds at 1M x 512, under a minute on 2 cores) and their settings
(``ivf_nlist``/``ivf_nprobe``, ``hnsw_m``/``hnsw_ef_construction``/``hnsw_ef_search``).

Exact search (``index="exact"``). A symmetric scan over blocks of 2,048 rows (``_blocked_top``: torch
GEMMs, each block pair serving the rows of both blocks, so half the products of a full scan, and only
entries above a per-row floor kept) gives each row its k + 8 largest approximate products. They are
re-ranked by float64 similarity with the index tie-break. A row is certified exact when its k-th float64
similarity exceeds the smallest approximate candidate similarity by more than the bound e on the
scan's error below: every row left out has approximate similarity at most that smallest one, so exact
similarity below the k-th. Otherwise the row is searched again with k + 120 candidates (the same
products, the same test), then computed whole in float64 (``_full_rows``). What remains against a
dense float64 reference is float64 summation order (~1e-16, the 1e-12 slack in e): it flips a
neighbour only between similarities within ~1e-15 of each other that are not exactly equal; exact
ties (duplicates, dyadic features) are exact in both and resolved by index.

Where the block products run (``device``: ``"auto"`` is CUDA when torch sees a device, else CPU). On
CPU they are float32 GEMMs (``torch.mm`` at full float32 precision). On CUDA they are float16 operands
with float32 accumulation and float32 output (cuBLAS's tensor-core GEMM, ``torch.mm(out_dtype=
torch.float32)``, with TF32 and cuBLAS's reduced-precision split-K reductions switched off for the
scan). float16 rather than bfloat16: unit-norm entries lie in [-1, 1], far inside float16's range
(overflow at 65,504), so bfloat16's wider exponent buys nothing, while float16's 11-bit significand
makes the bound below 8 times smaller than bfloat16's 8 bits (2 u_in = 2^-10 against 2^-7), so far
fewer rows need the wider search; the tensor-core rates of the two are equal. Only the format of the
operand depends on the device: CPU has no float16 x float16 -> float32 GEMM, so a float16 scan on CPU
multiplies the same float16 values held exactly in float32, whose products are as exact and whose sums
are float32 too. The tests run that scan on CPU (``_SCAN_FORMAT``) against the dense float64 table; the
candidates' re-ranking and the whole-row fallback are float64 on CPU for both devices.

The bound (``_product_error``). Rows x, y with ||x||, ||y|| <= nu = 1 + 1e-3 (the accepted norm
tolerance), D entries. Rounding them to a format of unit roundoff u (2^-11 for float16) and subnormal
spacing s (2^-24) moves each entry by |x~_i - x_i| <= u |x_i| + s/2, so ||x~ - x|| <= rho = u nu +
(s/2) sqrt(D). Then, by Cauchy-Schwarz on each term of <x~, y~> - <x, y> = <x~ - x, y> + <x, y~ - y> +
<x~ - x, y~ - y>, the input rounding moves the product by at most 2 nu rho + rho^2 (~2u for unit
vectors). The products x~_i y~_i are exact in float32 (11 + 11 significant bits <= 24, exponents >=
-48; in bfloat16 a product may underflow float32, by < 2^-149 each, inside the slack below), so only
the sum rounds: for any order of D float32 additions of unit roundoff u_acc,
|fl(sum) - sum| <= gamma_D sum |x~_i y~_i| <= gamma_D (nu + rho)^2, gamma_D = D u_acc / (1 - D u_acc)
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §3.1). Tensor cores align the
addends of each block sum to the largest and truncate (Fasi, Higham, Mikaitis and Pranesh, "Numerical
behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 2021): a block of b products plus the running
sum errs by at most (b + 1) 2^-23 of its absolute sum, at most 2 x 2^-23 per product, so u_acc =
2^-22 for the low-precision scan (IEEE float32 sums, CPU's, are within it). In all:

    e = 2 nu rho + rho^2 + gamma_D (nu + rho)^2 + 1e-12 (the float64 re-ranking's own rounding).

With float16 at D = 2048: 2 nu rho ~ 9.8e-4 (input rounding, the larger term below D = 4096),
gamma_D ~ 4.9e-4, e ~ 1.5e-3. A float32 scan on float32 features rounds no input (rho = 0) and sums
with u_acc = 2^-24 (IEEE round to nearest): e = gamma_D nu^2 + 1e-12 ~ 1.2e-4 at 2048-d.

``index="int8"`` is the same blocked scan on int8 features, q = round(x / s) with one scale s = max |x|
/ 127 for all rows (so products compare as integers along rows and columns), through exact int32 GEMMs
(``torch._int_mm``, VNNI kernels on x86): about 4x the float32 rate on the 2-core CPU here. Its k + 8
candidates get the same float64 re-ranking, so only the candidate set can differ from the exact one.
Rounding moves a similarity by at most |x| |r_y| + |r_x| |y| + |r_x| |r_y| (r = x - s q; |r| ~ 0.01 at
2048-d), typically by ~1e-4: a neighbour is missed only where the exact top k and the int8 top k + 8
disagree beyond that. That bound is too coarse to certify rows whose k-th neighbour sits in the dense
floor of unrelated similarities, so nothing is certified. On the clustering benchmark's 32,621 x 2048
features: 99.998 % of the exact table (recall@30 1.0 on 500 sampled queries) and labels identical
to the dense reference's. It is a CPU speed path: on CUDA it runs the float16 scan, uncertified.

Approximate indices (not in the reference). ``ivf`` is IVF-Flat with faiss k-means lists (sqrt(nprobe
N) of them, 40 training points per list, 10 iterations), each point probing ``nprobe`` lists (8 by
default), scanned list by list with one GEMM per list instead of faiss's per-query scan (measured on the
2-core CPU here: ~2.4 G multiply-adds/s for faiss's IndexIVFFlat scan, ~6 for the list GEMMs), and
symmetrically: a pair is scored when either point probes the other's list, which raises the recall of
mutual neighbours, the ones k-reciprocal sets are made of. The scan costs ~sqrt(nprobe) N^1.5.
Recall@30 against brute force on the benchmark's synthetic features at nprobe 8: 0.79 at 50k, 0.69 at
200k, 0.54 at 1M (the far, noise-level neighbours are the ones missed); labels at 50k: ARI 0.90 against
exact kNN. More probes buy little: nprobe 64 at 200k gives 0.86 (3,578 lists, 451 s on a loaded 2-core
machine, against ~50 s at nprobe 8). Why: on those features 35 % of the true top-30 entries at 200k are
at noise level (cosine < 0.25 against a spread of 0.045 between unrelated images; 21 % of the queries are
un-clustered images whose whole top 30 is), and such neighbours fall in no particular list, so each is
found with about the probability that its list is scanned: 0.95 needs nearly all of them, i.e. close to
a full scan, which ``int8`` does faster than any list scan (``"auto"``: ``int8`` on CPU, the certified
exact scan on CUDA). IVF's centroids are searched on all GPUs when faiss has any. ``hnsw`` is faiss's
IndexHNSWFlat (M 32, efConstruction 80, efSearch 128); its build is slow on CPU (~1 min per 100k at
512-d on an idle machine here; build and search of 100k x 512 did not finish in 10 min on a loaded one).
Both re-rank their k + 8 candidates in float64 like the exact search.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import faiss
import numpy as np
import torch

INDICES = ("exact", "int8", "ivf", "hnsw", "auto")  # auto: exact where the scan runs on CUDA, else int8
DEVICES = ("auto", "cpu", "cuda")
IVF_NPROBE = 8  # default inverted lists visited per query; sqrt(nprobe N) lists balance assignment and scan

_MARGIN = 8  # candidates per row beyond k, so that the boundary is settled among them
_WIDE_MARGIN = 120  # second search for the rows the first could not certify
_QUERY_CHUNK = 1 << 14  # queries searched and re-ranked at once
_PAIR_CHUNK = 1 << 13  # columns whose float64 similarities are computed at once (whole-row fallback)
_FULL_ROW_CHUNK = 1 << 22  # similarities of whole rows computed at once (wide search, fallback)
_RANK_CHUNK = 1 << 9  # candidate vectors gathered (float32, then float64) per re-ranking step
_BLOCK = 2048  # rows per block of the blocked brute-force scan: one block product is 16 MB
_HOLD = 2  # the blocked scan cuts its candidates to each row's top once it holds this many per row and slot
_IVF_TRAIN_PER_LIST = 40  # k-means training points per list (faiss warns below 39)
_IVF_NITER = 10  # k-means iterations
_HNSW_M, _HNSW_EF_CONSTRUCTION, _HNSW_EF_SEARCH = 32, 80, 128
_RECALL_QUERIES = 2000  # queries for the approximate indices' recall against brute-force search
_RECALL_COLUMNS = 1 << 14  # rows scanned at once for the sampled queries' brute force (128 MB of products)
_NORM_TOL = 1e-3  # accepted |norm - 1| of a feature row
_UNIT = 2.0**-24  # float32 unit roundoff (round to nearest)
_BLOCK_SUM_UNIT = 2.0**-22  # float32 tensor-core block sums, truncating: (b + 1) 2^-23 per b products, b >= 1
_RERANK_SLACK = 1e-12  # the float64 re-ranking's own rounding, and its summation order against a reference
# the format of the block products' operands per device (module docstring)
_SCAN_FORMAT = {"cpu": torch.float32, "cuda": torch.float16}


def check_features(features: np.ndarray) -> np.ndarray:
    """The features as C-contiguous float32, after the checks every entry point needs."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"features must be a 2-D (N, D) array with N >= 2, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features must be floating point, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # NaN/inf anywhere in a row shows in its norm
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:
        raise ValueError(f"features must be finite: row {bad[0]} contains NaN or inf")
    off = np.abs(np.sqrt(sq) - 1)
    worst = int(np.argmax(off))
    if off[worst] > _NORM_TOL:
        raise ValueError(f"features must be L2-normalised rows: row {worst} has norm {math.sqrt(sq[worst]):.6g}")
    return x


def check_search(index: str, nprobe: int, device: str) -> None:
    """The search arguments of the public entry points (before the features are read)."""
    if index not in INDICES:
        raise ValueError(f"index must be one of {', '.join(INDICES)}, got {index!r}")
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got nprobe={nprobe}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False)")


def check_k(k: int, n: int, name: str = "k1") -> None:
    if not 1 <= k < n:
        raise ValueError(f"{name} must be in [1, N) with N = {n} features, got {name}={k}")


def _resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _product_error(fmt: torch.dtype, dim: int) -> float:
    """Bound on |computed <x~, y~> - <x, y>| of the blocked scan for rows of norm <= 1 + _NORM_TOL, plus
    the re-ranking's slack (module docstring, "The bound")."""
    nu = 1 + _NORM_TOL
    if fmt == torch.float32:  # the features themselves: no input rounding, IEEE float32 sums
        rho, u_acc = 0.0, _UNIT
    else:
        info = torch.finfo(fmt)
        rho = info.eps / 2 * nu + info.smallest_normal * info.eps / 2 * math.sqrt(dim)
        u_acc = _BLOCK_SUM_UNIT
    gamma = dim * u_acc / (1 - dim * u_acc)
    return 2 * nu * rho + rho**2 + gamma * (nu + rho) ** 2 + _RERANK_SLACK


def _flat_index(x: np.ndarray) -> faiss.Index:
    """Exact inner-product search over ``x``; on all GPUs when faiss has any."""
    index = faiss.IndexFlatIP(x.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def _hnsw_index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexHNSWFlat(x.shape[1], _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = _HNSW_EF_SEARCH
    index.add(x)
    return index


def _ivf_candidates(x: np.ndarray, take: int, nprobe: int, stats: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """IVF-Flat search of every row among all rows: float32 similarities and ids (N x take, -1 = none).

    Each point probes the lists of its nprobe most similar k-means centroids, as faiss's IndexIVFFlat
    does, but the scan runs list by list: the queries probing a list against its members are one GEMM,
    whose rows update the queries' running top ``take`` and whose columns the members' (a pair is
    scored when either point probes the other's list; a pair scored twice is kept once).
    """
    n, dim = x.shape
    nlist = max(1, min(int(round(math.sqrt(nprobe * n))), n // _IVF_TRAIN_PER_LIST))
    nprobe = min(nprobe, nlist)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, nlist * _IVF_TRAIN_PER_LIST), replace=False))
    kmeans = faiss.Kmeans(dim, nlist, niter=_IVF_NITER, spherical=True, seed=1)
    kmeans.train(x[sample])
    _, probes = _flat_index(kmeans.centroids).search(x, nprobe)  # probes[:, 0] is the point's own list
    members = np.argsort(probes[:, 0], kind="stable")
    member_at = np.concatenate([[0], np.cumsum(np.bincount(probes[:, 0], minlength=nlist))])
    queries = np.argsort(probes.ravel(), kind="stable") // nprobe
    query_at = np.concatenate([[0], np.cumsum(np.bincount(probes.ravel(), minlength=nlist))])
    del probes
    best_s = np.full((n, take), -np.inf, np.float32)
    best_i = np.full((n, take), -1, np.int64)
    for lst in range(nlist):
        m = members[member_at[lst]:member_at[lst + 1]]
        q = queries[query_at[lst]:query_at[lst + 1]]
        if len(m) and len(q):
            sims = x[q] @ x[m].T
            _merge_top(best_s, best_i, q, sims, m)
            _merge_top(best_s, best_i, m, sims.T, q)  # the block also serves the members: symmetric probing
    stats.update(ivf_nlist=float(nlist), ivf_nprobe=float(nprobe))
    return best_s, best_i


def _rank(x: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (len(rows) x c; -1 = none) sorted by float64 similarity to their row, ties by index;
    missing candidates get -inf and go last. The float32 candidate vectors are gathered _RANK_CHUNK at a
    time and widened to float64, where their products with the row are exact and summed by BLAS."""
    c, dim = cand.shape[1], x.shape[1]
    step = max(1, _RANK_CHUNK // c)
    table = torch.from_numpy(x)
    gathered = torch.empty(step * c, dim)
    wide = torch.empty(step * c, dim, dtype=torch.float64)
    sims = np.empty(cand.shape)
    for s in range(0, len(rows), step):
        part = np.maximum(cand[s:s + step], 0)
        m = part.size
        torch.index_select(table, 0, torch.from_numpy(part.ravel()), out=gathered[:m])
        wide[:m].copy_(gathered[:m])
        left = x[rows[s:s + step]].astype(np.float64)
        sims[s:s + step] = np.matmul(wide[:m].numpy().reshape(len(part), c, dim), left[:, :, None])[:, :, 0]
    sims[cand < 0] = -np.inf
    order = np.lexsort((cand, -sims), axis=-1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(cand, order, 1)


def _full_rows(x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of whole rows: float64 similarities to every point; everything tied with the k-th
    (with a slack for the re-ranking's own rounding) is re-ranked, so ties are broken by index."""
    n = len(x)
    sims, ids = np.empty((len(rows), k)), np.empty((len(rows), k), np.int64)
    step = max(1, _FULL_ROW_CHUNK // n)
    for s in range(0, len(rows), step):
        part = rows[s:s + step]
        left = x[part].astype(np.float64)
        full = np.empty((len(part), n))
        for c0 in range(0, n, _PAIR_CHUNK):
            full[:, c0:c0 + _PAIR_CHUNK] = left @ x[c0:c0 + _PAIR_CHUNK].T.astype(np.float64)
        kth = -np.partition(-full, k - 1, axis=1)[:, k - 1]
        for r, row in enumerate(part):
            cand = np.flatnonzero(full[r] >= kth[r] - _RERANK_SLACK)
            s64, cand = _rank(x, np.array([row]), cand[None, :])
            sims[s + r], ids[s + r] = s64[0, :k], cand[0, :k]
    return sims, ids


def _merge_top(best_s: np.ndarray, best_i: np.ndarray, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
    """Merge the block ``sims`` (len(rows) x len(ids)) into the running top candidates of ``rows``
    (distinct); an id already held is not taken twice."""
    take = best_s.shape[1]
    if sims.shape[1] > take:
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        sims, ids = np.take_along_axis(sims, top, 1), ids[top]
    else:
        ids = np.broadcast_to(ids, sims.shape)
    cat_i = np.concatenate([best_i[rows], ids], 1)
    by_id = np.argsort(cat_i, axis=1, kind="stable")
    cat_i = np.take_along_axis(cat_i, by_id, 1)
    cat_s = np.take_along_axis(np.concatenate([best_s[rows], sims], 1), by_id, 1)
    again = np.zeros(cat_i.shape, bool)
    again[:, 1:] = cat_i[:, 1:] == cat_i[:, :-1]  # the same pair seen in two blocks
    cat_s[again], cat_i[again] = -np.inf, -1
    keep = np.argpartition(-cat_s, take - 1, axis=1)[:, :take]
    best_s[rows], best_i[rows] = np.take_along_axis(cat_s, keep, 1), np.take_along_axis(cat_i, keep, 1)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """Matrix products as the error bound assumes them, whatever the caller set: float32 ones in full
    float32 (no TF32), float16 ones with float32 reductions throughout (no float16 split-K sums)."""
    matmul = torch.backends.cuda.matmul
    before = (torch.get_float32_matmul_precision(), matmul.allow_fp16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("highest")
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.allow_fp16_reduced_precision_reduction = before[1]


def _scan_operand(x: np.ndarray, kind: str, device: torch.device) -> tuple[torch.Tensor, float]:
    """The rows as the blocked scan multiplies them, on ``device``, and the factor from their products
    to similarities: int8 with one scale for all rows on CPU, so that products compare as integers along
    rows and columns alike; else rounded to the device's _SCAN_FORMAT (held in float32 on CPU, which
    multiplies no float16 into float32)."""
    rows = torch.from_numpy(x)
    if kind == "int8" and device.type == "cpu":
        scale = max(float(x.max()), -float(x.min())) / 127  # > 0: the rows have unit norm
        quantized = torch.empty(x.shape, dtype=torch.int8)
        for s in range(0, len(x), _BLOCK):
            quantized[s:s + _BLOCK] = torch.round(rows[s:s + _BLOCK] / scale)
        return quantized, scale * scale
    fmt = _SCAN_FORMAT[device.type]
    if device.type == "cpu" and fmt == torch.float32:
        return rows, 1.0  # the features themselves, no copy
    out = torch.empty(x.shape, dtype=fmt if device.type == "cuda" else torch.float32, device=device)
    for s in range(0, len(x), _BLOCK):  # rounded block by block: no full-size float32 copy on the device
        out[s:s + _BLOCK] = rows[s:s + _BLOCK].to(device).to(fmt)
    return out, 1.0


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a b^T into the front of the flat buffer ``out``: exact int32 sums of int8 products (oneDNN's VNNI
    kernels), float16 products summed into float32 (CUDA), or float32."""
    out = out[:len(a) * len(b)].view(len(a), len(b))
    if a.dtype == torch.int8:
        return torch._int_mm(a, b.T, out=out)
    if a.dtype != out.dtype:
        return torch.mm(a, b.T, out_dtype=out.dtype, out=out)
    return torch.mm(a, b.T, out=out)


def _sum_dtype(feat: torch.Tensor) -> torch.dtype:
    return torch.int32 if feat.dtype == torch.int8 else torch.float32


def _lowest(dtype: torch.dtype) -> int | float:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min


def _ordinal(vals: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) ordered as ``vals`` (int32, or finite float32 through its bit pattern)."""
    if vals.dtype == torch.int32:
        return vals.long() + 2**31
    bits = vals.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1) + 2**31


def _top_per_row(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, start: int, end: int,
                 take: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``take`` largest (row, col, val) triples of each row in [start, end), rows ascending and values
    descending (ties in the order given), and each row's take-th value (the dtype's lowest where a row
    has fewer)."""
    order = torch.sort(rows.long() * 2**32 + (2**32 - 1 - _ordinal(vals)), stable=True).indices  # rows, then -vals
    rows, cols, vals = rows[order], cols[order], vals[order]
    local = rows.long() - start
    counts = torch.bincount(local, minlength=end - start)
    rank = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[local]
    keep = rank < take
    rows, cols, vals, rank, local = rows[keep], cols[keep], vals[keep], rank[keep], local[keep]
    floor = torch.full((end - start,), _lowest(vals.dtype), dtype=vals.dtype, device=vals.device)
    last = rank == take - 1
    floor[local[last]] = vals[last]
    return rows, cols, vals, floor


def _blocked_top(feat: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` largest products of every row with all rows, itself included: (N, take) values,
    descending, and their ids, on the device of ``feat``. ``take`` <= N.

    A symmetric scan over blocks of _BLOCK rows, so half the products of a full scan. The diagonal
    blocks come first: each row's top ``take`` within its own block is a lower bound (its floor) of the
    row's final take-th product. Then each pair of blocks I < J is one product: its entries at or above
    their row's floor become candidates of the rows of I, those at or above their column's floor
    candidates of the rows of J, so nothing is transposed and only entries that can still make a row's
    top are held. A block whose rows hold more than _HOLD ``take`` candidates each is cut to each row's
    top, which also raises their floors; once I has met every J its rows are final. Every (row, column)
    pair is produced once, and memory stays at one product plus a few ``take`` candidates per row."""
    n, device = len(feat), feat.device
    starts = list(range(0, n, _BLOCK))
    ends = starts[1:] + [n]
    dtype = _sum_dtype(feat)
    floor = torch.full((n,), _lowest(dtype), dtype=dtype, device=device)
    held: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in starts]
    # one product and one mask, reused: fresh 16-64 MB arrays per block pair fragment the heap
    side = min(n, _BLOCK)
    product = torch.empty(side * side, dtype=dtype, device=device)
    mask = torch.empty(side * side, dtype=torch.bool, device=device)

    def cut(b: int) -> None:
        r, c, v = (torch.cat(part) for part in zip(*held[b]))
        r, c, v, floor[starts[b]:ends[b]] = _top_per_row(r, c, v, starts[b], ends[b], take)
        held[b] = [(r, c, v)]

    for b, (i0, i1) in enumerate(zip(starts, ends)):
        v, c = torch.topk(_product(feat[i0:i1], feat[i0:i1], product), min(take, i1 - i0), dim=1)
        rows = torch.arange(i0, i1, dtype=torch.int32, device=device).repeat_interleave(v.shape[1])
        held[b].append((rows, (c + i0).int().ravel(), v.ravel()))
        if v.shape[1] == take:
            floor[i0:i1] = v[:, -1]
    for a, (i0, i1) in enumerate(zip(starts, ends)):
        for b in range(a + 1, len(starts)):
            j0, j1 = starts[b], ends[b]
            s = _product(feat[i0:i1], feat[j0:j1], product)
            above = mask[:s.numel()].view(s.shape)
            r, c = torch.nonzero(torch.ge(s, floor[i0:i1, None], out=above), as_tuple=True)  # candidates of I's rows
            held[a].append(((r + i0).int(), (c + j0).int(), s[r, c]))
            r, c = torch.nonzero(torch.ge(s, floor[None, j0:j1], out=above), as_tuple=True)  # and of J's
            held[b].append(((c + j0).int(), (r + i0).int(), s[r, c]))
            for blk in (a, b):
                if sum(len(part[0]) for part in held[blk]) > _HOLD * (ends[blk] - starts[blk]) * take:
                    cut(blk)
        cut(a)
    return (torch.cat([h[0][2] for h in held]).view(n, take),
            torch.cat([h[0][1] for h in held]).long().view(n, take))


def _rows_top(feat: torch.Tensor, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force for some rows with the blocked scan's products (float ``feat``): their ``width``
    largest similarities (descending, float32) and ids."""
    n = len(feat)
    sims, ids = np.empty((len(rows), width), np.float32), np.empty((len(rows), width), np.int64)
    step = max(1, _FULL_ROW_CHUNK // n)
    buffer = torch.empty(min(step, len(rows)) * n, dtype=_sum_dtype(feat), device=feat.device)
    with _full_precision():
        for s in range(0, len(rows), step):
            part = torch.from_numpy(rows[s:s + step]).to(feat.device)
            v, c = torch.topk(_product(feat[part], feat, buffer), width, dim=1)
            sims[s:s + step], ids[s:s + step] = v.cpu().numpy(), c.cpu().numpy()
    return sims, ids


def _sample_top(feat: torch.Tensor, rows: np.ndarray, width: int) -> np.ndarray:
    """Brute force for a sample of rows (the recall's truth): the ids of their ``width`` largest products
    (float ``feat``) with all rows. One pass over the features, _RECALL_COLUMNS rows at a time against the
    whole sample, so that at 1M rows it is a few GEMMs rather than one pass per handful of rows."""
    queries = feat[torch.from_numpy(rows).to(feat.device)]
    best_v = torch.empty(len(rows), 0, dtype=torch.float32, device=feat.device)
    best_i = torch.empty(len(rows), 0, dtype=torch.int64, device=feat.device)
    buffer = torch.empty(len(rows) * min(len(feat), _RECALL_COLUMNS), dtype=torch.float32, device=feat.device)
    with _full_precision():
        for c0 in range(0, len(feat), _RECALL_COLUMNS):
            block = _product(queries, feat[c0:c0 + _RECALL_COLUMNS], buffer)
            v, c = torch.topk(block, min(width, block.shape[1]), dim=1)
            best_v, at = torch.topk(torch.cat([best_v, v], 1), min(width, best_v.shape[1] + v.shape[1]), dim=1)
            best_i = torch.gather(torch.cat([best_i, c + c0], 1), 1, at)
    return best_i.cpu().numpy()


def knn_table(x: np.ndarray, k: int, index: str, stats: dict[str, float], nprobe: int = IVF_NPROBE,
              device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """``knn_search`` of features that passed ``check_features`` (and k ``check_k``, the search
    arguments ``check_search``), recording its timings and counts in ``stats``."""
    n, dim = x.shape
    dev = _resolve(device)
    if index == "auto":  # the certified scan where it is cheap; on CPU the one search that keeps the neighbours
        index = "exact" if dev.type == "cuda" else "int8"
    start = time.perf_counter()
    take = min(n, k + _MARGIN)
    err = _product_error(_SCAN_FORMAT[dev.type], dim)
    if index == "hnsw":
        hnsw = _hnsw_index(x)
        stats.update(hnsw_m=float(_HNSW_M), hnsw_ef_construction=float(_HNSW_EF_CONSTRUCTION),
                     hnsw_ef_search=float(_HNSW_EF_SEARCH))

        def search(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            return hnsw.search(x[rows], width)
    else:
        if index == "ivf":
            cand_s, cand_i = _ivf_candidates(x, take, nprobe, stats)
        else:
            feat, unit = _scan_operand(x, index, dev)
            with _full_precision():
                top_s, top_i = _blocked_top(feat, take)
            cand_s, cand_i = top_s.cpu().numpy().astype(np.float32) * np.float32(unit), top_i.cpu().numpy()
            del top_s, top_i

        def search(rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            # only the exact search asks for another width: its float operand
            return (cand_s[rows], cand_i[rows]) if width == take else _rows_top(feat, rows, width)
    stats["knn_index_s"] = time.perf_counter() - start
    sims, ids = np.empty((n, k)), np.empty((n, k), np.int64)
    retry = []
    for q0 in range(0, n, _QUERY_CHUNK):
        rows = np.arange(q0, min(n, q0 + _QUERY_CHUNK))
        s32, cand = search(rows, take)
        s64, cand = _rank(x, rows, cand)
        sims[rows], ids[rows] = s64[:, :k], cand[:, :k]
        if index == "exact":
            certain = (cand.shape[1] == n) | (s64[:, k - 1] > s32.min(axis=1) + err)
        else:  # approximate: only rows the index could not fill are redone
            certain = np.isfinite(s64[:, k - 1])
        retry.append(rows[~certain])
    retry = np.concatenate(retry)
    stats["knn_rows_widened"] = float(len(retry))
    if retry.size and index == "exact" and take < n:
        s32, cand = search(retry, min(n, k + _WIDE_MARGIN))
        s64, cand = _rank(x, retry, cand)
        certain = (cand.shape[1] == n) | (s64[:, k - 1] > s32.min(axis=1) + err)
        sims[retry[certain]], ids[retry[certain]] = s64[certain, :k], cand[certain, :k]
        retry = retry[~certain]
    stats["knn_rows_full"] = float(len(retry))
    if retry.size:
        sims[retry], ids[retry] = _full_rows(x, retry, k)
    if index != "exact":
        sample = np.random.default_rng(1).choice(n, min(n, _RECALL_QUERIES), replace=False)
        truth = _rank(x, sample, _sample_top(_scan_operand(x, "exact", dev)[0], sample, take))[1][:, :k]
        stats["knn_recall"] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids[sample], truth)]) / k)
        stats["knn_recall_queries"] = float(len(sample))
    stats["knn_s"] = time.perf_counter() - start
    return sims, ids


def knn_search(features: np.ndarray, k: int, index: str = "exact", nprobe: int = IVF_NPROBE,
               device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every row among all rows, self included: (N, k) float64 cosine
    similarities, descending, and (N, k) int64 ids, ties by index. ``index="exact"`` is certified exact
    (module docstring); ``"int8"`` (the same blocked scan on int8 features), ``"ivf"`` (IVF-Flat:
    sqrt(nprobe N) k-means lists, each point probing ``nprobe``) and ``"hnsw"`` (M 32, efSearch 128) are
    approximate; their k + 8 candidates are re-ranked the same way. ``"auto"`` is ``"exact"`` when the
    scan runs on CUDA and ``"int8"`` on CPU (module docstring, "Approximate indices"). ``device``: where the blocked scan's
    products run, ``"auto"`` = CUDA when available."""
    check_search(index, nprobe, device)  # the arguments first: checking the features reads them all
    x = check_features(features)
    check_k(k, len(x), "k")
    return knn_table(x, k, index, {}, nprobe, device)
