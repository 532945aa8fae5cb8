"""Plain-text tables for terminal reports (`dsserve plugins`, the conformance suite's summaries).

Columns are left-aligned and separated by `GAP`; the last column, the one with free text, is
word-wrapped under itself so that every line stays within the given width.
"""
from __future__ import annotations

import textwrap

GAP = "  "
MIN_LAST_COLUMN = 20  # the last column keeps this much room even when the others are wide


def table_lines(header: list[str], rows: list[list[str]], width: int) -> list[str]:
    """The header and `rows` as aligned lines of at most `width` characters (more where the other
    columns leave the last one under `MIN_LAST_COLUMN`, or a word in it is longer than its room:
    words are never split)."""
    cols = len(header)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(cols - 1)]
    indent = sum(widths) + len(GAP) * (cols - 1)
    room = max(MIN_LAST_COLUMN, width - indent)
    lines = []
    for row in [header, *rows]:
        lead = GAP.join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + GAP
        wrapped = textwrap.wrap(row[-1], room, break_long_words=False) or [""]
        lines.append((lead + wrapped[0]).rstrip())
        lines.extend(" " * indent + more for more in wrapped[1:])
    return lines
