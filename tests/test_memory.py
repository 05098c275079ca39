"""SpCL hybrid memory (pretrain/memory.py) against the straightforward SpCL formula, plus a real 2-rank run.

The references below are the SpCL code written out (yxgeee/SpCL spcl/models/hm.py): B x N similarities,
index_add into a per-class table, masked softmax with its 1e-6, nll of log(p + 1e-6), autograd for the
gradient, and the per-sample momentum loop. Slots with a label < 0 are in no class; batch samples on
such slots are ignored by the loss (the memory's documented rule). launch/bench/memory.py uses them as
the timing baseline.

Run as a script under torchrun, this file is the 2-process worker of ``test_two_ranks_match_one_process``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reidforge.pretrain.memory import HybridMemory, estimate_memory_bytes


# -- the reference -----------------------------------------------------------------------------------
def reference_loss(memory_feats: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, indices: torch.Tensor,
                   temperature: float = 0.05) -> torch.Tensor:
    """SpCL's HybridMemory.forward on a constant memory, in ``feats``' dtype (autograd gives the gradient).

    As hm.py: a (max label + 1) x B table filled by index_add, empty rows masked out of the softmax.
    """
    dtype, b = feats.dtype, feats.shape[0]
    inputs = feats.mm(memory_feats.to(dtype).t()) / temperature          # B x N
    valid = labels >= 0
    lab = labels[valid]
    num_rows = int(lab.max()) + 1 if lab.numel() else 0
    sim = torch.zeros(num_rows, b, dtype=dtype).index_add(0, lab, inputs.t()[valid])
    nums = torch.zeros(num_rows, 1, dtype=dtype).index_add(0, lab, torch.ones(lab.numel(), 1, dtype=dtype))
    mask = (nums > 0).to(dtype)
    sim = sim / (mask * nums + (1 - mask))
    exps = torch.exp(sim.t()) * mask.t()
    masked_sim = exps / (exps.sum(1, keepdim=True) + 1e-6)
    targets = labels[indices]
    keep = targets >= 0
    if not keep.any():
        return (feats * 0).sum()
    return F.nll_loss(torch.log(masked_sim + 1e-6)[keep], targets[keep])


@torch.no_grad()
def reference_update(memory_feats: torch.Tensor, feats: torch.Tensor, indices: torch.Tensor,
                     momentum: float = 0.2) -> None:
    """HM.backward's loop: one sample at a time, in batch order, rounded to the storage dtype each step."""
    for x, y in zip(feats, indices.tolist()):
        v = momentum * memory_feats[y].float() + (1.0 - momentum) * x.float()
        memory_feats[y] = (v / v.norm()).to(memory_feats.dtype)


def _unit(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _labels(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clusters of 2-5 slots over about half the slots, singletons, and a few dropped (-1), shuffled."""
    labels, next_id, i = [], 0, 0
    while i < n // 2:
        size = int(torch.randint(2, 6, (), generator=generator))
        labels += [next_id] * size
        next_id, i = next_id + 1, i + size
    labels += [-1] * 3
    labels += list(range(next_id + 10, next_id + 10 + n - len(labels)))  # singletons, ids with gaps
    labels = torch.tensor(labels[:n])
    return labels[torch.randperm(n, generator=generator)]


def _memory(n: int = 60, dim: int = 16, dtype: torch.dtype = torch.float32, **kw) -> HybridMemory:
    mem = HybridMemory(n, dim, dtype=dtype, **kw)
    mem.initialize(torch.randn(n, dim))
    mem.set_labels(_labels(n))
    return mem


def _batch(mem: HybridMemory, b: int, duplicates: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, mem.num_samples, (b,))
    if duplicates:
        idx[1] = idx[0]
        idx[5] = idx[0]
        idx[3] = idx[2]
    # features near their slots so that the targets matter
    feats = F.normalize(mem.features[idx].float() + 0.5 * torch.randn(b, mem.dim), dim=1)
    return feats, idx


def _ours(mem: HybridMemory, feats: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.clone().requires_grad_(True)
    loss = mem(f, idx)
    loss.backward()
    return loss.detach(), f.grad


def _theirs(bank: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, idx: torch.Tensor,
            temperature: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss and gradient in float64 on the given (stored) bank, then its sequential update."""
    f = feats.double().clone().requires_grad_(True)
    loss = reference_loss(bank.double(), labels, f, idx, temperature)
    loss.backward()
    reference_update(bank, feats, idx)
    return loss.detach(), f.grad


# -- loss, gradient, update --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size,temperature", [(32768, 0.05), (3, 0.05), (4, 0.01)])
def test_loss_gradient_and_update_match_the_reference(chunk_size: int, temperature: float) -> None:
    mem = _memory(chunk_size=chunk_size, temperature=temperature)
    assert 0 < mem.num_clusters < mem.num_classes < 60 and int((mem.labels < 0).sum()) == 3
    bank = mem.features.clone()
    for step in range(4):
        feats, idx = _batch(mem, 12)
        if step == 1:
            idx[7] = int(torch.nonzero(mem.labels < 0)[0])  # a dropped slot in the batch: ignored by the loss
        loss, grad = _ours(mem, feats, idx)
        ref_loss, ref_grad = _theirs(bank, mem.labels, feats, idx, temperature)
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(mem.features, bank, atol=1e-6, rtol=0)  # sequential, duplicates included
        if step == 1:
            assert not grad[7].any()


def test_duplicate_indices_update_sequentially() -> None:
    mem = HybridMemory(5, 4)
    mem.initialize(torch.eye(5, 4) + 0.1)
    x = _unit(4, 4)
    idx = torch.tensor([2, 2, 0, 2])
    expected = mem.features.clone()
    for f, i in zip(x, idx.tolist()):  # v <- 0.2 v + 0.8 f, then normalised, one sample after another
        v = 0.2 * expected[i] + 0.8 * f
        expected[i] = v / v.norm()
    _ours(mem, x, idx)
    torch.testing.assert_close(mem.features, expected, atol=1e-6, rtol=0)  # last-bit rounding
    # a batch-mean update (or "last wins") would give something else
    assert not torch.allclose(expected[2], F.normalize(0.2 * (torch.eye(5, 4) + 0.1)[2] + 0.8 * x[[0, 1, 3]].mean(0),
                                                       dim=0), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_storage(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    mem = _memory(dtype=dtype, chunk_size=5)
    torch.manual_seed(1)
    mem32 = _memory()
    assert mem.features.dtype == dtype and mem._cluster_sums.dtype == torch.float32
    assert mem.memory_bytes()["features"] == 60 * 16 * mem.features.element_size()
    bank = mem.features.clone()
    for _ in range(5):
        feats, idx = _batch(mem32, 12)
        loss, grad = _ours(mem, feats, idx)
        ref_loss, ref_grad = _theirs(bank, mem.labels, feats, idx)  # the reference on the same stored bank
        # the math is fp32 on the stored values: as close to the reference as fp32 storage is
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)
        # each sequential step rounds to the storage dtype; fp32 rounding inside may flip one last bit
        ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
        assert (mem.features.float() - bank.float()).abs().max() <= ulp
        _ours(mem32, feats, idx)
    # and the 16-bit bank stays within its rounding of the fp32 one
    assert (mem.features.float() - mem32.features).abs().max() < (2e-3 if dtype == torch.float16 else 1.6e-2)
    sums = mem._cluster_sums.clone()
    mem.rebuild()
    assert (sums - mem._cluster_sums).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_incremental_sums_equal_a_recompute_after_many_steps(dtype: torch.dtype) -> None:
    n, dim = 400, 32
    mem = HybridMemory(n, dim, dtype=dtype)
    mem.initialize(torch.randn(n, dim))
    labels = torch.arange(n) // 25  # 16 clusters of 25: every step touches them
    labels[::7] = torch.arange(1000, 1000 + len(labels[::7]))
    mem.set_labels(labels)
    for _ in range(400):
        idx = torch.randint(0, n, (32,))
        x = _unit(32, dim)
        mem._momentum_update(x, idx)  # what backward runs; 12,800 updates in all
    incremental = mem._cluster_sums.clone()
    mem.rebuild()
    drift = (incremental - mem._cluster_sums).abs().max().item()
    assert drift <= 1e-5, drift
    assert mem._cluster_counts.sum() + mem._singletons.numel() == n


def test_dropped_labels_are_in_no_class() -> None:
    mem = HybridMemory(6, 4)
    mem.initialize(_unit(6, 4))
    mem.set_labels(torch.tensor([0, 0, -1, 3, -5, 7]))
    assert (mem.num_clusters, mem.num_classes) == (1, 3)
    f = mem.features[[0]].clone()
    # classes {0,1}, {3}, {5}: the dropped slots 2 and 4 change nothing
    loss, _ = _ours(mem, f, torch.tensor([0]))
    ref, _ = _theirs(mem.features.clone(), mem.labels, f, torch.tensor([0]))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    # a batch of only dropped slots: loss 0, no gradient, but the slots are still updated
    before = mem.features.clone()
    x = _unit(2, 4)
    loss, grad = _ours(mem, x, torch.tensor([2, 4]))
    assert loss.item() == 0 and not grad.any()
    assert not torch.equal(mem.features[[2, 4]], before[[2, 4]]) and torch.equal(mem.features[:2], before[:2])


def test_no_grad_forward_does_not_update_and_double_backward_updates_once() -> None:
    mem = _memory()
    feats, idx = _batch(mem, 8)
    before = mem.features.clone()
    with torch.no_grad():
        loss = mem(feats, idx)
    assert torch.equal(mem.features, before)
    f = feats.clone().requires_grad_(True)
    again = mem(f, idx)
    assert again.item() == pytest.approx(loss.item(), abs=1e-6)
    again.backward(retain_graph=True)
    once = mem.features.clone()
    again.backward()
    assert torch.equal(mem.features, once) and not torch.equal(once, before)


def test_initialize_subset_and_bytes() -> None:
    mem = HybridMemory(10, 4, dtype=torch.float16)
    mem.set_labels(torch.tensor([0, 0, 0, 1, 1, 2, 3, -1, 4, 4]))
    mem.initialize(torch.randn(4, 4) * 3, torch.tensor([1, 3, 5, 8]))
    norms = mem.features.float().norm(dim=1)
    assert torch.allclose(norms[[1, 3, 5, 8]], torch.ones(4), atol=1e-3) and not norms[[0, 2, 4, 6, 7, 9]].any()
    sums = mem._cluster_sums.clone()
    mem.rebuild()
    torch.testing.assert_close(sums, mem._cluster_sums, atol=1e-6, rtol=0)
    got = mem.memory_bytes()
    assert got["total"] == got["features"] + got["labels"] + got["derived"] == estimate_memory_bytes(
        10, 4, torch.float16, num_clusters=mem.num_clusters, num_singletons=mem._singletons.numel())


# -- state -----------------------------------------------------------------------------------------
def test_state_dict_round_trip() -> None:
    mem = _memory(chunk_size=7)
    for _ in range(3):
        _ours(mem, *_batch(mem, 8))
    state = mem.state_dict()
    assert set(state) == {"features", "labels", "cluster_sums"}
    feats, idx = _batch(mem, 8)
    with torch.no_grad():
        expected = mem(feats, idx)

    parent = nn.Module()
    parent.memory = HybridMemory(60, 16, chunk_size=7)
    parent.load_state_dict({f"memory.{k}": v for k, v in state.items()})
    loaded = parent.memory
    assert torch.equal(loaded.features, mem.features) and torch.equal(loaded.labels, mem.labels)
    assert torch.equal(loaded._singletons, mem._singletons) and loaded.num_clusters == mem.num_clusters
    # the incrementally kept sums come back as they were (a recompute differs in the last bits)
    assert torch.equal(loaded._cluster_sums, mem._cluster_sums)
    with torch.no_grad():
        assert loaded(feats, idx).item() == expected.item()

    half = HybridMemory(60, 16, dtype=torch.float16)  # an fp32 checkpoint into a half store
    half.load_state_dict(state)
    assert half.features.dtype == torch.float16 and half.num_classes == mem.num_classes
    with pytest.raises(RuntimeError, match="size mismatch"):
        HybridMemory(61, 16).load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for cluster_sums"):
        HybridMemory(60, 16).load_state_dict({**state, "cluster_sums": state["cluster_sums"][1:]})
    older = HybridMemory(60, 16)  # a state without sums (or a dtype change) gets them recomputed
    older.load_state_dict({k: state[k] for k in ("features", "labels")})
    torch.testing.assert_close(older._cluster_sums, mem._cluster_sums, atol=1e-6, rtol=0)
    # casting a parent keeps the derived sums fp32
    parent.half()
    assert loaded.dtype == torch.float16 and loaded._cluster_sums.dtype == torch.float32


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(_unit(2, 16), torch.tensor([0, 60])), IndexError, r"slot index 60 out of range \[0, 60\)"),
    (lambda m: m(_unit(2, 16), torch.tensor([-1, 3])), IndexError, "slot index -1 out of range"),
    (lambda m: m(_unit(2, 8), torch.tensor([0, 1])), ValueError, r"feats must be \(B, 16\)"),
    (lambda m: m(_unit(2, 16), torch.tensor([0, 1, 2])), ValueError, "2 features but 3 indices"),
    (lambda m: m(_unit(2, 16), torch.tensor([0.0, 1.0])), ValueError, "1-D integer tensor"),
    (lambda m: m(3 * _unit(2, 16), torch.tensor([0, 1])), ValueError, "must be L2-normalised"),
    (lambda m: m.set_labels(torch.zeros(59, dtype=torch.long)), ValueError, "need 60 labels"),
    (lambda m: m.set_labels(torch.zeros(60)), ValueError, "labels must be integers"),
    (lambda m: m.initialize(torch.randn(60, 15)), ValueError, r"float \(n, 16\)"),
    (lambda m: m.initialize(torch.randn(59, 16)), ValueError, "59 rows for 60 slots"),
    (lambda m: m.initialize(torch.randn(2, 16), torch.tensor([4, 4])), ValueError, "duplicates"),
    (lambda m: m.initialize(torch.randn(2, 16), torch.tensor([4, 60])), IndexError, "out of range"),
    (lambda m: HybridMemory(4, 4, dtype=torch.float64), ValueError, "dtype must be one of"),
])
def test_bad_inputs_give_one_line_errors(call, error, match) -> None:
    mem = _memory()
    with pytest.raises(error, match=match) as info:
        call(mem)
    assert "\n" not in str(info.value)


# -- two real processes ----------------------------------------------------------------------------
_N, _IN, _DIM, _STEPS = 40, 12, 8, 6
_SPLITS = [(4, 4)] * (_STEPS - 1) + [(5, 3)]  # the last global batch is split unevenly


def _scenario() -> tuple[nn.Module, HybridMemory, list, dict]:
    """Model, memory and global batches, identical on every process (seeded)."""
    g = torch.Generator().manual_seed(7)
    model = nn.Linear(_IN, _DIM)
    with torch.no_grad():
        model.weight.copy_(torch.randn(_DIM, _IN, generator=g) * 0.3)
        model.bias.copy_(torch.randn(_DIM, generator=g) * 0.1)
    mem = HybridMemory(_N, _DIM, chunk_size=5)
    mem.initialize(torch.randn(_N, _DIM, generator=g))
    relabel = {0: _labels(_N, g), 3: _labels(_N, g)}
    batches = []
    for split in _SPLITS:
        usable = torch.nonzero(relabel[0 if len(batches) < 3 else 3] >= 0).squeeze(1)
        idx = usable[torch.randint(0, len(usable), (sum(split),), generator=g)]
        idx[sum(split) - 1] = idx[0]  # the same slot on both ranks: order matters
        batches.append((torch.randn(sum(split), _IN, generator=g), idx, split))
    return model, mem, batches, relabel


def _train(model: nn.Module, mem: HybridMemory, batches: list, relabel: dict, rank: int | None) -> None:
    """rank None: one process on the global batches; else this rank's slice, loss scaled so that DDP's
    gradient average equals the global-batch mean."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step, (x, idx, split) in enumerate(batches):
        if step in relabel:
            mem.set_labels(relabel[step])
        if rank is None:
            lo, hi, scale = 0, len(idx), 1.0
        else:
            lo = sum(split[:rank])
            hi, scale = lo + split[rank], len(split) * split[rank] / len(idx)
        loss = mem(F.normalize(model(x[lo:hi]), dim=1), idx[lo:hi]) * scale
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, dist.get_world_size()
    model, mem, batches, relabel = _scenario()
    _train(DistributedDataParallel(model), mem, batches, relabel, rank)
    torch.save({"features": mem.features, "labels": mem.labels, "sums": mem._cluster_sums,
                "model": model.state_dict(), "world": dist.get_world_size()}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # (a) the replicas are bit-identical (and so are the DDP models)
    for key in ("features", "labels", "sums"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name
    # (b) and equal to one process running the same global batches
    model, mem, batches, relabel = _scenario()
    _train(model, mem, batches, relabel, None)
    assert not torch.allclose(mem.features, _scenario()[1].features, atol=1e-2)  # the memory did move
    torch.testing.assert_close(ranks[0]["features"], mem.features, atol=1e-5, rtol=0)
    assert torch.equal(ranks[0]["labels"], mem.labels)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], value, atol=1e-5, rtol=0)


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
