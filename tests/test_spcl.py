"""SpCL pretraining end to end on a tiny synthetic pool: clustering, logging, export, resume, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

import reidforge.pretrain.spcl as spcl
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.finetune.models import build_model
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.shared.config import load_config
from reidforge.shared.optim import build_optimizer, build_scheduler
from conftest import killed_in_epoch
from reidforge.shared.weights import load_pretrained, read_export_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 unlabelled images of 24 hidden identities, plus a labelled query/gallery pair."""
    root = tmp_path_factory.mktemp("pool")
    cfg = SyntheticConfig(pool_images=240, pool_images_per_id=10, test_ids=8, images_per_test_id=6, distractors=4)
    sources = build_sources(cfg)
    write_split(sources["synthetic_lup"]["pool"], root / "pool", "pool", relabel=False,
                options=WriteOptions(progress=False))
    for split in ("query", "gallery"):
        write_split(sources["synthetic_person"][split], root / split, split, relabel=False,
                    options=WriteOptions(progress=False))
    return root


def _overrides(pool: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [f"run_name={name}", f"output_dir={out}", "model.name=osnet_x0_25", "model.weights=none",
            f"data.train=[{pool / 'pool'}]",
            "data.p=4", "data.k=4", "data.workers=0", "data.test_batch_size=64", "data.transform.height=64",
            "data.transform.width=32", "epochs=2", "iters_per_epoch=3", "log_every=1", "cluster.k1=10",
            "cluster.k2=3", *extra]


def _config(pool: Path, out: Path, name: str, *extra: str) -> SpCLConfig:
    return load_config(SpCLConfig, None, _overrides(pool, out, name, *extra))


def test_pretrain_clusters_logs_and_exports_a_backbone_finetune_loads(
        tiny_pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = spcl.pretrain(_config(tiny_pool, tmp_path, "run", f"data.query={tiny_pool / 'query'}",
                                  f"data.gallery={tiny_pool / 'gallery'}", "eval_every=1"))
    run = tmp_path / "run"
    history = state["history"]
    assert [r["epoch"] for r in history] == [1, 2] and state["iteration"] == 6
    for row in history:
        assert row["clusters"] + row["outliers"] <= 240 and 0 <= row["clustered"] <= 1
        assert -1 <= row["ARI"] <= 1 and 0 <= row["NMI"] <= 1 and 0 <= row["mAP"] <= 1 and np.isfinite(row["loss"])
    out = capsys.readouterr().out
    assert "| epoch | clusters |" in out and f"run directory: {run}" in out
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")) and (run / "metrics.json").is_file()

    meta = read_export_metadata(run / "backbone_final.safetensors")
    assert meta["kind"] == "backbone" and meta["architecture"] == "osnet_x0_25" and meta["input_size"] == [64, 32]
    assert meta["provenance"]["memory_slots"] == 240 and not (run / "backbone_best.safetensors").exists()
    assert meta["provenance"]["weights"] == "none"
    assert meta["pooling"] == "avg" and "gem_p" not in meta  # the pooling it was trained under, for evaluation
    # the fine-tuning stage takes it as its starting point: every backbone tensor lands
    model = build_model("osnet", 10, variant="osnet_x0_25")
    report = load_pretrained(model, run / "backbone_final.safetensors")
    assert len(report.trunk_loaded) == report.trunk_total and not report.unused
    assert report.layout.startswith("reidforge backbone export (osnet_x0_25)")
    exported = load_file(str(run / "backbone_final.safetensors"))
    assert all(torch.equal(model.state_dict()[f"backbone.{k}"], v) for k, v in exported.items())


def test_killed_run_resumes_to_the_same_state(tiny_pool: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spcl.pretrain(_config(tiny_pool, tmp_path, "whole", "epochs=3"))
    with killed_in_epoch(monkeypatch, spcl.SpCLTrainer, 2):
        spcl.pretrain(_config(tiny_pool, tmp_path, "killed", "epochs=3"))
    state = spcl.pretrain(_config(tiny_pool, tmp_path, "killed", "epochs=3"), resume=True)
    assert state["epoch"] == 3
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]
    assert [r["clusters"] for r in state["history"]] == [r["clusters"] for r in whole]
    a = load_file(str(tmp_path / "whole" / "backbone_final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "backbone_final.safetensors"))
    assert all((a[k].float() - b[k].float()).abs().max() <= 1e-5 for k in a)
    ma = load_file(str(tmp_path / "whole" / "checkpoints" / "epoch-0003" / "memory.safetensors"))
    mb = load_file(str(tmp_path / "killed" / "checkpoints" / "epoch-0003" / "memory.safetensors"))
    assert torch.equal(ma["labels"], mb["labels"]) and (ma["features"] - mb["features"]).abs().max() <= 1e-5


def test_bad_input_fails_in_one_line(tiny_pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert spcl.main(["memory.temp=0.1"]) == 2
    assert "unknown config key 'memory.temp'" in capsys.readouterr().err
    base = _overrides(tiny_pool, tmp_path, "bad")
    assert spcl.main([*base, f"model.weights={tmp_path / 'none.pth'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: weights file not found: {tmp_path / 'none.pth'}"
    empty = ("error: model.weights is empty: give the pretrained file this recipe starts from "
             "(model.weights=FILE), or model.weights=none to train from random init")
    assert spcl.main([*base, "model.weights=''"]) == 2
    assert capsys.readouterr().err.strip() == empty
    # SpCL's Market-1501 recipe expects ImageNet weights: without them it stops before reading anything
    market = ["--config", str(REPO / "launch" / "configs" / "spcl_resnet50_market.yaml"), f"output_dir={tmp_path}",
              f"data.train=[{tiny_pool / 'pool'}]", f"data.query={tiny_pool / 'query'}",
              f"data.gallery={tiny_pool / 'gallery'}"]
    assert spcl.main(market) == 2
    assert capsys.readouterr().err.strip() == empty and not (tmp_path / "spcl_resnet50_market").exists()
    assert spcl.main([*base, f"data.train=[{tmp_path / 'nowhere'}]"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert spcl.main([*base, f"data.query={tiny_pool / 'query'}"]) == 2
    assert "data.query and data.gallery go together" in capsys.readouterr().err
    assert spcl.main([*base, "--resume"]) == 2
    assert "no checkpoint under" in capsys.readouterr().err


def _torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                             str(REPO / "pretrain" / "spcl.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_pool: Path, tmp_path: Path) -> None:
    """2 ranks x (P=4, K=4) against 1 process x (P=8, K=4) with BatchNorm groups of 16: same updates.

    One step per epoch: Adam turns rounding noise in near-zero gradients into steps of about lr, and
    random-init features amplify them within a few steps (after 3 steps in each of 2 epochs the memories
    of the two runs differed by up to 0.3 for some seeds, with either sampler), while one step per epoch
    stays at rounding level."""
    deterministic = ["data.transform.flip=0", "data.transform.pad=0", "data.transform.random_erasing=0",
                     "iters_per_epoch=1"]
    proc = _torchrun(_overrides(tiny_pool, tmp_path, "two", *deterministic), tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    spcl.pretrain(_config(tiny_pool, tmp_path, "one", "data.p=8", "samples_per_bn=16", *deterministic))

    two = json.loads((tmp_path / "two" / "checkpoints" / "epoch-0002" / "trainer_state.json").read_text())
    assert two["world_size"] == 2 and two["replicas_identical"] is True
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    assert [r["clusters"] for r in two["history"]] == [r["clusters"] for r in one]
    m2 = load_file(str(tmp_path / "two" / "checkpoints" / "epoch-0002" / "memory.safetensors"))
    m1 = load_file(str(tmp_path / "one" / "checkpoints" / "epoch-0002" / "memory.safetensors"))
    assert torch.equal(m1["labels"], m2["labels"])
    assert (m1["features"] - m2["features"]).abs().max() <= 1e-3
    b2 = load_file(str(tmp_path / "two" / "backbone_final.safetensors"))
    b1 = load_file(str(tmp_path / "one" / "backbone_final.safetensors"))
    # BatchNorm running statistics differ by design (DDP broadcasts rank 0's); the weights do not
    weights = [k for k in b1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert max((b1[k] - b2[k]).abs().max().item() for k in weights) <= 1e-3


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Exact means bit-identical with one intra-op thread (floating-point reductions keep their order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)}/{len(ta)} tensors of {a.name} differ, first {differ[0]}"


@contextmanager
def _killed_after(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> Iterator[None]:
    """Within the block, the run dies right after writing the checkpoint of iteration ``step`` of 0-based ``epoch``."""
    real = spcl.SpCLTrainer._checkpoint

    def dies(self: spcl.SpCLTrainer, at: int = 0) -> None:
        real(self, at)
        if self.state["epoch"] == epoch and at == step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(spcl.SpCLTrainer, "_checkpoint", dies)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(spcl.SpCLTrainer, "_checkpoint", real)


def _assert_resumed_run_is_the_whole_run(run: Path, whole: Path, resumed: dict, reference: dict) -> None:
    def timeless(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in history]

    assert resumed["iteration"] == reference["iteration"]
    assert timeless(resumed["history"]) == timeless(reference["history"])  # clusters, losses, ARI: equal
    _assert_identical(whole / "backbone_final.safetensors", run / "backbone_final.safetensors")
    last = max(p.name for p in (whole / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    for name in ("memory.safetensors", "model.safetensors"):
        _assert_identical(whole / "checkpoints" / last / name, run / "checkpoints" / last / name)


def test_two_processes_resume_to_the_whole_run_with_one_set_of_batchnorm_statistics(
        tiny_pool: Path, tmp_path: Path) -> None:
    """2 ranks re-extracting before every clustering: rank 1's BatchNorm statistics (its own after the
    epoch's last forward) are replaced by rank 0's before extraction and checkpoints, so the run resumed
    from its epoch-1 checkpoint (which holds rank 0's) re-extracts the same memory and ends equal to
    the whole run, tensor for tensor."""
    args = ("cluster_features=reextract", "iters_per_epoch=2")
    proc = _torchrun(_overrides(tiny_pool, tmp_path, "whole", *args), tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    # the same run killed after its epoch-1 checkpoint: a copy of the directory as it then was
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "epoch-0002")
    (tmp_path / "killed" / "checkpoints" / "latest").write_text("epoch-0001")
    proc = _torchrun([*_overrides(tiny_pool, tmp_path, "killed", *args), "--resume"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    state = json.loads((tmp_path / "killed" / "checkpoints" / "epoch-0002" / "trainer_state.json").read_text())
    reference = json.loads((tmp_path / "whole" / "checkpoints" / "epoch-0002" / "trainer_state.json").read_text())
    assert state["replicas_identical"] is True and state["world_size"] == 2
    assert [r["outliers"] for r in state["history"]] == [r["outliers"] for r in reference["history"]]
    _assert_identical(tmp_path / "whole" / "backbone_final.safetensors", tmp_path / "killed" / "backbone_final.safetensors")
    for name in ("memory.safetensors", "model.safetensors"):
        _assert_identical(tmp_path / "whole" / "checkpoints" / "epoch-0002" / name,
                          tmp_path / "killed" / "checkpoints" / "epoch-0002" / name)


def test_a_run_killed_mid_epoch_resumes_from_its_iteration_checkpoint_bit_for_bit(
        tiny_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """checkpoint_every_iters with 2 DataLoader workers: a kill after iteration 2 of epoch 2 loses nothing;
    the resumed run keeps that epoch's labels, skips the batches it trained on, draws the same
    augmentations for the rest and continues the memory's incremental cluster sums, so it ends with
    every tensor equal to the whole run's."""
    extra = ("checkpoint_every_iters=2", "iters_per_epoch=4", "data.workers=2")
    whole = spcl.pretrain(_config(tiny_pool, tmp_path, "whole", *extra))
    with _killed_after(monkeypatch, 1, 2):
        spcl.pretrain(_config(tiny_pool, tmp_path, "killed", *extra))
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "epoch-0001-step-0000002"
    resumed = spcl.pretrain(_config(tiny_pool, tmp_path, "killed", *extra), resume=True)
    assert resumed["iteration"] == 8
    _assert_resumed_run_is_the_whole_run(tmp_path / "killed", tmp_path / "whole", resumed, whole)


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return values


@pytest.mark.parametrize("sampler", ["pk", "multiple_gallery"])
def test_fewer_pseudo_classes_than_p_keep_training_and_resume_alike(
        tiny_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        one_thread: None, sampler: str) -> None:
    """A 64-image pool whose clustering (outliers dropped) leaves 6, then 2 classes for P=16: both epochs
    train (pk: classes drawn with replacement; multiple_gallery: repeated passes), say so in a line and
    in TensorBoard, and a run killed mid-epoch 2 resumes through the same path to the same tensors."""
    extra = ("data.max_images=64", "cluster.drop_outliers=true", "data.p=16", f"data.sampler={sampler}",
             "checkpoint_every_iters=2", "iters_per_epoch=3", "seed=1")  # seed 1: the clusterings counted below
    whole = spcl.pretrain(_config(tiny_pool, tmp_path, "whole", *extra))
    assert [(r["clusters"], r["outliers"] > 0) for r in whole["history"]] == [(6, False), (2, True)]
    out = capsys.readouterr().out
    how = "draws its classes with replacement" if sampler == "pk" else "cycles passes over them"
    for epoch, classes in ((1, 6), (2, 2)):
        assert f"epoch {epoch}: {classes} pseudo-classes, fewer than p x processes = 16: each batch {how}" in out
    assert _scalars(tmp_path / "whole", "cluster/below_p") == [(0, 1.0), (3, 1.0)]
    assert _scalars(tmp_path / "whole", "cluster/pseudo_classes") == [(0, 6.0), (3, 2.0)]
    with _killed_after(monkeypatch, 1, 2):
        spcl.pretrain(_config(tiny_pool, tmp_path, "killed", *extra))
    resumed = spcl.pretrain(_config(tiny_pool, tmp_path, "killed", *extra), resume=True)
    assert "epoch 2: 2 pseudo-classes, fewer than p x processes = 16" in capsys.readouterr().out
    _assert_resumed_run_is_the_whole_run(tmp_path / "killed", tmp_path / "whole", resumed, whole)


def test_a_clustering_without_any_class_trains_on_instance_classes(
        tiny_pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """min_samples above the pool size: every image is noise, and dropped; the epochs still train."""
    state = spcl.pretrain(_config(tiny_pool, tmp_path, "none", "data.max_images=64", "cluster.drop_outliers=true",
                                  "cluster.min_samples=70", "cluster.self_paced=false"))
    assert [(r["clusters"], r["outliers"]) for r in state["history"]] == [(0, 64), (0, 64)]
    assert all(r["loss"] > 0 for r in state["history"])
    out = capsys.readouterr().out
    for epoch in (1, 2):
        assert f"epoch {epoch}: no cluster and outliers dropped: every image is its own class this epoch" in out


def test_a_dying_rank_stops_the_other_instead_of_hanging(tiny_pool: Path, tmp_path: Path) -> None:
    proc = _torchrun(_overrides(tiny_pool, tmp_path, "dies", "epochs=50", "iters_per_epoch=20"), tmp_path)
    deadline = time.monotonic() + 300
    ranks: list[psutil.Process] = []
    while time.monotonic() < deadline and not (tmp_path / "dies" / "config.yaml").is_file():
        time.sleep(0.5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spcl.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2 and proc.poll() is None
    os.kill(ranks[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


@pytest.mark.slow
def test_spcl_from_random_init_raises_clustering_ari(tmp_path: Path) -> None:
    """The tiny recipe on 1,000 pool images of 100 hidden identities: clustering gets closer to the truth."""
    cfg = SyntheticConfig(pool_images=1000, pool_images_per_id=10)
    write_split(build_sources(cfg)["synthetic_lup"]["pool"], tmp_path / "pool", "pool", relabel=False,
                options=WriteOptions(progress=False))
    state = spcl.pretrain(load_config(SpCLConfig, REPO / "launch" / "configs" / "spcl_tiny.yaml", [
        f"output_dir={tmp_path}", f"data.train=[{tmp_path / 'pool'}]", "data.query=''", "data.gallery=''"]))
    ari = [row["ARI"] for row in state["history"]]
    assert len(ari) == 10 and np.mean(ari[-3:]) > ari[0] + 0.02, ari


@pytest.mark.parametrize("sampler", ["multiple_gallery", "pk"])
def test_global_batches_are_shared_by_the_ranks_and_resume_mid_epoch(sampler: str) -> None:
    """Rank r's batches are slice r of the one-process batches of P x world; a resumed epoch continues
    them; passes cycle with fresh draws while the epoch lasts."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.repeat(np.arange(30), 5), np.arange(30, 130), [-1] * 10])[rng.permutation(260)]
    camids = rng.integers(0, 6, len(labels))

    def batches(rank: int, world: int, start: int = 0, epoch: int = 2) -> list[list[int]]:
        return list(spcl.PseudoIdentityBatches(labels, camids, 8 // world, 4, 40, 7, epoch, rank, world, start,
                                               sampler))

    one = batches(0, 1)
    assert len(one) == 40 and all(len(b) == 32 for b in one) and all(labels[b].min() >= 0 for b in one)
    two = [batches(r, 2) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one
    assert batches(1, 2, start=13) == two[1][13:]
    assert batches(0, 1, epoch=3) != one
    per_pass = len(spcl.SAMPLERS[sampler](labels, camids, p=8, k=4, seed=7).global_batches(2 << 16))
    assert per_pass < 40 and one[per_pass] != one[0]  # the epoch outlasts one pass: the next pass is new


def test_shipped_recipes_declare_their_start_and_spcl_schedule() -> None:
    """Every SpCL recipe says how it starts: a required pretrained file ("") or random init ("none"),
    and a random-init recipe calibrates BatchNorm; the Market-1501 recipe keeps SpCL's Adam and StepLR,
    whose per-epoch rate the per-iteration schedule gives at every iteration of the epoch."""
    recipes = {p.stem: load_config(SpCLConfig, p) for p in sorted((REPO / "launch" / "configs").glob("spcl_*.yaml"))}
    assert {name: cfg.model.weights for name, cfg in recipes.items()} == {
        "spcl_dm_osnet_lup": "none", "spcl_dm_osnet_synthetic": "none", "spcl_resnet50_market": "", "spcl_tiny": "none"}
    assert all(cfg.bn_calibration_batches > 0 for cfg in recipes.values() if cfg.model.weights == "none")
    assert all(cfg.data.sampler == "multiple_gallery" for cfg in recipes.values())
    market = recipes["spcl_resnet50_market"]
    encoder = torch.nn.Linear(2, 2)
    adam = build_optimizer(encoder, market.optim)
    assert type(adam) is torch.optim.Adam and [g["weight_decay"] for g in adam.param_groups] == [5e-4]
    step = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=market.optim.lr)
    spcl_sched = torch.optim.lr_scheduler.StepLR(step, step_size=20, gamma=0.1)  # spcl_train_usl.py, per epoch
    ours = build_scheduler(adam, market.optim, market.iters_per_epoch, market.epochs)
    lrs = []
    for _ in range(market.epochs):
        for _ in range(market.iters_per_epoch):
            lrs.append((spcl_sched.get_last_lr()[0], ours.get_last_lr()[0]))
            adam.step()
            ours.step()
        step.step()
        spcl_sched.step()
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in lrs) and market.epochs == 50
    assert lrs[40 * 400 - 1][1] == pytest.approx(3.5e-5) and lrs[40 * 400][1] == pytest.approx(3.5e-6)


def test_the_optimiser_is_the_one_the_config_names(tiny_pool: Path, tmp_path: Path) -> None:
    """optim.* is the fine-tuning stage's block: SpCL builds the optimiser, decay groups, rate and clipping it
    names (gradients clipped to 1e-6 leave the weights where they started)."""
    trainer = spcl.SpCLTrainer(_config(tiny_pool, tmp_path, "sgd", "optim.name=sgd", "optim.lr=0.01",
                                       "optim.momentum=0.5", "optim.weight_decay=0", "optim.bias_decay=false",
                                       "optim.clip_grad_norm=1e-6"))
    sgd = trainer.optimizer.optimizer
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.5
    assert [(g["lr"], g["weight_decay"]) for g in sgd.param_groups] == [(0.01, 0.0), (0.01, 0.0)]
    before = [p.detach().clone() for g in sgd.param_groups for p in g["params"]]
    assert trainer.fit()["iteration"] == 6
    after = [p.detach() for g in sgd.param_groups for p in g["params"]]
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) < 1e-6
    assert [v for _, v in _scalars(tmp_path / "sgd", "train/lr")] == pytest.approx([0.01] * 6)


def test_batchnorm_calibration_spreads_random_init_features(tiny_pool: Path, tmp_path: Path) -> None:
    def mean_cosine(*extra: str) -> float:
        memory = spcl.SpCLTrainer(_config(tiny_pool, tmp_path, f"cal{len(extra)}", *extra)).memory.features.float()
        sim = torch.nn.functional.normalize(memory, dim=1) @ torch.nn.functional.normalize(memory, dim=1).T
        return float((sim.sum() - sim.trace()) / (len(sim) * (len(sim) - 1)))

    assert mean_cosine() > 0.9  # random init, (0, 1) running statistics: every image looks alike
    assert mean_cosine("bn_calibration_batches=2") < 0.2
