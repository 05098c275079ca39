"""Tests for the P x K identity samplers in data.samplers."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch

from data.samplers import CameraAwarePKSampler, PKSampler

P, K = 4, 4
SAMPLERS = [PKSampler, CameraAwarePKSampler]


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


@pytest.mark.parametrize("cls", SAMPLERS)
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


@pytest.mark.parametrize("cls", SAMPLERS)
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
        ({"p": 61}, "need at least p=61 identities with pid >= 0, got 60"),
        ({"pids": [0.5, 1.5]}, "pids must be a 1-D array of integers"),
    ],
)
@pytest.mark.parametrize("cls", SAMPLERS)
def test_invalid_arguments(cls: type[PKSampler], kwargs: dict, match: str) -> None:
    pids, camids = make_labels()
    args = {"pids": pids, "camids": camids, "p": P, "k": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)


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


@pytest.mark.parametrize("cls", SAMPLERS)
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
@pytest.mark.parametrize("cls", SAMPLERS)
def test_epoch_construction_scales(cls: type[PKSampler]) -> None:
    rng = np.random.default_rng(0)
    pids = rng.integers(0, 250_000, 2_500_000)
    camids = rng.integers(0, 8, len(pids))
    sampler = cls(pids, camids, p=16, k=4)
    start = time.perf_counter()
    batches = sampler.global_batches(0)
    assert time.perf_counter() - start < 5.0
    assert batches.shape[1] == 64
