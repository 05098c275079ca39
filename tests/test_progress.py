"""The progress display (shared/progress.py): plain lines off a terminal with the whole run's count and ETA,
a tqdm bar on one that keeps log.txt plain, --no-progress and REIDFORGE_PROGRESS, and a real fine-tuning
run (2 epochs x 2 iterations) with its resumed start."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from conftest import killed_in_epoch
import reidforge.finetune.engine as engine
from reidforge.data.shards import WriteOptions, write_split
from reidforge.finetune.train import main as train_main
from reidforge.shared.config import ConfigError
from reidforge.shared.progress import Progress, RunProgress, duration, progress_options
from reidforge.shared.runlog import log_to, output_log


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REIDFORGE_PROGRESS", "lines")
    monkeypatch.setenv("REIDFORGE_PROGRESS_INTERVAL", "30")


def test_a_run_prints_plain_lines_with_epoch_loss_rate_and_eta(lines: None, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with RunProgress(10, 400, clock=clock) as run:
        assert (run.total, run.n) == (4000, 0)
        run.start_epoch(0)
        run.set_phase("train")
        for i in range(400):
            clock.now += 0.125
            run.step(2.0 if i % 2 else 1.0)
        run.end_epoch()
        run.set_phase("eval")
        clock.now += 20.0
        run.start_epoch(1)
        run.set_phase("train")
    err = capsys.readouterr().err
    assert "\r" not in err and capsys.readouterr().out == ""
    assert err.splitlines() == [
        "[train] epoch 1/10  iter 0/4,000 (0%)",
        # after the interval's 30 s: 240 iterations done, 3,760 left at 8 it/s
        "[train] epoch 1/10  iter 240/4,000 (6%)  loss 1.500  8.0 it/s  eta 7m50s",
        "[train] epoch 1/10  iter 400/4,000 (10%)  loss 1.500  8.0 it/s  eta 7m30s",  # the epoch's end
        "[eval] epoch 1/10  iter 400/4,000 (10%)  loss 1.500  8.0 it/s  eta 7m30s",
        # the evaluation's 20 s count in the whole run's rate: 400 iterations in 70 s
        "[train] epoch 2/10  iter 400/4,000 (10%)  5.7 it/s  eta 10m30s",
        "[train] epoch 2/10  iter 400/4,000 (10%)  5.7 it/s  done in 1m10s",
    ]


def test_a_resumed_run_starts_at_its_iteration_and_a_short_epoch_moves_the_count_on(
        lines: None, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with RunProgress(10, 400, epoch=2, step=30, clock=clock) as run:  # epoch 3, iteration 31 next
        run.set_phase("train")
        for _ in range(50):
            clock.now += 1.0
            run.step()
        run.start_epoch(3)  # epoch 3 ended 320 iterations short of 400
        run.set_phase("train")
    first, *_, last = capsys.readouterr().err.splitlines()
    assert first == "[train] epoch 3/10  iter 830/4,000 (20%)"
    assert run.n == 1200 and last.startswith("[train] epoch 4/10  iter 1,200/4,000 (30%)  ")
    # the rate counts this process's iterations only, not the resumed ones: 50 + 320 in 50 s
    assert last.endswith("  7.4 it/s  done in 50s")


def test_a_pass_prints_its_lines_and_says_when_it_is_done(lines: None, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with Progress(12, "embedding query", "eval", unit="batch", clock=clock) as bar:
        for _ in bar.wrap(range(12)):
            clock.now += 3.0
    with Progress(None, "synthetic: checking images", "check", unit="img", clock=clock) as bar:
        bar.update(7)
    assert capsys.readouterr().err.splitlines() == [
        "[eval] embedding query  0/12 batch (0%)",
        "[eval] embedding query  10/12 batch (83%)  3.0 s/batch  eta 6s",
        "[eval] embedding query  12/12 batch (100%)  3.0 s/batch  done in 36s",
        "[check] synthetic: checking images  0 img",
        "[check] synthetic: checking images  7 img  done in 0s",
    ]
    assert [duration(s) for s in (0.4, 59, 225, 3600 * 26 + 300)] == ["0s", "59s", "3m45s", "26h05m"]


def test_an_error_ends_a_pass_without_its_done_line(lines: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), Progress(4, "CFS", "score", unit="img") as bar:
        bar.update(2)
        raise RuntimeError("too many lost")
    assert capsys.readouterr().err == "[score] CFS  0/4 img (0%)\n"


def test_no_progress_the_environment_and_other_ranks_silence_it(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def shown() -> str:
        with RunProgress(2, 3) as run:
            run.set_phase("train")
            run.step(1.0)
        with Progress(3, "pass", "extract") as bar:
            bar.update(3)
        return capsys.readouterr().err

    monkeypatch.setenv("REIDFORGE_PROGRESS", "lines")
    assert shown().count("\n") == 4
    with progress_options(enabled=False):
        assert shown() == ""
        with progress_options(enabled=True):  # an inner command cannot turn an outer --no-progress back on
            assert shown() == ""
    assert shown().count("\n") == 4
    for off in ("0", "off", "OFF"):
        monkeypatch.setenv("REIDFORGE_PROGRESS", off)
        assert shown() == ""
    monkeypatch.setenv("REIDFORGE_PROGRESS", "lines")
    monkeypatch.setenv("RANK", "1")  # a launched process that is not the main one
    assert shown() == ""
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("REIDFORGE_PROGRESS", "yes")
    with pytest.raises(ConfigError, match=r"^REIDFORGE_PROGRESS='yes': expected one of 1, auto, 0, off, bar, lines$"):
        with progress_options():
            pass
    monkeypatch.setenv("REIDFORGE_PROGRESS", "1")
    monkeypatch.setenv("REIDFORGE_PROGRESS_INTERVAL", "-5")
    with pytest.raises(ConfigError, match=r"^REIDFORGE_PROGRESS_INTERVAL='-5': expected a number of seconds >= 0$"):
        Progress(3, "pass", "extract")


def test_a_bar_is_drawn_on_the_screen_and_the_log_gets_plain_lines(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """REIDFORGE_PROGRESS=bar (as on a terminal): tqdm draws on the stream beneath log.txt's copy, prints
    meanwhile pass above the bar, and log.txt holds the plain lines and the prints, never a \\r."""
    monkeypatch.setenv("REIDFORGE_PROGRESS", "bar")
    monkeypatch.setenv("REIDFORGE_PROGRESS_INTERVAL", "0")
    screen, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", out)
    with output_log():
        log_to(tmp_path)
        with RunProgress(1, 2) as run:
            run.set_phase("train")
            run.step(0.5)
            print("between two steps")
            run.step(1.5)
        assert (sys.stdout, sys.stderr) != (out, screen)  # output_log's copies, not the bar's wrappers
    assert (sys.stdout, sys.stderr) == (out, screen)
    assert re.search(r"\r\[train\] epoch 1/1: +100%\|.*\| 2/2 \[.*loss 1\.000\]", screen.getvalue())
    assert out.getvalue() == "between two steps\n"
    log = (tmp_path / "log.txt").read_text()
    assert "\r" not in log and "\x1b" not in log
    assert [re.sub(r"  [\d.,]+ it/s.*", "", line) for line in log.splitlines()[1:]] == [
        "[train] epoch 1/1  iter 0/2 (0%)", "[train] epoch 1/1  iter 1/2 (50%)  loss 0.500", "between two steps",
        "[train] epoch 1/1  iter 2/2 (100%)  loss 1.000", "[train] epoch 1/1  iter 2/2 (100%)  loss 1.000"]


def test_a_shard_build_shows_one_pass_per_split_unless_told_not_to(lines: None, toy_source, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_split(toy_source, tmp_path / "a", "train", options=WriteOptions(samples_per_shard=16))
    first, last = capsys.readouterr().err.splitlines()
    assert first == "[shards] toy/train  0/40 img (0%)"
    assert re.fullmatch(r"\[shards\] toy/train  40/40 img \(100%\)  [\d.,]+ (img/s|s/img)  done in \d+s", last)
    write_split(toy_source, tmp_path / "b", "train", options=WriteOptions(samples_per_shard=16, progress=False))
    assert capsys.readouterr().err == ""


def _argv(shards: Path, out: Path) -> list[str]:
    person = shards / "synthetic_person"
    return ["--config", "launch/configs/dm_osnet_tiny.yaml", f"output_dir={out}", "run_name=r", "epochs=2",
            "iters_per_epoch=2", "model.name=osnet", "model.options={variant: osnet_x0_25}",
            f"data.train={person / 'train'}", f"data.query={person / 'query'}", f"data.gallery={person / 'gallery'}",
            "data.p=4", "data.k=4", "data.workers=0", "data.transform.height=64", "data.transform.width=32",
            "eval_every=1"]


def _run_lines(text: str) -> list[str]:
    """The whole-run lines, without their timings."""
    return [re.sub(r"  (loss|[\d.,]+ (it/s|s/it)).*", "", line) for line in text.splitlines()
            if re.match(r"\[\w+\] epoch ", line)]


def test_a_training_run_shows_one_whole_run_count_and_resumes_at_its_iteration(
        tiny_shards: Path, tmp_path: Path, lines: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(tiny_shards, tmp_path)
    with killed_in_epoch(monkeypatch, engine.Trainer, 1):
        train_main(argv)
    killed = capsys.readouterr().err
    assert "\r" not in killed
    assert _run_lines(killed) == [
        "[train] epoch 1/2  iter 0/4 (0%)", "[train] epoch 1/2  iter 2/4 (50%)",  # the epoch's end
        "[eval] epoch 1/2  iter 2/4 (50%)", "[checkpoint] epoch 1/2  iter 2/4 (50%)"]
    assert re.search(r"^\[eval\] embedding query  1/1 batch \(100%\)  .*done in \d+s$", killed, re.MULTILINE)

    assert train_main([*argv, "--resume"]) == 0
    resumed = capsys.readouterr().err
    assert _run_lines(resumed) == [
        "[train] epoch 2/2  iter 2/4 (50%)", "[train] epoch 2/2  iter 4/4 (100%)", "[eval] epoch 2/2  iter 4/4 (100%)",
        "[checkpoint] epoch 2/2  iter 4/4 (100%)", "[export] epoch 2/2  iter 4/4 (100%)",
        "[export] epoch 2/2  iter 4/4 (100%)"]
    assert re.search(r"^\[train\] epoch 2/2  iter 4/4 \(100%\)  loss \d+\.\d{3}  [\d.]+ (it/s|s/it)  eta 0s$",
                     resumed, re.MULTILINE)
    assert re.fullmatch(r"\[export\] epoch 2/2  iter 4/4 \(100%\)  loss \d+\.\d{3}  [\d.]+ (it/s|s/it)  done in \d+s",
                        resumed.splitlines()[-1])
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "\r" not in log and log.count("=== ") == 2
    assert _run_lines(log) == _run_lines(killed) + _run_lines(resumed)

    # --no-progress, and REIDFORGE_PROGRESS=0 for a launcher: not one progress line
    assert train_main([*argv, "epochs=0", "--overwrite", "--no-progress"]) == 0
    monkeypatch.setenv("REIDFORGE_PROGRESS", "0")
    assert train_main([*argv, "epochs=0", "--overwrite"]) == 0
    quiet = capsys.readouterr().err
    assert not re.search(r"^\[\w+\] ", quiet, re.MULTILINE)
    assert not re.search(r"^\[\w+\] ", (tmp_path / "r" / "log.txt").read_text(), re.MULTILINE)
    monkeypatch.setenv("REIDFORGE_PROGRESS", "sometimes")
    assert train_main([*argv, "epochs=0", "--overwrite"]) == 2
    assert capsys.readouterr().err == ("error: REIDFORGE_PROGRESS='sometimes': expected one of 1, auto, 0, off, "
                                       "bar, lines\n")
