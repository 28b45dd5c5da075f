"""Throughput by prefork worker processes (1, 2, 4, 8), kojin_pg against Redis.

usage: python -m bench.worker_processes [--stock] [--repeat N] [--quick]
       python -m bench processes [--stock] [--repeat N] [--quick]   (also part of ``all``)

Issue 12's target: kojin_pg >= Redis at each count. Each count runs ``e2e.py`` with
``BENCH_POOL=prefork`` and ``BENCH_CONC=<count>`` ``--repeat`` times per system, the systems in
turns (:mod:`bench.interleave`), and reports the median with its spread and the ratio. Beside
it, kojin_pg at ``synchronous_commit=off`` (Redis AOF ``everysec``'s durability): with few
processes a task's durable result store is a WAL flush that its one process waits for before it
takes the next task, and the ``off`` row shows how much of the gap that is.

Rows keep the keys the README's report reads: ``"kojin x<count>"``, ``"kojin sync=off
x<count>"`` and ``"redis x<count>"``. ``all`` calls :func:`worker_processes` with its
``run_script`` and ``median_runs``; run alone, the figures go to
``bench/results/processes.json`` (``processes_stock.json`` with ``--stock``).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.interleave import interleaved_runs
from bench.spread import fmt_spread, ratio, value, verdict
from bench.writers import kojin_variants

RunScript = Callable[..., dict]
MedianRuns = Callable[[int, Callable[[], dict]], dict]

COUNTS = (1, 2, 4, 8)


def worker_processes(db: str, redis_url: str | None, repeat: int, n_tasks: str,
                     run_script: RunScript, median_runs: MedianRuns) -> dict[str, Any]:
    """Run every count for every system; print the table; return ``{"kojin x1": row, ...}``."""
    rows: dict[str, Any] = {}
    kojin = {name: url for name, url in kojin_variants(db).items() if name != "kojin no notify"}
    for count in COUNTS:
        env = {"BENCH_POOL": "prefork", "BENCH_CONC": str(count)}
        runs = {f"{name} x{count}": lambda url=url, env=env: run_script(
            "e2e.py", [url, url, n_tasks, "20"], env={"BENCH_IMPORT": "import kojin_pg", **env})
            for name, url in kojin.items()}
        if redis_url:
            runs[f"redis x{count}"] = lambda env=env: run_script(
                "e2e.py", [redis_url, redis_url, n_tasks, "20"], env=env)
        rows.update(interleaved_runs(repeat, runs, median_runs))
    print_table(rows, repeat)
    return rows


def print_table(rows: dict[str, Any], repeat: int) -> None:
    """Tasks/s per count for every system, with spreads and kojin_pg's ratios to Redis."""
    print(f"\n== throughput (tasks/s) by prefork worker processes, median of {repeat}"
          " (target: kojin >= 1.0x Redis at each count)")
    print(f"{'processes':<10}{'kojin':>9}  {'[min, max]':<16}{'off':>9}  {'[min, max]':<16}"
          f"{'redis':>9}  {'[min, max]':<16}{'ratio':>7}  {'spreads':<9}{'off ratio':>10}")
    for count in COUNTS:
        k, off = rows.get(f"kojin x{count}"), rows.get(f"kojin sync=off x{count}")
        r = rows.get(f"redis x{count}")
        x, x_off = ratio(k, r, "throughput"), ratio(off, r, "throughput")
        print(f"{count:<10}{_n(value(k, 'throughput')):>9}  {fmt_spread(k, 'throughput'):<16}"
              f"{_n(value(off, 'throughput')):>9}  {fmt_spread(off, 'throughput'):<16}"
              f"{_n(value(r, 'throughput')):>9}  {fmt_spread(r, 'throughput'):<16}"
              f"{f'{x:.2f}x' if x else '-':>7}  {verdict(k, r, 'throughput'):<9}"
              f"{f'{x_off:.2f}x' if x_off else '-':>10}")
    print("(ratio: kojin_pg at synchronous_commit=on against Redis; off ratio: at off)")


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import make_db, median_runs, run_script, save_results, start_servers, stop_servers
    from bench.servers import bench_parser, describe

    args = bench_parser("python -m bench.worker_processes",
                        "300 tasks, one repeat").parse_args(argv)
    repeat, n_tasks = (1, "300") if args.quick else (args.repeat, "2000")
    admin, server, redis_url, redis_proc = start_servers(args.stock)
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        results = {"date": time.strftime("%Y-%m-%d %H:%M"),
                   "machine": f"{os.cpu_count()} cores, {sys.platform}",
                   "postgres": describe(admin, server), "tasks_per_run": int(n_tasks),
                   "repeat": repeat,
                   "worker_processes": worker_processes(db, redis_url, repeat, n_tasks,
                                                        run_script, median_runs)}
    finally:
        stop_servers(server, redis_proc)
    print(f"\nraw figures: {save_results('processes', results, args.quick, args.stock)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
