"""Each paper's ablation table as one command: its rows trained on the synthetic world, N seeds each,
reported as mean +- std beside the paper's numbers, with whether the paper's ordering holds at this scale.

    python launch/bench/ablations.py <table> [--budget tiny|default] [--seeds N] [--epochs E] [--iters I]
        [--size HxW] [--rows a,b] [--jobs 2] [--out runs/ablations] [--shards DIR] [--world key=value]
        [--pretrain key=value] [--check-repeat] [--no-progress] [key=value ...]

Tables (``--rows`` picks some of a table's rows by name; the row list is in ``TABLES`` below):

- ``dm_osnet_mhsa``: DM-OSNet Table 2, where DL-MHSA replaces the 9x9 stream (``mhsa_stages`` of
  ``finetune/models/dm_osnet.py``; [0,0,0] is the OSNet-IBN baseline), and torchreid's OSNet x1.0
  (``finetune/models/osnet.py``), the "OSNet [6]" of Table 4; on the synthetic person split.
- ``fnc``: FNC Tables 5-6, separate vs not separate branches (``split``) and multiply vs add (``fusion``),
  ``finetune/models/fnc.py`` on its tiny ResNet-18 trunk; on the synthetic vehicle split.
- ``lka_reid``: LKA-ReID Table II, MBR-4B and +LKA, +HCA, both (``finetune/models/lka_reid.py``, tiny
  ResNet-18 trunk, no LAI as in Table II); on the synthetic vehicle split.
- ``spcl``: DM-OSNet fine-tuned from random init vs from a SpCL backbone, as ``launch/demo.py`` makes it
  (init export, CFS ranking of the pool between it and the random-init fine-tuning, SpCL on the best half,
  fine-tuning from its backbone), per seed; DM-OSNet Table 4's rows without and with LUPerson pretraining.

Every row x seed is one ``finetune/train.py`` run of the table's recipe (``launch/configs/``) with the
row's overrides, the budget (``epochs``, ``iters_per_epoch``, input size; ``eval_every`` = epochs, so it
is ranked once, at the end) and the trailing ``key=value`` overrides; its mAP and R1 are the last test row
of its ``metrics.json``. Runs go ``--jobs`` at a time as child processes (``reidforge.shared.stages``):
one that finished is skipped when the command is run again (its checkpoints are deleted once it is done:
its exports, metrics and log stay), one that was killed resumes from its last checkpoint. The synthetic
world (``launch/configs/synthetic.yaml``, seed 0, ``--world`` overrides) is rendered once into
``<out>/shards`` and shared by every table, unless ``--shards`` names a rendered one.

Each run is deterministic by construction: one intra-op thread (``OMP_NUM_THREADS=1``), no loader
workers, and a fixed seed (``seed=<s>``: initialisation, sampler, augmentation), so its weights and
metrics are the same bit for bit whenever it runs. ``--check-repeat`` shows it for the first row's first
seed: that run of the table (made now if missing) against a fresh copy of it under ``<out>/repeat``
(every stage it needs rerun too), every weight of model_final and every metric compared.

The verdict compares every pair of rows that the paper ranks apart, on the paper's first listed dataset:
the pair agrees when the means here are in the same order, clearly when their gap also exceeds one
standard error of the difference (sample std over seeds). The ordering holds when every pair agrees.

Writes ``<out>/<table>.md`` and ``<out>/<table>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from reidforge.shared.io import atomic_open, atomic_write_json
from reidforge.shared.stages import Runner, Stage, StageError
from reidforge.shared.table import format_table

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "configs"

MARKET, DUKE = "Market-1501", "DukeMTMC-reID"
CITYFLOW_VAL = "CityFlow-ReID val"  # FNC's validation split of the CityFlow training set (§4.1)
VERI = "VeRi-776"


@dataclass(frozen=True)
class Row:
    name: str  # its run directories' name and its --rows name
    label: str  # as the paper names it
    overrides: tuple[str, ...]  # key=value on the table's recipe
    paper: dict[str, tuple[float, float]]  # dataset -> (mAP, R1) in %, as printed in the source
    source: str  # the table, row and columns of the paper numbers
    spcl: bool = False  # fine-tuned from the same seed's SpCL backbone (the spcl table)
    dl_mhsa: bool = False  # DL-MHSA's window and pooling scaled to the input size (dl_mhsa_geometry)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    recipe: str  # under launch/configs/
    dataset: str  # the synthetic split trained and ranked
    columns: tuple[str, ...]  # the paper's datasets shown; the first one decides the ordering verdict
    rows: tuple[Row, ...]
    note: str


# DM-OSNet (Zhou et al., Sensors 2022) Table 2: mhsa_stages -> (Market1501 mAP, rank-1, DukeMTMC-reID mAP,
# rank-1), columns 1-4 of the table. Table 4 repeats [0,0,0] as "OSNet [6]" and [1,0,0] as "OSNet+DL-MHSA".
DM_OSNET_TABLE2 = {
    (0, 0, 0): (84.9, 94.8, 73.5, 88.6),
    (1, 0, 0): (86.76, 95.26, 76.87, 89.45),
    (0, 1, 0): (86.68, 95.01, 76.65, 89.54),
    (0, 0, 1): (86.42, 95.06, 76.58, 89.68),
    (1, 1, 0): (86.07, 94.83, 75.87, 88.7),
    (1, 0, 1): (85.57, 94.12, 75.38, 88.24),
    (0, 1, 1): (85.42, 94.18, 75.21, 88.73),
    (1, 1, 1): (84.93, 93.88, 75.03, 87.75),
}


def dl_mhsa_geometry(height: int, width: int) -> tuple[str, ...]:
    """DL-MHSA's window G and K/V pooling ds at this input: the paper's 8 at 256x128 (§4.2) scaled with the
    input, G = ds = H / 32, so that every stage sees the paper's token grid (at conv2 8x4 windows and 8x4
    pooled tokens, at conv4 2x1). The paper's 8 on a 64x32 input would leave conv3 and conv4 (8x4 and 4x2
    maps) no whole window."""
    g = height // 32
    if height % 32 or width % 16 or (width // 16) % g:
        raise AblationError(f"input {height}x{width}: DL-MHSA's scaled window (H/32) needs H a multiple of 32 and "
                            "W/16 a multiple of H/32, e.g. 64x32, 128x64, 256x128")
    return f"model.options.window={g}", f"model.options.ds_ratios=[{g},{g},{g}]"


def _mhsa_row(stages: tuple[int, int, int]) -> Row:
    m_map, m_r1, d_map, d_r1 = DM_OSNET_TABLE2[stages]
    code = "".join(map(str, stages))
    label = f"[{','.join(map(str, stages))}]" + {"000": " (OSNet-IBN baseline)", "100": " (DM-OSNet)"}.get(code, "")
    return Row(f"mhsa_{code}", label, (f"model.options.mhsa_stages=[{','.join(map(str, stages))}]",),
               {MARKET: (m_map, m_r1), DUKE: (d_map, d_r1)},
               f"DM-OSNet Table 2, row [{','.join(map(str, stages))}]: Market1501 and DukeMTMC-reID mAP, rank-1",
               dl_mhsa=True)


TABLES = {t.name: t for t in (
    Table("dm_osnet_mhsa", "DM-OSNet Table 2: where DL-MHSA goes; and DM-OSNet vs OSNet (Table 4)",
          "dm_osnet_synthetic.yaml", "synthetic_person", (MARKET, DUKE),
          (*(_mhsa_row(s) for s in DM_OSNET_TABLE2),
           Row("osnet", "OSNet x1.0 (torchreid head)", ("model.name=osnet", "model.options.triplet=true"),
               {MARKET: (84.9, 94.8),  # Table 4, row "OSNet [6]", Market1501 mAP, rank-1
                DUKE: (73.5, 88.6)},  # Table 4, row "OSNet [6]", DukeMTMC-reID mAP, rank-1
               "DM-OSNet Table 4, row OSNet [6] (the numbers of the OSNet paper): Market1501 and DukeMTMC-reID "
               "mAP, rank-1")),
          "The paper's rows start from ImageNet weights and train 120 epochs at 256x128; here every row starts "
          "from random init, with DL-MHSA's 8-pixel window and pooling scaled to the input (2 at 64x32), so "
          "that each stage has the paper's token grid. The OSNet row has torchreid's head with the triplet "
          "term added, the other rows DM-OSNet's BNNeck head."),
    Table("fnc", "FNC Tables 5-6: separate vs not separate branches, multiply vs add",
          "fnc_synthetic.yaml", "synthetic_vehicle", (CITYFLOW_VAL,),
          (Row("separate_multiply", "FNC (separate + multiply)", ("model.options.split=after_conv4_1",
                                                                   "model.options.fusion=multiply"),
               {CITYFLOW_VAL: (70.8, 84.0)},  # Table 5 "FNC(separate)" = Table 6 "FNC(separate+ multiply)"
               "FNC Table 5, row FNC(separate), and Table 6, row FNC(separate+ multiply): mAP, Top-1"),
           Row("not_separate", "FNC (not separate)", ("model.options.split=none",),
               {CITYFLOW_VAL: (68.5, 84.0)},  # Table 5, row "FNC(not separate)": mAP, Top-1
               "FNC Table 5, row FNC(not separate): mAP, Top-1"),
           Row("separate_add", "FNC (separate + add)", ("model.options.fusion=add",),
               {CITYFLOW_VAL: (67.1, 84.0)},  # Table 6, row "FNC(separate + add)": mAP, Top-1
               "FNC Table 6, row FNC(separate + add): mAP, Top-1")),
          "FNC's numbers are on its own validation split of CityFlow-ReID with an SE-ResNeXt-101 trunk; here "
          "the tiny ResNet-18 trunk. Table 5's baseline and single-branch rows have no model option. All three "
          "print Top-1 84.0, so only mAP ranks them."),
    Table("lka_reid", "LKA-ReID Table II: MBR-4B baseline, +LKA, +HCA, both",
          "lka_reid_synthetic.yaml", "synthetic_vehicle", (VERI,),
          tuple(Row(name, label, (f"model.options.lka={lka}", f"model.options.hca={hca}",
                                  "model.options.n_cams=0", "model.options.n_views=0"), {VERI: numbers},
                    f"LKA-ReID Table II, row {label}: VeRi-776 mAP, Rank-1")
                for name, label, lka, hca, numbers in (
                    ("baseline", "Baseline (MBR-4B)", "false", "false", (84.72, 97.68)),  # Table II row 1
                    ("lka", "+LKA", "true", "false", (85.37, 97.79)),  # Table II row 2
                    ("hca", "+HCA", "false", "true", (85.30, 97.74)),  # Table II row 3
                    ("lka_hca", "+LKA +HCA (LKA-ReID)", "true", "true", (85.55, 97.94)))),  # Table II row 4
          "Table II is without LAI (Table I's unstarred rows), so LAI is off here too (n_cams=n_views=0); the "
          "tiny ResNet-18 trunk instead of ResNet50-IBN-a. Table I prints Rank-1 97.97 for the last row."),
    Table("spcl", "SpCL-pretrained vs random init (DM-OSNet Table 4)",
          "dm_osnet_synthetic.yaml", "synthetic_person", (MARKET, DUKE),
          (Row("random", "DM-OSNet, random init", (),
               {MARKET: (86.76, 95.26),  # Table 4, row "OSNet+DL-MHSA": Market1501 mAP, rank-1
                DUKE: (76.87, 89.45)},  # Table 4, row "OSNet+DL-MHSA": DukeMTMC-reID mAP, rank-1
               "DM-OSNet Table 4, row OSNet+DL-MHSA (ImageNet init): Market1501 and DukeMTMC-reID mAP, rank-1"),
           Row("spcl", "DM-OSNet, SpCL backbone", (),
               {MARKET: (87.36, 95.61),  # Table 4, row "OSNet+DL-MHSA+LUperson (DM-OSNet)": mAP, rank-1
                DUKE: (78.26, 89.18)},  # the same row, DukeMTMC-reID mAP, rank-1
               "DM-OSNet Table 4, row OSNet+DL-MHSA+LUperson (DM-OSNet): Market1501 and DukeMTMC-reID mAP, rank-1",
               spcl=True)),
          "The paper's baseline starts from supervised ImageNet weights and its SpCL runs on the CFS-kept half "
          "of LUPerson; here random init against SpCL on the CFS-kept half of the synthetic pool (CFS model A: "
          "the seeded initialisation, B: the random-init row's run of the same seed, as in launch/demo.py)."),
)}

PERSON_POOL = "synthetic_lup"
SCRATCH_ROW = "random"  # the spcl table's random-init row: its run of a seed is that seed's CFS model B
SPCL_RECIPE = "spcl_dm_osnet_synthetic.yaml"
CFS_KEEP = 0.5  # DM-OSNet §3.3: "the top 50% of the sorted images"


@dataclass(frozen=True)
class Budget:
    seeds: int
    epochs: int
    iters: int  # per epoch; 0 = one pass of the sampler (fine-tuning only; SpCL then keeps its recipe's)
    size: tuple[int, int] | None = None  # input (H, W); None = each recipe's own


# tiny: the test's smoke scale. default: the scale of the numbers a note would quote (about the demo's
# fine-tuning length: 8 epochs, here of 20 iterations each, at each recipe's own input size).
BUDGETS = {"tiny": Budget(seeds=2, epochs=1, iters=2), "default": Budget(seeds=3, epochs=8, iters=20)}
WORLD = ["pool_images=2000"]  # the demo's pool: enough for the spcl table, cheap to render
METRICS = ("mAP", "R1")


class AblationError(ValueError):
    """A bad command line, named in one line before any run starts."""


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise argparse.ArgumentTypeError(f"--size must be HxW in pixels, e.g. 64x32, got {text!r}")
    return int(height), int(width)


def _split(root: Path, dataset: str, name: str) -> str:
    return str(root / dataset / name)


@dataclass
class Plan:
    """The runs of one table and what they need."""

    table: Table
    budget: Budget
    shards: Path
    overrides: list[str]  # for every fine-tuning run
    pretrain: list[str]  # for every SpCL run

    def budget_overrides(self, recipe_options: dict[str, Any]) -> list[str]:
        """The budget as overrides of a fine-tuning recipe whose model options are ``recipe_options``."""
        b = self.budget
        out = [f"epochs={b.epochs}", f"eval_every={b.epochs}", f"iters_per_epoch={b.iters}",
               "keep_checkpoints=1", "data.workers=0"]  # workers would only compete for the cores (one thread each)
        if b.size is not None:
            out += [f"data.transform.height={b.size[0]}", f"data.transform.width={b.size[1]}"]
            if "input_size" in recipe_options:  # models whose layers are sized to their input (MBR's BoT blocks)
                out.append(f"model.options.input_size=[{b.size[0]},{b.size[1]}]")
        return out

    def train_command(self, runs: Path, run_name: str, seed: int, extra: list[str]) -> list[str]:
        t, d = self.table, self.table.dataset
        return [sys.executable, "finetune/train.py", "--config", str(CONFIGS / t.recipe), f"output_dir={runs}",
                f"run_name={run_name}", f"seed={seed}", f"data.train=[{_split(self.shards, d, 'train')}]",
                f"data.query={_split(self.shards, d, 'query')}", f"data.gallery={_split(self.shards, d, 'gallery')}",
                *extra]

    def stages(self, rows: tuple[Row, ...], seeds: range, root: Path, prefix: str,
               after: tuple[str, ...]) -> tuple[list[Stage], dict[tuple[str, int], Path]]:
        """The stages of ``rows`` x ``seeds`` under ``root`` (names prefixed by ``prefix``), upstream stages
        first, and each row x seed's run directory."""
        t = self.table
        runs = root / t.name
        arch, options, size = _recipe_model(t.recipe)
        budget = self.budget_overrides(options)
        geometry = dl_mhsa_geometry(*(self.budget.size or size)) if any(r.dl_mhsa for r in rows) else ()
        scratch = next((r for r in t.rows if r.name == SCRATCH_ROW), None)
        todo: dict[str, Stage] = {}
        run_dirs: dict[tuple[str, int], Path] = {}

        def train(name: str, run_name: str, seed: int, extra: list[str], needs: tuple[str, ...]) -> Stage:
            stage = Stage(f"{prefix}{t.name}-{name}", self.train_command(runs, run_name, seed, extra), needs,
                          runs / run_name)
            return todo.setdefault(stage.name, stage)

        for seed in seeds:
            for row in rows:
                extra = [*budget, *row.overrides, *(geometry if row.dl_mhsa else ()), *self.overrides]
                if not row.spcl:
                    run_dirs[row.name, seed] = train(f"{row.name}-s{seed}", f"{row.name}_s{seed}", seed, extra,
                                                     after).run_dir
                    continue
                # The demo's chain for this seed: init export and random-init fine-tuning (CFS's A and B),
                # CFS ranking of the pool, SpCL on the kept half, fine-tuning from its backbone.
                if scratch is None:
                    raise AblationError(f"table {t.name}: a SpCL row needs a row named {SCRATCH_ROW!r} (CFS's B)")
                init = train(f"init-s{seed}", f"init_s{seed}", seed, [*budget, *self.overrides, "epochs=0"], after)
                random = train(f"{SCRATCH_ROW}-s{seed}", f"{SCRATCH_ROW}_s{seed}", seed,
                               [*budget, *scratch.overrides, *self.overrides], after)
                cfs_dir = runs / f"cfs_s{seed}"
                cfs = Stage(f"{prefix}{t.name}-cfs-s{seed}", [
                    sys.executable, "pretrain/cfs.py", "score", _split(self.shards, PERSON_POOL, "pool"),
                    "--arch", arch,
                    "--pretrained", str(init.run_dir / "model_final.safetensors"),
                    "--finetuned", str(random.run_dir / "model_final.safetensors"),
                    "--workers", "0", "--out", str(cfs_dir)], (init.name, random.name))
                todo.setdefault(cfs.name, cfs)
                b = self.budget
                spcl = Stage(f"{prefix}{t.name}-pretrain-s{seed}", [
                    sys.executable, "pretrain/spcl.py", "--config", str(CONFIGS / SPCL_RECIPE),
                    f"output_dir={runs}", f"run_name=pretrain_s{seed}", f"seed={seed}",
                    f"data.train=[{_split(self.shards, PERSON_POOL, 'pool')}]",
                    f"data.cfs_ranking={cfs_dir / 'cfs_ranking.txt'}", f"data.cfs_keep={CFS_KEEP}",
                    f"data.query={_split(self.shards, t.dataset, 'query')}",
                    f"data.gallery={_split(self.shards, t.dataset, 'gallery')}",
                    f"epochs={b.epochs}", f"eval_every={b.epochs}", "keep_checkpoints=1",
                    *([f"iters_per_epoch={b.iters}"] if b.iters else []),
                    *([f"data.transform.height={b.size[0]}", f"data.transform.width={b.size[1]}"] if b.size else []),
                    *self.pretrain], (cfs.name,), runs / f"pretrain_s{seed}")
                todo.setdefault(spcl.name, spcl)
                backbone = runs / f"pretrain_s{seed}" / "backbone_final.safetensors"
                run_dirs[row.name, seed] = train(f"{row.name}-s{seed}", f"{row.name}_s{seed}", seed,
                                                 [*extra, f"model.weights={backbone}"], (spcl.name,)).run_dir
        return list(todo.values()), run_dirs


def _recipe_model(recipe: str) -> tuple[str, dict[str, Any], tuple[int, int]]:
    """The fine-tuning recipe's model name, its options and its input (H, W)."""
    from reidforge.finetune.engine import TrainConfig
    from reidforge.shared.config import load_config

    cfg = load_config(TrainConfig, CONFIGS / recipe)
    return cfg.model.name, dict(cfg.model.options), (cfg.data.transform.height, cfg.data.transform.width)


def _check_commands(stages: list[Stage]) -> None:
    """Every run's config loads (unknown keys, bad values), so a mistake stops here, not hours in."""
    from reidforge.finetune.engine import TrainConfig
    from reidforge.shared.config import ConfigError, load_config

    for stage in stages:
        script = stage.command[1]
        if script not in ("finetune/train.py", "pretrain/spcl.py"):
            continue
        if script == "finetune/train.py":
            schema: type = TrainConfig
        else:
            from reidforge.pretrain.spcl import SpCLConfig
            schema = SpCLConfig
        try:
            load_config(schema, stage.command[3], stage.command[4:])
        except ConfigError as e:
            raise AblationError(f"{stage.name}: {e}") from None


def _check_shards(root: Path, splits: list[tuple[str, str]]) -> None:
    from reidforge.data.shards import ShardError, load_manifest

    for dataset, split in splits:
        path = root / dataset / split
        try:
            load_manifest(path)
        except (ShardError, OSError) as e:
            raise AblationError(f"--shards {root}: {dataset}/{split} is not a shard split ({e})") from None


def final_metrics(run_dir: Path, epochs: int) -> dict[str, float]:
    """The run's last test evaluation (its model_final), which must be of its last epoch."""
    path = run_dir / "metrics.json"
    tests = [r for r in json.loads(path.read_text())["history"] if r.get("split", "test") == "test"]
    if not tests or tests[-1]["epoch"] != epochs:
        raise AblationError(f"{path}: no test evaluation of epoch {epochs}")
    return {k: float(tests[-1][k]) for k in (*METRICS, "mINP")}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _paper(value: float) -> str:
    """A paper number with at least one decimal (84.0, 86.76): how the papers print them."""
    text = f"{value:g}"
    return text if "." in text else f"{text}.0"


def _cell(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def ordering(rows: list[dict[str, Any]], dataset: str, metric: str) -> dict[str, Any]:
    """The paper's order of ``rows`` by ``metric`` on ``dataset`` against the order of the means here."""
    k = METRICS.index(metric)
    ranked = [r for r in rows if dataset in r["paper"]]
    pairs, agree, clear = 0, 0, 0
    for a, b in combinations(ranked, 2):
        pa, pb = a["paper"][dataset][k], b["paper"][dataset][k]
        if pa == pb:
            continue  # the paper does not rank them apart
        hi, lo = (a, b) if pa > pb else (b, a)
        pairs += 1
        gap = hi[metric]["mean"] - lo[metric]["mean"]
        agree += gap > 0
        if hi[metric]["std"] is not None and lo[metric]["std"] is not None:
            error = math.sqrt(hi[metric]["std"] ** 2 / hi["n"] + lo[metric]["std"] ** 2 / lo["n"])
            clear += gap > error
    paper = sorted(ranked, key=lambda r: -r["paper"][dataset][k])
    here = sorted(ranked, key=lambda r: -r[metric]["mean"])
    one_seed = any(r["n"] < 2 for r in ranked)

    def chain(order: list[dict[str, Any]], value: Any) -> str:
        text = order[0]["label"]
        for prev, r in zip(order, order[1:]):
            text += (" = " if value(prev) == value(r) else " > ") + r["label"]
        return text

    return {"dataset": dataset, "metric": metric, "pairs": pairs, "agree": agree,
            "clear": None if one_seed else clear, "holds": pairs > 0 and agree == pairs,
            "paper_order": chain(paper, lambda r: r["paper"][dataset][k]),
            "order_here": chain(here, lambda r: r[metric]["mean"])}


def verdict_line(o: dict[str, Any]) -> str:
    if o["pairs"] == 0:
        return f"{o['dataset']} {o['metric']}: the paper ranks no two rows apart, nothing to compare."
    clear = "" if o["clear"] is None else f", {o['clear']} of them by more than one standard error"
    return (f"{o['dataset']} {o['metric']}: paper {o['paper_order']}; here {o['order_here']}. "
            f"{o['agree']} of {o['pairs']} pairs in the paper's order{clear}: the ordering "
            f"{'holds' if o['holds'] else 'does not hold'} at this scale.")


def summarise(table: Table, rows: tuple[Row, ...], runs: dict[tuple[str, int], Path], seeds: range,
              epochs: int, seconds: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        per_seed = [{"seed": s, "run_dir": str(runs[row.name, s]), "seconds": seconds.get((row.name, s)),
                     **final_metrics(runs[row.name, s], epochs)} for s in seeds]
        entry: dict[str, Any] = {"name": row.name, "label": row.label, "overrides": list(row.overrides),
                                 "paper": {d: list(v) for d, v in row.paper.items()}, "source": row.source,
                                 "n": len(per_seed), "runs": per_seed}
        for metric in METRICS:
            mean, std = _mean_std([r[metric] for r in per_seed])
            entry[metric] = {"mean": mean, "std": std}
        out.append(entry)
    return out


def render_markdown(table: Table, rows: list[dict[str, Any]], verdicts: list[dict[str, Any]], header: list[str]
                    ) -> str:
    cells = [[r["label"], *[" / ".join(map(_paper, r["paper"][d])) if d in r["paper"] else "-"
                            for d in table.columns],
              _cell(r["mAP"]["mean"], r["mAP"]["std"]), _cell(r["R1"]["mean"], r["R1"]["std"]), r["n"]]
             for r in rows]
    body = format_table(["row", *[f"paper {d} mAP / R1 (%)" for d in table.columns], "mAP (%)", "R1 (%)", "seeds"],
                        cells)
    sources = [f"- {r['label']}: {r['source']}" for r in rows]
    return "\n".join([f"# {table.title}", "", *header, "", body, "",
                      "Ordering (sample std over seeds; a pair is clear when its gap exceeds one standard error):",
                      "", *[f"- {verdict_line(v)}" for v in verdicts], "", table.note, "", "Paper numbers:", "",
                      *sources, ""])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help=f"one of {', '.join(TABLES)}")
    p.add_argument("--budget", choices=BUDGETS, default="default",
                   help="preset of seeds, epochs and iterations: tiny (a smoke run) or default (for a note)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 per row (default: the budget's)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the budget's)")
    p.add_argument("--iters", type=int, help="iterations per epoch, 0 = one sampler pass (default: the budget's)")
    p.add_argument("--size", type=_size, help="input size HxW (default: each recipe's own)")
    p.add_argument("--rows", help="comma-separated row names (default: every row of the table)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each on one thread (default 2)")
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--shards", type=Path, help="a rendered synthetic world (default: render one into OUT/shards)")
    p.add_argument("--world", action="append", default=[], metavar="key=value",
                   help="override of launch/configs/synthetic.yaml for the rendered world (repeatable)")
    p.add_argument("--pretrain", action="append", default=[], metavar="key=value",
                   help="override of every SpCL run's recipe, spcl table (repeatable)")
    p.add_argument("--check-repeat", action="store_true",
                   help="run the first row's first seed twice and compare weights and metrics bit for bit")
    p.add_argument("--no-progress", action="store_true", help="the runs show no progress lines")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every fine-tuning run")
    return p


def _budget(args: argparse.Namespace) -> Budget:
    base = BUDGETS[args.budget]
    b = Budget(seeds=base.seeds if args.seeds is None else args.seeds,
               epochs=base.epochs if args.epochs is None else args.epochs,
               iters=base.iters if args.iters is None else args.iters, size=args.size)
    for flag, value, lo in (("--seeds", b.seeds, 1), ("--epochs", b.epochs, 1), ("--iters", b.iters, 0),
                            ("--jobs", args.jobs, 1)):
        if value < lo:
            raise AblationError(f"{flag} must be >= {lo}, got {value}")
    return b


def _rows(table: Table, names: str | None) -> tuple[Row, ...]:
    if not names:
        return table.rows
    known = {r.name: r for r in table.rows}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise AblationError(f"--rows: unknown row(s) {', '.join(unknown) or repr(names)} of table {table.name}; "
                            f"valid: {', '.join(known)}")
    return tuple(known[n] for n in wanted)


def compare_runs(a: Path, b: Path) -> tuple[int, list[str]]:
    """Tensors compared between two runs' model_final, and what differs (weights or final metrics)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model_final.safetensors")), load_file(str(b / "model_final.safetensors"))
    diffs = sorted(wa.keys() ^ wb.keys())
    diffs += [k for k in sorted(wa.keys() & wb.keys())
              if wa[k].dtype != wb[k].dtype or wa[k].shape != wb[k].shape or not torch.equal(wa[k], wb[k])]
    history = [[{k: v for k, v in row.items() if k != "eval_seconds"}
                for row in json.loads((run / "metrics.json").read_text())["history"]] for run in (a, b)]
    if history[0] != history[1]:
        diffs.append("metrics.json history")
    return len(wa), diffs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        if args.table not in TABLES:
            raise AblationError(f"unknown table {args.table!r}; valid: {', '.join(TABLES)}")
        table = TABLES[args.table]
        budget = _budget(args)
        rows = _rows(table, args.rows)
        out = args.out.resolve()
        needed = [(table.dataset, s) for s in ("train", "query", "gallery")]
        if any(r.spcl for r in rows):
            needed.append((PERSON_POOL, "pool"))
        todo: list[Stage] = []
        if args.shards is not None:
            shards, after = args.shards.resolve(), ()
            _check_shards(shards, needed)
        else:
            shards, after = out / "shards", ("render",)
            todo.append(Stage("render", [sys.executable, "data/build_shards.py", "synthetic", "--out", str(shards),
                                         "--config", str(CONFIGS / "synthetic.yaml"), "--workers", "2", "seed=0",
                                         *WORLD, *args.world]))
        plan = Plan(table, budget, shards, list(args.overrides), list(args.pretrain))
        seeds = range(budget.seeds)
        if args.check_repeat:  # the first row's first seed, and a fresh copy of it
            rows, seeds = rows[:1], range(1)
        stages, run_dirs = plan.stages(rows, seeds, out / "runs", "", after)
        fresh, fresh_dirs = (plan.stages(rows, seeds, out / "repeat", "repeat-", after) if args.check_repeat
                             else ([], {}))
        todo += stages + fresh
        _check_commands(todo)
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    env = {**os.environ, "REIDFORGE_PROGRESS": "0"} if args.no_progress else None
    runner = Runner(out, REPO, env)
    if args.check_repeat:
        for stage in fresh:
            runner.forget(stage.name)  # the copy is made now, whatever an earlier check left
    start = time.perf_counter()
    try:
        runner.run_all(todo, args.jobs)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    # Only a killed run resumes from its checkpoints; a finished one is skipped, or rerun afresh when its
    # settings change. Dropping them keeps a full table to its exports (FNC's tiny checkpoint is ~250 MB).
    dropped = [stage.run_dir / "checkpoints" for stage in todo
               if stage.run_dir is not None and (stage.run_dir / "checkpoints").is_dir()]
    for path in dropped:
        shutil.rmtree(path)
    if dropped:
        print(f"deleted the checkpoints of {len(dropped)} finished run(s): only a killed run resumes from them")
    determinism = ("Each run is deterministic by construction: one intra-op thread (OMP_NUM_THREADS=1), no "
                   "loader workers, a fixed seed; its weights and metrics repeat bit for bit.")

    if args.check_repeat:
        key = (rows[0].name, 0)
        count, diffs = compare_runs(run_dirs[key], fresh_dirs[key])
        same = not diffs
        print(f"repeat check, {table.name} row {rows[0].name} seed 0, run twice ({run_dirs[key]}, {fresh_dirs[key]}): "
              + (f"all {count} tensors of model_final and every metric identical bit for bit" if same else
                 f"differs in {len(diffs)} item(s): {', '.join(diffs[:5])}"))
        return 0 if same else 1

    try:
        # seconds per row x seed: its own training stage (a skipped one reports the time it took then)
        seconds = {(r.name, s): runner.timings[f"{table.name}-{r.name}-s{s}"][1] for r in rows for s in seeds}
        results = summarise(table, rows, run_dirs, seeds, budget.epochs, seconds)
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verdicts = [ordering(results, table.columns[0], metric) for metric in METRICS]
    size = "x".join(map(str, budget.size)) if budget.size else "each recipe's own"
    run_seconds = sum(float(t[1]) for t in runner.timings.values())
    iters = f"{budget.iters} iteration{'s' * (budget.iters != 1)}" if budget.iters else "one sampler pass"
    seeds_text = f"seeds 0-{budget.seeds - 1}" if budget.seeds > 1 else "seed 0"
    header = [f"Budget: {budget.epochs} epoch{'s' * (budget.epochs != 1)} x {iters} per epoch, "
              f"input {size}, {seeds_text} ({budget.seeds} per row), recipe "
              f"launch/configs/{table.recipe}, on the synthetic world's {table.dataset} split ({shards}).",
              f"{determinism} Compute: {len(todo)} stages, {run_seconds:.0f} s of process time in all, "
              f"{args.jobs} at a time."]
    markdown = render_markdown(table, results, verdicts, header)
    report = {"table": table.name, "title": table.title, "recipe": table.recipe, "dataset": table.dataset,
              "budget": {"seeds": budget.seeds, "epochs": budget.epochs, "iters": budget.iters,
                         "size": list(budget.size) if budget.size else None},
              "overrides": list(args.overrides), "pretrain": list(args.pretrain), "shards": str(shards),
              "determinism": determinism, "rows": results, "ordering": verdicts, "note": table.note,
              "stages": [{"name": n, "seconds": s, "reused": r == "yes"} for n, s, r in runner.timings.values()],
              "wall_seconds": wall}
    with atomic_open(out / f"{table.name}.md", "w") as f:
        f.write(markdown)
    atomic_write_json(out / f"{table.name}.json", report)
    print(format_table(["stage", "seconds", "reused"], list(runner.timings.values())))
    print(f"{len(todo)} stages, {args.jobs} at a time: {wall:.0f} s\n")
    print(markdown)
    print(f"table: {out / f'{table.name}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
