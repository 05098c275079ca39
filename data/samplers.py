"""Identity batch samplers for metric-learning training (batches of P x K images).

All three are batch samplers (``DataLoader(dataset, batch_sampler=sampler)``) over a map-style
dataset addressed by sample index; they only need the label arrays. Indices whose pid is negative
(outliers / un-clustered samples of pseudo labels) are never sampled.
``EpochBatches`` makes epochs of a fixed number of batches of one of them, passes following passes.

Semantics follow:

* ``PKSampler``: torchreid's ``RandomIdentitySampler`` (deep-person-reid, ``torchreid/data/sampler.py``):
  per epoch every identity's shuffled images are cut into groups of K, then batches are formed by
  repeatedly taking one group from each of P distinct identities drawn at random among those that
  still have groups, until fewer than P such identities remain.
* ``MultipleGallerySampler``: SpCL's ``RandomMultipleGallerySampler`` (yxgeee/SpCL
  ``spcl/utils/data/sampler.py``, used by ``examples/spcl_train_usl.py``): per pass every identity once,
  in random order, as a random anchor image followed by K-1 more images of that identity, drawn among
  its images from other cameras than the anchor's if it has any, else among its other images; an
  identity with a single image contributes that image alone. The flat index list of the pass is cut
  into batches of P*K consecutive indices, the last incomplete one dropped (SpCL: a DataLoader with
  ``batch_size`` 64 and ``drop_last``), so a batch holds P*K images of a varying number of identities.
* ``CameraAwarePKSampler``: a P x K variant of that sampler: one group of exactly K images per
  identity per epoch, a random anchor plus K-1 images preferably taken from other cameras.

Deviations from the sources:

* Randomness comes from a private ``numpy.random.Generator`` seeded with ``(seed, epoch)`` instead of
  the global ``random`` / ``numpy`` / ``torch`` state, so an epoch is reproducible on its own.
* The samplers yield whole batches and shard them across ranks (rank r takes global batches
  r, r + world_size, ...); the sources yield a flat single-process index stream.
* ``__len__`` is the exact number of batches of the current epoch, not an estimate.
* In the P x K samplers an identity with fewer than K images contributes each of its images once and
  draws only the missing slots with replacement (torchreid draws all K with replacement, which may
  skip images).
* ``MultipleGallerySampler`` draws the K-1 images without replacement whenever there are at least
  K-1 candidates; SpCL draws with replacement unless there are at least K, so an identity with exactly
  K-1 other-camera images repeats some of them there and never here. A camid of -1 (unknown) compares
  as one more camera value, so a pool without camera ids (LUPerson: a video is a scene, not a camera,
  and the shards store no camid) takes the K-1 images among the identity's other images.
* ``CameraAwarePKSampler`` groups first take one image per camera other than the anchor's, so an
  identity seen by at least K cameras always yields K distinct cameras; then further images of other
  cameras, then images of the anchor's camera, and repeat images only when the identity has fewer
  than K. SpCL draws the K-1 images among other-camera images only, with replacement whenever there
  are fewer than K of them, and gives an identity with a single image one slot, not K.
* The camera-aware sampler drops the last incomplete batch (SpCL leaves batching to the loader).
* ``replacement=True`` (the P x K samplers; used for pseudo labels, whose class count is not known in
  advance): an epoch with fewer than P identities still yields batches of P x K images, each batch
  drawing its P identities uniformly with replacement (an identity drawn twice gives its next group of
  K, cycling through its groups), ``max(groups // P, 1)`` batches; with at least P identities nothing
  changes. The sources stop with fewer than P identities. ``MultipleGallerySampler`` never needs P
  distinct identities (its batches are cut from whole passes) and only needs one.
* ``keyed()`` yields each batch with its key ``(epoch, global batch number)``, which
  ``data/draws.py`` turns into per-sample augmentation seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def _as_labels(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    """One int64 label per dataset index; rejects non-integer or non-1-D input."""
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(-1)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integers, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _within_identity_offsets(offsets: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep offsets inside their identity's block; redraw the others uniformly from that identity.

    ``offsets`` is (groups, K) and ``counts`` (groups, 1) the image count of each group's identity;
    only identities with fewer than K images have offsets past their count.
    """
    redrawn = (rng.random(offsets.shape) * counts).astype(np.int64)
    return np.where(offsets < counts, offsets, redrawn)


def _draw_identity_batches(groups_per_identity: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """torchreid's batch loop: rows of P group ids, each from P distinct identities drawn at random.

    Group ids of identity i are ``nxt[i] .. end[i] - 1``. Identities with groups left occupy
    ``active[:n_active]``; a partial Fisher-Yates shuffle of its first P slots draws a uniform
    P-subset in O(P), and exhausted identities are swap-removed.
    """
    end = np.cumsum(groups_per_identity)
    nxt = (end - groups_per_identity).tolist()
    end = end.tolist()
    active = list(range(len(end)))
    n_active = len(active)
    # Every batch consumes P groups, so this many uniforms always suffice.
    uniforms = rng.random(int(groups_per_identity.sum()) // p * p).tolist()
    u = 0
    out: list[int] = []
    while n_active >= p:
        for j in range(p):
            r = j + int(uniforms[u] * (n_active - j))
            u += 1
            active[j], active[r] = active[r], active[j]
        # Descending order: swap-removing slot j only moves in an identity from a slot already visited
        # or never drawn, so slots 0..j-1 still hold this batch's identities.
        for j in range(p - 1, -1, -1):
            ident = active[j]
            out.append(nxt[ident])
            nxt[ident] += 1
            if nxt[ident] == end[ident]:
                n_active -= 1
                active[j] = active[n_active]
    return np.asarray(out, dtype=np.int64).reshape(-1, p)


def _draw_with_replacement(groups_per_identity: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of P group ids for fewer than P identities: identities drawn uniformly with replacement.

    ``max(groups // P, 1)`` rows; the n-th draw of an identity takes its group ``n mod groups``, so its
    groups are used in turn before any repeats.
    """
    n_batches = max(int(groups_per_identity.sum()) // p, 1)
    ident = (rng.random(n_batches * p) * len(groups_per_identity)).astype(np.int64)
    order = np.argsort(ident, kind="stable")
    ranked = ident[order]
    occurrence = np.empty_like(ident)
    occurrence[order] = np.arange(len(ident)) - np.searchsorted(ranked, ranked)
    first_group = np.cumsum(groups_per_identity) - groups_per_identity
    return (first_group[ident] + occurrence % groups_per_identity[ident]).reshape(n_batches, p)


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of P identities x K images, torchreid ``RandomIdentitySampler`` style.

    Every rank builds the same global batch list for an epoch from ``(seed, epoch)``, truncates it to
    a multiple of ``world_size`` and keeps every ``world_size``-th batch starting at ``rank``, so all
    ranks yield the same number of batches and never share an index within an epoch.

    Epoch and progress: iterating yields the batches of ``epoch`` not yet consumed, and a completed
    iteration moves on to the next epoch (so ``len`` then counts that epoch's batches; PK batch
    counts can differ slightly between epochs). ``set_epoch`` to another epoch restarts progress at
    0, to the current one keeps it, so ``load_state_dict`` followed by the trainer's usual
    ``set_epoch`` resumes mid-epoch. Progress counts batches handed to the DataLoader, which runs
    ahead of the training step when workers prefetch; a trainer checkpointing mid-epoch there should
    store its own step count as ``consumed``.

    ``replacement``: with fewer than P identities, batches draw identities with replacement (module
    docstring) instead of the constructor raising ValueError.
    """

    needs_p_identities = True  # False where a batch is not P distinct identities (MultipleGallerySampler)

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        camids: Sequence[int] | np.ndarray | None = None,
        p: int = 16,
        k: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        replacement: bool = False,
    ) -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"p (identities per batch) must be >= 1, got {p}")
        if k < 1:
            raise ValueError(f"k (images per identity) must be >= 1, got {k}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        pid_arr = _as_labels(pids, "pids")
        cam_arr = None
        if camids is not None:
            cam_arr = _as_labels(camids, "camids")
            if len(cam_arr) != len(pid_arr):
                raise ValueError(f"camids has {len(cam_arr)} entries but pids has {len(pid_arr)}")

        valid = np.flatnonzero(pid_arr >= 0)
        # Dataset indices grouped by identity: identity i owns order[starts[i] : starts[i] + counts[i]].
        self._order = valid[np.argsort(pid_arr[valid], kind="stable")]
        _, self._starts, self._counts = np.unique(pid_arr[self._order], return_index=True, return_counts=True)
        if len(self._counts) < (p if self.needs_p_identities and not replacement else 1):
            need = f"p={p} identities" if self.needs_p_identities and not replacement else "one identity"
            raise ValueError(f"need at least {need} with pid >= 0, got {len(self._counts)}")
        self._identity = np.repeat(np.arange(len(self._counts)), self._counts)
        self._identity_key = self._identity.astype(np.uint64) << np.uint64(32)
        self._camids = cam_arr
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.epoch = 0
        self._consumed = 0
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def num_identities(self) -> int:
        """Identities with pid >= 0."""
        return len(self._counts)

    def _shuffle_within_identities(self, rng: np.random.Generator) -> np.ndarray:
        """Positions into ``self._order`` that permute each identity's block at random, blocks in place."""
        # Identity in the high 32 bits, a random word in the low ones: exact integer keys, no float ties.
        return np.argsort(self._identity_key | rng.integers(0, 1 << 32, size=len(self._order), dtype=np.uint64))

    def _build_batches(self, rng: np.random.Generator) -> np.ndarray:
        """Global batches of one epoch as a (batches, P*K) array of dataset indices."""
        shuffled = self._order[self._shuffle_within_identities(rng)]
        groups_per_identity = np.maximum(self._counts // self.k, 1)
        owner = np.repeat(np.arange(self.num_identities), groups_per_identity)
        # nth group of its identity = global group number - the identity's first group number
        nth = np.arange(len(owner)) - (np.cumsum(groups_per_identity) - groups_per_identity)[owner]
        offsets = nth[:, None] * self.k + np.arange(self.k)
        offsets = _within_identity_offsets(offsets, self._counts[owner][:, None], rng)
        groups = shuffled[self._starts[owner][:, None] + offsets]
        if self.num_identities < self.p:  # only with replacement=True
            rows = _draw_with_replacement(groups_per_identity, self.p, rng)
        else:
            rows = _draw_identity_batches(groups_per_identity, self.p, rng)
        return groups[rows].reshape(len(rows), self.p * self.k)

    def global_batches(self, epoch: int) -> np.ndarray:
        """All ranks' batches of ``epoch`` before sharding, as a (batches, P*K) array."""
        return self._build_batches(np.random.default_rng([self.seed, epoch]))

    def rank_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of ``epoch`` as a (batches, P*K) array; cached for the last epoch asked."""
        if self._cache is None or self._cache[0] != epoch:
            batches = self.global_batches(epoch)
            usable = len(batches) // self.world_size * self.world_size
            self._cache = (epoch, batches[self.rank : usable : self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed = 0

    def keyed(self) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """As iterating, with each batch's key ``(epoch, global batch number)``."""
        epoch = self.epoch
        batches = self.rank_batches(epoch)
        for i in range(self._consumed, len(batches)):
            self._consumed = i + 1
            yield (epoch, self.rank + i * self.world_size), batches[i].tolist()
        self.epoch, self._consumed = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.keyed():
            yield batch

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        total = len(self.rank_batches(epoch))
        if not 0 <= consumed <= total:
            raise ValueError(f"consumed={consumed} is outside [0, {total}] batches of epoch {epoch}")
        self.epoch, self._consumed = epoch, consumed


class CameraAwarePKSampler(PKSampler):
    """One group of K images per identity and epoch, spread over cameras (SpCL style).

    A group is a random anchor image, then one image of each other camera, then more images of
    other cameras, then images of the anchor's camera, each tier in random order; identities with
    fewer than K images repeat random images. Identities are shuffled and every P consecutive
    groups form a batch; the last incomplete batch is dropped. Sharding and resume are PKSampler's.
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        camids: Sequence[int] | np.ndarray | None = None,
        p: int = 16,
        k: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        replacement: bool = False,
    ) -> None:
        if camids is None:
            raise ValueError("CameraAwarePKSampler requires camids")
        super().__init__(pids, camids, p=p, k=k, seed=seed, rank=rank, world_size=world_size,
                         replacement=replacement)
        # Dense camera codes keep the (identity, camera) sort key small.
        codes = np.unique(self._camids[self._order], return_inverse=True)[1].reshape(-1)
        self._cam_code, self._num_cams = codes, int(codes.max()) + 1

    def _build_batches(self, rng: np.random.Generator) -> np.ndarray:
        perm = self._shuffle_within_identities(rng)
        shuffled, cam, ident = self._order[perm], self._cam_code[perm], self._identity
        # The first image of each shuffled block is the anchor.
        anchor_cam = cam[self._starts][ident]
        # First image of each (identity, camera) pair in shuffled order: a stable sort keeps that order.
        pair = ident * self._num_cams + cam
        by_pair = np.argsort(pair, kind="stable")
        pair_head = np.ones(len(by_pair), dtype=bool)
        pair_head[1:] = pair[by_pair[1:]] != pair[by_pair[:-1]]
        new_cam = np.zeros(len(shuffled), dtype=bool)
        new_cam[by_pair[pair_head]] = True
        # Tiers: 0 anchor, 1 first image of another camera, 2 other images of other cameras, 3 anchor's camera.
        tier = np.full(len(shuffled), 3)
        tier[cam != anchor_cam] = 2
        tier[new_cam & (cam != anchor_cam)] = 1
        tier[self._starts] = 0
        # Stable sort keeps the random order within each tier of each identity.
        ranked = shuffled[np.argsort(ident * 4 + tier, kind="stable")]

        offsets = np.broadcast_to(np.arange(self.k), (self.num_identities, self.k))
        offsets = _within_identity_offsets(offsets, self._counts[:, None], rng)
        groups = ranked[self._starts[:, None] + offsets]
        if self.num_identities < self.p:  # only with replacement=True
            rows = _draw_with_replacement(np.ones(self.num_identities, dtype=np.int64), self.p, rng)
            return groups[rows].reshape(len(rows), self.p * self.k)
        groups = groups[rng.permutation(self.num_identities)]
        n_batches = self.num_identities // self.p
        return groups[: n_batches * self.p].reshape(n_batches, self.p * self.k)


def _draw_offsets(m: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` offsets in [0, m) per row: distinct where m >= draws, independent otherwise (m >= 1).

    Distinct rows pick the t-th value not yet taken, t uniform over what is left, so each row is a
    uniformly random ordered sample, as ``np.random.choice(m, draws, replace=False)`` draws it.
    Rows with m == 0 get zeros, which the caller discards.
    """
    out = np.zeros((len(m), draws), dtype=np.int64)
    distinct = m >= draws
    for j in range(draws):
        left = np.where(distinct, m - j, m)
        t = (rng.random(len(m)) * np.maximum(left, 1)).astype(np.int64)
        taken = np.sort(out[:, :j], axis=1)
        for c in range(j):  # ascending taken values: skip each one at or below t
            t += distinct & (t >= taken[:, c])
        out[:, j] = t
    return out


class MultipleGallerySampler(PKSampler):
    """SpCL's ``RandomMultipleGallerySampler``: each identity once per pass, batches of P*K images.

    A pass visits the identities in random order; each contributes a random anchor image, then, unless
    it has a single image, K-1 images drawn among its images from other cameras than the anchor's, or
    among its other images when all share the anchor's camera (distinct when there are at least K-1
    candidates, with replacement otherwise). The pass's flat index list is cut into batches of P*K
    consecutive indices and the last incomplete batch is dropped; an identity's images may straddle two
    batches. A pass shorter than one batch is followed by as many more passes as fill one, so one
    identity is enough. ``camids`` None means one camera for all. Sharding and resume are PKSampler's.
    """

    needs_p_identities = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # PKSampler's arguments
        super().__init__(*args, **kwargs)
        cams = np.zeros(len(self._order), np.int64) if self._camids is None else self._camids[self._order]
        # Camera-sorted identity blocks: the anchor's same-camera images are one run of its block.
        by = np.lexsort((cams, self._identity))
        self._order, cams = self._order[by], cams[by]
        head = np.ones(len(cams), dtype=bool)
        head[1:] = (cams[1:] != cams[:-1]) | (self._identity[1:] != self._identity[:-1])
        run = np.cumsum(head) - 1
        run_start = np.flatnonzero(head)
        self._run_start = run_start[run]
        self._run_len = np.diff(np.append(run_start, len(cams)))[run]

    def pass_indices(self, epoch: int) -> np.ndarray:
        """The flat index list of one pass of ``epoch`` (SpCL's sampler output), before batching."""
        return self._one_pass(np.random.default_rng([self.seed, epoch]))

    def _one_pass(self, rng: np.random.Generator) -> np.ndarray:
        visit = rng.permutation(self.num_identities)
        starts, counts = self._starts[visit], self._counts[visit]
        anchor = starts + (rng.random(len(visit)) * counts).astype(np.int64)
        run_start, run_len = self._run_start[anchor], self._run_len[anchor]
        # The candidates are the identity's block minus a hole: the anchor's camera run when other
        # cameras exist, else the anchor alone.
        other_cams = counts > run_len
        hole = np.where(other_cams, run_start, anchor) - starts
        hole_len = np.where(other_cams, run_len, 1)
        m = counts - hole_len
        offsets = _draw_offsets(m, self.k - 1, rng)
        offsets += (offsets >= hole[:, None]) * hole_len[:, None]
        groups = np.concatenate([anchor[:, None], starts[:, None] + offsets], axis=1)
        keep = np.ones(groups.shape, dtype=bool)
        keep[m == 0, 1:] = False  # a single-image identity contributes its anchor alone
        return self._order[groups[keep]]

    def _build_batches(self, rng: np.random.Generator) -> np.ndarray:
        size = self.p * self.k
        # A pass shorter than one batch (a tiny pool, or few clusters early on) is joined by further passes
        # until a batch fills: SpCL's drop_last loader would yield nothing there and stall.
        passes = [self._one_pass(rng)]
        while sum(map(len, passes)) < size:
            passes.append(self._one_pass(rng))
        flat = np.concatenate(passes)
        n_batches = len(flat) // size
        return flat[: n_batches * size].reshape(n_batches, size)


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """Exactly ``iters`` batches an epoch from a P x K sampler (``iters_per_epoch`` > 0 of the run config).

    The epoch is the sampler's current one; its batches come first, and when they run out the sampler's
    further passes follow, pass r of epoch e being the sampler's epoch ``e + r * PASS_STRIDE``: drawn
    afresh, with batch keys (and so augmentation seeds) no other epoch or pass has. With ``iters`` up to
    one pass the batches are the first ``iters`` of the epoch. ``set_epoch``, ``state_dict`` and resume
    are the sampler's, at epoch boundaries.
    """

    PASS_STRIDE = 1 << 32

    def __init__(self, sampler: PKSampler, iters: int) -> None:
        super().__init__()
        if iters < 1:
            raise ValueError(f"iters (batches per epoch) must be >= 1, got {iters}")
        self.sampler, self.iters = sampler, iters

    def keyed(self) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """The epoch's batches with their keys ``(sampler epoch of the pass, global batch number)``."""
        epoch, done = self.sampler.epoch, 0
        for round_ in itertools.count():
            if round_:
                self.sampler.set_epoch(epoch + round_ * self.PASS_STRIDE)
            before = done
            for key, batch in self.sampler.keyed():
                yield key, batch
                done += 1
                if done == self.iters:
                    return
            if round_ and done == before:  # a fresh pass without a batch (pass 0 may just be used up)
                raise ValueError(f"epoch {epoch}: the sampler has no batch for this rank (world_size "
                                 f"{self.sampler.world_size}), so no epoch of {self.iters} iterations can be drawn")

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.keyed():
            yield batch

    def __len__(self) -> int:
        return self.iters
