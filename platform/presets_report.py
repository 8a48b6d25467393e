"""`scaleyard models`: every job's model presets (`Job.model_presets`) as one table per job."""

from __future__ import annotations

from typing import Any

FIRST = ("name", "params", "flops_per_sample")
LAST = ("use", "note")
HEADERS = {"flops_per_sample": "train FLOPs/sample"}


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """A table of one job's rows: name, params, FLOPs, its extra columns in order, use, note."""
    extra = [k for row in rows for k in row if k not in FIRST + LAST]
    columns = [*FIRST, *dict.fromkeys(extra), *(k for k in LAST if any(k in row for row in rows))]
    cells = [[HEADERS.get(c, c) for c in columns]] + [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for line in cells:
        parts = [cell.ljust(w) if c in ("name", *LAST) else cell.rjust(w) for c, cell, w in zip(columns, line, widths)]
        text.append("  " + "  ".join(parts).rstrip())
    return text


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "params" and isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
