"""Repeats taken in turns: system A, B, C, then A, B, C again, rather than A A A, B B B.

On a shared or drifting machine (another job starting, the page cache warming, autovacuum) a
slow patch then lands on every system instead of on one, so ratios of the medians stay fair;
that matters for targets as tight as 0.95x. The rows are merged by ``median_runs`` as the rest
of the bench does (median, ``_spread`` [min, max]), and a system whose run fails becomes
``{"error": ...}`` without losing the others.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping

MedianRuns = Callable[[int, Callable[[], dict]], dict]

FAILURES = (RuntimeError, subprocess.TimeoutExpired, ValueError)


def interleaved_runs(repeat: int, runs: Mapping[str, Callable[[], dict]],
                     median_runs: MedianRuns) -> dict[str, dict]:
    """``repeat`` rounds of every run in ``runs`` in turn; ``{name: merged row}``."""
    done: dict[str, list[dict]] = {name: [] for name in runs}
    failed: dict[str, str] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            if name in failed:
                continue
            try:
                done[name].append(fn())
            except FAILURES as exc:
                failed[name] = str(exc)
    out: dict[str, dict] = {}
    for name in runs:
        if name in failed:
            print(f"  ({name} skipped: {failed[name].splitlines()[0] if failed[name] else ''})")
            out[name] = {"error": failed[name][-500:]}
        else:
            results = iter(done[name])
            out[name] = median_runs(len(done[name]), lambda results=results: next(results))
    return out
