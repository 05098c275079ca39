"""The demo (launch/demo.py) at its smallest scale: every stage runs and the report links real pictures,
a second run skips everything, and a demo killed mid-pretraining resumes to the same results table."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["render", "init", "scratch", "cfs", "spcl", "finetune", "fnc", "lka", "eval-dm_osnet_scratch",
          "eval-dm_osnet_spcl", "eval-fnc_tiny", "eval-lka_reid_tiny", "onnx"]
TINY = """\
out: {out}
world: [train_ids=12, images_per_train_id=6, test_ids=6, images_per_test_id=6, distractors=6, pool_images=160,
        pool_images_per_id=8, vehicle_train_ids=6, vehicle_test_ids=4, images_per_vehicle_id=6]
person: [epochs=1, iters_per_epoch=2, data.p=4]
pretrain: [epochs=2, iters_per_epoch=2, data.p=4, bn_calibration_batches=1, eval_every=2]
vehicle: [epochs=1, iters_per_epoch=1, data.p=2, data.test_batch_size=16]
"""


def _demo(config: Path, **popen) -> subprocess.Popen:
    # The demo fixes each stage's thread count itself (launch/demo.py THREADS): nothing set here.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen([sys.executable, "launch/demo.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _results_table(output: str) -> str:
    """The table the demo prints last: the block that starts with its ``| model`` header."""
    block = output[output.rindex("| model"):]
    return block[:block.index("\n\n")] if "\n\n" in block else block.strip()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny.yaml"
    config.write_text(TINY.format(out=root / "out"))
    return config, root / "out", _finish(_demo(config))


def test_every_stage_runs_and_the_report_shows_real_pictures(demo: tuple[Path, Path, str]) -> None:
    _, out, output = demo
    for stage in STAGES:
        assert json.loads((out / "stages" / f"{stage}.json").read_text())["seconds"] > 0
    rows = _results_table(output).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["dm_osnet_scratch", "dm_osnet_spcl", "fnc_tiny",
                                                           "lka_reid_tiny"]
    for row in rows:
        metrics = [float(cell) for cell in row.split("|")[5:10]]  # in %, one decimal
        assert all(0.0 <= m <= 100.0 for m in metrics)
        assert all(re.fullmatch(r"\d{1,3}\.\d", cell.strip()) for cell in row.split("|")[5:10]), row
    report = (out / "report.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(pictures) >= 11
    for picture in pictures:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert (out / "export" / "dm_osnet_spcl.onnx").stat().st_size > 1_000_000
    assert output.rstrip().endswith(f"report: {out / 'report.md'}")


def test_a_second_run_skips_every_finished_stage(demo: tuple[Path, Path, str]) -> None:
    config, _, first = demo
    start = time.monotonic()
    second = _finish(_demo(config))
    assert second.count("finished by a previous run, skipped") == len(STAGES)
    assert _results_table(second) == _results_table(first)
    assert time.monotonic() - start < 60


def test_a_killed_demo_resumes_to_the_same_table(demo: tuple[Path, Path, str]) -> None:
    """Forget pretraining and everything after it, kill the demo once pretraining has checkpointed an
    epoch, run it again: it resumes SpCL from that checkpoint and ends with the first run's results, to
    the last bit (each stage runs on one thread, whatever the caller's environment says)."""
    config, out, first = demo
    results = (out / "eval" / "dm_osnet_spcl" / "results.json").read_text()
    for stage in ("spcl", "finetune", "eval-dm_osnet_spcl", "onnx"):
        (out / "stages" / f"{stage}.json").unlink()
    for path in ("runs/spcl", "runs/dm_osnet_spcl", "eval/dm_osnet_spcl", "export"):
        shutil.rmtree(out / path)
    proc = _demo(config, start_new_session=True)
    checkpoint = out / "runs" / "spcl" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the demo ended before pretraining checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "stages" / "spcl.json").exists()
    resumed = _finish(_demo(config))
    assert "pretrain/spcl.py" in resumed and "--resume" in resumed
    assert _results_table(resumed) == _results_table(first)
    assert (out / "eval" / "dm_osnet_spcl" / "results.json").read_text() == results
