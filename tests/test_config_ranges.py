"""Config values that would lose work are refused at start, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import main as spcl_main
from reidforge.shared.config import ConfigError, load_config

FINETUNE = "launch/configs/dm_osnet_tiny.yaml"
SPCL = "launch/configs/spcl_tiny.yaml"


def _refused(main, recipe: str, out: Path, override: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--config", recipe, f"output_dir={out}", "run_name=r", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert not (out / "r").exists()  # refused before the run directory was made
    return err


@pytest.mark.parametrize("override, message", [
    ("eval_every=0", "config key 'eval_every': must be >= 1, got 0"),
    ("checkpoint_every=0", "config key 'checkpoint_every': must be >= 1, got 0"),
    ("epochs=-1", "config key 'epochs': must be >= 0, got -1"),
    ("log_every=0", "config key 'log_every': must be >= 1, got 0"),
    ("keep_checkpoints=0", "config key 'keep_checkpoints': must be >= 1, got 0"),
    ("data.p=0", "config key 'data.p': must be >= 1, got 0"),
    ("data.k=0", "config key 'data.k': must be >= 1, got 0"),
    ("optim.lr=0", "config key 'optim.lr': must be > 0, got 0.0"),
    ("data.workers=-1", "config key 'data.workers': must be >= 0, got -1"),
    ("data.max_bad_fraction=1.5", "config key 'data.max_bad_fraction': must be <= 1, got 1.5"),
    ("data.transform.flip=2", "config key 'data.transform.flip': must be <= 1, got 2.0"),
    ("iters_per_epoch=-1", "config key 'iters_per_epoch': must be >= 0, got -1"),
])
def test_finetune_refuses_values_that_lose_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               override: str, message: str) -> None:
    assert _refused(train_main, FINETUNE, tmp_path, override, capsys) == f"error: {message}"


@pytest.mark.parametrize("override, message", [
    ("iters_per_epoch=0", "config key 'iters_per_epoch': must be >= 1, got 0"),
    ("checkpoint_every_iters=-1", "config key 'checkpoint_every_iters': must be >= 0, got -1"),
    ("optim.lr=-0.1", "config key 'optim.lr': must be > 0, got -0.1"),
    ("memory.momentum=1.5", "config key 'memory.momentum': must be <= 1, got 1.5"),
    ("memory.temperature=0", "config key 'memory.temperature': must be > 0, got 0.0"),
    ("cluster.eps=0", "config key 'cluster.eps': must be > 0, got 0.0"),
    ("data.cfs_keep=0", "config key 'data.cfs_keep': must be > 0, got 0.0"),
])
def test_spcl_refuses_values_that_lose_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           override: str, message: str) -> None:
    assert _refused(spcl_main, SPCL, tmp_path, override, capsys) == f"error: {message}"


def _data(shards: Path) -> list[str]:
    split = shards / "synthetic_person"
    return [f"data.train=[{split / 'train'}]", f"data.query={split / 'query'}", f"data.gallery={split / 'gallery'}"]


def test_a_triplet_loss_needs_two_images_per_identity(tiny_shards: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", FINETUNE, f"output_dir={tmp_path}", *_data(tiny_shards), "data.p=4"]
    assert train_main([*argv, "data.k=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: data.k=1: dm_osnet's triplet loss needs k >= 2 images per identity (an anchor without a " \
                  "positive gives a zero loss)"


def test_p_beyond_the_identities_of_the_data_is_one_line(tiny_shards: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", FINETUNE, f"output_dir={tmp_path}", *_data(tiny_shards), "data.p=9"]) == 2
    assert capsys.readouterr().err.strip() == ("error: data.p=9: the training data holds 8 identities, and a P x K "
                                               "batch needs p distinct ones (p <= 8)")


def test_an_unknown_model_option_names_the_valid_ones(tiny_shards: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", FINETUNE, f"output_dir={tmp_path}", *_data(tiny_shards), "data.p=4",
                       "model.options={colour: red}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'dm_osnet': got an unexpected keyword argument 'colour'; its options: ")


def test_bad_yaml_is_one_line_naming_the_place(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: 3\n  eval_every: [\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:2:13: not valid YAML \(mapping values are not allowed"):
        load_config(TrainConfig, broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="a config file is a mapping of keys to values, this holds a list"):
        load_config(TrainConfig, listed)


def test_a_single_path_where_a_list_is_expected_is_that_list() -> None:
    assert load_config(TrainConfig, None, ["data.train=/data/train"]).data.train == ["/data/train"]
    assert load_config(TrainConfig, None, ["data.train=[/a,/b]"]).data.train == ["/a", "/b"]
