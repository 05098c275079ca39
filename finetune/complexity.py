"""Parameters, MACs and feature width of every registered re-ID model, beside the published figures.

    python finetune/complexity.py [--models a,b] [--markdown]

Every model in ``reidforge.finetune.models.MODELS`` is built (all of them unless ``--models`` names some) and
measured with ``reidforge.shared.complexity`` at its own ``input_size``: MACs of one eval-mode forward pass (convs,
linears and matrix products, attention included), the eval feature width, and the trainable parameters
without a classifier (``num_classes=0``) and, where a published figure includes one, with the
published figure's number of classes. A model that fails to build or run gets a row saying why, and
the command exits with status 1.

``PUBLISHED`` holds the reference figures of models.md §8, keyed by registered model name: a new
model's figures go there as one more entry. ``VARIANTS`` lists option sets measured as rows of their own
after a model's default row (FNC's split points, where the paper can be read more than one way).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reidforge.finetune.models import MODELS, build_model
from reidforge.shared.complexity import count_params, measure_forward
from reidforge.shared.table import format_table


@dataclass(frozen=True)
class Reference:
    """A published (or reference-derived) figure: trainable parameters with a ``num_classes``-way
    classifier (0: without one), MACs at the model's input size, and where they come from."""

    params: int | None
    macs: float | None
    num_classes: int = 0
    source: str = ""


PUBLISHED: dict[str, Reference] = {
    "osnet": Reference(2_169_508, 978.9e6, 0, "§1: 2.2M (backbone + fc512), 978.9M mult-adds"),
    "bot_resnet50": Reference(23_508_032 + 2048 * 751 + 2048, 4.05e9, 751, "§3: 23.51M + 2048·N + 2048 (calc)"),
    "bot_resnet50_ibn_a": Reference(23_508_032 + 2048 * 751 + 2048, 4.05e9, 751,
                                    "§3: IBN-a keeps ResNet-50's counts (calc)"),
    "bot_seresnext50": Reference(25_510_896 + 2048 * 751 + 2048, 4.06e9, 751, "§4: 25.51M + head (calc)"),
    "dm_osnet": Reference(1_935_908 + 512 * 751 + 512, 1.054e9, 751, "§2: 1.94M + BNNeck head (reference code, calc)"),
    "mbr_4b": Reference(61_440_064, 14.44e9, 575, "§5, LKA-ReID Table II (12.23G by models.md's count)"),
    "lka_reid": Reference(47_420_000, 13.70e9, 575, "§6: LKA-ReID Table II, +LKA +HCA"),
}

VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "fnc": ({"split": "after_conv3"}, {"split": "after_conv4"}, {"split": "none"}),
}


def row_label(name: str, options: dict[str, Any]) -> str:
    """``name``, then each option as `` (key=value)``: the row's label."""
    return name + "".join(f" ({key}={value})" for key, value in options.items())


def _delta(measured: float, published: float) -> str:
    return f"{100 * (measured - published) / published:+.2f}%"


def measure(name: str, options: dict[str, Any] | None = None) -> list[str]:
    """One table row for a registered model, built with ``options`` (published figures: defaults only)."""
    options = options or {}
    ref = Reference(None, None) if options else PUBLISHED.get(name, Reference(None, None))
    model = build_model(name, 0, **options)
    h, w = model.input_size
    params = count_params(model)
    macs, output = measure_forward(model, (h, w))
    dim = output.shape[-1]
    if dim != model.feature_dim:
        raise ValueError(f"declares feature_dim {model.feature_dim} but returns {dim}")
    with_head = count_params(build_model(name, ref.num_classes, **options)) if ref.num_classes else params
    deltas = []
    if ref.params is not None:
        deltas.append(f"params {_delta(with_head, ref.params)}")
    if ref.macs is not None:
        deltas.append(f"MACs {_delta(macs, ref.macs)}")
    return [row_label(name, options), f"{h}x{w}", f"{params:,}",
            f"{with_head:,} (N={ref.num_classes})" if ref.num_classes else "", f"{macs / 1e9:.3f}", str(dim),
            f"{ref.params:,}" if ref.params is not None else "",
            f"{ref.macs / 1e9:.3f}" if ref.macs is not None else "", ", ".join(deltas), ref.source]


HEADERS = ["model", "input", "params (no classifier)", "params (published N)", "GMACs", "feature dim",
           "published params", "published GMACs", "measured vs published", "reference (models.md)"]


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[c]) for r in [headers, *rows]) for c in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [headers, ["-" * w for w in widths], *rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated registered names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else MODELS.names()
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS.names())}")
    rows, failed = [], False
    for name, options in ((n, options) for n in names for options in ({}, *VARIANTS.get(n, ()))):
        try:
            rows.append(measure(name, options))
        except Exception as e:  # one broken model must not hide the others' rows
            rows.append([row_label(name, options), *[""] * (len(HEADERS) - 2), f"FAILED: {type(e).__name__}: {e}"])
            failed = True
    print(format_table(HEADERS, rows) if args.markdown else plain_table(HEADERS, rows))
    stale = sorted(set(PUBLISHED) - set(MODELS.names()))
    if stale and not args.models:
        print(f"\npublished figures for unregistered names: {', '.join(stale)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
