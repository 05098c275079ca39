"""Text from data, made safe to print: file names and sample keys may hold terminal control sequences."""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """``text`` with every control or format character (ESC, CR, BEL, bidi overrides ...) written as an
    escape (``\\x1b``, ``\\r``, ``\\u202e``), so that printing a name cannot move the cursor, clear the
    screen or reorder the line; other characters, non-ASCII letters included, are kept."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cc", "Cf"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
