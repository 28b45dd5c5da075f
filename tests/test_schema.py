"""The migrator: idempotent, concurrent-safe, clear about missing or newer schemas."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest
from celery import Celery, states
from psycopg import sql

from kojin_pg.db import schema
from kojin_pg.errors import SchemaError

ROOT = Path(__file__).resolve().parent.parent


def _migrate(url, q):
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            q.put(schema.migrate(conn, "kojin"))
    except Exception as exc:
        q.put(repr(exc))


def test_concurrent_migrate_from_8_processes(empty_db_url):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_migrate, args=(empty_db_url, q)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    applied = [r for r in results if r]
    assert applied == [list(range(1, schema.latest_version() + 1))], results
    with psycopg.connect(empty_db_url) as conn:
        assert schema.current_version(conn, "kojin") == schema.latest_version()


def test_migrate_is_idempotent(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert schema.migrate(conn, "kojin") == []


def test_auto_migrate_off_names_the_command(empty_db_url):
    app = Celery("x", backend="kojin+" + empty_db_url + "?auto_migrate=false",
                 broker="memory://", set_as_current=False)
    with pytest.raises(SchemaError, match="kojin-pg migrate"):
        app.backend.mark_as_done("t", 1)


def test_newer_schema_is_refused(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO kojin.schema_migrations (version, name) VALUES (999, 'future')")
    app = Celery("x", backend="kojin+" + db_url, broker="memory://", set_as_current=False)
    with pytest.raises(SchemaError, match="newer than this kojin_pg"):
        app.backend.get_task_meta("t")


def test_first_use_migrates(empty_db_url):
    app = Celery("x", backend="kojin+" + empty_db_url, broker="memory://", set_as_current=False)
    app.backend.mark_as_done("t", 1)
    assert app.backend.get_task_meta("t")["status"] == states.SUCCESS


def test_runtime_role_with_dml_only(db_url):
    """A least-privilege role (no DDL) works with auto_migrate=False on a migrated schema."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS kojin_runtime_t")
        conn.execute("CREATE ROLE kojin_runtime_t LOGIN")
        conn.execute("GRANT USAGE ON SCHEMA kojin TO kojin_runtime_t")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA kojin "
                     "TO kojin_runtime_t")
    url = db_url.replace("postgres@", "kojin_runtime_t@")
    try:
        app = Celery("x", backend="kojin+" + url + "?auto_migrate=false", broker="memory://",
                     set_as_current=False)
        app.backend.mark_as_done("t", 1)
        assert app.backend.get_task_meta("t")["result"] == 1
        app.backend.db.close()
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DROP OWNED BY kojin_runtime_t")
            conn.execute("DROP ROLE kojin_runtime_t")


def test_a_role_that_may_not_write_logical_messages_stores_and_publishes_what_it_announces(
        db_url, caplog):
    """An announced store or publish waits for its flush by writing a logical-decoding
    message (sql/0013). PUBLIC may call pg_logical_emit_message by default, and a hardened
    server may revoke it: then every announced store and publish failed on it, after its
    write and announcement had committed. Such a role commits the write and its announcement
    together, durably, in one transaction, as before migration 12, and the log says why and what
    to grant."""
    from kombu import Connection, Producer
    from roles import dml_role
    from test_claimer import make_queue

    from kojin_pg.backend.waiters import wait_slot
    from kojin_pg.transport.idle import idle_space, queue_key

    with psycopg.connect(db_url, autocommit=True) as conn:
        # this test's database only: the grants of functions are kept per database
        for (fn,) in conn.execute("SELECT oid::regprocedure::text FROM pg_proc "
                                  "WHERE proname = 'pg_logical_emit_message'").fetchall():
            conn.execute(f"REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC")
    q = make_queue()
    with dml_role(db_url, "kojin_no_logical_t") as url, \
            psycopg.connect(db_url, autocommit=True) as listener:
        app = Celery("x", backend=f"kojin+{url}?auto_migrate=false&synchronous_commit=on",
                     broker="memory://", set_as_current=False)
        backend = app.backend
        # a waiter holds the result's wait slot, and a consumer is idle on the queue: the
        # store and the publish both announce
        listener.execute("SELECT pg_advisory_lock_shared(%s, %s)",
                         (backend.wait_space, wait_slot("t")))
        listener.execute("SELECT pg_advisory_lock(%s, %s)",
                         (idle_space("kojin"), queue_key(q.name)))
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(backend.channel)))
        backend.mark_as_done("t", 1)
        heard = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert len(heard) == 1 and "t" in heard[0]
        assert backend.get_task_meta("t", cache=False)["result"] == 1
        assert any("may not execute pg_logical_emit_message" in r.getMessage()
                   for r in caplog.records)
        backend.db.close()
        with Connection(f"kojin+{url}?auto_migrate=false&synchronous_commit=on") as conn:
            q(conn.channel()).declare()
            Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                     serializer="json", auto_declare=False).publish({"i": 1})
        assert listener.execute("SELECT count(*) FROM kojin.messages WHERE queue = %s",
                                (q.name,)).fetchone() == (1,)


@pytest.mark.slow
def test_built_wheel_ships_sql_and_migrates(tmp_path, empty_db_url):
    """Build the wheel, install it alone, and run its ``kojin-pg migrate``."""
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("kojin_pg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "kojin_pg/sql/0001_results.sql" in names
    assert "kojin_pg/sql/queries/backend.sql" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import kojin_pg, sys; assert kojin_pg.__file__.startswith(sys.argv[1]), "
            "kojin_pg.__file__; from kojin_pg.cli import main; sys.exit(main(sys.argv[2:]))")
    out = subprocess.run([sys.executable, "-c", code, str(target), "migrate", "--url",
                          empty_db_url], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    with psycopg.connect(empty_db_url) as conn:
        assert schema.current_version(conn, "kojin") == schema.latest_version()


def test_a_server_older_than_postgresql_14_is_refused_by_name(db_url):
    """Result reads use pg_column_compression (PostgreSQL 14): an older server would fail
    every get with an unknown function; it is refused up front, naming both versions."""
    from kojin_pg.db.schema import check_server_version

    with psycopg.connect(db_url) as conn:
        check_server_version(conn.info.server_version, "postgresql://u@h/db")  # this one runs
    with pytest.raises(SchemaError, match=r"needs PostgreSQL 14 or newer.*is PostgreSQL 13\.12"):
        check_server_version(130012, "postgresql://u@h/db")
