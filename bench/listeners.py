"""What each listening process costs every notifying commit: PostgreSQL up to 18 wakes every
session that LISTENs in the database at each commit that sent a NOTIFY, whatever the channel.

usage: python -m bench.listeners [--stock] [--seconds N] [--quick]
       python -m bench listeners [--stock] [--quick]

kojin_pg holds one LISTEN session per consuming process (a worker's main process) and one per
process waiting for results, each on channels of its own; a publish that hands its message to
an idle consumer, and a result store that someone waits for, commit with a NOTIFY. This
measures, with ``pgbench`` (one client, ``-M prepared``, ``synchronous_commit=off`` so that the
disk does not hide the CPU), one-row INSERT commits per second and the server's CPU per commit
(every process of the cluster, bench/server_cost.py's ``tree_cpu_seconds``), plain and with a
NOTIFY of 900 bytes (a hand-off's size) on a channel nobody listens to, beside 0, 10, 40 and 80
idle sessions that LISTEN on another channel: in the same database, and in another database of
the same server; then beside 40 processes that each waited for a result through kojin_pg's
result backend 5 s before (a web tier between requests: each stopped listening once nobody in it
waited for 2 s). Repeats are taken in turns and the median kept.

Up to PostgreSQL 18 a notifying commit signals every listener of its own database that has not
read to the queue's head, and a listener of another database only once it is several queue
pages behind (``SignalBackends`` in ``async.c``); the "another database" rows measure what that
leaves of the cost, for a broker and a result backend kept in two databases of one server.

PostgreSQL 19 is to signal only the sessions that listen on the notified channel (commit
282b1cde9d, "Optimize LISTEN/NOTIFY"); on it, the NOTIFY rows should stay flat.

Writes bench/results/listeners.json (``--stock``: listeners_stock.json; ``--quick``:
last_listeners_quick.json, not kept in git).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg

#: Within a stock server's max_connections (100) with the bench's own connections.
LISTENERS = (0, 10, 40, 80)
PAYLOAD_BYTES = 900
SCRIPTS = {
    "insert": "INSERT INTO bench_listeners VALUES (1, 'x');\n",
    "insert + NOTIFY": ("INSERT INTO bench_listeners SELECT 1, 'x' FROM "
                        f"pg_notify('bench_nobody', repeat('x', {PAYLOAD_BYTES}));\n"),
}


def pgbench_run(db: str, script: str, seconds: int, postmaster: int | None) -> dict[str, float]:
    """One pgbench run of ``script``: commits/s, and the server's CPU per commit in µs."""
    from bench.get_limit import pgbench_tps
    from bench.server_cost import tree_cpu_seconds

    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        cpu0 = tree_cpu_seconds(postmaster) if postmaster else None
        tps = pgbench_tps(db, ["-f", f.name, "-c", "1", "-M", "prepared"], seconds,
                          env=dict(os.environ, PGOPTIONS="-c synchronous_commit=off"))
        cpu1 = tree_cpu_seconds(postmaster) if postmaster else None
    finally:
        os.unlink(f.name)
    row = {"commits_per_s": round(tps, 1)}
    if cpu0 is not None and cpu1 is not None:
        row["server_cpu_us_per_commit"] = round(1e6 * (cpu1 - cpu0) / (tps * seconds), 1)
    return row


def measure(db: str, listen_db: str, seconds: int,
            repeat: int) -> dict[str, dict[str, dict[str, float]]]:
    """{listeners: {script: median row}} with ``listeners`` idle LISTEN sessions open on
    ``listen_db`` while pgbench commits on ``db``."""
    from bench.server_cost import postmaster_pid

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_listeners (id bigint, v text)")
        postmaster = postmaster_pid(conn)
    idle: list[psycopg.Connection] = []
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for count in LISTENERS:
            while len(idle) < count:
                conn = psycopg.connect(listen_db, autocommit=True)
                conn.execute("LISTEN bench_other")
                idle.append(conn)
            results[str(count)] = scripts_in_turns(db, seconds, repeat, postmaster)
            print_row(count, results[str(count)])
    finally:
        for conn in idle:
            conn.close()
    return results


#: A web process between requests: it waited for one result, then idles until told to end.
IDLE_CALLER = """
import sys, uuid
from celery import Celery
app = Celery("idle_caller", backend="kojin+" + sys.argv[1], broker="memory://",
             set_as_current=False)
task_id = str(uuid.uuid4())
app.backend.mark_as_done(task_id, 1)
print(app.AsyncResult(task_id).get(timeout=60), flush=True)
sys.stdin.read()
"""
IDLE_CALLERS = 40
#: Seconds between the callers' last wait and the measurement.
CALLERS_IDLE_FOR = 5.0


def measure_idle_callers(db: str, seconds: int, repeat: int) -> dict[str, dict[str, float]]:
    """{script: median row} beside :data:`IDLE_CALLERS` processes that each waited for a
    result (kojin_pg's result backend) :data:`CALLERS_IDLE_FOR` seconds before: what a web
    tier between requests costs the notifying commits."""
    from bench.server_cost import postmaster_pid
    from kojin_pg.db import schema

    with psycopg.connect(db, autocommit=True) as conn:
        schema.migrate(conn, "kojin")
        postmaster = postmaster_pid(conn)
    callers = [subprocess.Popen([sys.executable, "-c", IDLE_CALLER, db], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
               for _ in range(IDLE_CALLERS)]
    try:
        for caller in callers:
            if caller.stdout is None or caller.stdout.readline().strip() != "1":
                raise RuntimeError("an idle caller did not get its result")
        time.sleep(CALLERS_IDLE_FOR)
        row = scripts_in_turns(db, seconds, repeat, postmaster)
    finally:
        for caller in callers:
            if caller.stdin is not None:
                caller.stdin.close()
        for caller in callers:
            caller.wait(30)
    print_row(IDLE_CALLERS, row, "idle callers")
    return row


def scripts_in_turns(db: str, seconds: int, repeat: int,
                     postmaster: int | None) -> dict[str, dict[str, float]]:
    """{script: median row}: every script of :data:`SCRIPTS` ``repeat`` times, in turns."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SCRIPTS}
    for _ in range(repeat):
        for name, script in SCRIPTS.items():
            runs[name].append(pgbench_run(db, script, seconds, postmaster))
    return {name: merged(rows) for name, rows in runs.items()}


def merged(rows: list[dict[str, float]]) -> dict:
    """The runs taken in turns as one row, the way the rest of the bench merges repeats
    (median, ``_spread`` [min, max]; see bench/interleave.py)."""
    from bench.__main__ import median_runs

    runs = iter(rows)
    return median_runs(len(rows), lambda: next(runs))


def print_row(count: int, row: dict[str, dict[str, float]], what: str = "idle listeners") -> None:
    cells = []
    for name, r in row.items():
        cpu = r.get("server_cpu_us_per_commit")
        cells.append(f"{name}: {r['commits_per_s']:>9,.0f}/s"
                     + (f", {cpu:>7.1f} µs CPU" if cpu is not None else ""))
    print(f"{count:>4} {what:<16}" + "   ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    from bench.servers import bench_parser

    parser = bench_parser("python -m bench.listeners", "2 s runs, one repeat")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    seconds, repeat = (2, 1) if args.quick else (args.seconds, args.repeat)
    from bench.__main__ import make_db
    from bench.servers import describe, destroy, start_postgres

    admin, server = start_postgres(stock=args.stock)
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        other = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"),
                         "machine": f"{os.cpu_count()} cores, {sys.platform}",
                         "postgres": describe(admin, server), "seconds": seconds,
                         "repeat": repeat, "payload_bytes": PAYLOAD_BYTES}
        for key, listen_db, where in (("by_listeners", db, "the same database"),
                                      ("by_listeners_other_db", other, "another database")):
            print(f"one client, synchronous_commit=off; beside N idle sessions that LISTEN "
                  f"on another channel, in {where}")
            results[key] = measure(db, listen_db, seconds, repeat)
        print(f"beside {IDLE_CALLERS} processes that waited for a result "
              f"{CALLERS_IDLE_FOR:.0f} s before (kojin_pg's result backend, as in a web tier)")
        results["idle_callers"] = {"processes": IDLE_CALLERS, "idle_for_s": CALLERS_IDLE_FOR,
                                   **measure_idle_callers(db, seconds, repeat)}
    finally:
        destroy(server)
    from bench.__main__ import save_results

    save_results("listeners", results, quick=args.quick, stock=args.stock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
