"""SpCL's hybrid memory and unified contrastive loss, at LUPerson scale (millions of slots) on one device.

Ge et al., "Self-paced Contrastive Learning with Hybrid Memory for Domain Adaptive Object Re-ID",
NeurIPS 2020. §3.1 "unified contrastive learning", eq. (1)-(2): for an encoded, L2-normalised feature f
whose memory slot belongs to class y,

    S_c  = <f, mu_c> / tau,   mu_c = (1 / n_c) * sum_{j in c} v_j      (un-normalised mean of unit vectors;
                                                                      equal to the mean of member logits)
    p(c|f) = exp(S_c) / (sum_{c'} exp(S_c') + 1e-6)
    loss   = mean_b  -log(p(y_b | f_b) + 1e-6)

over all classes c: the clusters, and every un-clustered slot as its own (singleton) class. §3.1 memory
update, eq. (3)-(4): in backward, for every sample of the batch in order, v_i <- m v_i + (1 - m) f,
v_i <- v_i / ||v_i||, m = 0.2 (80 % new feature). The gradient flows to f only (memory constant).
Reference code: yxgeee/SpCL ``spcl/models/hm.py`` (``HM`` autograd Function + ``HybridMemory``) and
OpenUnReID ``openunreid/models/losses/memory.py`` (the DDP version).

How it is computed (and why it scales to 2.5M slots x 512-d on a CPU)
---------------------------------------------------------------------
The reference forms the B x N similarity to every slot, index_adds it into a C x B per-class table,
exponentiates and normalises; its backward multiplies the B x N gradient by the N x d memory. Here:

* Clusters (classes with >= 2 member slots) keep an fp32 ``sum`` of their member vectors (K x d) and a
  count. They are recomputed exactly by :meth:`initialize`, :meth:`set_labels` and :meth:`rebuild`; the
  momentum update adds ``new - old`` (the stored, i.e. rounded, values) of each touched slot to its
  cluster's sum: O(B d) per step. A cluster logit is ``(f . sum) / (n tau)``. The sums are saved in
  ``state_dict`` (``cluster_sums``) and restored as they were, not recomputed: a recompute differs
  from the incremental sums in the last bits, so a run resumed from a checkpoint taken between two
  clusterings would otherwise not continue bit for bit.
* Singleton classes have ``mu = v`` itself: their logits are taken straight from the slot vectors
  (gathered in chunks through a reused buffer), so no C x d centroid copy of the bank is held.
* Classes are scanned in chunks of ``chunk_size``, exponentials taken relative to the target logit
  S_y (known before the pass; see ``_scan``; a running max per row when tau is too small for that).
  The same pass accumulates sum_c q_c mu_c for the gradient, so forward does exactly two
  (B x chunk x d) matmuls per chunk, and the gradient is returned analytically by backward:

      dL_b/df_b = (w_b / tau) (sum_c q_bc mu_c - mu_{y_b}) / B_valid,
      q_bc = exp(S_bc) / (sum exp(S_b.) + 1e-6),  w_b = p_b / (p_b + 1e-6),

  which is the exact derivative of the formula above including both epsilons.
  Peak extra memory per forward: chunk x d fp32 (+ the same in storage dtype) + B x chunk fp32;
  ``chunk_size=None`` picks 4096 classes on a CPU, 65536 on an accelerator.

Deviations from the reference code (all deliberate)
---------------------------------------------------
1. Math: incremental fp32 cluster sums instead of a per-step index_add over all N slots (identical in
   exact arithmetic; the incremental sums drift from a recompute by rounding only, ~1e-7 relative per
   update; tests bound it after many steps, and every :meth:`set_labels` recomputes them exactly).
2. The exponentials are taken after subtracting the target logit (or a running max for tau < ~0.03);
   the reference exponentiates the raw logits, the same number for |S| <= 1/tau = 20 but an overflow
   for small tau. The two epsilons are kept exactly: ``sum exp(S) + 1e-6`` (carried in log space) and
   ``log(p + 1e-6)``.
3. Labels < 0 (images dropped from training, e.g. undecodable or DBSCAN noise dropped on purpose)
   belong to no class and never enter any denominator. A batch sample whose slot has a label < 0 is
   ignored by the loss, like ``ignore_index``: the loss is the mean over the local samples with a
   label >= 0, and 0 (still attached to the graph, so backward and the update run) if there is none.
   Its slot is still momentum-updated. (The reference has no negative labels: its index_add would fail.)
4. ``labels`` default to ``arange(num_samples)`` (every slot its own class: instance discrimination)
   instead of zeros, so the memory is usable before the first clustering. ``features`` start at zero as
   in the reference; call :meth:`initialize`.
5. Storage dtype: ``float32`` (reference), ``float16`` or ``bfloat16``; the math is always fp32. With a
   16-bit store every sequential update step is rounded to it, exactly what the reference would do
   with a half buffer; cluster sums track the rounded stored values.
6. The sequential update is vectorised in "rounds": round r applies the r-th occurrence of every index
   in batch order. Updates of different slots commute, so this equals the per-sample loop for repeated
   indices. Norms use ``vector_norm`` clamped at 1e-12 (reference: plain division), so rounding may
   differ from the loop in the last bit.
7. The update is applied at most once per forward, even if backward runs twice (``retain_graph``).
8. ``feats`` must be L2-normalised (checked: every row norm within 1e-2 of 1, else ValueError; the
   reference does not check). They are cast to fp32 and autocast is disabled inside.
9. A forward without autograd (``torch.no_grad()`` or ``feats`` not requiring grad) returns the loss
   only: no gather, no gradient work and, as in the reference (no backward), no update.

Distributed (torch.distributed initialised, world size > 1), as OpenUnReID
--------------------------------------------------------------------------
Every rank holds a full replica. Forward ``all_gather``s (no gradient) the fp32 features and indices of
every rank in rank order (= global batch order). Local batches may differ in size: sizes are gathered
first and the tensors padded to the largest. Backward applies the same ordered update for the whole
global batch on every rank, with no collective in backward, so the ``features`` replicas stay
bit-identical. (The derived cluster sums are accumulated with ``index_put_(accumulate=True)``, serial on
CPU; were they ever to differ in the last bits between ranks, that could not reach ``features``, which
depend only on the gathered batch and themselves.) The loss and gradient use the local batch only
(mean over the local batch); DDP averages gradients over ranks, which equals the global-batch mean when the local sizes are equal (otherwise scale the local loss by
``world_size * B_local / B_global``). Every rank must run forward and backward on every step (the
forward has collectives; a skipped backward leaves that rank's replica behind). Keep the memory
OUTSIDE the DDP-wrapped model (or use ``broadcast_buffers=False``): DDP would otherwise broadcast the
multi-GB bank from rank 0 on every forward; do not pass it to ``accelerator.prepare``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-6  # the reference's two epsilons: softmax denominator and log
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORM_TOLERANCE = 1e-2
_INIT_CHUNK = 1 << 16  # rows per step of initialize / recompute
# classes per step of the forward scan when chunk_size is None: on a CPU a chunk of the bank should stay
# in cache between its two matmuls (4096 x 512 fp32 = 8 MB: the fastest of 1k-128k on a 32 MB-L3 EPYC);
# on an accelerator, fewer and larger kernels
CPU_CHUNK, DEVICE_CHUNK = 4096, 65536


def estimate_memory_bytes(num_samples: int, dim: int, dtype: torch.dtype = torch.float32,
                          num_clusters: int = 0, num_singletons: int | None = None) -> int:
    """Bytes a :class:`HybridMemory` holds (features, labels and the derived index), for planning."""
    singletons = num_samples if num_singletons is None else num_singletons
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (num_samples * dim * itemsize + num_samples * 8 * 2  # features, labels, slot -> cluster
            + num_clusters * (dim + 1) * 4 + singletons * 8)   # cluster sums + counts, singleton list


class _HybridMemoryLoss(torch.autograd.Function):
    """Loss in forward (with its gradient computed on the way), momentum update in backward."""

    @staticmethod
    def forward(ctx, feats: Tensor, indices: Tensor, memory: HybridMemory) -> Tensor:  # noqa: D401
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad, all_feats, all_indices = memory._loss_and_grad(feats, indices, need_grad)
        ctx.memory, ctx.done = memory, False
        ctx.save_for_backward(grad if need_grad else None, all_feats, all_indices)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad, all_feats, all_indices = ctx.saved_tensors
        if not ctx.done:
            ctx.memory._momentum_update(all_feats, all_indices)
            ctx.done = True
        return (None if grad is None else grad * grad_loss.to(grad.dtype)), None, None


class HybridMemory(nn.Module):
    """SpCL's hybrid memory with the unified contrastive loss (see the module docstring).

    Buffers (saved in ``state_dict``): ``features`` (num_samples, dim) in ``dtype``, ``labels``
    (num_samples,) int64, and ``cluster_sums`` (clusters, dim) fp32, the incrementally kept sums. Derived
    from the labels, not saved, rebuilt on load: cluster counts, the slot -> cluster map and the list of
    singleton slots. A state without ``cluster_sums``, or whose features have another dtype than this
    store (they are rounded on load), gets its sums recomputed.
    """

    def __init__(self, num_samples: int, dim: int, temperature: float = 0.05, momentum: float = 0.2,
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        super().__init__()
        if num_samples <= 0 or dim <= 0:
            raise ValueError(f"num_samples and dim must be positive, got {num_samples} and {dim}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        if not temperature > 0 or not 0 <= momentum < 1 or (chunk_size is not None and chunk_size <= 0):
            raise ValueError(f"need temperature > 0, 0 <= momentum < 1, chunk_size > 0; got {temperature}, "
                             f"{momentum}, {chunk_size}")
        self.num_samples, self.dim = int(num_samples), int(dim)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.dtype, self.chunk_size = dtype, chunk_size
        self.register_buffer("features", torch.zeros(num_samples, dim, dtype=dtype))
        self.register_buffer("labels", torch.arange(num_samples, dtype=torch.long))
        # derived from (features, labels); never saved
        self.register_buffer("_slot_cluster", torch.full((num_samples,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("_singletons", torch.arange(num_samples, dtype=torch.long), persistent=False)
        self.register_buffer("_cluster_sums", torch.zeros(0, dim), persistent=False)
        self.register_buffer("_cluster_counts", torch.zeros(0), persistent=False)

    # -- public API ------------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        """Classes with at least two member slots."""
        return self._cluster_sums.shape[0]

    @property
    def num_classes(self) -> int:
        """Clusters + singleton classes (slots with label < 0 are in no class)."""
        return self.num_clusters + self._singletons.numel()

    @torch.no_grad()
    def initialize(self, features: Tensor, indices: Tensor | None = None) -> None:
        """Write L2-normalised ``features`` into slots ``indices`` (default: all slots, in order)."""
        if features.dim() != 2 or features.shape[1] != self.dim or not features.is_floating_point():
            raise ValueError(f"initialize: features must be a float (n, {self.dim}) tensor, got "
                             f"{features.dtype} {tuple(features.shape)}")
        dev = self.features.device
        if indices is None:
            if features.shape[0] != self.num_samples:
                raise ValueError(f"initialize: {features.shape[0]} rows for {self.num_samples} slots "
                                 "(pass indices to fill a subset)")
            for a in range(0, self.num_samples, _INIT_CHUNK):
                rows = features[a:a + _INIT_CHUNK].to(dev, torch.float32)
                self.features[a:a + len(rows)] = F.normalize(rows, dim=1).to(self.dtype)
            self._recompute_sums()
            return
        indices = self._check_indices(indices, "initialize")
        if indices.shape[0] != features.shape[0]:
            raise ValueError(f"initialize: {features.shape[0]} feature rows but {indices.shape[0]} indices")
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError("initialize: indices contain duplicates")
        for a in range(0, indices.numel(), _INIT_CHUNK):
            self.write_stored(self.to_storage(features[a:a + _INIT_CHUNK]), indices[a:a + _INIT_CHUNK])

    def to_storage(self, features: Tensor) -> Tensor:
        """Rows as :meth:`initialize` stores them: L2-normalised in fp32, cast to the storage dtype. What a
        rank sends of its share of an extraction (fp16 chunks for a float16 memory)."""
        return F.normalize(features.to(self.features.device, torch.float32), dim=1).to(self.dtype)

    @torch.no_grad()
    def write_stored(self, rows: Tensor, indices: Tensor) -> None:
        """Write ``rows`` already in storage form (:meth:`to_storage`) into distinct slots ``indices``, bit
        for bit, and move the cluster sums with them: every rank writing the same rows stays identical."""
        if rows.dim() != 2 or rows.shape[1] != self.dim or rows.dtype != self.dtype:
            raise ValueError(f"write_stored: rows must be ({len(indices)}, {self.dim}) {self.dtype}, got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        indices = self._check_indices(indices, "write_stored")
        if indices.shape[0] != rows.shape[0]:
            raise ValueError(f"write_stored: {rows.shape[0]} rows but {indices.shape[0]} indices")
        old = self.features.index_select(0, indices).float()
        self.features.index_copy_(0, indices, rows.to(self.features.device))
        self._add_to_sums(indices, old)

    @torch.no_grad()
    def set_labels(self, labels: Tensor) -> None:
        """New pseudo labels, one per slot: >= 0 form classes, < 0 belong to none. Rebuilds the sums."""
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != self.num_samples:
            raise ValueError(f"set_labels: need {self.num_samples} labels (one per slot), got shape "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"set_labels: labels must be integers, got {labels.dtype}")
        self.labels.copy_(labels.to(self.labels.device, torch.long))
        self.rebuild()

    @torch.no_grad()
    def rebuild(self) -> None:
        """Recompute the derived class index and cluster sums exactly from ``features`` and ``labels``."""
        labels = self.labels
        dev = labels.device
        valid = labels >= 0
        classes, inverse, counts = torch.unique(labels[valid], return_inverse=True, return_counts=True)
        is_cluster = counts >= 2
        cluster_row = torch.full((classes.numel(),), -1, dtype=torch.long, device=dev)
        cluster_row[is_cluster] = torch.arange(int(is_cluster.sum()), device=dev)
        slot_cluster = torch.full((self.num_samples,), -1, dtype=torch.long, device=dev)
        slot_cluster[valid] = cluster_row[inverse]
        self._slot_cluster = slot_cluster
        self._singletons = torch.nonzero(valid & (slot_cluster < 0)).squeeze(1)
        self._cluster_counts = counts[is_cluster].to(torch.float32)
        self._recompute_sums()

    def forward(self, feats: Tensor, indices: Tensor) -> Tensor:
        """Unified contrastive loss of the local batch (``feats`` (B, dim) L2-normalised, slot ``indices``).

        Under torch.distributed every rank must call this (it all_gathers); the momentum update of the
        whole global batch happens when backward runs. Without autograd (no_grad, or ``feats`` not
        requiring grad) it only computes the loss: no gather, no gradient work, no update.
        """
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must be (B, {self.dim}), got {tuple(feats.shape)}")
        if feats.device != self.features.device:
            raise ValueError(f"feats on {feats.device} but the memory on {self.features.device}")
        indices = self._check_indices(indices, "forward")
        if indices.shape[0] != feats.shape[0]:
            raise ValueError(f"{feats.shape[0]} features but {indices.shape[0]} indices")
        if feats.shape[0]:
            norms = torch.linalg.vector_norm(feats.detach().float(), dim=1)
            worst = float((norms - 1).abs().max())
            if not worst <= _NORM_TOLERANCE:
                raise ValueError(f"feats must be L2-normalised (a row norm is off by {worst:.3g}); "
                                 "apply F.normalize(feats, dim=1)")
        if not (torch.is_grad_enabled() and feats.requires_grad):
            return self._loss_and_grad(feats.float(), indices, need_grad=False, gather=False)[0]
        return _HybridMemoryLoss.apply(feats.float(), indices, self)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, for logging: features, labels, derived (sums, counts, index) and total."""
        derived = sum(t.numel() * t.element_size()
                      for t in (self._slot_cluster, self._singletons, self._cluster_sums, self._cluster_counts))
        out = {"features": self.features.numel() * self.features.element_size(),
               "labels": self.labels.numel() * self.labels.element_size(), "derived": derived}
        out["total"] = sum(out.values())
        return out

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, dim={self.dim}, temperature={self.temperature}, "
                f"momentum={self.momentum}, dtype={self.dtype}, clusters={self.num_clusters}, "
                f"classes={self.num_classes}")

    # -- state -----------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "cluster_sums"] = self._cluster_sums if keep_vars else self._cluster_sums.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        sums = state_dict.pop(prefix + "cluster_sums", None)
        features = state_dict.get(prefix + "features")
        before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) != before:
            return
        self.rebuild()
        if sums is None or not isinstance(features, Tensor) or features.dtype != self.dtype:
            return
        if tuple(sums.shape) != tuple(self._cluster_sums.shape):
            error_msgs.append(f"size mismatch for {prefix}cluster_sums: the labels give "
                              f"{tuple(self._cluster_sums.shape)}, the state has {tuple(sums.shape)}")
            return
        self._cluster_sums = sums.to(self._cluster_sums.device, torch.float32).clone()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .half()/.float() on a parent would also cast the derived fp32 sums: keep them fp32 and exact
        self.dtype = self.features.dtype
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"HybridMemory storage must be one of {STORAGE_DTYPES}, got {self.dtype}")
        if self._cluster_sums.dtype != torch.float32 or self._cluster_counts.dtype != torch.float32:
            self._cluster_counts = self._cluster_counts.float()
            self._recompute_sums()
        return self

    # -- internals -------------------------------------------------------------------------------
    def _check_indices(self, indices: Tensor, where: str) -> Tensor:
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"{where}: indices must be a 1-D integer tensor, got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        indices = indices.to(self.features.device, torch.long)
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.num_samples:
                raise IndexError(f"{where}: slot index {lo if lo < 0 else hi} out of range "
                                 f"[0, {self.num_samples})")
        return indices

    @torch.no_grad()
    def _recompute_sums(self) -> None:
        sums = torch.zeros(self._cluster_counts.numel(), self.dim, device=self.features.device)
        if sums.shape[0]:
            for a in range(0, self.num_samples, _INIT_CHUNK):
                cl = self._slot_cluster[a:a + _INIT_CHUNK]
                rows = torch.nonzero(cl >= 0).squeeze(1)
                if rows.numel():
                    sums.index_put_((cl[rows],), self.features[a:a + _INIT_CHUNK].index_select(0, rows).float(),
                                    accumulate=True)
        self._cluster_sums = sums

    @torch.no_grad()
    def _add_to_sums(self, slots: Tensor, old: Tensor) -> None:
        """Cluster sums += (stored now - ``old``) for unique ``slots`` (``old``: their fp32 values before)."""
        cl = self._slot_cluster[slots]
        rows = torch.nonzero(cl >= 0).squeeze(1)
        if rows.numel():
            new = self.features.index_select(0, slots[rows]).float()
            self._cluster_sums.index_put_((cl[rows],), new - old[rows], accumulate=True)

    def _gather(self, feats: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch (every rank's features and indices, in rank order); local under one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return feats, indices
        world = dist.get_world_size()
        size = torch.tensor([feats.shape[0]], dtype=torch.long, device=feats.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        most = max(sizes)
        pad_f = feats.new_zeros(most, self.dim)
        pad_f[:feats.shape[0]] = feats
        pad_i = indices.new_zeros(most)
        pad_i[:indices.shape[0]] = indices
        all_f = [torch.empty_like(pad_f) for _ in range(world)]
        all_i = [torch.empty_like(pad_i) for _ in range(world)]
        dist.all_gather(all_f, pad_f)
        dist.all_gather(all_i, pad_i)
        return (torch.cat([t[:n] for t, n in zip(all_f, sizes)]), torch.cat([t[:n] for t, n in zip(all_i, sizes)]))

    @torch.no_grad()
    def _loss_and_grad(self, feats: Tensor, indices: Tensor, need_grad: bool,
                       gather: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Local loss, its gradient w.r.t. ``feats``, and the global batch for the update."""
        with torch.autocast(feats.device.type, enabled=False):
            f = feats.detach().float()
            all_f, all_i = self._gather(f, indices) if gather else (f, indices)
            grad = torch.zeros_like(f)
            valid = torch.nonzero(self.labels[indices] >= 0).squeeze(1)
            n_valid = valid.numel()
            if n_valid == 0:
                return f.new_zeros(()), grad, all_f, all_i
            fv, iv = f.index_select(0, valid), indices.index_select(0, valid)
            inv_tau = 1.0 / self.temperature
            mu = self._class_means(iv)
            s_y = (fv * mu).sum(1) * inv_tau
            m, z, acc = self._scan(fv, s_y, need_grad)
            log_den = torch.logaddexp(m.double() + z.log(), torch.full_like(z, math.log(EPS)))
            p = torch.exp(s_y.double() - log_den)
            loss = (-torch.log(p + EPS)).sum() / n_valid
            if need_grad:
                w = (p / (p + EPS)) * (inv_tau / n_valid)
                q_mu = acc * torch.exp(m.double() - log_den).float()[:, None]  # sum_c q_c mu_c
                grad.index_copy_(0, valid, (q_mu - mu) * w.float()[:, None])
            return loss.float(), grad, all_f, all_i

    def _class_means(self, slots: Tensor) -> Tensor:
        """mu of each slot's class (cluster mean, or the slot's own vector for a singleton), fp32."""
        mu = self.features.index_select(0, slots).float()
        cl = self._slot_cluster[slots]
        rows = torch.nonzero(cl >= 0).squeeze(1)
        if rows.numel():
            k = cl[rows]
            mu[rows] = self._cluster_sums.index_select(0, k) / self._cluster_counts.index_select(0, k)[:, None]
        return mu

    def _scan(self, f: Tensor, s_y: Tensor, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """One pass over all classes (clusters, then singletons), ``chunk_size`` at a time.

        Returns a per-row shift ``m``, z = sum_c exp(S_c - m) (float64) and, for the gradient,
        acc = sum_c exp(S_c - m) mu_c. Normally m = S_y, the target logit, fixed before the pass: every
        S_c - S_y lies in [-2/tau, 2/tau] (unit f, ||mu|| <= 1), so with 2/tau + log C well inside the
        float32 exponent range nothing overflows, the target's own term keeps z >= 1, and the subtraction
        rides in the matmul (addmm). Otherwise (tau below ~0.03) a running max per row, rescaling as it goes.
        """
        b, dev = f.shape[0], f.device
        inv_tau = 1.0 / self.temperature
        f_tau = f * inv_tau
        k, singles = self.num_clusters, self._singletons
        fixed = 2.05 * inv_tau + math.log(max(self.num_classes, 1)) < 80.0
        m = s_y.clone() if fixed else torch.full((b,), -math.inf, device=dev)
        neg_m = (-m)[:, None]
        z = torch.zeros(b, dtype=torch.float64, device=dev)
        acc = torch.zeros(b, self.dim, device=dev) if need_grad else None
        chunk = min(self.chunk_size or (CPU_CHUNK if dev.type == "cpu" else DEVICE_CHUNK), max(k, singles.numel(), 1))
        s_buf = torch.empty(b * chunk, device=dev)

        def absorb(s: Tensor, w: Tensor, col_scale: Tensor | None, shifted: bool) -> None:
            """s: (b, n) logits (minus m when ``shifted``) of the classes with (scaled) vectors w."""
            nonlocal m
            if not shifted:  # running max: rescale what was accumulated so far
                m_new = torch.maximum(m, s.amax(dim=1))
                alpha = torch.exp(m - m_new)
                s.sub_(m_new[:, None])
                z.mul_(alpha.double())
                if acc is not None:
                    acc.mul_(alpha[:, None])
                m = m_new
            s.exp_()
            z.add_(s.sum(dim=1).double())  # float32 within a chunk (cascade sum), float64 across chunks
            if acc is not None:
                if col_scale is not None:
                    s.mul_(col_scale)
                acc.addmm_(s, w)

        if k:
            inv_n = self._cluster_counts.reciprocal()
            for a in range(0, k, chunk):
                w = self._cluster_sums[a:a + chunk]
                n = w.shape[0]
                s = torch.mm(f_tau, w.t(), out=s_buf[:b * n].view(b, n)).mul_(inv_n[a:a + n])
                if fixed:
                    s.add_(neg_m)
                absorb(s, w, inv_n[a:a + n], fixed)
        if singles.numel():
            w_buf = torch.empty(chunk, self.dim, device=dev)
            h_buf = None if self.dtype == torch.float32 else torch.empty(chunk, self.dim, dtype=self.dtype, device=dev)
            for a in range(0, singles.numel(), chunk):
                idx = singles[a:a + chunk]
                n = idx.numel()
                if h_buf is None:
                    w = torch.index_select(self.features, 0, idx, out=w_buf[:n])
                else:
                    w = w_buf[:n].copy_(torch.index_select(self.features, 0, idx, out=h_buf[:n]))
                out = s_buf[:b * n].view(b, n)
                s = torch.addmm(neg_m, f_tau, w.t(), out=out) if fixed else torch.mm(f_tau, w.t(), out=out)
                absorb(s, w, None, fixed)
        return m, z, acc

    @torch.no_grad()
    def _momentum_update(self, feats: Tensor, indices: Tensor) -> None:
        """v <- m v + (1 - m) f, v <- v / ||v||, sequentially in batch order (vectorised by rounds)."""
        if indices.numel() == 0:
            return
        feats = feats.float()
        touched = torch.unique(indices)
        old = self.features.index_select(0, touched).float()
        for rows in _occurrence_rounds(indices, touched.numel()):
            idx = indices if rows is None else indices.index_select(0, rows)
            x = feats if rows is None else feats.index_select(0, rows)
            v = self.features.index_select(0, idx).float()
            v.mul_(self.momentum).add_(x, alpha=1.0 - self.momentum)
            v.div_(torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min_(1e-12))
            self.features.index_copy_(0, idx, v.to(self.dtype))
        self._add_to_sums(touched, old)


def _occurrence_rounds(indices: Tensor, num_unique: int):
    """Batch positions grouped by occurrence number of their index (round r = r-th occurrences, in
    batch order). Yields None once when every index is distinct (all positions, one round)."""
    n = indices.numel()
    if num_unique == n:
        yield None
        return
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    starts = torch.ones(n, dtype=torch.bool, device=indices.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    pos = torch.arange(n, device=indices.device)
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    occurrence = torch.empty_like(pos)
    occurrence[order] = pos - first
    for r in range(int(occurrence.max()) + 1):
        yield torch.nonzero(occurrence == r).squeeze(1)
