"""Many threads of one process waiting for results: a web process whose request threads each
send a task and wait for its result.

usage: python -m bench callers [--stock] [--quick] [--repeat N]   (not part of ``all``)
       python -m bench.callers [--stock] [--quick] [--repeat N]

Celery gives each thread a result backend of its own unless the backend says it is thread-safe;
kojin_pg's says so (kojin_pg/backend/shared.py), so the threads of a process share one
listening session and one pool. This measures what that workload costs end to end: one
``celery worker -P threads -c 8`` (bench/e2e.py's app) and one caller process
(``python -m bench.callers caller``) whose T threads (1, 8 and 32) each send a noop with
``delay()`` and wait for it with ``get()``, over and over, N tasks in all. Per run: tasks/s,
p50 and p99 of a ``delay().get()``, and for kojin_pg the connections the caller process held
at the end (its URLs carry ``application_name=bench_caller``), and the CPU time per task of the
caller process, the worker (its process tree) and the server (the postmaster's tree, or
redis-server), as bench/server_cost.py reads them, over the same window. kojin_pg (at the
default durability, and at ``synchronous_commit=off`` beside it) and Redis (broker and backend,
AOF ``everysec``, whose durability ``off`` matches), taken in turns (:mod:`bench.interleave`),
median of ``--repeat`` (3) with its spread.

Writes bench/results/callers.json (``--stock``: callers_stock.json; ``--quick``:
last_callers_quick.json, not kept in git).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.instances import Setup, cell, in_turns
from bench.processes import stop_group
from bench.spread import value, verdict

HERE = Path(__file__).resolve().parent

#: Threads of the caller process.
THREADS = (1, 8, 32)
#: kojin_pg at the default durability, at ``synchronous_commit=off`` beside it (Redis AOF
#: ``everysec``'s durability), and Redis.
SYSTEMS = ("kojin", "kojin off", "redis")
#: The caller's connections are told apart from the worker's by this application_name.
CALLER_NAME = "bench_caller"


def write_app(directory: str, broker: str, backend: str, imports: str) -> None:
    """bench/e2e.py's app (bench/server_cost.py's template), as ``benchapp.py`` in
    ``directory``."""
    from bench.server_cost import APP

    Path(directory, "benchapp.py").write_text(
        APP.format(name="benchapp", imports=imports, broker=broker, backend=backend))


def caller(threads: int, n: int, worker_pid: int, server_pid: int) -> None:
    """In the caller process: ``threads`` threads each send and wait ``n // threads`` times;
    print the figures as one JSON line, then wait for a line on stdin (the driver counts this
    process's connections meanwhile). The CPU time per task of this process, of the worker's
    process tree (``worker_pid``) and of the server's (``server_pid``; 0: not read)."""
    import benchapp

    from bench.server_cost import tree_cpu_seconds

    def others() -> tuple[float | None, float | None]:
        return (tree_cpu_seconds(worker_pid),
                tree_cpu_seconds(server_pid) if server_pid else None)

    benchapp.noop.delay(0).get(timeout=60)
    samples: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        mine = []
        for i in range(n // threads):
            t = time.perf_counter()
            benchapp.noop.delay(i).get(timeout=60)
            mine.append(time.perf_counter() - t)
        with lock:
            samples.extend(mine)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    (w0, s0), c0 = others(), time.process_time()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    c1, (w1, s1) = time.process_time(), others()
    samples.sort()
    row = {"throughput": round(len(samples) / elapsed, 1),
           "p50_ms": round(1000 * statistics.median(samples), 2),
           "p99_ms": round(1000 * samples[int(0.99 * (len(samples) - 1))], 2),
           "caller_cpu_ms": round(1000 * (c1 - c0) / len(samples), 3)}
    for name, before, after in (("worker", w0, w1), ("server", s0, s1)):
        if before is not None and after is not None:
            row[f"{name}_cpu_ms"] = round(1000 * (after - before) / len(samples), 3)
    print(json.dumps(row), flush=True)
    sys.stdin.readline()


def with_name(url: str) -> str:
    """``url`` with the caller's ``application_name`` (a kojin_pg URL; Redis's is left)."""
    if not url.startswith("kojin+"):
        return url
    return url + ("&" if "?" in url else "?") + f"application_name={CALLER_NAME}"


def one_run(setup: Setup, threads: int, n: int) -> dict[str, Any]:
    """One worker, one caller of ``threads`` threads; the caller's figures and connections."""
    worker_dir, caller_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    write_app(worker_dir, setup.broker, setup.backend, setup.imports)
    write_app(caller_dir, with_name(setup.broker), with_name(setup.backend), setup.imports)
    log = open(os.path.join(worker_dir, "worker.log"), "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-P", "threads", "-c", "8",
         "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=worker_dir, env=dict(os.environ, PYTHONPATH=worker_dir), start_new_session=True,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.callers", "caller", str(threads), str(n),
             str(worker.pid), str(setup.server_pid or 0)],
            cwd=str(HERE.parent), env=dict(os.environ, PYTHONPATH=caller_dir + os.pathsep
                                           + str(HERE.parent)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            proc.wait(60)
            errors = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"caller failed:\n{errors[-3000:]}")
        row = json.loads(line)
        if setup.broker.startswith("kojin+"):
            url = setup.broker.removeprefix("kojin+").split("?")[0]  # not our URL options
            with psycopg.connect(url, autocommit=True) as pg:
                row["caller_connections"] = pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (CALLER_NAME,)).fetchone()[0]
        proc.communicate("\n", timeout=60)
        return row
    finally:
        stop_group(worker, grace=60, kill_wait=10)
        log.close()
        for directory in (worker_dir, caller_dir):
            subprocess.run(["rm", "-rf", directory], check=False)


def print_table(rows: dict[str, Any], counts: tuple[int, ...], repeat: int) -> None:
    """Tasks/s, p50, p99 and the caller's connections per thread count; kojin_pg against
    Redis."""
    print(f"\n== one caller process, T threads each sending and waiting; median of {repeat} "
          "[min-max]")
    print(f"{'threads':<9}{'system':<11}{'tasks/s':>22}{'p50 ms':>22}{'p99 ms':>24}"
          f"{'connections':>13}")
    for count in counts:
        for system in SYSTEMS:
            row = rows.get(f"{system} x{count}")
            if not row:
                continue
            if "error" in row:
                print(f"{count:<9}{system:<11}  failed: {row['error'].splitlines()[-1][:80]}")
                continue
            conns = value(row, "caller_connections")
            print(f"{count:<9}{system:<11}{cell(row, 'throughput', 0):>22}"
                  f"{cell(row, 'p50_ms', 2):>22}{cell(row, 'p99_ms', 2):>24}"
                  f"{'' if conns is None else f'{conns:.0f}':>13}")
        redis = rows.get(f"redis x{count}")
        for system in SYSTEMS[:2]:
            print_ratios(system, rows.get(f"{system} x{count}"), redis)


def print_ratios(system: str, kojin: dict[str, Any] | None, redis: dict[str, Any] | None) -> None:
    """One system's throughput, p50 and p99 against Redis's, with the verdicts of the spreads."""
    tp, base_tp = value(kojin, "throughput"), value(redis, "throughput")
    p50, base_p50 = value(kojin, "p50_ms"), value(redis, "p50_ms")
    p99, base_p99 = value(kojin, "p99_ms"), value(redis, "p99_ms")
    if tp and base_tp and p50 and base_p50 and p99 and base_p99:
        print(f"{'':<9}{system} / redis: throughput {tp / base_tp:.2f}x "
              f"({verdict(kojin, redis, 'throughput')}), p50 {p50 / base_p50:.2f}x as long "
              f"({verdict(kojin, redis, 'p50_ms', higher_is_better=False)}), p99 "
              f"{p99 / base_p99:.2f}x ({verdict(kojin, redis, 'p99_ms', higher_is_better=False)})")


def print_cpu_table(rows: dict[str, Any], counts: tuple[int, ...], repeat: int) -> None:
    """CPU ms per task of the caller, the worker and the server, per thread count (the server's
    only where it runs on this machine)."""
    print(f"\n== CPU ms per task (median of {repeat})")
    print(f"{'threads':<9}{'system':<11}{'caller':>10}{'worker':>10}{'server':>10}{'total':>10}")
    for count in counts:
        for system in SYSTEMS:
            row = rows.get(f"{system} x{count}")
            if not row or "error" in row:
                continue
            parts = [value(row, f"{k}_cpu_ms") for k in ("caller", "worker", "server")]
            cells = "".join(f"{'-' if p is None else f'{p:.2f}':>10}" for p in parts)
            total = sum(p for p in parts if p is not None)
            print(f"{count:<9}{system:<11}{cells}{total:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["caller"]:  # the caller process of one run
        caller(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    from bench.servers import bench_parser

    args = bench_parser("python -m bench.callers", "1 and 8 threads, one repeat").parse_args(argv)
    repeat, n, counts = (1, 160, THREADS[:2]) if args.quick else (args.repeat, 1280, THREADS)
    from bench.__main__ import make_db, save_results, start_servers, stop_servers
    from bench.servers import describe

    admin, server, redis_url, redis_proc = start_servers(args.stock)
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, {sys.platform}",
            "postgres": describe(admin, server), "repeat": repeat, "tasks": n,
            "worker": "celery worker -P threads -c 8"}
        from bench.server_cost import postmaster_pid
        with psycopg.connect(db) as conn:
            postmaster = postmaster_pid(conn)
        off = "kojin+" + db + "?synchronous_commit=off"
        systems = {"kojin": Setup("kojin+" + db, "kojin+" + db, "import kojin_pg", postmaster),
                   "kojin off": Setup(off, off, "import kojin_pg", postmaster)}
        if redis_url and redis_proc:
            systems["redis"] = Setup(redis_url, redis_url, "", redis_proc.pid)
        results["rows"] = in_turns(systems, counts, repeat,
                                   lambda setup, count: one_run(setup, count, n))
        print_table(results["rows"], counts, repeat)
        print_cpu_table(results["rows"], counts, repeat)
    finally:
        stop_servers(server, redis_proc)
    save_results("callers", results, quick=args.quick, stock=args.stock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
