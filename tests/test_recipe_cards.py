"""Recipe cards (launch/cards/<recipe>.yaml) hold every paper recipe to its sources.

Each recipe is resolved exactly as ``finetune/train.py --config`` or ``pretrain/spcl.py --config``
resolves it (``reidforge.shared.config.load_config``: schema defaults, then the YAML), and every setting on its
card must equal the resolved value; every key the recipe file sets must be on its card; the settings
that define a method must be there for every recipe; the README's recipe table must show each card's
expected numbers. A later edit of a recipe that drifts from its source fails here.

Card format::

    recipe: launch/configs/<name>.yaml
    stage: finetune | pretrain          # TrainConfig (finetune/train.py) | SpCLConfig (pretrain/spcl.py)
    start: <the weights the run starts from, and where that comes from>
    expect:                             # the number to expect
      - {metric: mAP, value: 87.36, split: <data>, source: <paper table>}
    settings:                           # sourced values
      - {key: <dotted config key>, value: <value>, source: <paper section or repo + file + key>,
         deviation: <optional: where the engine differs from the source>}
    unsourced:                          # values no source gives
      - {key: <dotted config key>, value: <value>, why: <why this value>}
    operational: [<keys that place data and outputs, not part of the method>]
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from reidforge.finetune.engine import TrainConfig
from reidforge.finetune.models import build_model
from reidforge.pretrain.spcl import SpCLConfig
from reidforge.shared.backbones import build_backbone
from reidforge.shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS, CARDS = ROOT / "launch" / "configs", ROOT / "launch" / "cards"
SCHEMAS = {"finetune": TrainConfig, "pretrain": SpCLConfig}

# Keys that say where data, weights and outputs live or how often to log: the only ones a card may
# list as operational.
OPERATIONAL = {
    "finetune": {"run_name", "output_dir", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
                 "dist_timeout_minutes", "model.weights", "data.train", "data.query", "data.gallery", "data.val_query", "data.val_gallery",
                 "data.workers", "data.test_batch_size", "data.max_bad_fraction"},
    "pretrain": {"run_name", "output_dir", "eval_every", "checkpoint_every", "checkpoint_every_iters",
                 "keep_checkpoints", "log_every", "dist_timeout_minutes", "model.weights", "data.train",
                 "data.query", "data.gallery", "data.workers", "data.test_batch_size", "data.max_bad_fraction"},
}
# Settings that define a method: on every card of the stage, sourced or explained.
_TRANSFORM = [f"data.transform.{k}" for k in ("height", "width", "flip", "pad", "random_erasing", "mean", "std")]
REQUIRED = {
    "finetune": {"model.name", "epochs", "data.sampler", "data.p", "data.k", *_TRANSFORM,
                 "data.transform.color_jitter", "data.transform.autoaugment", "data.transform.augmix",
                 "optim.name", "optim.lr", "optim.weight_decay", "optim.bias_decay", "optim.schedule",
                 "optim.warmup_epochs", "optim.warmup_factor", "optim.milestones", "optim.gamma",
                 "optim.min_lr_factor", "optim.delay_epochs", "optim.freeze_mode", "freeze_backbone_iters",
                 "freeze_backbone_epochs", "loss.label_smoothing", "loss.triplet_margin", "amp", "distance",
                 "flip_test", "rerank", "eval_protocol"},
    "pretrain": {"model.name", "model.pooling", "epochs", "iters_per_epoch", "data.sampler", "samples_per_bn",
                 "data.p", "data.k", *_TRANSFORM, "optim.name", "optim.lr", "optim.weight_decay", "optim.bias_decay",
                 "optim.schedule", "optim.warmup_epochs", "optim.milestones", "optim.gamma", "amp",
                 "cluster_features", "memory.temperature", "memory.momentum", "cluster.method", "cluster.eps",
                 "cluster.eps_gap", "cluster.min_samples", "cluster.k1", "cluster.k2"},
}


def is_paper_recipe(path: Path) -> bool:
    """A recipe meant to reproduce a paper: not a tiny CPU variant, a synthetic-world run or the demo."""
    return not (path.stem.endswith("_tiny") or "synthetic" in path.stem or path.stem == "demo")


def load_card(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CARDS / f"{name}.yaml"))


def resolve(cfg: Any, key: str) -> Any:
    """The value at a dotted key of a resolved config (dataclass fields, then dict entries, e.g. options)."""
    value = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, part)
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(key)
    return value


def leaf_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys of every value a recipe file sets (lists are values)."""
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
                         for k, v in node.items())) if node else {prefix.rstrip(".")}


def same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-12, abs_tol=1e-12)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected))
    return actual == expected


PAPER_RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if is_paper_recipe(p))
CARD_NAMES = sorted(p.stem for p in CARDS.glob("*.yaml"))


def test_every_paper_recipe_has_a_card_and_every_card_a_recipe() -> None:
    assert PAPER_RECIPES == CARD_NAMES
    assert {"bot_market", "dm_osnet_market", "dm_osnet_market_sbs", "fnc_cityflow", "seresnext50_veri",
            "mbr_4b_veri", "lka_reid_veri", "spcl_resnet50_market", "spcl_dm_osnet_lup"} <= set(CARD_NAMES)


@pytest.mark.parametrize("name", CARD_NAMES)
def test_card_is_complete(name: str) -> None:
    card = load_card(name)
    assert card["recipe"] == f"launch/configs/{name}.yaml"
    assert card["stage"] in SCHEMAS and card["start"].strip()
    assert card["expect"] and all(e["metric"] and isinstance(e["value"], (int, float)) and e["source"].strip()
                                  for e in card["expect"])
    assert all(s["source"].strip() for s in card["settings"]), "every setting names its source"
    assert all(u["why"].strip() for u in card.get("unsourced", [])), "every unsourced setting says why"
    listed = [e["key"] for e in [*card["settings"], *card.get("unsourced", [])]]
    assert len(listed) == len(set(listed)), f"keys listed twice: {sorted(k for k in listed if listed.count(k) > 1)}"
    operational = set(card.get("operational", []))
    assert operational <= OPERATIONAL[card["stage"]], f"not operational: {operational - OPERATIONAL[card['stage']]}"
    assert not operational & set(listed)

    recipe_keys = leaf_keys(OmegaConf.to_container(OmegaConf.load(ROOT / card["recipe"])))
    assert recipe_keys - set(listed) - operational == set(), "recipe keys missing from the card"
    required = set(REQUIRED[card["stage"]])
    cfg = load_config(SCHEMAS[card["stage"]], ROOT / card["recipe"])
    if card["stage"] == "finetune":
        if cfg.rerank:
            required |= {"rerank_k1", "rerank_k2", "rerank_lambda"}
        if cfg.model.options.get("classifier") == "circle":
            required |= {"loss.circle_scale", "loss.circle_margin"}
    assert required - set(listed) == set(), "method settings missing from the card"


@pytest.mark.parametrize("name", CARD_NAMES)
def test_resolved_recipe_equals_its_card(name: str) -> None:
    card = load_card(name)
    cfg = load_config(SCHEMAS[card["stage"]], ROOT / card["recipe"])
    wrong = []
    for entry in [*card["settings"], *card.get("unsourced", [])]:
        try:
            actual = resolve(cfg, entry["key"])
        except KeyError:
            wrong.append(f"{entry['key']}: not a key of the resolved config")
            continue
        if not same(actual, entry["value"]):
            wrong.append(f"{entry['key']}: recipe resolves to {actual!r}, card says {entry['value']!r}")
    assert wrong == []


@pytest.mark.parametrize("name", CARD_NAMES)
def test_card_model_options_build(name: str) -> None:
    """The recipe's model (or encoder) accepts its options; built on the meta device, so no weights are allocated."""
    card = load_card(name)
    cfg = load_config(SCHEMAS[card["stage"]], ROOT / card["recipe"])
    with torch.device("meta"):
        if card["stage"] == "finetune":
            model = build_model(cfg.model.name, 4, **cfg.model.options)
        else:
            model = build_backbone(cfg.model.name, **cfg.model.options)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_readme_recipe_table_shows_each_card_and_its_numbers() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Paper recipes (GPU)"):]
    table = table[:table.index("\n## ", 1)]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    for name in CARD_NAMES:
        row = next((r for r in rows if f"launch/cards/{name}.yaml" in r), None)
        assert row is not None, f"no README recipe row for launch/cards/{name}.yaml"
        for expected in load_card(name)["expect"]:
            assert str(expected["value"]) in row, f"{name}: {expected['metric']} {expected['value']} not in its row"


def test_a_drifted_recipe_fails_its_card(tmp_path: Path) -> None:
    """The check itself: one changed value in a copy of a recipe is reported with both values."""
    card = load_card("bot_market")
    recipe = OmegaConf.load(ROOT / card["recipe"])
    recipe.optim.milestones = [30, 55]
    drifted = tmp_path / "bot_market.yaml"
    OmegaConf.save(recipe, drifted)
    cfg = load_config(TrainConfig, drifted)
    entry = next(s for s in card["settings"] if s["key"] == "optim.milestones")
    assert not same(resolve(cfg, entry["key"]), entry["value"])
    assert same(resolve(load_config(TrainConfig, ROOT / card["recipe"]), entry["key"]), entry["value"])
    with pytest.raises(KeyError):
        resolve(cfg, "optim.no_such_key")
