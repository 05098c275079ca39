"""Typed configs: YAML + key=value overrides, and one-line errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reidforge.shared.config import ConfigError, choice, load_config, save_config


@dataclass
class Optim:
    name: str = choice("adam", "sgd", "adamw")
    lr: float = 3.5e-4
    milestones: list[int] = field(default_factory=lambda: [40, 70])


@dataclass
class Recipe:
    epochs: int = 120
    run_name: str = "demo"
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path: Path) -> None:
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text("epochs: 30\noptim:\n  name: sgd\n  lr: 0.01\n")
    cfg = load_config(Recipe, yaml, ["optim.lr=0.1", "optim.milestones=[10,20]"])
    assert isinstance(cfg, Recipe) and isinstance(cfg.optim, Optim)
    assert (cfg.epochs, cfg.run_name, cfg.optim.name, cfg.optim.lr, cfg.optim.milestones) == (30, "demo", "sgd", 0.1, [10, 20])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Recipe, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epoch=3"], "override 'epoch=3': unknown config key 'epoch'; valid keys here: epochs, optim, run_name"),
        (["optim.momentum=0.9"], "unknown config key 'optim.momentum'; valid keys here: lr, milestones, name"),
        (["epochs=many"], "override 'epochs=many': config key 'epochs': Value 'many' of type 'str' could not be converted to Integer"),
        (["optim.name=lamb"], "config key 'optim.name': invalid value 'lamb'; valid choices: adam, sgd, adamw"),
        (["epochs"], "override 'epochs' is not of the form key=value"),
        # the override at fault is named, not the last one given
        (["epoch=3", "epochs=4", "optim.lr=0.1"], "override 'epoch=3': unknown config key 'epoch'"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_yaml_mistakes_name_the_file(tmp_path: Path) -> None:
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("optim:\n  betas: [0.9, 0.99]\n")
    with pytest.raises(ConfigError, match=rf"^{yaml}: unknown config key 'optim.betas'"):
        load_config(Recipe, yaml)
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config(Recipe, "nowhere.yaml")


def test_an_earlier_versions_saved_config_translates_its_renamed_keys(tmp_path: Path) -> None:
    from reidforge.shared.config import translate_renamed
    from reidforge.pretrain.spcl import SpCLConfig

    old = {"encoder": {"backbone": "resnet18", "pooling": "gem"}, "lr": 1e-3, "data": {"splits": ["a"]}}
    assert translate_renamed(SpCLConfig, old) == {"model": {"name": "resnet18", "pooling": "gem"},
                                                  "optim": {"lr": 1e-3}, "data": {"train": ["a"]}}
    yaml = tmp_path / "config.yaml"
    yaml.write_text("encoder:\n  backbone: resnet18\nlr: 0.001\n")
    with pytest.raises(ConfigError, match="'encoder.backbone' was renamed to 'model.name'"):
        load_config(SpCLConfig, yaml)  # a recipe is told, a saved run is read
    cfg = load_config(SpCLConfig, yaml, translate=True)
    assert (cfg.model.name, cfg.optim.lr) == ("resnet18", 1e-3)
