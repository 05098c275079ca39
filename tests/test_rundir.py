"""Run directories: a second run never silently replaces the first; --overwrite replaces it on purpose;
--resume refuses a changed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from reidforge.data.shards import WriteOptions, write_split
from reidforge.data.synthetic import SyntheticConfig, build_sources
from reidforge.finetune import engine
from reidforge.finetune.engine import TrainConfig
from reidforge.pretrain import spcl
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.shared.config import ConfigError, load_config, save_config
from reidforge.shared.rundir import claim_run_dir


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    cfg = SyntheticConfig(train_ids=8, images_per_train_id=4, test_ids=4, images_per_test_id=4, distractors=2)
    for split, source in build_sources(cfg)["synthetic_person"].items():
        write_split(source, root / split, split, relabel=split == "train", options=WriteOptions(progress=False))
    return root


def _finetune(shards: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "run_name=clob", f"output_dir={out}", "model.name=osnet", "model.options={variant: osnet_x0_25}",
        f"data.train=[{shards / 'train'}]", f"data.query={shards / 'query'}", f"data.gallery={shards / 'gallery'}",
        "data.p=4", "data.k=2", "data.workers=0", "data.transform.height=32", "data.transform.width=16",
        "epochs=1", "iters_per_epoch=1", "optim.warmup_epochs=0", "keep_checkpoints=1", *extra])


def test_a_second_run_refuses_overwrite_replaces_resume_checks_the_config(
        shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine.train(_finetune(shards, tmp_path))
    run = tmp_path / "clob"
    first = (run / "model_final.safetensors").read_bytes()
    with pytest.raises(ConfigError) as err:
        engine.train(_finetune(shards, tmp_path, "optim.lr=0.5"))
    assert str(err.value) == (f"{run} holds another run (checkpoints, config.yaml, metrics.json, "
                              "model_final.safetensors): pass --resume to continue it or --overwrite to replace it")
    assert (run / "model_final.safetensors").read_bytes() == first  # untouched
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch")] == ["epoch-0001"]

    # --resume with a changed value names it; the allowed keys may change
    with pytest.raises(ConfigError, match=r"--resume: the config differs from the run's .*config\.yaml in "
                                          r"data\.p, optim\.lr; only checkpoint_every"):
        engine.train(_finetune(shards, tmp_path, "optim.lr=0.5", "data.p=2"), resume=True)
    state = engine.train(_finetune(shards, tmp_path, "epochs=2", "eval_every=2", "log_every=5"), resume=True)
    assert state["epoch"] == 2
    assert (run / "checkpoints" / "latest").read_text() == "epoch-0002"

    capsys.readouterr()
    state = engine.train(_finetune(shards, tmp_path, "optim.lr=0.5"), overwrite=True)
    out = capsys.readouterr().out
    assert (f"--overwrite: deleted the previous run's checkpoints, config.yaml, metrics.json, "
            f"model_final.safetensors, tensorboard in {run}") in out
    assert state["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "latest"]
    assert "lr: 0.5" in (run / "config.yaml").read_text()


def test_spcl_refuses_an_occupied_directory_before_reading_the_pool(shards: Path, tmp_path: Path) -> None:
    cfg = load_config(SpCLConfig, None, [f"output_dir={tmp_path}", "run_name=s", "model.weights=none",
                                         f"data.train=[{shards / 'train'}]"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "backbone_final.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds another run \(backbone_final\.safetensors\)"):
        spcl.SpCLTrainer(cfg)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint under"):
        spcl.SpCLTrainer(cfg, resume=True)


def test_claim_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(TrainConfig)
    run = tmp_path / "run"
    claim_run_dir(run, cfg, False, False, True)  # nothing there yet
    run.mkdir()
    (run / "weights_report.json").write_text("{}")  # a run killed while loading weights has made nothing of its own
    claim_run_dir(run, cfg, False, False, True)
    save_config(cfg, run / "config.yaml")
    with pytest.raises(ConfigError, match="--resume and --overwrite contradict each other"):
        claim_run_dir(run, cfg, True, True, True)
    claim_run_dir(run, cfg, False, True, False)  # a non-main rank deletes nothing
    assert (run / "config.yaml").is_file()
    claim_run_dir(run, cfg, False, True, True)
    assert sorted(p.name for p in run.iterdir()) == []
    expected = f"--overwrite: deleted the previous run's config.yaml, weights_report.json in {run}\n"
    assert capsys.readouterr().out == expected

    save_config(cfg, run / "config.yaml")
    changed = load_config(TrainConfig, None, ["epochs=7", "data.workers=0", "keep_checkpoints=5",
                                              "checkpoint_every=3", "run_name=elsewhere"])
    claim_run_dir(run, changed, True, False, True)  # resume-safe keys only
    changed.data.transform.height = 128
    with pytest.raises(ConfigError, match=r"in data\.transform\.height; only"):
        claim_run_dir(run, changed, True, False, True)
