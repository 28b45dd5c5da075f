"""Throughput by prefork worker processes (1, 2, 4, 8), kojin_pg against Redis.

Issue 12's target: kojin_pg >= Redis at each count. Each count runs ``e2e.py`` with
``BENCH_POOL=prefork`` and ``BENCH_CONC=<count>`` ``--repeat`` times per system, the two
systems in turns (:mod:`bench.interleave`), and reports the median with its spread and the ratio.

Rows keep the keys the README's report reads: ``"kojin x<count>"`` and ``"redis x<count>"``.
Called from ``bench/__main__.py``, which passes its ``run_script`` and ``median_runs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.interleave import interleaved_runs
from bench.spread import fmt_spread, ratio, value, verdict

RunScript = Callable[..., dict]
MedianRuns = Callable[[int, Callable[[], dict]], dict]

COUNTS = (1, 2, 4, 8)


def worker_processes(db: str, redis_url: str | None, repeat: int, n_tasks: str,
                     run_script: RunScript, median_runs: MedianRuns) -> dict[str, Any]:
    """Run every count for both systems; print the table; return ``{"kojin x1": row, ...}``."""
    rows: dict[str, Any] = {}
    for count in COUNTS:
        env = {"BENCH_POOL": "prefork", "BENCH_CONC": str(count)}
        runs = {f"kojin x{count}": lambda env=env: run_script(
            "e2e.py", ["kojin+" + db, "kojin+" + db, n_tasks, "20"],
            env={"BENCH_IMPORT": "import kojin_pg", **env})}
        if redis_url:
            runs[f"redis x{count}"] = lambda env=env: run_script(
                "e2e.py", [redis_url, redis_url, n_tasks, "20"], env=env)
        rows.update(interleaved_runs(repeat, runs, median_runs))
    print_table(rows, repeat)
    return rows


def print_table(rows: dict[str, Any], repeat: int) -> None:
    """Tasks/s per count for both systems, with spreads and kojin_pg's ratio to Redis."""
    print(f"\n== throughput (tasks/s) by prefork worker processes, median of {repeat}"
          " (target: kojin >= 1.0x Redis at each count)")
    print(f"{'processes':<10}{'kojin':>9}  {'[min, max]':<16}{'redis':>9}  {'[min, max]':<16}"
          f"{'ratio':>7}  spreads")
    for count in COUNTS:
        k, r = rows.get(f"kojin x{count}"), rows.get(f"redis x{count}")
        kv, rv = value(k, "throughput"), value(r, "throughput")
        x = ratio(k, r, "throughput")
        print(f"{count:<10}{_n(kv):>9}  {fmt_spread(k, 'throughput'):<16}"
              f"{_n(rv):>9}  {fmt_spread(r, 'throughput'):<16}"
              f"{f'{x:.2f}x' if x else '-':>7}  {verdict(k, r, 'throughput')}")


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"
