"""Exact resume of fine-tuning with DataLoader workers: augmentations are a function of the draw, not the worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import killed_in_epoch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import reidforge.finetune.engine as engine
from reidforge.data.draws import SeededBatches, SeededDraws, draw_seeds
from reidforge.data.readers import IndexedShards, collate
from reidforge.data.samplers import PKSampler
from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.data.transforms import TransformConfig, build_transforms
from reidforge.finetune.engine import TrainConfig
from reidforge.shared.config import load_config


@pytest.fixture(scope="module")
def tiny_person(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    cfg = SyntheticConfig(train_ids=12, images_per_train_id=6, test_ids=4, images_per_test_id=4, distractors=2)
    for split, source in build_sources(cfg)["synthetic_person"].items():
        write_split(source, root / split, split, relabel=split == "train", options=WriteOptions(progress=False))
    return root


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Exact means bit-identical with one intra-op thread (floating-point reductions keep their order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(shards: Path, out: Path, name: str, workers: int) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"run_name={name}", f"output_dir={out}", "model.name=osnet", "model.options={variant: osnet_x0_25}",
        f"data.train=[{shards / 'train'}]", f"data.query={shards / 'query'}", f"data.gallery={shards / 'gallery'}",
        "data.p=4", "data.k=4", f"data.workers={workers}", "data.transform.height=64", "data.transform.width=32",
        "data.transform.random_erasing=0.5", "epochs=2", "eval_every=2", "optim.warmup_epochs=1",
        "optim.lr=0.003", "log_every=1"])


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)}/{len(ta)} tensors differ, first {differ[0]}"


def test_workers_resume_bit_identically_and_match_no_workers(tiny_person: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine.train(_config(tiny_person, tmp_path, "whole", workers=2))
    with killed_in_epoch(monkeypatch, engine.Trainer, 1):
        engine.train(_config(tiny_person, tmp_path, "killed", workers=2))
    state = engine.train(_config(tiny_person, tmp_path, "killed", workers=2), resume=True)
    assert state["epoch"] == 2
    _assert_identical(tmp_path / "whole" / "model_final.safetensors", tmp_path / "killed" / "model_final.safetensors")
    engine.train(_config(tiny_person, tmp_path, "main", workers=0))
    _assert_identical(tmp_path / "whole" / "model_final.safetensors", tmp_path / "main" / "model_final.safetensors")


def test_a_drawn_sample_is_augmented_alike_by_any_worker_and_leaves_the_main_rng(tiny_person: Path) -> None:
    tf = build_transforms(TransformConfig(height=64, width=32, random_erasing=0.5), train=True)
    dataset = IndexedShards(tiny_person / "train", tf)
    sampler = PKSampler(dataset.pids, dataset.camids, p=4, k=4, seed=3)

    def images(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(SeededDraws(dataset), batch_sampler=SeededBatches(sampler, 3), num_workers=workers,
                            collate_fn=collate, generator=torch.Generator())  # its own: leaves the global RNG
        sampler.set_epoch(1)
        return [b["image"] for b in loader]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    main = images(0)
    assert torch.equal(torch.get_rng_state(), before)  # augmenting in the main process draws nothing from it
    assert all(torch.equal(a, b) for a, b in zip(main, images(2), strict=True))
    # a resumed epoch that skips its first batch draws the same augmentations for the batches it trains on
    sampler.load_state_dict({"epoch": 1, "consumed": 1})
    skipped = [b["image"] for b in DataLoader(SeededDraws(dataset), batch_sampler=SeededBatches(sampler, 3),
                                              num_workers=2, collate_fn=collate)]
    assert all(torch.equal(a, b) for a, b in zip(main[1:], skipped, strict=True))
    assert draw_seeds(3, (1, 0), 4) != draw_seeds(3, (1, 1), 4) and len(set(draw_seeds(3, (1, 0), 64))) == 64
