"""Tests for the identity batch samplers in reidforge.data.samplers."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch

from reidforge.data.samplers import CameraAwarePKSampler, EpochBatches, MultipleGallerySampler, PKSampler

P, K = 4, 4
SAMPLERS = [PKSampler, CameraAwarePKSampler]
# Samplers whose global batch list is cut, sharded and resumed the same way.
ALL_SAMPLERS = [*SAMPLERS, MultipleGallerySampler]


def make_labels(seed: int = 0, n_ids: int = 60, n_outliers: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled pids (non-contiguous values, sizes 1..11, some outliers -1) and camids in 0..5."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, n_ids)
    pids = np.concatenate([np.repeat(np.arange(n_ids) * 3 + 7, sizes), np.full(n_outliers, -1)])
    pids = pids[rng.permutation(len(pids))]
    camids = rng.integers(0, 6, len(pids))
    return pids, camids


def make_sampler(cls: type[PKSampler], **kwargs) -> PKSampler:
    pids, camids = make_labels()
    return cls(pids, camids, **{"p": P, "k": K, **kwargs})


@pytest.mark.parametrize("cls", SAMPLERS)
def test_batch_composition(cls: type[PKSampler]) -> None:
    pids, camids = make_labels()
    sampler = cls(pids, camids, p=P, k=K, seed=3)
    sizes = Counter(pids[pids >= 0].tolist())
    n_batches = len(sampler)
    batches = list(sampler)
    assert len(batches) == n_batches > 0
    seen: set[int] = set()
    for batch in batches:
        assert len(batch) == P * K
        assert all(0 <= i < len(pids) for i in batch)
        batch_pids = pids[batch]
        assert (batch_pids >= 0).all()
        assert sorted(Counter(batch_pids.tolist()).values()) == [K] * P
        for pid in set(batch_pids.tolist()):
            group = [i for i in batch if pids[i] == pid]
            # Images repeat only for identities with fewer than K images, and then all of them are used.
            assert len(set(group)) == min(K, sizes[pid])
        assert seen.isdisjoint(batch)
        seen.update(batch)


def test_pk_exhausts_identities_like_torchreid() -> None:
    pids, camids = make_labels(seed=1)
    sampler = PKSampler(pids, camids, p=P, k=K, seed=5)
    used = Counter(pids[i] for batch in sampler for i in batch[::K])
    sizes = Counter(pids[pids >= 0].tolist())
    left = {pid: max(1, n // K) - used[pid] for pid, n in sizes.items()}
    assert min(left.values()) >= 0
    # The loop stops only once fewer than P identities still have groups.
    assert sum(v > 0 for v in left.values()) < P


def test_camera_aware_prefers_other_cameras() -> None:
    # pid 0: 5 cameras, 3 images each; pid 1: K images, one camera; pid 2: two cameras, 6 images each;
    # pid 3: 2 images; pids 4..7: filler with K cameras each.
    pid_cam = (
        [(0, c) for c in range(5) for _ in range(3)]
        + [(1, 5)] * K
        + [(2, 0)] * 6 + [(2, 1)] * 6
        + [(3, 2), (3, 3)]
        + [(pid, c) for pid in range(4, 8) for c in range(K)]
    )
    pids = np.array([pc[0] for pc in pid_cam])
    camids = np.array([pc[1] for pc in pid_cam])
    for epoch in range(10):
        sampler = CameraAwarePKSampler(pids, camids, p=P, k=K, seed=epoch)
        groups = [batch[j : j + K] for batch in sampler for j in range(0, P * K, K)]
        assert len(groups) == 8
        for group in groups:
            pid, cams = pids[group[0]], camids[group].tolist()
            if pid in (0, 4, 5, 6, 7):
                assert len(set(cams)) == K
            elif pid == 1:
                assert sorted(group) == np.flatnonzero(pids == 1).tolist()
            elif pid == 2:
                # The anchor comes first; every other image is from the other camera.
                assert cams.count(cams[0]) == 1 and len(set(group)) == K
            else:
                assert set(group) == set(np.flatnonzero(pids == 3).tolist())


def test_camera_aware_one_group_per_identity() -> None:
    pids, camids = make_labels(seed=2)
    sampler = CameraAwarePKSampler(pids, camids, p=P, k=K)
    group_pids = [pids[i] for batch in sampler for i in batch[::K]]
    n_ids = len(set(pids[pids >= 0].tolist()))
    assert len(group_pids) == len(set(group_pids)) == n_ids // P * P


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_deterministic_per_seed_epoch_rank(cls: type[PKSampler]) -> None:
    first = make_sampler(cls, seed=11, rank=1, world_size=2)
    again = make_sampler(cls, seed=11, rank=1, world_size=2)
    assert list(first) == list(again)
    first.set_epoch(4)
    again.set_epoch(4)
    epoch4 = list(first)
    assert epoch4 == list(again)
    first.set_epoch(5)
    assert list(first) != epoch4
    assert list(make_sampler(cls, seed=12, rank=1, world_size=2)) != list(make_sampler(cls, seed=11, rank=1, world_size=2))


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_global_list(cls: type[PKSampler], world_size: int) -> None:
    ranks = [make_sampler(cls, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in ranks:
        sampler.set_epoch(2)
    per_rank = [list(sampler) for sampler in ranks]
    lengths = {len(batches) for batches in per_rank}
    assert lengths == {len(ranks[0].rank_batches(2))} and min(lengths) > 0

    indices = [{i for batch in batches for i in batch} for batches in per_rank]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert indices[a].isdisjoint(indices[b])

    global_batches = make_sampler(cls, seed=7).global_batches(2).tolist()
    interleaved = [per_rank[r][i] for i in range(lengths.pop()) for r in range(world_size)]
    assert interleaved == global_batches[: len(global_batches) // world_size * world_size]


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_resume_mid_epoch(cls: type[PKSampler]) -> None:
    sampler = make_sampler(cls, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sampler.state_dict() == {"epoch": 4, "consumed": 0}

    sampler.set_epoch(3)
    it = iter(sampler)
    consumed = [next(it) for _ in range(2)]
    state = sampler.state_dict()
    assert state == {"epoch": 3, "consumed": 2} and consumed == full[:2]

    resumed = make_sampler(cls, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's epoch loop re-announces the resumed epoch
    assert len(resumed) == len(full)
    assert list(resumed) == full[2:]
    assert resumed.state_dict() == {"epoch": 4, "consumed": 0}

    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # moving to another epoch starts it from the beginning
    assert len(list(resumed)) == len(resumed.rank_batches(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0}, "p .* must be >= 1, got 0"),
        ({"k": 0}, "k .* must be >= 1, got 0"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\), got 2"),
        ({"rank": -1}, r"rank must be in \[0, 1\), got -1"),
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"camids": [0, 1]}, "camids has 2 entries but pids has"),
        ({"pids": [0.5, 1.5]}, "pids must be a 1-D array of integers"),
    ],
)
@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_invalid_arguments(cls: type[PKSampler], kwargs: dict, match: str) -> None:
    pids, camids = make_labels()
    args = {"pids": pids, "camids": camids, "p": P, "k": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_fewer_than_p_identities_raise_unless_drawn_with_replacement(cls: type[PKSampler]) -> None:
    pids, camids = make_labels()
    with pytest.raises(ValueError, match="need at least p=61 identities with pid >= 0, got 60"):
        cls(pids, camids, p=61, k=K)
    # 3 identities for P=4: every batch is P x K images of those identities, each identity's groups in turn
    few = np.repeat([5, 9, 2], [9, 1, 4])
    sampler = cls(few, np.arange(len(few)) % 3, p=P, k=K, seed=2, replacement=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) >= 1
    groups = 4 if cls is PKSampler else 3  # PK: 9 // K + 1 + 1 groups; camera-aware: one per identity
    assert len(batches) == max(groups // P, 1)
    for batch in batches:
        assert len(batch) == P * K and set(few[batch]) <= {5, 9, 2}
        counts = Counter(few[batch].tolist())
        assert all(c % K == 0 for c in counts.values())
    assert list(cls(few, np.arange(len(few)) % 3, p=P, k=K, seed=2, replacement=True)) == batches
    # with at least P identities replacement changes nothing
    assert list(cls(pids, camids, p=P, k=K, seed=3, replacement=True)) == list(cls(pids, camids, p=P, k=K, seed=3))


def test_multiple_gallery_needs_one_identity_not_p() -> None:
    few = np.repeat([5, 9], [6, 3])
    batches = list(MultipleGallerySampler(few, None, p=P, k=K, seed=1))
    assert batches and all(len(b) == P * K and set(few[b]) <= {5, 9} for b in batches)
    with pytest.raises(ValueError, match="need at least one identity with pid >= 0, got 0"):
        MultipleGallerySampler([-1, -1], None, p=P, k=K)


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_keyed_batches_carry_epoch_and_global_batch_number(cls: type[PKSampler]) -> None:
    rank1 = make_sampler(cls, seed=4, rank=1, world_size=2)
    rank1.set_epoch(3)
    keyed = list(rank1.keyed())
    assert [b for _, b in keyed] == rank1.rank_batches(3).tolist()
    assert [key for key, _ in keyed] == [(3, 1 + 2 * i) for i in range(len(keyed))]
    assert rank1.epoch == 4  # a completed pass moves on, as iterating does


def test_camera_aware_requires_camids() -> None:
    with pytest.raises(ValueError, match="requires camids"):
        CameraAwarePKSampler(make_labels()[0], p=P, k=K)


def test_pk_accepts_missing_camids_and_only_outliers_fail() -> None:
    pids, _ = make_labels()
    assert len(PKSampler(pids.tolist(), p=P, k=K)) > 0
    with pytest.raises(ValueError, match="need at least p=4 identities with pid >= 0, got 0"):
        PKSampler([-1, -1, -1], p=P, k=K)


def test_load_state_dict_rejects_out_of_range_progress() -> None:
    sampler = make_sampler(PKSampler)
    with pytest.raises(ValueError, match="consumed=-1 is outside"):
        sampler.load_state_dict({"epoch": 0, "consumed": -1})
    with pytest.raises(ValueError, match="is outside"):
        sampler.load_state_dict({"epoch": 0, "consumed": len(sampler) + 1})


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, pids: np.ndarray) -> None:
        self.pids = pids

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, int(self.pids[index])


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_dataloader_smoke(cls: type[PKSampler]) -> None:
    pids, camids = make_labels()
    sampler = cls(pids, camids, p=P, k=K, seed=1)
    loader = torch.utils.data.DataLoader(_IndexDataset(pids), batch_sampler=sampler)
    assert len(loader) == len(sampler)
    expected = sampler.rank_batches(0).tolist()
    got = []
    for index, pid in loader:
        assert index.shape == pid.shape == (P * K,)
        assert torch.equal(pid, torch.as_tensor(pids[index.numpy()]))
        got.append(index.tolist())
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_epoch_construction_scales(cls: type[PKSampler]) -> None:
    rng = np.random.default_rng(0)
    pids = rng.integers(0, 250_000, 2_500_000)
    camids = rng.integers(0, 8, len(pids))
    sampler = cls(pids, camids, p=16, k=4)
    start = time.perf_counter()
    batches = sampler.global_batches(0)
    assert time.perf_counter() - start < 5.0
    assert batches.shape[1] == 64


# (pid, camid) per index: pid 0 two images on camera 0 and one on camera 1; pid 1 a single image; pid 2
# five images of one camera; pid 3 five cameras; pid 4 two images on camera 5, four on camera 6; two outliers.
HAND = ([(0, 0), (0, 0), (0, 1), (1, 3)] + [(2, 2)] * 5 + [(3, c) for c in range(5)] + [(4, 5)] * 2
        + [(4, 6)] * 4 + [(-1, 0), (-1, 1)])
HAND_PIDS = np.array([pc[0] for pc in HAND])
HAND_CAMS = np.array([pc[1] for pc in HAND])


def _groups(flat: list[int], pids: np.ndarray) -> list[list[int]]:
    """A pass's flat list split into its identities' groups (consecutive groups never share a pid)."""
    groups: list[list[int]] = []
    for i in flat:
        if groups and pids[groups[-1][0]] == pids[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def test_multiple_gallery_groups_follow_spcl_rules() -> None:
    sampler = MultipleGallerySampler(HAND_PIDS, HAND_CAMS, p=2, k=K, seed=0)
    anchors: dict[int, set[int]] = {pid: set() for pid in range(5)}
    for epoch in range(60):
        flat = sampler.pass_indices(epoch).tolist()
        groups = _groups(flat, HAND_PIDS)
        # Every pseudo-class once per pass; outliers never; 4 + 1 + 4 + 4 + 4 images.
        assert sorted(HAND_PIDS[g[0]] for g in groups) == [0, 1, 2, 3, 4] and len(flat) == 17
        for anchor, *rest in groups:
            pid, cam = HAND_PIDS[anchor], HAND_CAMS[anchor]
            anchors[pid].add(anchor)
            if pid == 0:  # other cameras first, with replacement when fewer than K-1
                assert rest == [2, 2, 2] if cam == 0 else set(rest) <= {0, 1} and len(rest) == 3
            elif pid == 1:
                assert rest == []  # a single image takes one slot, not K
            elif pid == 2:  # one camera: K-1 distinct other images
                assert len(set(rest)) == 3 and anchor not in rest and (HAND_PIDS[rest] == 2).all()
            elif pid == 3:
                assert len(set(rest)) == 3 and cam not in HAND_CAMS[rest] and (HAND_PIDS[rest] == 3).all()
            else:
                assert (len(set(rest)) == 3 and set(rest) <= {16, 17, 18, 19} if cam == 5
                        else len(rest) == 3 and set(rest) <= {14, 15})
        # Batches are consecutive P*K slices of the pass; the incomplete rest is dropped.
        assert sampler.global_batches(epoch).tolist() == [flat[:8], flat[8:16]]
    assert anchors == {0: {0, 1, 2}, 1: {3}, 2: {4, 5, 6, 7, 8}, 3: set(range(9, 14)), 4: set(range(14, 20))}


def test_multiple_gallery_without_camids_prefers_other_images() -> None:
    sampler = MultipleGallerySampler(HAND_PIDS, None, p=2, k=K, seed=0)
    for epoch in range(20):
        for anchor, *rest in _groups(sampler.pass_indices(epoch).tolist(), HAND_PIDS):
            members = set(np.flatnonzero(HAND_PIDS == HAND_PIDS[anchor]).tolist()) - {anchor}
            assert set(rest) <= members
            # pid 1 has none; pid 0 has 2, drawn with replacement; the others at least K-1: distinct
            assert len(rest) == (K - 1 if members else 0) and (len(members) < K - 1 or len(set(rest)) == K - 1)


def test_singletons_take_one_slot_instead_of_k_copies() -> None:
    # 30 one-image pseudo-classes and 10 clusters of 6 images over 3 cameras.
    pids = np.concatenate([np.arange(30), np.repeat(np.arange(30, 40), 6)])
    camids = np.concatenate([np.zeros(30, np.int64), np.tile([0, 1, 2], 20)])
    mg = MultipleGallerySampler(pids, camids, p=P, k=K, seed=4)
    flat = mg.pass_indices(0)
    assert len(flat) == 30 + 10 * K and sorted(Counter(pids[flat]).values()) == [1] * 30 + [K] * 10
    assert len(set(flat[pids[flat] < 30].tolist())) == 30
    pk = PKSampler(pids, camids, p=P, k=K, seed=4)
    copies = Counter(i for batch in pk.global_batches(0).tolist() for i in batch if pids[i] < 30)
    assert set(copies.values()) == {K}


def test_distinct_images_per_batch_with_mostly_singletons() -> None:
    """87 % of the pseudo-classes are un-clustered images: PK fills 64 slots with ~22 distinct images
    (16 x (0.87 + 0.13 x 4) = 22.2 expected), SpCL's sampler with 64."""
    rng = np.random.default_rng(0)
    sizes = np.concatenate([np.ones(870, np.int64), rng.integers(K, 2 * K, 130)])  # one PK group each
    pids = np.repeat(np.arange(len(sizes)), sizes)
    camids = np.concatenate([np.arange(s) for s in sizes])  # every image of a cluster on its own camera
    distinct = {cls.__name__: [len(set(b)) for e in range(5) for b in cls(pids, camids, p=16, k=K, seed=1)
                               .global_batches(e).tolist()] for cls in (PKSampler, MultipleGallerySampler)}
    assert set(distinct["MultipleGallerySampler"]) == {64}
    assert 20.5 < np.mean(distinct["PKSampler"]) < 24


def test_multiple_gallery_shards_global_batches_across_ranks() -> None:
    pids, camids = make_labels(seed=3)
    whole = MultipleGallerySampler(pids, camids, p=P, k=K, seed=9).global_batches(1).tolist()
    ranks = [MultipleGallerySampler(pids, camids, p=P, k=K, seed=9, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(whole) // 2
    assert [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(2)] == whole[: len(whole) // 2 * 2]


def test_multiple_gallery_joins_passes_shorter_than_a_batch() -> None:
    sampler = MultipleGallerySampler(np.arange(20), p=16, k=K)  # 20 singletons: 20 images a pass, batch 64
    batches = sampler.global_batches(0)
    assert batches.shape == (1, 64)  # four passes (80 images) make one batch, the rest is dropped
    for i in range(3):  # each whole pass inside it is a permutation of the 20 images
        assert sorted(batches[0, 20 * i:20 * (i + 1)].tolist()) == list(range(20))
    assert np.array_equal(batches, sampler.global_batches(0))


@pytest.mark.parametrize("world_size", [1, 2])
def test_epoch_batches_give_exactly_the_epochs_length(world_size: int) -> None:
    """iters_per_epoch > 0: the epoch's own batches first, then fresh passes with keys of their own, exactly
    ``iters`` batches; at most one pass long, the first ``iters`` batches of the epoch."""
    sampler = make_sampler(PKSampler, seed=5, rank=world_size - 1, world_size=world_size)
    sampler.set_epoch(3)
    one_pass = list(sampler.keyed())
    n = len(one_pass)
    sampler.set_epoch(4)
    sampler.set_epoch(3)
    long = EpochBatches(sampler, 2 * n + 3)
    drawn = list(long.keyed())
    assert len(long) == len(drawn) == 2 * n + 3 and drawn[:n] == one_pass
    assert [key[0] for key, _ in drawn] == [3] * n + [3 + EpochBatches.PASS_STRIDE] * n + [3 + 2 * EpochBatches.PASS_STRIDE] * 3
    assert len({key for key, _ in drawn}) == len(drawn) and drawn[n][1] != one_pass[0][1]  # a new pass, new keys
    sampler.set_epoch(4)  # the trainer's next epoch starts from that epoch's own batches
    sampler.set_epoch(3)
    assert list(EpochBatches(sampler, 2).keyed()) == one_pass[:2]
    with pytest.raises(ValueError, match="must be >= 1"):
        EpochBatches(sampler, 0)


def test_epoch_batches_refuse_a_rank_without_batches() -> None:
    pids = np.repeat(np.arange(4), 4)
    sampler = PKSampler(pids, None, p=4, k=4, seed=0, rank=1, world_size=2)  # one global batch: none for rank 1
    with pytest.raises(ValueError, match="no batch for this rank"):
        list(EpochBatches(sampler, 3))
