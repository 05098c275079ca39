"""The ablation tables (launch/bench/ablations.py) at their smallest scale: 2 rows x 2 seeds of a couple of
iterations write the table with mean +- std beside the paper's numbers, a second run retrains nothing, a
repeated run is identical bit for bit, and bad names are one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablations", REPO / "launch" / "bench" / "ablations.py")
ablations = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ablations  # dataclasses resolve the module's annotations through it
_spec.loader.exec_module(ablations)

ROWS = "mhsa_000,mhsa_100"
TINY = ["--budget", "tiny", "--rows", ROWS, "--no-progress", "data.p=4", "data.test_batch_size=16"]


def _ablate(*args: str) -> subprocess.CompletedProcess:
    # The script fixes each run's thread count itself (reidforge.shared.stages THREADS): nothing set here.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run([sys.executable, "launch/bench/ablations.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def table(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    out = tmp_path_factory.mktemp("ablations")
    args = ["dm_osnet_mhsa", "--out", str(out), "--shards", str(tiny_shards), *TINY]
    done = _ablate(*args)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return out, args, done.stdout


def test_the_table_has_mean_and_std_beside_the_paper(table: tuple[Path, list[str], str]) -> None:
    out, _, stdout = table
    markdown = (out / "dm_osnet_mhsa.md").read_text()
    assert markdown in stdout
    lines = [line for line in markdown.splitlines() if line.startswith("| [")]
    assert [line.split("|")[1].strip() for line in lines] == ["[0,0,0] (OSNet-IBN baseline)", "[1,0,0] (DM-OSNet)"]
    # Table 2's Market1501 and DukeMTMC-reID mAP / rank-1, then mean +- std over the 2 seeds
    assert [c.strip() for c in lines[0].split("|")[2:4]] == ["84.9 / 94.8", "73.5 / 88.6"]
    assert [c.strip() for c in lines[1].split("|")[2:4]] == ["86.76 / 95.26", "76.87 / 89.45"]
    report = json.loads((out / "dm_osnet_mhsa.json").read_text())
    assert report["budget"] == {"seeds": 2, "epochs": 1, "iters": 2, "size": None}
    for line, row in zip(lines, report["rows"]):
        assert row["n"] == 2 and [r["seed"] for r in row["runs"]] == [0, 1]
        for r in row["runs"]:  # each seed's numbers are its run's final test evaluation
            final = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["history"][-1]
            assert (final["epoch"], final["split"], final["mAP"], final["R1"]) == (1, "test", r["mAP"], r["R1"])
        maps = [r["mAP"] for r in row["runs"]]
        assert row["mAP"] == {"mean": statistics.fmean(maps), "std": statistics.stdev(maps)}
        cells = [c.strip() for c in line.split("|")[4:7]]
        assert cells[0] == f"{100 * row['mAP']['mean']:.1f} ± {100 * row['mAP']['std']:.1f}"
        assert cells[1] == f"{100 * row['R1']['mean']:.1f} ± {100 * row['R1']['std']:.1f}" and cells[2] == "2"
    assert "deterministic by construction" in markdown
    assert [v["metric"] for v in report["ordering"]] == ["mAP", "R1"]
    assert "Market-1501 mAP: paper [1,0,0] (DM-OSNet) > [0,0,0] (OSNet-IBN baseline)" in markdown


def test_a_second_run_retrains_nothing(table: tuple[Path, list[str], str]) -> None:
    out, args, _ = table
    finals = sorted((out / "runs" / "dm_osnet_mhsa").glob("*/model_final.safetensors"))
    assert len(finals) == 4
    before = {p: p.stat().st_mtime_ns for p in finals}
    first = (out / "dm_osnet_mhsa.md").read_text()
    again = _ablate(*args)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert again.stdout.count("finished by a previous run, skipped") == 4
    assert "finetune/train.py" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in finals} == before
    assert (out / "dm_osnet_mhsa.md").read_text() == first


def test_a_repeated_run_is_identical_bit_for_bit(table: tuple[Path, list[str], str]) -> None:
    out, args, _ = table
    done = _ablate(*args, "--check-repeat", "--rows", "mhsa_100")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # the table's run of that row and seed (reused) against a fresh one
    assert done.stdout.count("finished by a previous run, skipped") == 1 and done.stdout.count("train.py") == 1
    assert "row mhsa_100 seed 0, run twice" in done.stdout and "identical bit for bit" in done.stdout
    count, diffs = ablations.compare_runs(out / "repeat" / "dm_osnet_mhsa" / "mhsa_100_s0",
                                          out / "runs" / "dm_osnet_mhsa" / "mhsa_100_s0")
    assert count > 100 and diffs == []


@pytest.mark.parametrize("args, message", [
    (["dm_osnet_mhsa_typo"], "error: unknown table 'dm_osnet_mhsa_typo'; valid: dm_osnet_mhsa, fnc, lka_reid, spcl"),
    (["fnc", "--rows", "separate_add,add"], "error: --rows: unknown row(s) add of table fnc; valid: "
                                            "separate_multiply, not_separate, separate_add"),
    (["lka_reid", "--seeds", "0"], "error: --seeds must be >= 1, got 0"),
])
def test_bad_names_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    done = _ablate(*args, "--out", str(tmp_path))
    assert done.returncode == 2 and done.stderr == message + "\n" and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # before anything is rendered or trained


def test_a_bad_override_stops_before_any_run(tiny_shards: Path, tmp_path: Path) -> None:
    done = _ablate("dm_osnet_mhsa", "--out", str(tmp_path), "--shards", str(tiny_shards), *TINY, "optim.lrr=1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "dm_osnet_mhsa-mhsa_000-s0" in done.stderr and "unknown config key 'optim.lrr'" in done.stderr
    assert not (tmp_path / "runs").exists()


def _row(label: str, paper: float, mean: float, std: float | None, n: int = 3) -> dict:
    return {"label": label, "paper": {"X": (paper, paper)}, "n": n, "mAP": {"mean": mean, "std": std},
            "R1": {"mean": mean, "std": std}}


def test_the_ordering_verdict_counts_pairs_in_the_papers_order() -> None:
    rows = [_row("a", 80.0, 0.50, 0.01), _row("b", 79.0, 0.52, 0.01), _row("c", 70.0, 0.30, 0.01),
            _row("d", 70.0, 0.10, 0.01)]
    o = ablations.ordering(rows, "X", "mAP")
    # a>b (wrong way), a>c, a>d, b>c, b>d (right, by far more than one standard error); c = d in the paper
    assert (o["pairs"], o["agree"], o["clear"], o["holds"]) == (5, 4, 4, False)
    assert o["paper_order"] == "a > b > c = d" and o["order_here"] == "b > a > c > d"
    assert ablations.verdict_line(o).endswith("4 of 5 pairs in the paper's order, 4 of them by more than one "
                                              "standard error: the ordering does not hold at this scale.")
    close = ablations.ordering([_row("a", 80.0, 0.51, 0.02), _row("b", 79.0, 0.50, 0.02)], "X", "mAP")
    assert (close["pairs"], close["agree"], close["clear"], close["holds"]) == (1, 1, 0, True)
    single = ablations.ordering([_row("a", 80.0, 0.51, None, 1), _row("b", 79.0, 0.50, None, 1)], "X", "mAP")
    assert single["clear"] is None and "standard error" not in ablations.verdict_line(single)
