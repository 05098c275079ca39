"""Progress of every command: one tqdm bar on a terminal, plain lines everywhere else.

A training command (``finetune/engine.py``, ``pretrain/spcl.py``) keeps one :class:`RunProgress` over
every iteration of every epoch of the run (on ``--resume`` it starts at the resumed iteration), labelled
with the epoch, the phase (``train``, ``extract``, ``cluster``, ``eval``, ``checkpoint``, ``export``), the
running loss (the mean of the epoch so far), the rate and the whole-run ETA: the iterations left at the
run's average rate since it started, which counts its evaluation and clustering time too. Every other
pass (evaluation embedding, SpCL's extractions, CFS scoring, shard writing, search) opens its own short
:class:`Progress`, drawn under the run's bar and gone when it ends.

Everything goes to stderr, so stdout holds only a command's results (``search.py --json``, the tables).
The mode is decided when a bar opens:

- ``bar``, stderr is a terminal: tqdm bars. Lines printed meanwhile are written with the bars lifted
  (``tqdm.external_write_mode``), so a print never lands inside a bar. The redraws reach the terminal
  only; a run's ``log.txt`` (``shared/runlog.py``) gets the plain lines below instead.
- ``lines``, stderr is not a terminal (CI, nohup, a pipe): plain lines and never a carriage return,
  one when a pass opens, one at each phase change and epoch end of a run, one every
  ``REIDFORGE_PROGRESS_INTERVAL`` seconds (default 30) and one when a pass ends (``done in ...``)::

      [train] epoch 3/10  iter 1,230/4,000 (30%)  loss 1.234  12.3 it/s  eta 3m45s
      [eval] embedding query  4/12 batch (33%)  2.1 batch/s  eta 4s

- ``off``: the command's ``--no-progress`` (:func:`progress_options`), ``REIDFORGE_PROGRESS=0``, or any
  process but the main one (``reidforge.shared.config.is_main_process``: global rank 0).

``REIDFORGE_PROGRESS`` (for launchers): ``1`` or ``auto`` (the default, as above), ``0`` or ``off``,
``bar`` or ``lines`` to force one of the two. A value outside these is a one-line ``ConfigError``.

Why tqdm does not write the lines too: tqdm redraws its line with ``\\r`` on any file, a terminal or not,
and ends the line only when the bar closes; ``disable`` and ``mininterval`` only thin the redraws out.
So tqdm draws on terminals, and this module formats the same counts as lines for everything else.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

from reidforge.shared.config import ConfigError, is_main_process
from reidforge.shared.runlog import log_line, unlogged

T = TypeVar("T")

MODE_ENV, INTERVAL_ENV = "REIDFORGE_PROGRESS", "REIDFORGE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0  # seconds between two plain lines of one pass
MODES = {"": "auto", "1": "auto", "auto": "auto", "0": "off", "off": "off", "bar": "bar", "lines": "lines"}

_enabled = True  # False inside a command's --no-progress (progress_options)


def progress_settings() -> tuple[str, float]:
    """(mode asked for: auto, off, bar or lines; seconds between plain lines) from the environment and the
    enclosing :func:`progress_options`; a bad value is a one-line ConfigError naming the variable."""
    raw = os.environ.get(MODE_ENV, "")
    mode = MODES.get(raw.strip().lower())
    if mode is None:
        raise ConfigError(f"{MODE_ENV}={raw!r}: expected one of 1, auto, 0, off, bar, lines")
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        interval = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        interval = math.nan
    if not 0 <= interval < math.inf:
        raise ConfigError(f"{INTERVAL_ENV}={text!r}: expected a number of seconds >= 0")
    return ("off" if not _enabled or not is_main_process() else mode), interval


@contextmanager
def progress_options(enabled: bool = True) -> Iterator[None]:
    """A command's ``--no-progress`` (``enabled=False``) for everything inside; the environment is checked
    on entry, so a bad ``REIDFORGE_PROGRESS`` stops a command before any work."""
    global _enabled
    progress_settings()
    saved, _enabled = _enabled, _enabled and enabled
    try:
        yield
    finally:
        _enabled = saved


def duration(seconds: float) -> str:
    """``45s``, ``3m45s``, ``2h05m``: an ETA or elapsed time at the precision a reader needs."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate_text(rate: float, unit: str) -> str:
    """``12.3 it/s``, or ``4.0 s/it`` below one per second (as tqdm shows slow rates)."""
    return f"{rate:,.1f} {unit}/s" if rate >= 1 else f"{1 / rate:,.1f} s/{unit}"


class _AboveBars:
    """sys.stdout or sys.stderr while a bar is on the terminal: complete lines are written with every bar
    lifted and redrawn after, so that prints and warnings never land inside a bar."""

    def __init__(self, stream: TextIO, screen: TextIO):
        self.stream, self.screen, self.pending = stream, screen, ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            done, _, self.pending = self.pending.rpartition("\n")
            with tqdm.external_write_mode(file=self.screen):
                self.stream.write(done + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ... of the wrapped stream
        return getattr(self.stream, name)


_lifted: list[_AboveBars] = []  # the wrappers in place while any bar is open
_open_bars = 0


def _bar_opened(screen: TextIO) -> None:
    global _open_bars
    if _open_bars == 0:
        _lifted[:] = [_AboveBars(sys.stdout, screen), _AboveBars(sys.stderr, screen)]
        sys.stdout, sys.stderr = _lifted  # type: ignore[assignment]
    _open_bars += 1


def _bar_closed() -> None:
    global _open_bars
    _open_bars -= 1
    if _open_bars == 0:
        out, err = _lifted
        sys.stdout, sys.stderr = out.stream, err.stream
        for wrapper in (out, err):
            wrapper.stream.write(wrapper.pending)  # a last write without its newline
        _lifted.clear()


class Progress:
    """A short pass of ``total`` units (None: unknown), shown as ``[phase] desc`` (module docstring)."""

    leave = False  # a finished pass leaves no bar behind on the terminal

    def __init__(self, total: int | None, desc: str, phase: str, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.phase, self.unit = total, desc, phase, unit
        self.n = self.initial = initial
        self.postfix = ""
        self._clock = clock
        self._start = self._last = clock()
        asked, self.interval = progress_settings()
        screen = sys.stderr.screen if isinstance(sys.stderr, _AboveBars) else unlogged(sys.stderr)
        if not enabled or asked == "off":
            self.mode = "off"
        elif asked == "auto":
            self.mode = "bar" if getattr(screen, "isatty", lambda: False)() else "lines"
        else:
            self.mode = asked
        self._screen, self._bar = screen, None
        self.closed = self.mode == "off"
        if phase:
            self._open()

    def _open(self) -> None:
        """Show the pass: its bar, or its first line."""
        if self.mode == "bar":
            # The average rate since the start (smoothing 0): the ETA of a run counts its evaluations too.
            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.label(), unit=self.unit,
                             leave=self.leave, file=self._screen, dynamic_ncols=True, smoothing=0)
            _bar_opened(self._screen)
        self._emit()

    def label(self) -> str:
        return f"[{self.phase}] {self.desc}"

    def count(self) -> str:
        if self.total is None:
            return f"{self.n:,} {self.unit}"
        percent = 100 * self.n // self.total if self.total else 100
        return f"{self.n:,}/{self.total:,} {self.unit} ({percent}%)"

    def line(self, done: bool = False) -> str:
        """The plain line of the present state; ``done``: the closing one, with the time the pass took."""
        elapsed = self._clock() - self._start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [self.label(), self.count(), *([self.postfix] if self.postfix else [])]
        if rate > 0:
            parts.append(rate_text(rate, self.unit))
        if done:
            parts.append(f"done in {duration(elapsed)}")
        elif rate > 0 and self.total is not None:
            parts.append(f"eta {duration(max(self.total - self.n, 0) / rate)}")
        return "  ".join(parts)

    def _emit(self, done: bool = False) -> None:
        """A plain line now: on stderr off a terminal, into the run's log.txt only behind a bar."""
        if self.closed:
            return
        self._last = self._clock()
        if self.mode == "lines":
            print(self.line(done), file=sys.stderr, flush=True)
        else:
            log_line(self.line(done))

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        if self._clock() - self._last >= self.interval:
            self._emit()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, each counted once the loop has finished with it."""
        for item in items:
            yield item
            self.update()

    def close(self, done: bool = True) -> None:
        """End the pass; ``done`` prints its closing line (not after an error: the error is the last word)."""
        if self.closed:
            return
        if done:
            self._emit(done=True)
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            _bar_closed()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(done=kind is None)


class RunProgress(Progress):
    """A training run of ``epochs`` x ``iters_per_epoch`` iterations, started at epoch ``epoch`` (0-based)
    and its iteration ``step`` (a resumed run). It shows from the first :meth:`set_phase` on."""

    leave = True  # the run's final state stays on screen

    def __init__(self, epochs: int, iters_per_epoch: int, epoch: int = 0, step: int = 0, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.epochs, self.iters_per_epoch, self.epoch = epochs, iters_per_epoch, epoch
        self._losses = [0.0, 0]
        self._shown: tuple[str, int] | None = None
        super().__init__(epochs * iters_per_epoch, "", "", unit="it", initial=epoch * iters_per_epoch + step,
                         enabled=enabled, clock=clock)

    def label(self) -> str:
        return f"[{self.phase}] epoch {min(self.epoch + 1, self.epochs)}/{self.epochs}"

    def count(self) -> str:
        percent = 100 * self.n // self.total if self.total else 100
        return f"iter {self.n:,}/{self.total:,} ({percent}%)"

    def start_epoch(self, epoch: int, step: int = 0) -> None:
        """Epoch ``epoch`` (0-based) begins at its iteration ``step``; its running loss starts afresh. An
        epoch that ended short (fewer batches than ``iters_per_epoch``) moves the count on to here."""
        self.epoch, self._losses = epoch, [0.0, 0]
        self.set_postfix("")
        position = epoch * self.iters_per_epoch + step
        if position > self.n:
            self.update(position - self.n)

    def set_phase(self, phase: str) -> None:
        """Enter ``phase`` of the present epoch: a line says so (a phase lasts from seconds to hours)."""
        self.phase, shown, self._shown = phase, self._shown, (phase, self.epoch)
        if shown is None:
            self._open()
        elif self._shown != shown:
            if self._bar is not None:
                self._bar.set_description_str(self.label())
            self._emit()

    def step(self, loss: float | None = None) -> None:
        """One training iteration done, with its loss."""
        if loss is not None:
            self._losses[0] += loss
            self._losses[1] += 1
            self.set_postfix(f"loss {self._losses[0] / self._losses[1]:.3f}")
        self.update()

    def end_epoch(self) -> None:
        """The epoch's training is over: its line, with the epoch's mean loss."""
        self._emit()
