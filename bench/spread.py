"""Ratios between two medians of ``median_runs`` rows, and whether their spreads support them.

A row is what ``bench.__main__.median_runs`` returns: ``{metric: median,
metric + "_spread": [min, max], ...}`` (or ``{"error": ...}`` for a failed competitor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Row = Mapping[str, Any]


def value(row: Row | None, metric: str) -> float | None:
    """The median of ``metric`` in ``row``, None when missing or failed."""
    if not row or "error" in row:
        return None
    v = row.get(metric)
    return float(v) if isinstance(v, int | float) else None


def spread(row: Row | None, metric: str) -> tuple[float, float] | None:
    """``(min, max)`` of ``metric`` over the repeats (the median twice for a single run)."""
    v = value(row, metric)
    if v is None:
        return None
    s = (row or {}).get(metric + "_spread")
    return (float(s[0]), float(s[1])) if s else (v, v)


def ratio(base: Row | None, other: Row | None, metric: str,
          higher_is_better: bool = True) -> float | None:
    """How many times better ``base`` is than ``other`` on ``metric`` (> 1: base better)."""
    b, o = value(base, metric), value(other, metric)
    if not b or not o:
        return None
    return b / o if higher_is_better else o / b


def verdict(base: Row | None, other: Row | None, metric: str,
            higher_is_better: bool = True) -> str:
    """``better``/``worse`` only when the two spreads do not overlap, else ``overlap``
    (``one run`` when neither has a spread to judge by)."""
    b, o = spread(base, metric), spread(other, metric)
    if b is None or o is None:
        return ""
    if b[0] == b[1] and o[0] == o[1]:
        return "one run"
    if not higher_is_better:
        b, o = (-b[1], -b[0]), (-o[1], -o[0])
    if b[0] > o[1]:
        return "better"
    if b[1] < o[0]:
        return "worse"
    return "overlap"


def fmt_spread(row: Row | None, metric: str) -> str:
    """``[min, max]`` for a printed table ('-' when missing)."""
    s = spread(row, metric)
    return f"[{s[0]:,.0f}, {s[1]:,.0f}]" if s else "-"


def print_ratio_table(title: str, rows: Mapping[str, Row], metric: str, unit: str,
                      targets: Mapping[str, float] | None = None, base: str = "kojin",
                      higher_is_better: bool = True) -> None:
    """One table: each system's median, spread, and ``base``'s ratio to it with the verdict.

    ``targets`` maps a system to the ratio ``base`` must reach against it (printed beside).
    """
    print(f"\n== {title}")
    print(f"{'system':<18}{unit:>10}  {'[min, max]':<20}{'ratio':>8}  spreads")
    for system, row in rows.items():
        v = value(row, metric)
        if v is None:
            print(f"{system:<18}{'-':>10}  {'(failed)' if row and 'error' in row else '':<20}")
            continue
        cell, note = "", ""
        if system != base:
            r = ratio(rows.get(base), row, metric, higher_is_better)
            if r is not None:
                cell = f"{r:.2f}x"
                note = verdict(rows.get(base), row, metric, higher_is_better)
                target = (targets or {}).get(system)
                if target is not None:
                    note += f"  (target >= {target:.2f}x: {'met' if r >= target else 'NOT met'})"
        print(f"{system:<18}{v:>10,.0f}  {fmt_spread(row, metric):<20}{cell:>8}  {note}")
    print(f"(ratio: how many times better {base} is than the row; spreads: whether the repeats'"
          " [min, max] keep apart)")
