"""Both stages speak one vocabulary: the shared blocks' keys are the same in both schemas, keys of earlier
versions are refused with their new names, and ``iters_per_epoch`` means the same in both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reidforge.data.config import DataConfig
from reidforge.finetune import engine
from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.pretrain.spcl import main as spcl_main
from reidforge.shared.config import ConfigError, describe_fields, load_config, save_config
from reidforge.shared.optim import OptimConfig
from reidforge.shared.run_config import ModelConfig, RunConfig
from reidforge.shared.rundir import claim_run_dir

ROOT = Path(__file__).resolve().parents[1]


def _keys(schema: type, prefix: str = "") -> set[str]:
    return {row.split("=", 1)[0] for row, _ in describe_fields(schema, prefix)}


SHARED = (_keys(RunConfig) | _keys(ModelConfig, "model.") | _keys(DataConfig, "data.")
          | _keys(OptimConfig, "optim."))


def test_the_stages_share_exactly_the_shared_blocks_keys() -> None:
    assert _keys(TrainConfig) & _keys(SpCLConfig) == SHARED
    assert {"iters_per_epoch", "seed", "model.name", "model.weights", "data.train", "data.sampler", "optim.lr",
            "optim.name", "optim.milestones", "dist_timeout_minutes"} <= SHARED
    assert TrainConfig().seed == SpCLConfig().seed == 0


def test_help_describes_inherited_keys_and_shows_each_stages_defaults() -> None:
    finetune, spcl = dict(describe_fields(TrainConfig)), dict(describe_fields(SpCLConfig))
    assert finetune["seed=0 (int)"] == spcl["seed=0 (int)"] == ("seeds the initialisation, the sampler and every "
                                                                "image's augmentation")
    assert finetune["iters_per_epoch=0 (int)"].startswith("Iterations an epoch trains: 0 = one pass over the "
                                                          "sampler's batches; > 0 = exactly that many")
    assert spcl["iters_per_epoch=400 (int)"].startswith("Iterations an epoch trains (SpCL's --iters 400)")
    assert spcl["optim.milestones=[20, 40] (list[int])"] == finetune["optim.milestones=[40, 70] (list[int])"]
    assert spcl["optim.warmup_epochs=0.0 (float)"] == "linear warm-up length; 0 = none; >= 0"
    assert "model.name='bot_resnet50' (str)" in finetune and "model.pooling='avg' (str)" in spcl
    assert spcl["data.workers=2 (int)"] == finetune["data.workers=2 (int)"] == "DataLoader worker processes; >= 0"


@pytest.mark.parametrize("schema, override, new", [
    (SpCLConfig, "encoder.backbone=resnet18", "model.name"),
    (SpCLConfig, "encoder.weights=none", "model.weights"),
    (SpCLConfig, "encoder.options.last_stride=1", "model.options.last_stride"),
    (SpCLConfig, "data.splits=[/pool]", "data.train"),
    (SpCLConfig, "lr=0.1", "optim.lr"),
    (SpCLConfig, "milestones=[10]", "optim.milestones"),
    (SpCLConfig, "sampler=pk", "data.sampler"),
    (TrainConfig, "max_iters_per_epoch=2", "iters_per_epoch"),
])
def test_a_renamed_key_names_its_new_name(schema: type, override: str, new: str) -> None:
    old = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(schema, None, [override])
    assert str(e.value) == f"override '{override}': config key '{old}' was renamed to '{new}'"


def test_an_old_recipe_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old_spcl.yaml"
    old.write_text("epochs: 2\nlr: 1.0e-3\nencoder:\n  backbone: resnet18\n  weights: none\n")
    with pytest.raises(ConfigError, match=rf"^{old}: config key 'lr' was renamed to 'optim.lr'$"):
        load_config(SpCLConfig, old)
    assert spcl_main(["--config", str(old), f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"error: {old}: config key 'lr' was renamed to 'optim.lr'\n"
    finetune = tmp_path / "old_finetune.yaml"
    finetune.write_text("max_iters_per_epoch: 10\n")
    assert train_main(["--config", str(finetune), f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {finetune}: config key 'max_iters_per_epoch' was renamed "
                                               "to 'iters_per_epoch'")


def test_the_rename_table_leaves_a_schema_that_has_the_key_alone() -> None:
    @dataclass
    class Plain:
        lr: float = 0.1

    assert load_config(Plain, None, ["lr=0.2"]).lr == 0.2


def test_resuming_a_run_saved_under_old_names_names_the_rename(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    old = OmegaConf.to_container(OmegaConf.structured(SpCLConfig()))
    model = old.pop("model")
    old["encoder"] = {"backbone": model.pop("name"), **model}  # the block as runs before the rename saved it
    OmegaConf.save(OmegaConf.create(old), run / "config.yaml")
    with pytest.raises(ConfigError) as e:
        claim_run_dir(run, SpCLConfig(), True, False, True)
    assert str(e.value) == f"--resume: {run / 'config.yaml'}: config key 'encoder.backbone' was renamed to 'model.name'"
    save_config(SpCLConfig(), run / "config.yaml")
    claim_run_dir(run, SpCLConfig(), True, False, True)  # the same config under today's names resumes


def test_iters_per_epoch_is_the_epochs_length_beyond_one_pass(tiny_shards: Path, tmp_path: Path) -> None:
    person = tiny_shards / "synthetic_person"
    base = [f"output_dir={tmp_path}", "model.name=osnet", "model.options={variant: osnet_x0_25}",
            f"data.train=[{person / 'train'}]", f"data.query={person / 'query'}", f"data.gallery={person / 'gallery'}",
            "data.p=4", "data.k=2", "data.workers=0", "data.transform.height=32", "data.transform.width=16",
            "epochs=2", "optim.warmup_epochs=1"]
    one_pass = engine.Trainer(load_config(TrainConfig, None, [*base, "run_name=a"]))
    passes = len(one_pass.sampler)
    assert one_pass.iters_per_epoch == passes >= 2
    longer = engine.Trainer(load_config(TrainConfig, None, [*base, "run_name=b", f"iters_per_epoch={passes + 3}"]))
    assert longer.iters_per_epoch == len(list(longer.loader)) == passes + 3
    warmup = longer.scheduler.lr_lambdas[0]  # optim.warmup_epochs=1 spans the longer epoch
    assert warmup(passes) == pytest.approx(0.01 + 0.99 * passes / (passes + 3)) and warmup(passes + 3) == 1.0
    shorter = engine.Trainer(load_config(TrainConfig, None, [*base, "run_name=c", f"iters_per_epoch={passes - 1}"]))
    assert shorter.iters_per_epoch == len(list(shorter.loader)) == passes - 1


@pytest.mark.parametrize("flag", ["--flip-test", "--flip"])
def test_evaluate_names_flipping_as_the_config_does(flag: str) -> None:
    from reidforge.finetune.evaluate import _parser

    args = ["--weights", "w.safetensors", "--query", "q", "--gallery", "g"]
    assert _parser().parse_args([*args, flag]).flip and not _parser().parse_args(args).flip
