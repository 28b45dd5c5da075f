"""Server cost of one end-to-end Celery task on kojin_pg: statements, WAL, PostgreSQL CPU time.

usage: python -m bench cost [--quick] [--stock]      (also part of ``python -m bench all``)
       python -m bench.server_cost [--tasks N] [--stock]

A PostgreSQL of its own with ``pg_stat_statements`` preloaded (``track = all``): a temporary
embedded server, a temporary stock one with ``--stock`` (:mod:`bench.servers`), or the
KOJIN_PG_URL server as it is (its ``pg_stat_statements`` if loaded, else statement figures are
missing and the result says so). Per ``synchronous_commit`` (on, the default, then off, as the
``kojin+`` URL option), on a fresh database:

1. A client subprocess (``python -m bench.server_cost client``) starts a real
   ``celery worker -P prefork -c 4`` with kojin_pg as broker and backend (bench/e2e.py's app)
   and warms it up with 100 tasks.
2. Here, once the idle backends have flushed their statistics (1.5 s):
   ``pg_stat_statements_reset()``, ``pg_stat_reset_shared('wal')`` (and ``'io'`` from
   PostgreSQL 16, where 18 counts WAL syncs), the WAL position and the server's CPU time.
3. The client publishes N noop tasks and waits for every result, measuring its own CPU time
   (``time.process_time``: every thread of the publishing and result-waiting process) and the
   worker's (its process tree, as below).
4. Here: the server's CPU time and the WAL position again, and the statements of the bench
   database (pg_stat_statements counts them as they end: top-level calls, the top ones by
   calls and by time); 1.5 s later (the run's backends have flushed) WAL syncs from
   ``pg_stat_wal``/``pg_stat_io``. WAL bytes are how far the WAL position moved: everything
   the cluster wrote, commit records, autovacuum and full-page images included. WAL records
   and commits that wrote WAL come from ``pg_waldump --stats`` between the two positions when
   the WAL files are readable here (our own server), else records from ``pg_stat_wal``.

Server CPU time: PostgreSQL runs as one postmaster and one process per backend (and walwriter,
checkpointer, autovacuum...), all its children. The CPU time of that tree is the sum over its
live processes of utime+stime+cutime+cstime from ``/proc/<pid>/stat``; a backend that exits is
reaped by the postmaster, whose cutime/cstime then hold all of its time. The difference of two
such sums is the CPU the whole server spent between them, backends that came and went included
(the postmaster is found as the parent of our own backend; a server that is not local, or not
visible in /proc, gets no CPU figure). The same sum over the worker's tree gives the worker's.

Then, beside it, the same N tasks through Redis (broker and backend, AOF ``everysec``: the
bench's Redis, or one started here when run alone): the client's, the worker's and
redis-server's CPU per task, measured the same way, so that the split of a task's CPU between
client, worker and server can be compared within one run.

Every figure covers the whole window, so fixed per-second costs of an idle worker (polls,
upkeep) are spread over the N tasks: a larger N gives the steadier per-task figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.processes import stop_group
from bench.servers import describe, destroy, start_postgres

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTINGS = (("shared_preload_libraries", "pg_stat_statements"),
            ("pg_stat_statements.track", "all"))
WARMUP = 100
TOP = 10
#: PostgreSQL flushes an idle backend's pending statistics within a second
FLUSH_S = 1.5

#: The Celery app of a bench's client and workers (also bench/instances.py's): ``name`` (its
#: module's), ``imports`` (``import kojin_pg`` registers the kojin+ transport), ``broker``,
#: ``backend``.
APP = textwrap.dedent("""
    {imports}
    from celery import Celery
    app = Celery({name!r}, broker={broker!r}, backend={backend!r})
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True,
                    result_expires=3600, worker_hijack_root_logger=False)

    @app.task
    def noop(x=None):
        return x
""")


# -- CPU time of a process tree, from /proc ------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def tree_cpu_seconds(root: int) -> float | None:
    """CPU time (user + system) of ``root`` and every live descendant, each with the time of
    its reaped children (cutime + cstime): see the module docstring. None: ``root`` is gone."""
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        own[pid] = sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
    if root not in own:
        return None
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += own.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def postmaster_pid(conn: psycopg.Connection) -> int | None:
    """The postmaster of ``conn``'s server when it runs on this machine: our backend's parent."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = _stat_fields(row[0]) if row else None
    if fields is None:
        return None
    parent = int(fields[1])
    try:
        comm = Path(f"/proc/{parent}/comm").read_text().strip()
    except OSError:
        return None
    return parent if comm in ("postgres", "postmaster") else None


# -- the client: worker, warm-up, N tasks ---------------------------------------------------------

def client(url: str, n: int) -> None:
    """Child side: start the worker, warm up, then on ``go`` run N tasks, on ``stop`` stop.
    Talks to the parent in JSON lines on stdout; reads commands from stdin (closed: stop)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still stop the worker (finally)
    d = tempfile.mkdtemp(prefix="bench_cost_")
    Path(d, "costapp.py").write_text(APP.format(name="costapp", imports="import kojin_pg",
                                                broker=url, backend=url))
    sys.path.insert(0, d)
    env = dict(os.environ, PYTHONPATH=d + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "costapp", "worker", "-P", "prefork", "-c", "4",
         "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=d, stdout=open(os.path.join(d, "w.log"), "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        import costapp  # type: ignore[import-not-found]

        costapp.noop.delay(0).get(timeout=90)
        for r in [costapp.noop.delay(i) for i in range(WARMUP)]:
            r.get(timeout=120)
        _say(ready=True)
        _expect("go")
        cpu0, wcpu0, t0 = time.process_time(), tree_cpu_seconds(worker.pid), time.perf_counter()
        results = [costapp.noop.delay(i) for i in range(n)]
        for r in results:
            r.get(timeout=600)
        elapsed = time.perf_counter() - t0
        cpu1, wcpu1 = time.process_time(), tree_cpu_seconds(worker.pid)
        _say(done=True, elapsed_s=elapsed, client_cpu_s=cpu1 - cpu0,
             worker_cpu_s=(wcpu1 - wcpu0) if wcpu0 is not None and wcpu1 is not None else None)
        _expect("stop")
    finally:
        stop_group(worker, grace=60)
    shutil.rmtree(d, ignore_errors=True)  # a failed run keeps it: the worker's log


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"server_cost client: expected {word!r}, got {line!r}")


# -- the parent: statistics around one run --------------------------------------------------------

def _stats_available(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT 1 FROM pg_stat_statements LIMIT 1")
    except psycopg.Error:
        return False
    return True


def _reset(conn: psycopg.Connection, statements: bool) -> None:
    if statements:
        conn.execute("SELECT pg_stat_statements_reset()")
    conn.execute("SELECT pg_stat_reset_shared('wal')")
    if conn.info.server_version >= 160000:
        conn.execute("SELECT pg_stat_reset_shared('io')")


def _wal_stats(conn: psycopg.Connection) -> dict[str, Any]:
    """pg_stat_wal's counters, plus WAL syncs and writes from pg_stat_io where they moved
    (PostgreSQL 18 dropped them from pg_stat_wal)."""
    row = conn.execute("SELECT to_jsonb(w) FROM pg_stat_wal w").fetchone()
    stats: dict[str, Any] = dict(row[0]) if row else {}
    if "wal_sync" not in stats and conn.info.server_version >= 160000:
        io = conn.execute("SELECT sum(writes)::bigint, sum(fsyncs)::bigint FROM pg_stat_io"
                          " WHERE object = 'wal'").fetchone()
        if io:
            stats["wal_write"], stats["wal_sync"] = io
    return stats


def _statements(conn: psycopg.Connection, dbname: str) -> dict[str, Any]:
    base = ("FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s")
    row = conn.execute(f"SELECT coalesce(sum(calls) FILTER (WHERE toplevel), 0)::bigint,"
                       f" coalesce(sum(calls), 0)::bigint {base}", (dbname,)).fetchone()
    top = {}
    for key, order in (("by_calls", "calls"), ("by_time", "total_exec_time")):
        rows = conn.execute(
            f"SELECT calls, round(total_exec_time::numeric, 1)::float8, rows, wal_bytes::bigint,"
            f" toplevel, regexp_replace(query, '\\s+', ' ', 'g') {base}"
            f" ORDER BY {order} DESC LIMIT {TOP}", (dbname,)).fetchall()
        top[key] = [{"calls": c, "total_ms": ms, "rows": r, "wal_bytes": w, "toplevel": tl,
                     "query": q[:160]} for c, ms, r, w, tl, q in rows]
    return {"toplevel_calls": row[0] if row else 0, "all_calls": row[1] if row else 0, **top}


def _waldump(server: Any, start: str, end: str) -> dict[str, int] | None:
    """WAL records, commit records and full-page-image bytes between two WAL positions
    (``pg_waldump --stats=record``), when the server is ours (its WAL files readable here)."""
    if server is None:
        return None
    out = subprocess.run([str(server.bin_dir / "pg_waldump"), "--stats=record", "-p",
                          str(server.data_dir / "pg_wal"), "-s", start, "-e", end],
                         capture_output=True, text=True, timeout=120)
    found: dict[str, int] = {"commits": 0}
    for line in out.stdout.splitlines():
        if m := re.match(r"\s*Transaction/COMMIT\S*\s+(\d+)", line):
            found["commits"] += int(m.group(1))
        elif m := re.match(r"\s*Total\s+(\d+)\s+\d+\s+\[[^]]*\]\s+(\d+)", line):
            found["records"], found["fpi_bytes"] = int(m.group(1)), int(m.group(2))
    return found if "records" in found else None


class _Client:
    """The client subprocess and its line protocol, with a watchdog."""

    def __init__(self, url: str, n: int, timeout: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.server_cost", "client", url,
                                      str(n)], cwd=str(HERE.parent), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.watchdog = threading.Timer(timeout, self.proc.terminate)
        self.watchdog.start()

    def wait_for(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                msg = json.loads(line)
                if msg.get(key):
                    return msg
        raise RuntimeError(f"server_cost client exited (rc {self.proc.wait()}) before {key}")

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Wait for the client to stop its worker and exit (closing its stdin tells it to)."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            self.proc.wait(120)
        finally:
            self.watchdog.cancel()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def measure(admin_url: str, server: Any, n: int, synchronous_commit: str) -> dict[str, Any]:
    """One run of N tasks on a fresh database: the figures per task and in total."""
    dbname = "bench_cost_" + uuid.uuid4().hex[:6]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = admin_url.rpartition("/")[0] + "/" + dbname
    kojin = f"kojin+{url}" + ("?synchronous_commit=off" if synchronous_commit == "off" else "")
    client_proc = _Client(kojin, n, timeout=900)
    try:
        client_proc.wait_for("ready")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            statements = _stats_available(conn)
            postmaster = postmaster_pid(conn)
            time.sleep(FLUSH_S)  # idle backends flush the warm-up's pending WAL statistics
            _reset(conn, statements)
            lsn0 = _lsn(conn)
            cpu0 = tree_cpu_seconds(postmaster) if postmaster else None
            client_proc.send("go")
            done = client_proc.wait_for("done")
            cpu1 = tree_cpu_seconds(postmaster) if postmaster else None
            lsn1 = _lsn(conn)
            stmts = _statements(conn, dbname) if statements else None  # counted as they end
            time.sleep(FLUSH_S)  # the run's backends, idle now, flush their WAL statistics
            wal = _wal_stats(conn)
            client_proc.send("stop")
            client_proc.close()
            row = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)::bigint", (lsn1, lsn0)).fetchone()
            wal_bytes = int(row[0]) if row else 0
            dump = _waldump(server, lsn0, lsn1)
    finally:
        client_proc.close()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname)))
    server_cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None

    def per_task(v: float | None, scale: float = 1.0, digits: int = 2) -> float | None:
        return None if v is None else round(v * scale / n, digits)

    notes = [] if stmts else ["pg_stat_statements not loaded on this server: no statement figures"]
    if not postmaster:
        notes.append("server not local: no server CPU figure")
    if not dump:
        notes.append("WAL files not readable here: WAL records from pg_stat_wal, no commit count")
    return {
        "synchronous_commit": synchronous_commit, "tasks": n,
        "tasks_per_s": round(n / done["elapsed_s"], 1),
        "per_task": {
            "statements": per_task(stmts["toplevel_calls"]) if stmts else None,
            "statements_all_levels": per_task(stmts["all_calls"]) if stmts else None,
            "wal_bytes": per_task(wal_bytes, digits=0),
            "wal_records": per_task(dump["records"] if dump else wal.get("wal_records")),
            "wal_syncs": per_task(wal.get("wal_sync")),
            "commits_writing_wal": per_task(dump["commits"]) if dump else None,
            "server_cpu_ms": per_task(server_cpu, 1000),
            "worker_cpu_ms": per_task(done["worker_cpu_s"], 1000),
            "client_cpu_ms": per_task(done["client_cpu_s"], 1000),
        },
        "totals": {"elapsed_s": round(done["elapsed_s"], 3), "wal_bytes": wal_bytes,
                   "server_cpu_s": server_cpu, "worker_cpu_s": done["worker_cpu_s"],
                   "client_cpu_s": done["client_cpu_s"], "pg_waldump": dump, "pg_stat_wal": wal,
                   "statements": {k: stmts[k] for k in ("toplevel_calls", "all_calls")}
                   if stmts else None},
        "top_statements": {k: stmts[k] for k in ("by_calls", "by_time")} if stmts else None,
        "notes": notes,
    }


def measure_redis(redis_url: str, redis_pid: int, n: int) -> dict[str, Any]:
    """The same N tasks with Redis as broker and backend (AOF everysec): CPU per task of the
    client, the worker and redis-server, beside kojin_pg's in the same run."""
    client_proc = _Client(redis_url, n, timeout=900)
    try:
        client_proc.wait_for("ready")
        cpu0 = tree_cpu_seconds(redis_pid)
        client_proc.send("go")
        done = client_proc.wait_for("done")
        cpu1 = tree_cpu_seconds(redis_pid)
        client_proc.send("stop")
    finally:
        client_proc.close()
    server_cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None

    def per_task_ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000 / n, 2)

    return {"tasks": n, "tasks_per_s": round(n / done["elapsed_s"], 1),
            "per_task": {"server_cpu_ms": per_task_ms(server_cpu),
                         "worker_cpu_ms": per_task_ms(done["worker_cpu_s"]),
                         "client_cpu_ms": per_task_ms(done["client_cpu_s"])}}


def _lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return str(row[0]) if row else "0/0"


def run(stock: bool = False, quick: bool = False, n: int | None = None,
        redis: tuple[str, int] | None = None) -> dict[str, Any]:
    """Both ``synchronous_commit`` settings on a server of their own, then the same tasks
    through ``redis`` (its URL and redis-server's pid) when given; prints a table and returns
    the figures for latest.json's ``server_cost``."""
    n = n or (300 if quick else 2000)
    admin, server = start_postgres(stock=stock, settings=SETTINGS)
    try:
        result: dict[str, Any] = {"server": describe(admin, server), "tasks": n,
                                  "cpu_ms_resolution": round(1000 / CLK_TCK, 1)}
        for mode in ("on", "off"):
            result[f"sync_{mode}"] = measure(admin, server, n, mode)
    finally:
        destroy(server)
    if redis is not None:
        # a database of its own on the bench's Redis, so no earlier part's keys are in the way
        result["redis"] = measure_redis(redis[0].rpartition("/")[0] + "/3", redis[1], n)
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    """The per-task figures of both runs side by side, and the top statements by calls."""
    print(f"\n== server cost per end-to-end task (prefork c=4, {result['tasks']} noop tasks;"
          f" {result['server']['kind']}: {result['server']['version'].split(' on ')[0]})")
    runs = [result[k] for k in ("sync_on", "sync_off") if k in result]
    print(f"{'per task':<24}" + "".join(f"{'sync_commit=' + r['synchronous_commit']:>20}"
                                        for r in runs))
    for key in ("statements", "statements_all_levels", "wal_bytes", "wal_records", "wal_syncs",
                "commits_writing_wal", "server_cpu_ms", "worker_cpu_ms", "client_cpu_ms"):
        cells = [r["per_task"].get(key) for r in runs]
        print(f"{key:<24}" + "".join(f"{'-' if c is None else c:>20}" for c in cells))
    print(f"{'tasks/s (this run)':<24}" + "".join(f"{r['tasks_per_s']:>20}" for r in runs))
    redis = result.get("redis")
    if redis:
        print(f"CPU ms per task, the same {result['tasks']} tasks through Redis (AOF everysec)"
              " in this run: " + ", ".join(
                  f"{key.removesuffix('_cpu_ms')} {redis['per_task'][key]}"
                  for key in ("server_cpu_ms", "worker_cpu_ms", "client_cpu_ms"))
              + f"; {redis['tasks_per_s']} tasks/s")
    top = runs[0].get("top_statements") if runs else None
    if top:
        print("top statements by calls (sync on): calls per task, total time, query")
        for s in top["by_calls"]:
            print(f"  {s['calls'] / result['tasks']:>6.2f} {s['total_ms']:>8.1f} ms"
                  f"  {s['query'][:90]}")
    for note in dict.fromkeys(note for r in runs for note in r["notes"]):
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    """``client URL N`` (the subprocess), or a standalone run printing the table and JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        client(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.server_cost")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stock", action="store_true")
    args = parser.parse_args(argv)
    from bench.__main__ import start_redis, stop_redis

    redis_url, redis_proc = start_redis()
    try:
        redis = (redis_url, redis_proc.pid) if redis_url and redis_proc else None
        print(json.dumps(run(args.stock, args.quick, args.tasks, redis), default=str))
    finally:
        stop_redis(redis_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
