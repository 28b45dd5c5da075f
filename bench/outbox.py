"""Outbox transactions from many threads: the wake-up after the commit against the one by it.

usage: python -m bench outbox [--stock] [--quick] [--repeat N]   (not part of ``all``)
       python -m bench.outbox [--stock] [--quick] [--repeat N]

A web process whose request threads each commit a business write and a task in one
transaction (``kojin_pg.outbox``), while a worker takes the tasks. Two ways to wake the worker
are compared, in turns (:mod:`bench.interleave`), in the same run:

- ``after commit``: ``with outbox.transaction(conn)``; the commit sends no NOTIFY, one statement
  after it does (at ``synchronous_commit=off``);
- ``at commit``: ``with conn.transaction()``; the commit itself sends the NOTIFY (a deferred
  trigger), and holds the database's NOTIFY lock until it is durable.

T threads (1, 8, 32), each on its own connection, run ``INSERT`` into a business table and
``send_task`` in one transaction, over and over, for a fixed time; one consumer process (kombu,
prefetch 16) acks the tasks, so it is often idle and the sends announce. Per run: transactions
per second, and the backends waiting on the NOTIFY lock (``pg_stat_activity`` wait event
``object``), sampled every 50 ms. At the server's own flush, and with each transaction's flush
made to take at least 1 ms (``commit_delay = 1000``, ``commit_siblings = 0`` on the business
connections), as on many cloud disks. Durability is the default (``synchronous_commit`` on).

Writes bench/results/outbox.json (``--stock``: outbox_stock.json; ``--quick``:
last_outbox_quick.json, not kept in git).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from kombu import Connection, Consumer, Exchange, Queue

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)
from bench.spread import value, verdict

THREADS = (1, 8, 32)
MODES = ("after commit", "at commit")
#: The business connections' settings of each flush: the server's own, and at least 1 ms.
FLUSHES: dict[str, str] = {"disk": "", "1 ms": "-c commit_delay=1000 -c commit_siblings=0"}
QUEUE = "bench_outbox"


def consumer(url: str) -> None:
    """The worker of a run: consume ``QUEUE`` and ack, until killed."""
    q = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    with Connection(url) as conn, Consumer(conn.channel(), [q], accept=["json"],
                                           callbacks=[lambda body, m: m.ack()],
                                           prefetch_count=16):
        while True:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass


def one_run(db: str, mode: str, flush: str, threads: int, seconds: float) -> dict[str, float]:
    """``threads`` threads committing outbox transactions for ``seconds``: their rate, and the
    mean number of backends waiting on the NOTIFY lock meanwhile."""
    from celery import Celery

    from kojin_pg import outbox

    app = Celery("bench_outbox", broker="kojin+" + db, set_as_current=False)
    options = FLUSHES[flush]
    conns = [psycopg.connect(db, options=options) if options else psycopg.connect(db)
             for _ in range(threads)]
    begin = outbox.transaction if mode == "after commit" else (lambda c: c.transaction())
    for conn in conns:  # warm: prepared statements, the schema check
        with begin(conn):
            outbox.send_task(conn, app, "bench.noop", queue=QUEUE)
    counts = [0] * threads
    start = threading.Barrier(threads + 1, timeout=120)  # broken, not hung, if a side fails

    def work(i: int) -> None:
        conn = conns[i]
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with begin(conn):
                conn.execute("INSERT INTO bench_orders (v) VALUES (1)")
                outbox.send_task(conn, app, "bench.noop", args=(i,), queue=QUEUE)
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    samples: list[int] = []
    try:
        with psycopg.connect(db, autocommit=True) as monitor:
            start.wait()
            began = time.monotonic()
            while any(t.is_alive() for t in workers):
                row = monitor.execute("SELECT count(*) FROM pg_stat_activity "
                                      "WHERE wait_event = 'object'").fetchone()
                samples.append(int(row[0]) if row else 0)
                time.sleep(0.05)
            elapsed = time.monotonic() - began
    finally:
        for t in workers:
            t.join()
        for conn in conns:
            conn.close()
    return {"tx_per_s": round(sum(counts) / elapsed, 1),
            "lock_waiters": round(statistics.mean(samples), 2) if samples else 0.0}


def print_table(rows: dict[str, Any], repeat: int) -> None:
    """Transactions/s per flush and thread count, both ways, and their ratio with its verdict."""
    print(f"\n== outbox transactions/s, wake-up after the commit against by it; median of "
          f"{repeat} [min-max]; NOTIFY-lock waiters (mean)")
    print(f"{'flush':<6}{'threads':>8}  {'after commit':<26}{'at commit':<26}"
          f"{'after ÷ at':<22}{'waiters after / at'}")
    for flush in FLUSHES:
        for threads in THREADS:
            after = rows.get(f"after commit {flush} x{threads}")
            at = rows.get(f"at commit {flush} x{threads}")
            if not after or not at or "error" in after or "error" in at:
                continue
            a, b = value(after, "tx_per_s"), value(at, "tx_per_s")
            print(f"{flush:<6}{threads:>8}  {_cell(after):<26}{_cell(at):<26}"
                  f"{(a / b if a and b else 0):.2f} {verdict(after, at, 'tx_per_s'):<16}"
                  f"{value(after, 'lock_waiters'):.2f} / {value(at, 'lock_waiters'):.2f}")


def _cell(row: dict[str, Any]) -> str:
    lo, hi = row["tx_per_s_spread"]
    return f"{row['tx_per_s']:,.0f} [{lo:,.0f}-{hi:,.0f}]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["consumer"]:
        consumer(argv[1])
        return 0
    from bench.servers import bench_parser

    args = bench_parser("python -m bench.outbox", "2 s runs, one repeat").parse_args(argv)
    repeat, seconds = (1, 2.0) if args.quick else (args.repeat, 6.0)
    from bench.__main__ import make_db, median_runs, save_results
    from bench.interleave import interleaved_runs
    from bench.processes import stop_group
    from bench.servers import describe, destroy, start_postgres

    admin, server = start_postgres(stock=args.stock)
    worker = None
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_orders (id bigserial PRIMARY KEY, v int)")
        with Connection("kojin+" + db) as conn:  # migrates the schema, declares the queue
            Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)(
                conn.channel()).declare()
        worker = subprocess.Popen([sys.executable, "-m", "bench.outbox", "consumer",
                                   "kojin+" + db], start_new_session=True)
        time.sleep(3)  # the consumer is up and idle
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, {sys.platform}",
            "postgres": describe(admin, server), "repeat": repeat, "seconds": seconds,
            "rows": {}}
        for flush in FLUSHES:
            for threads in THREADS:
                runs = {f"{mode} {flush} x{threads}":
                        (lambda mode=mode, flush=flush, threads=threads:
                         one_run(db, mode, flush, threads, seconds))
                        for mode in MODES}
                results["rows"].update(interleaved_runs(repeat, runs, median_runs))
        print_table(results["rows"], repeat)
    finally:
        if worker is not None:
            stop_group(worker, 5)
        destroy(server)
    save_results("outbox", results, quick=args.quick, stock=args.stock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
