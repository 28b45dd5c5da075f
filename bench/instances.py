"""Many worker instances on one server: the broker and the results in one database or in two.

usage: python -m bench instances [--stock] [--quick] [--repeat N]   (not part of ``all``)
       python -m bench.instances [--stock] [--quick] [--repeat N]

Up to PostgreSQL 18 every listening session of a database pays for each notifying commit of it
(``python -m bench listeners`` measures that with pgbench), and every ``celery worker``
instance keeps one listening session in the broker's database. kojin_pg notifies when a publish
hands its message to an idle worker and when a result is stored for a caller that waits for it.
docs/scaling.rst proposes, for many worker instances, the broker and the results in two
databases: a stored result then wakes the callers only, not every worker. This measures that
end to end with ``bench/e2e.py`` (one producer: a ``delay().get()`` latency loop, then N tasks
published and their results read, then a chord of 100) against ``BENCH_WORKERS`` instances of
``celery worker -P threads -c 2``, for 1, 6 and 16 instances:

- ``kojin``: broker and results in one database;
- ``kojin apart``: the results in another database of the same server;
- ``redis``: the same workload on Redis (broker and backend), for reference.

Runs are taken in turns (:mod:`bench.interleave`), median of ``--repeat`` (3) with its spread.
Writes bench/results/instances.json (``--stock``: instances_stock.json; ``--quick``:
last_instances_quick.json, not kept in git).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.spread import spread, value, verdict

HERE = Path(__file__).resolve().parent

#: Worker instances; 16 stays within a stock server's 100 connections with the producer's.
COUNTS = (1, 6, 16)
WORKER_ENV = {"BENCH_POOL": "threads", "BENCH_CONC": "2"}


def measure(db: str, results_db: str, redis_url: str | None, repeat: int, n_tasks: str,
            counts: tuple[int, ...]) -> dict[str, Any]:
    """Every count for every system, in turns; ``{"kojin x6": row, ...}``."""
    from bench.__main__ import median_runs, run_script
    from bench.interleave import interleaved_runs

    rows: dict[str, Any] = {}
    for count in counts:
        env = {**WORKER_ENV, "BENCH_WORKERS": str(count)}
        kojin_env = {"BENCH_IMPORT": "import kojin_pg", **env}
        runs = {
            f"kojin x{count}": lambda env=kojin_env: run_script(
                "e2e.py", ["kojin+" + db, "kojin+" + db, n_tasks, "100"], env=env),
            f"kojin apart x{count}": lambda env=kojin_env: run_script(
                "e2e.py", ["kojin+" + db, "kojin+" + results_db, n_tasks, "100"], env=env),
        }
        if redis_url:
            runs[f"redis x{count}"] = lambda env=env: run_script(
                "e2e.py", [redis_url, redis_url, n_tasks, "100"], env=env)
        rows.update(interleaved_runs(repeat, runs, median_runs))
    return rows


def cell(row: dict[str, Any], metric: str, digits: int) -> str:
    """``median [min-max]`` of ``metric`` with ``digits`` decimals."""
    v, s = value(row, metric), spread(row, metric)
    if v is None or s is None:
        return "-"
    return f"{v:,.{digits}f} [{s[0]:,.{digits}f}-{s[1]:,.{digits}f}]"


def print_table(rows: dict[str, Any], counts: tuple[int, ...], repeat: int) -> None:
    """Throughput, p50, p99 and the chord per count; apart against one database, and each
    against Redis (throughput ratio with its verdict, p50 as a ratio of times)."""
    print(f"\n== worker instances (threads -c 2 each), one producer; median of {repeat} "
          "[min-max]")
    print(f"{'instances':<10}{'system':<13}{'tasks/s':>22}{'p50 ms':>20}{'p99 ms':>20}"
          f"{'chord-100 s':>22}")
    for count in counts:
        for system in ("kojin", "kojin apart", "redis"):
            row = rows.get(f"{system} x{count}")
            if not row:
                continue
            if "error" in row:
                print(f"{count:<10}{system:<13}  failed: {row['error'].splitlines()[-1][:80]}")
                continue
            print(f"{count:<10}{system:<13}{cell(row, 'throughput', 0):>22}"
                  f"{cell(row, 'p50_ms', 2):>20}{cell(row, 'p99_ms', 2):>20}"
                  f"{cell(row, 'chord100_s', 3):>22}")
        one, apart, redis = (rows.get(f"{s} x{count}") for s in ("kojin", "kojin apart",
                                                                 "redis"))
        for name, row, base in (("apart / one database", apart, one),
                                ("one database / redis", one, redis),
                                ("apart / redis", apart, redis)):
            tp, base_tp = value(row, "throughput"), value(base, "throughput")
            p50, base_p50 = value(row, "p50_ms"), value(base, "p50_ms")
            if tp and base_tp and p50 and base_p50:
                print(f"{'':<10}{name:<22} throughput {tp / base_tp:.2f}x "
                      f"({verdict(row, base, 'throughput')}), p50 {p50 / base_p50:.2f}x "
                      f"as long ({verdict(row, base, 'p50_ms', higher_is_better=False)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instances")
    parser.add_argument("--stock", action="store_true",
                        help="the Debian apt PostgreSQL at default settings (bench/servers.py)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="1 and 6 instances, 500 tasks, one repeat")
    args = parser.parse_args(argv)
    repeat, n_tasks, counts = ((1, "500", COUNTS[:2]) if args.quick
                               else (args.repeat, "3000", COUNTS))
    from bench.__main__ import make_db, start_servers, stop_servers
    from bench.servers import describe

    admin, server, redis_url, redis_proc = start_servers(args.stock)
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        results_db = make_db(admin, "bench_results_" + uuid.uuid4().hex[:6])
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, {sys.platform}",
            "postgres": describe(admin, server), "repeat": repeat, "tasks": int(n_tasks),
            "worker": "celery worker -P threads -c 2, per instance"}
        results["rows"] = measure(db, results_db, redis_url, repeat, n_tasks, counts)
        print_table(results["rows"], counts, repeat)
    finally:
        stop_servers(server, redis_proc)
    name = ("last_instances_quick.json" if args.quick
            else "instances_stock.json" if args.stock else "instances.json")
    (HERE / "results" / name).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
