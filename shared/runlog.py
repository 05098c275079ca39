"""``log.txt`` in a run directory: everything a training command prints, as plain lines.

The command line (``reidforge.shared.config.config_main``) runs the command inside :func:`output_log`, which
copies ``sys.stdout`` and ``sys.stderr`` while they still reach the terminal; once the run knows its
directory (after claiming it) it calls :func:`log_to`, and the lines printed so far (the resolved
config among them) and every later one go to ``<run_dir>/log.txt``. Progress (``shared/progress.py``)
reaches the file as plain lines only: a terminal's bars are drawn on :func:`unlogged` streams, their
lines written by :func:`log_line`; any other line redrawn with carriage returns keeps its last state,
so the file holds no control characters. A resumed run appends to the same file under a new header
line. Only the main process logs.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TextIO

LOG_NAME = "log.txt"


class _Log:
    """Lines held in memory until a file is attached, then written there as they come."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.file: IO[str] | None = None

    def line(self, text: str) -> None:
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by output_log)
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.file.write(f"=== {stamp} {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
        for text in self.pending:
            self.line(text)
        self.pending = []


class _Tee:
    """A text stream that writes to ``stream`` and, line by line with ``\\r`` redraws collapsed, to a log."""

    def __init__(self, stream: TextIO, log: _Log):
        self.stream, self._log, self._line = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            self._log.line(line.rsplit("\r", 1)[-1].rstrip())
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_line(self) -> None:
        """Keep a line left without its newline (the last redraw of a bar still on screen)."""
        if last := self._line.rsplit("\r", 1)[-1].rstrip():
            self._log.line(last)
        self._line = ""

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ... of the real stream
        return getattr(self.stream, name)


_active: _Log | None = None


@contextmanager
def output_log(enabled: bool = True) -> Iterator[None]:
    """Copy what is printed inside the block, for :func:`log_to` to write into a run directory."""
    global _active
    if not enabled or _active is not None:
        yield
        return
    log = _Log()
    out, err = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    sys.stdout, sys.stderr, _active = out, err, log  # type: ignore[assignment]
    try:
        yield
    finally:
        out.close_line()
        err.close_line()
        sys.stdout, sys.stderr, _active = out.stream, err.stream, None
        if log.file is not None:
            log.file.close()


def log_to(run_dir: str | Path) -> Path | None:
    """Write the output of the enclosing :func:`output_log` to ``run_dir/log.txt`` (its path), from the
    start of the command on; None (and nothing written) outside one, e.g. when called from Python."""
    if _active is None or _active.file is not None:
        return None
    path = Path(run_dir) / LOG_NAME
    _active.attach(path)
    return path


def log_line(text: str) -> None:
    """Write ``text`` as one line of the enclosing :func:`output_log` only, not to the screen (the plain
    progress lines of a bar drawn on the terminal); nothing outside one."""
    if _active is not None:
        _active.line(text)


def unlogged(stream: TextIO) -> TextIO:
    """The screen beneath a stream that :func:`output_log` copies (``stream`` itself otherwise): what is
    written there, such as a progress bar's redraws, stays out of ``log.txt``."""
    return stream.stream if isinstance(stream, _Tee) else stream
