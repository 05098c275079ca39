"""The demo: from nothing to trained, evaluated and exported re-ID models on the synthetic world.

    python launch/demo.py [--config launch/configs/demo.yaml] [key=value ...]     (bash launch/demo.sh does set-up first)

Each stage is one of the platform's own commands, run as a child process with its output shown and
kept in ``<out>/logs/<stage>.log`` (its progress as plain lines, ``reidforge.shared.progress``; none with
``--no-progress``, which the stages get as ``REIDFORGE_PROGRESS=0``):

 1. render    ``data/build_shards.py synthetic``: persons, a LUPerson-like pool and vehicles, as shards
 2. init      ``finetune/train.py epochs=0``: DM-OSNet at its seeded initialisation, exported
 3. scratch   ``finetune/train.py``: DM-OSNet fine-tuned from that initialisation on the person split
 4. cfs       ``pretrain/cfs.py score``: the pool ranked by the cosine between 2 and 3 (CFS's models A and B)
 5. spcl      ``pretrain/spcl.py``: SpCL pretraining of a DM-OSNet backbone on the kept part of the pool
 6. finetune  ``finetune/train.py``: DM-OSNet fine-tuned from the SpCL backbone, same recipe as 3
 7. fnc, lka  ``finetune/train.py``: FNC and LKA-ReID on ResNet-18 trunks (their tiny variants) on the vehicle split
 8. eval-*    ``finetune/evaluate.py``: metrics, ranked lists, CMC and Grad-CAM for every model
 9. onnx      ``finetune/export_onnx.py``: the SpCL-initialised DM-OSNet as ONNX, checked with onnxruntime
10. report    ``<out>/report.md``: the results table and the pictures

A stage whose outputs a previous run finished (same command, same upstream stages) is skipped; a
training stage that was killed resumes from its last checkpoint (``--resume``), so a killed demo run
again ends with the same table. A changed setting reruns the stage it reaches and every stage after it;
a training stage rerun from the start replaces its old run directory (``--overwrite``).

CFS's model A is "a generic pre-trained model" and B "the same model after re-ID fine-tuning". With
nothing downloadable, the demo's A is DM-OSNet's seeded initialisation and B the scratch fine-tuning
of exactly that initialisation: the mechanics of the real recipe, not its ImageNet/DINO starting point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reidforge.shared.config import ConfigError, bounded, load_config
from reidforge.shared.io import atomic_open
from reidforge.shared.stages import Runner, Stage, StageError
from reidforge.shared.table import Percent, format_table

REPO = Path(__file__).resolve().parents[1]

CONFIGS = REPO / "launch" / "configs"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    # key=value overrides of each stage's recipe (the recipes are named below); the defaults fit the
    # 15-minute budget on 2 CPU cores, and the test suite shrinks them further.
    world: list[str] = field(default_factory=lambda: ["pool_images=2000"])  # launch/configs/synthetic.yaml
    person: list[str] = field(default_factory=list)  # both DM-OSNet fine-tunings: dm_osnet_synthetic.yaml
    pretrain: list[str] = field(default_factory=list)  # spcl_dm_osnet_synthetic.yaml
    vehicle: list[str] = field(default_factory=list)  # fnc_synthetic.yaml and lka_reid_synthetic.yaml
    cfs_keep: float = 0.5
    pictures: str = "ranked,cmc,gradcam"
    eval_workers: int = 0
    # Stages run at once, each a process with one intra-op thread (reidforge.shared.stages): the results are then bit-identical
    # from run to run (with two threads per process, SpCL's reductions vary in their last bits between runs,
    # and its clustering amplifies that), and independent stages keep every core busy instead.
    jobs: int = bounded(2, 1)


@dataclass
class Model:
    """A trained model of the demo: its training stage, evaluation split and how it started."""

    name: str
    stage: str
    dataset: str
    start: str


MODELS = (Model("dm_osnet_scratch", "scratch", "synthetic_person", "random init"),
          Model("dm_osnet_spcl", "finetune", "synthetic_person", "SpCL backbone"),
          Model("fnc_tiny", "fnc", "synthetic_vehicle", "random init"),
          Model("lka_reid_tiny", "lka", "synthetic_vehicle", "random init"))


def stages(cfg: DemoConfig) -> list[Stage]:
    out = Path(cfg.out)
    shards, runs = out / "shards", out / "runs"
    py = [sys.executable]

    def split(dataset: str, name: str) -> str:
        return str(shards / dataset / name)

    def train(recipe: str, run: str, dataset: str, extra: list[str]) -> list[str]:
        return [*py, "finetune/train.py", "--config", str(CONFIGS / recipe), f"output_dir={runs}", f"run_name={run}",
                f"seed={cfg.seed}", f"data.train=[{split(dataset, 'train')}]", f"data.query={split(dataset, 'query')}",
                f"data.gallery={split(dataset, 'gallery')}", *extra]

    person = "dm_osnet_synthetic.yaml"
    init = runs / "dm_osnet_init" / "model_final.safetensors"
    scratch = runs / "dm_osnet_scratch" / "model_final.safetensors"
    cfs_dir, backbone = out / "cfs", runs / "spcl" / "backbone_final.safetensors"
    result = [
        Stage("render", [*py, "data/build_shards.py", "synthetic", "--out", str(shards), "--config",
                         str(CONFIGS / "synthetic.yaml"), "--workers", "2", f"seed={cfg.seed}", *cfg.world]),
        Stage("init", train(person, "dm_osnet_init", "synthetic_person", [*cfg.person, "epochs=0"]), ("render",),
              runs / "dm_osnet_init"),
        Stage("scratch", train(person, "dm_osnet_scratch", "synthetic_person", cfg.person), ("render",),
              runs / "dm_osnet_scratch"),
        Stage("cfs", [*py, "pretrain/cfs.py", "score", split("synthetic_lup", "pool"), "--arch", "dm_osnet",
                      "--pretrained", str(init), "--finetuned", str(scratch), "--workers", "0", "--out", str(cfs_dir)],
              ("init", "scratch")),
        Stage("spcl", [*py, "pretrain/spcl.py", "--config", str(CONFIGS / "spcl_dm_osnet_synthetic.yaml"),
                       f"output_dir={runs}", "run_name=spcl", f"seed={cfg.seed}",
                       f"data.train=[{split('synthetic_lup', 'pool')}]",
                       f"data.cfs_ranking={cfs_dir / 'cfs_ranking.txt'}", f"data.cfs_keep={cfg.cfs_keep}",
                       f"data.query={split('synthetic_person', 'query')}",
                       f"data.gallery={split('synthetic_person', 'gallery')}", *cfg.pretrain],
              ("cfs",), runs / "spcl"),
        Stage("finetune", train(person, "dm_osnet_spcl", "synthetic_person",
                                [*cfg.person, f"model.weights={backbone}"]),
              ("spcl",), runs / "dm_osnet_spcl"),
        Stage("fnc", train("fnc_synthetic.yaml", "fnc_tiny", "synthetic_vehicle", cfg.vehicle), ("render",),
              runs / "fnc_tiny"),
        Stage("lka", train("lka_reid_synthetic.yaml", "lka_reid_tiny", "synthetic_vehicle", cfg.vehicle), ("render",),
              runs / "lka_reid_tiny"),
    ]
    for m in MODELS:
        result.append(Stage(f"eval-{m.name}", [
            *py, "finetune/evaluate.py", "--weights", str(runs / m.name / "model_final.safetensors"),
            "--query", split(m.dataset, "query"), "--gallery", split(m.dataset, "gallery"),
            "--pictures", cfg.pictures, "--workers", str(cfg.eval_workers), "--out", str(out / "eval" / m.name)],
            (m.stage,)))
    result.append(Stage("onnx", [*py, "finetune/export_onnx.py", "--weights",
                                 str(runs / "dm_osnet_spcl" / "model_final.safetensors"),
                                 "--out", str(out / "export" / "dm_osnet_spcl.onnx")], ("finetune",)))
    return result


def _parameters(weights: Path) -> int:
    """Learned parameters in an export (BatchNorm running statistics left out)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def write_report(out: Path, models: tuple[Model, ...], timings: list[list[Any]], cfs_keep: float) -> tuple[str, Path]:
    """``<out>/report.md`` with the results table and the pictures; returns (table, path)."""
    from reidforge.shared.visualize import cmc_curve, epoch_curves

    pictures = out / "report"
    pictures.mkdir(exist_ok=True)
    results = {m.name: json.loads((out / "eval" / m.name / "results.json").read_text()) for m in models}
    rows = []
    for m in models:
        r, cmc = results[m.name], results[m.name]["cmc"]
        params = _parameters(out / "runs" / m.name / "model_final.safetensors") / 1e6
        rows.append([m.name, m.start, m.dataset, round(params, 2), Percent(r["mAP"]),
                     *[Percent(cmc[k - 1]) for k in (1, 5, 10)], Percent(r["mINP"])])
    table = format_table(["model", "initialisation", "data", "params (M)", "mAP (%)", "R1 (%)", "R5 (%)", "R10 (%)",
                          "mINP (%)"], rows)
    for dataset in sorted({m.dataset for m in models}):
        cmc_curve({m.name: results[m.name]["cmc"] for m in models if m.dataset == dataset},
                  pictures / f"cmc_{dataset}.png")
    history = json.loads((out / "runs" / "spcl" / "metrics.json").read_text())["history"]
    # Clusters (tens) and outliers (hundreds) get a panel each: on one axis the cluster count reads flat.
    epoch_curves(history, [("ARI", "NMI"), ("clusters",), ("outliers",), ("mAP", "R1")], pictures / "spcl.png",
                 "SpCL on the kept pool: clustering against the hidden identities, and retrieval on the person split",
                 ylabels=["ARI, NMI against the identities", "clusters", "outliers (images)",
                          "person split: mAP, R1 (%)"])
    curve = format_table(["epoch", "clusters", "outliers", "ARI", "NMI", "loss"],
                         [[h["epoch"], h["clusters"], h["outliers"], round(h.get("ARI", float("nan")), 4),
                           round(h.get("NMI", float("nan")), 4), round(h["loss"], 4)] for h in history])
    cfs = json.loads((out / "cfs" / "cfs_summary.json").read_text())
    parity = [line for line in (out / "logs" / "onnx.log").read_text().splitlines() if line.startswith("parity")]
    commands = [json.loads((out / "stages" / f"{name}.json").read_text())["command"] for name, *_ in timings]
    lines = [
        "# reidforge demo report", "",
        "Every number below was produced by the commands at the end of this page, on the synthetic world.", "",
        "## Results", "", table, "",
        "CMC curves:", "", *[f"![CMC {d}](report/cmc_{d}.png)" for d in sorted({m.dataset for m in models})], "",
        "## SpCL pretraining", "",
        f"CFS scored {cfs['scored']:,} pool images (median score {cfs['quantiles']['q0.5']:.3f}) and SpCL "
        f"kept the best {cfs_keep:.0%}. The generic model A is DM-OSNet's seeded initialisation and B the "
        "scratch fine-tuning of it: nothing pretrained can be downloaded here.", "",
        "![SpCL curves](report/spcl.png)", "", curve, "",
        "## Ranked lists and activation maps", "",
        "Each row: a query (blue frame), then its top gallery matches, titled with rank, identity and camera "
        "(green: same identity; red: another; grey: same identity and camera, ignored by the protocol; the "
        "legend under each grid repeats this). Grad-CAM maps: what the embedding responds to, each scaled to "
        "its own range; a map with nothing to show is drawn as a tile labelled \"map is all zero\".", "",
    ]
    for m in models:
        lines += [f"### {m.name}", "", f"![ranked {m.name}](eval/{m.name}/ranked.png)", "",
                  f"![Grad-CAM {m.name}](eval/{m.name}/gradcam.png)", ""]
    lines += ["## Export", "", "`export/dm_osnet_spcl.onnx` (resize and normalisation inside the graph), "
              "checked against torch with onnxruntime:", "", *[f"    {line}" for line in parity], "",
              "## Stages", "", format_table(["stage", "seconds", "reused"], timings), "", "Commands:", "", "```",
              *[" ".join(c) for c in commands], "```", ""]
    path = out / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines))
    return table, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIGS / "demo.yaml")
    parser.add_argument("--no-progress", action="store_true", help="the stages show no progress lines")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    # Through the environment, so that a stage's command (and the fingerprint that vouches for it) stays the same.
    runner = Runner(out, REPO, {**os.environ, "REIDFORGE_PROGRESS": "0"} if args.no_progress else None)
    todo = stages(cfg)
    start = time.perf_counter()
    try:
        runner.run_all(todo, cfg.jobs)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[{len(todo) + 1}/{len(todo) + 1}] report", flush=True)
    timings = list(runner.timings.values())
    table, path = write_report(out, MODELS, timings, cfg.cfs_keep)
    print(format_table(["stage", "seconds", "reused"], timings))
    print(f"{len(todo)} stages, {cfg.jobs} at a time: {time.perf_counter() - start:.0f} s")
    print()
    print(table)
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
