"""Plain-text tables for the summaries that long runs print at the end (also valid Markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Percent(float):
    """A fraction shown as a percentage with one decimal (mAP 0.58431 -> ``58.4``), as re-ID papers report."""


def _cell(value: Any) -> str:
    if isinstance(value, Percent):
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table with aligned columns; numbers are right-aligned, :class:`Percent` values in %."""
    cells = [[_cell(v) for v in row] for row in rows]
    # a column of numbers, some cells left empty (a metric not measured every epoch), is still numeric
    numeric = [any(isinstance(row[c], (int, float)) for row in rows)
               and all(isinstance(row[c], (int, float)) or row[c] == "" for row in rows) for c in range(len(headers))]
    widths = [max([len(h)] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])
