"""What the 0003 indexes buy the Django admin's results page, and what they cost result writes.

usage: python -m bench.admin_indexes [ROWS] [URL]   (default 1,000,000 rows, embedded server)
Fills a fresh database's results table with ROWS rows (98% SUCCESS, 1% FAILURE, 1% RETRY,
50 task names, one day of date_done), then times the admin's list queries (EXPLAIN ANALYZE
execution time, best of 3) and result stores through the real backend (single process),
with the indexes and with them dropped. Not part of the test suite.
"""

from __future__ import annotations

import sys
import time
import uuid

import psycopg
from celery import Celery
from psycopg import sql

from kojin_pg.db import schema as kschema
from kojin_pg.db.sqlfiles import migrations
from kojin_pg.dev.embedded import temporary_server

FILL = """
INSERT INTO kojin.results (task_id, status, name, args, kwargs, result, worker, date_done)
SELECT 'bench-' || i,
       CASE WHEN i %% 100 = 0 THEN 'FAILURE' WHEN i %% 100 = 1 THEN 'RETRY' ELSE 'SUCCESS' END,
       'proj.task' || (i %% 50), '[1, 2]', '{}', to_jsonb(i), 'w1@host',
       now() - make_interval(secs => i * 86400.0 / %(rows)s)
FROM generate_series(1, %(rows)s) i
"""

# The admin's queries (Django's changelist adds task_id to make the order total).
PAGE = ("SELECT task_id, name, status, date_done, worker FROM kojin.results {where} "
        "ORDER BY date_done DESC, task_id DESC LIMIT 50")
QUERIES = {
    "first page": PAGE.format(where=""),
    "status=FAILURE": PAGE.format(where="WHERE status = 'FAILURE'"),
    "name=proj.task7": PAGE.format(where="WHERE name = 'proj.task7'"),
    "past hour": PAGE.format(where="WHERE date_done >= now() - interval '1 hour'"),
    "count(*) (paginator)": "SELECT count(*) FROM kojin.results",
    "SELECT DISTINCT name": "SELECT DISTINCT name FROM kojin.results ORDER BY name",
}
INDEXES = ("results_date_done_idx", "results_status_date_done_idx", "results_name_date_done_idx")


def explain_ms(conn: psycopg.Connection, query: str) -> float:
    best = float("inf")
    for _ in range(3):
        plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query).fetchone()[0]
        best = min(best, plan[0]["Execution Time"])
    return best


def loose_scan_ms(conn: psycopg.Connection) -> float:
    from kojin_pg.db import Queries

    query = Queries("django", "kojin").get("distinct_values", table="results", column="name")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        conn.execute(query, {"limit": 200}).fetchall()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def stores_per_second(url: str, n: int = 20000) -> float:
    app = Celery("b", backend="kojin+" + url, set_as_current=False)
    app.conf.result_extended = True
    backend = app.backend
    backend.mark_as_done("warm-up", 1)
    start = time.perf_counter()
    for i in range(n):
        task_id = str(uuid.uuid4())
        backend.mark_as_started(task_id)
        backend.mark_as_done(task_id, i)
    elapsed = time.perf_counter() - start
    backend.db.close()
    return 2 * n / elapsed


def measure(conn: psycopg.Connection) -> dict[str, float]:
    conn.execute("VACUUM ANALYZE kojin.results")
    figures = {name: explain_ms(conn, q) for name, q in QUERIES.items()}
    figures["loose index scan of names"] = loose_scan_ms(conn)
    return figures


def set_indexes(conn: psycopg.Connection, present: bool) -> None:
    for name in INDEXES:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS kojin.{}").format(sql.Identifier(name)))
    if present:
        index_migration = next(m for m in migrations() if m.name == "admin_indexes")
        conn.execute(sql.SQL(index_migration.text).format(schema=sql.Identifier("kojin")))
    conn.execute("VACUUM ANALYZE kojin.results")


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    server = None
    url = sys.argv[2] if len(sys.argv) > 2 else None
    if url is None:
        server = temporary_server(settings=(("fsync", "off"),))
        url = server.url
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS kojin CASCADE")
            kschema.migrate(conn, "kojin")
            conn.execute(FILL, {"rows": rows})
            figures = {True: measure(conn), False: {}}
            set_indexes(conn, False)
            figures[False] = measure(conn)
            # stores alternate between the two states, so drift (bloat, autovacuum) hits both
            rates: dict[bool, list[float]] = {True: [], False: []}
            stores_per_second(url, 2000)  # warm-up: caches, connections, code paths
            for present in (False, True, False, True):
                set_indexes(conn, present)
                rates[present].append(stores_per_second(url))
            for present, values in rates.items():
                figures[present]["stores/s (STARTED+SUCCESS)"] = sum(values) / len(values)
            with_idx, without = figures[True], figures[False]
            conn.execute("DROP SCHEMA kojin CASCADE")
    finally:
        if server is not None:
            server.destroy()
    print(f"results rows: {rows:,}")
    print(f"{'query (ms) / figure':<30} {'without':>10} {'with 0003':>10}")
    for name in with_idx:
        print(f"{name:<30} {without[name]:>10.2f} {with_idx[name]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
