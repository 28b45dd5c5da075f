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
``celery worker -P threads -c 2``, for 1, 6 and 12 instances:

- ``kojin``: broker and results in one database;
- ``kojin apart``: the results in another database of the same server;
- ``redis``: the same workload on Redis (broker and backend), for reference.

Then where the time goes: the same instances and systems, measured by
``python -m bench.instances cpu`` (a subprocess per run): with every instance up and warm, N
tasks published and their results read, and the CPU time spent meanwhile per task by the
producer (``time.process_time``), by the workers (their process trees) and by the server (the
postmaster's tree, or redis-server), as bench/server_cost.py measures them.

Runs are taken in turns (:mod:`bench.interleave`), median of ``--repeat`` (3) with its spread.
Writes bench/results/instances.json (``--stock``: instances_stock.json; ``--quick``:
last_instances_quick.json, not kept in git).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.spread import spread, value, verdict

HERE = Path(__file__).resolve().parent

#: Worker instances. Each held 6 to 7 connections (``-P threads -c 2``: the consumer and its
#: listener, the publishing pools, the result backend's pools), so 12 stayed within a stock
#: server's 100 with the producer's; 16 did not, and a worker's result store then failed. (Since
#: ffe136d and efd370e, 6 after its first tasks; the counts stay, so that runs compare.)
COUNTS = (1, 6, 12)
WORKER_ENV = {"BENCH_POOL": "threads", "BENCH_CONC": "2"}
SYSTEMS = ("kojin", "kojin apart", "redis")


@dataclass(frozen=True)
class Setup:
    """One system compared: its broker and result backend URLs, what the app imports, and the
    pid of its server (for the CPU part; None when it cannot be read)."""

    broker: str
    backend: str
    imports: str
    server_pid: int | None


def setups(db: str, results_db: str, redis_url: str | None, postmaster: int | None,
           redis_pid: int | None) -> dict[str, Setup]:
    """``{name: setup}`` in :data:`SYSTEMS` order: one database, apart, Redis if there is one."""
    kojin = "import kojin_pg"
    out = {"kojin": Setup("kojin+" + db, "kojin+" + db, kojin, postmaster),
           "kojin apart": Setup("kojin+" + db, "kojin+" + results_db, kojin, postmaster)}
    if redis_url:
        out["redis"] = Setup(redis_url, redis_url, "", redis_pid)
    return out


def in_turns(systems: dict[str, Setup], counts: tuple[int, ...], repeat: int,
             run: Callable[[Setup, int], dict]) -> dict[str, Any]:
    """``run(setup, count)`` for every count and system, the systems in turns;
    ``{"kojin x6": row, ...}``."""
    from bench.__main__ import median_runs
    from bench.interleave import interleaved_runs

    rows: dict[str, Any] = {}
    for count in counts:
        runs = {f"{name} x{count}": (lambda setup=setup, count=count: run(setup, count))
                for name, setup in systems.items()}
        rows.update(interleaved_runs(repeat, runs, median_runs))
    return rows


def e2e_run(setup: Setup, count: int, n_tasks: str) -> dict:
    """bench/e2e.py against ``count`` instances."""
    from bench.__main__ import run_script

    env = {**WORKER_ENV, "BENCH_WORKERS": str(count)}
    if setup.imports:
        env["BENCH_IMPORT"] = setup.imports
    return run_script("e2e.py", [setup.broker, setup.backend, n_tasks, "100"], env=env)


def cpu_run(broker: str, backend: str, imports: str, server_pid: int, count: int,
            n: int) -> dict[str, float]:
    """Start ``count`` worker instances, wait for every one and warm up; then publish ``n``
    tasks, read their results and return tasks/s and the CPU ms per task of the producer
    (this process), the workers and the server (the process tree of ``server_pid``)."""
    from bench.processes import stop_group
    from bench.server_cost import APP, tree_cpu_seconds

    d = tempfile.mkdtemp(prefix="bench_instances_")
    with open(os.path.join(d, "instancesapp.py"), "w") as f:
        f.write(APP.format(name="instancesapp", imports=imports, broker=broker,
                           backend=backend))
    sys.path.insert(0, d)
    mod = importlib.import_module("instancesapp")
    env = dict(os.environ, PYTHONPATH=d)
    workers = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "instancesapp", "worker", "-P",
         WORKER_ENV["BENCH_POOL"], "-c", WORKER_ENV["BENCH_CONC"], "-l", "warning",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"w{i}@%h"],
        env=env, cwd=d, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for i in range(count)]
    try:
        mod.noop.delay(0).get(timeout=60)
        deadline = time.monotonic() + 30 + 5 * count
        while len(mod.app.control.ping(timeout=1.0)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {count} workers answered a ping")
        for i in range(200):  # every instance has served, its pools are warm
            mod.noop.delay(i).get(timeout=30)

        def workers_cpu() -> float:
            return sum(tree_cpu_seconds(w.pid) or 0.0 for w in workers)

        w0, s0, p0 = workers_cpu(), tree_cpu_seconds(server_pid), time.process_time()
        t0 = time.perf_counter()
        results = [mod.noop.delay(i) for i in range(n)]
        for r in results:
            r.get(timeout=300)
        elapsed = time.perf_counter() - t0
        w1, s1, p1 = workers_cpu(), tree_cpu_seconds(server_pid), time.process_time()
        if s0 is None or s1 is None:
            raise RuntimeError("the server's CPU time cannot be read here")
        return {"throughput": round(n / elapsed, 1),
                "producer_cpu_ms": round(1000 * (p1 - p0) / n, 3),
                "workers_cpu_ms": round(1000 * (w1 - w0) / n, 3),
                "server_cpu_ms": round(1000 * (s1 - s0) / n, 3)}
    finally:
        mod.app.close()
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            stop_group(w, 30)
        sys.path.remove(d)
        shutil.rmtree(d, ignore_errors=True)


def cpu_run_in_subprocess(setup: Setup, count: int, n_tasks: str) -> dict:
    """:func:`cpu_run` in a subprocess of its own (``python -m bench.instances cpu``)."""
    if setup.server_pid is None:
        raise RuntimeError("the server's CPU time cannot be read here")
    out = subprocess.run(
        [sys.executable, "-m", "bench.instances", "cpu", setup.broker, setup.backend,
         setup.imports, str(setup.server_pid), str(count), n_tasks], capture_output=True,
        text=True, timeout=900, cwd=HERE.parent)
    if out.returncode != 0:
        raise RuntimeError(f"instances cpu {setup.broker.split(':')[0]} x{count} failed:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured_rows(rows: dict[str, Any], count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of ``count`` instances that have figures, as ``(system, row)``; a failed one is
    printed as such and skipped."""
    for system in SYSTEMS:
        row = rows.get(f"{system} x{count}")
        if not row:
            continue
        if "error" in row:
            print(f"{count:<10}{system:<13}  failed: {row['error'].splitlines()[-1][:80]}")
            continue
        yield system, row


def print_cpu_table(rows: dict[str, Any], counts: tuple[int, ...], repeat: int) -> None:
    """Tasks/s and CPU ms per task of the producer, the workers and the server, per count."""
    print(f"\n== CPU ms per task while every instance is up (median of {repeat})")
    print(f"{'instances':<10}{'system':<13}{'tasks/s':>22}{'producer':>10}{'workers':>10}"
          f"{'server':>10}{'total':>10}")
    for count in counts:
        for system, row in measured_rows(rows, count):
            parts = [value(row, k) or 0.0 for k in ("producer_cpu_ms", "workers_cpu_ms",
                                                     "server_cpu_ms")]
            print(f"{count:<10}{system:<13}{cell(row, 'throughput', 0):>22}"
                  + "".join(f"{p:>10.2f}" for p in parts) + f"{sum(parts):>10.2f}")


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
        for system, row in measured_rows(rows, count):
            print(f"{count:<10}{system:<13}{cell(row, 'throughput', 0):>22}"
                  f"{cell(row, 'p50_ms', 2):>20}{cell(row, 'p99_ms', 2):>20}"
                  f"{cell(row, 'chord100_s', 3):>22}")
        one, apart, redis = (rows.get(f"{s} x{count}") for s in SYSTEMS)
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
    from bench.servers import bench_parser

    parser = bench_parser("python -m bench.instances", "1 and 6 instances, 500 tasks, one repeat")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cpu"]:  # one run of measure_cpu, in a process of its own
        broker, backend, imports, pid, count, n = argv[1:7]
        print(json.dumps(cpu_run(broker, backend, imports, int(pid), int(count), int(n))))
        return 0
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
        from bench.server_cost import postmaster_pid
        with psycopg.connect(db) as conn:
            postmaster = postmaster_pid(conn)
        systems = setups(db, results_db, redis_url, postmaster,
                         redis_proc.pid if redis_proc else None)
        results["rows"] = in_turns(systems, counts, repeat,
                                   lambda setup, count: e2e_run(setup, count, n_tasks))
        print_table(results["rows"], counts, repeat)
        if postmaster is not None:
            results["cpu_per_task"] = in_turns(
                systems, counts, repeat,
                lambda setup, count: cpu_run_in_subprocess(setup, count, n_tasks))
            print_cpu_table(results["cpu_per_task"], counts, repeat)
        else:
            print("(the server's CPU cannot be read here: no CPU table)")
    finally:
        stop_servers(server, redis_proc)
    from bench.__main__ import save_results

    save_results("instances", results, quick=args.quick, stock=args.stock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
