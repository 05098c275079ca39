"""Summary tables: metrics in % with one decimal, as the papers print them, whatever their value."""

from __future__ import annotations

from reidforge.shared.table import Percent, format_table


def test_percentages_have_one_decimal_and_zero_is_not_a_bare_0() -> None:
    table = format_table(["model", "mAP (%)", "R1 (%)", "images"],
                         [["a", Percent(0.584), Percent(0.0), 1200], ["b", Percent(0.64412), Percent(1.0), 7]])
    assert table.splitlines() == [
        "| model | mAP (%) | R1 (%) | images |",
        "|-------|--------:|-------:|-------:|",
        "| a     |    58.4 |    0.0 |  1,200 |",
        "| b     |    64.4 |  100.0 |      7 |"]
