"""Every recipe in launch/configs/ is a valid TrainConfig naming a registered model, and each paper
recipe has a tiny CPU variant with the same model and optimiser."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.models import MODELS
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.shared.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
# paper recipe -> its tiny CPU variant
PAPER = {"bot_market": "bot_tiny", "dm_osnet_market": "dm_osnet_tiny", "dm_osnet_market_sbs": "dm_osnet_tiny",
         "fnc_cityflow": "fnc_tiny", "lka_reid_veri": "lka_reid_tiny", "mbr_4b_veri": "mbr_4b_tiny",
         "seresnext50_veri": "seresnext50_tiny"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_and_its_tiny_variant(name: str) -> None:
    full = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    tiny = load_config(TrainConfig, CONFIGS / f"{PAPER[name]}.yaml")
    assert full.model.name in MODELS and tiny.model.name == full.model.name
    assert tiny.optim.name == full.optim.name
    assert all(path.startswith("runs/demo/shards/synthetic_") for path in [*tiny.data.train, tiny.data.query])
    assert tiny.iters_per_epoch > 0 and tiny.epochs <= 3


def test_recipe_specifics_from_the_papers() -> None:
    fnc = load_config(TrainConfig, CONFIGS / "fnc_cityflow.yaml")
    assert (fnc.rerank, fnc.rerank_k1, fnc.rerank_k2, fnc.rerank_lambda) == (True, 75, 10, 0.1)
    assert (fnc.data.transform.height, fnc.data.transform.width, fnc.optim.name) == (384, 288, "ranger")
    lka = load_config(TrainConfig, CONFIGS / "lka_reid_veri.yaml")
    assert (lka.data.p, lka.data.k, lka.model.options["n_cams"], lka.model.options["n_views"]) == (6, 8, 20, 8)
    bot = load_config(TrainConfig, CONFIGS / "bot_market.yaml")
    assert (bot.optim.milestones, bot.optim.lr, bot.data.p * bot.data.k) == ([40, 70], 3.5e-4, 64)


def _schema(path: Path) -> type:
    if path.name == "synthetic.yaml":
        from reidforge.data.synthetic import SyntheticConfig

        return SyntheticConfig
    if path.name == "demo.yaml":
        spec = importlib.util.spec_from_file_location("demo", CONFIGS.parents[0] / "demo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
        spec.loader.exec_module(module)
        return module.DemoConfig
    return SpCLConfig if path.name.startswith("spcl_") else TrainConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_with_its_schema(path: Path) -> None:
    load_config(_schema(path), path)
