"""The training commands explain themselves: every config key in --help, the resolved config on request."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.train import main as train_main
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.pretrain.spcl import main as spcl_main
from reidforge.shared.config import describe_fields, load_config


def _leaves(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            keys += _leaves(f.type, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("main, schema", [(train_main, TrainConfig), (spcl_main, SpCLConfig)])
def test_help_lists_every_key_with_its_default(main, schema: type, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    listed = [line.strip().split("=")[0] for line in text.split("config keys")[1].splitlines()[1:]
              if line.startswith("  ") and not line.startswith("      ")]
    assert listed == _leaves(schema)
    assert "\n  data.p=16 (int)\n" in text


def test_descriptions_come_from_the_schema() -> None:
    rows = dict(describe_fields(TrainConfig))
    assert rows["optim.name='adam' (str)"] == ("optimiser of every trainable parameter; "
                                               "one of adam, adamw, sgd, rmsprop, ranger")
    assert rows["data.transform.flip=0.5 (float)"] == "probability of a horizontal flip; >= 0, <= 1"
    # a comment block above a field describes it
    assert rows["freeze_backbone_iters=0 (int)"].startswith("Trunk frozen for the first iterations (FastReID")
    assert rows["optim.lr=0.00035 (float)"].endswith("; > 0")


def test_print_config_is_the_resolved_config_and_runs_nothing(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = "launch/configs/dm_osnet_tiny.yaml"
    argv = ["--config", recipe, f"output_dir={tmp_path}", "epochs=3", "data.train=/x/train"]
    assert train_main(["--print-config", *argv]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == OmegaConf.to_container(OmegaConf.structured(load_config(TrainConfig, recipe, argv[2:])))
    assert printed["epochs"] == 3 and printed["data"]["train"] == ["/x/train"]
    assert list(tmp_path.iterdir()) == []


def test_the_run_directory_keeps_a_plain_log_of_the_command(tiny_shards, tmp_path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    person = tiny_shards / "synthetic_person"
    argv = ["--config", "launch/configs/dm_osnet_tiny.yaml", f"output_dir={tmp_path}", "run_name=r", "epochs=0",
            f"data.train={person / 'train'}", f"data.query={person / 'query'}", f"data.gallery={person / 'gallery'}",
            "data.p=4", "data.workers=0"]
    assert train_main(argv) == 0
    shown = capsys.readouterr()
    log = (tmp_path / "r" / "log.txt").read_text()
    assert log.startswith("=== ") and "\r" not in log and "\x1b" not in log
    lines = log.splitlines()
    assert lines[1] == "config:" and "epochs: 0" in lines  # what was printed before the directory was known
    assert all(line.rstrip() in log for line in shown.out.splitlines() if line.strip() and "\r" not in line)
    # a refused second start writes nothing there; --overwrite starts a new log
    assert train_main(argv) == 2
    assert (tmp_path / "r" / "log.txt").read_text() == log
    assert train_main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "r" / "log.txt").read_text().count("=== ") == 1
