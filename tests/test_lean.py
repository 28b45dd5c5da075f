"""A single get's read sent on libpq directly (``kojin_pg/db/lean.py``): it reads every column as
a cursor reads it, is prepared once per session and again where the session lost it, prepares
nothing where it may not, survives a lost connection, and raises the server's own errors."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from celery import states
from celery.app.task import Context
from psycopg import sql

from kojin_pg import config
from kojin_pg.db import Database, Queries
from kojin_pg.db.lean import LeanRead, positional


def tid() -> str:
    return str(uuid.uuid4())


def kojin_statements(conn: psycopg.Connection) -> list[str]:
    """The names of this session's prepared statements that kojin_pg made on libpq."""
    return [name for (name,) in conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'kojin\\_%%'",
        prepare=False).fetchall()]


@pytest.fixture
def one_connection(db_url):
    """A Database whose pool holds one connection, so every statement runs on the same
    session (with ``prepare_threshold`` as asked)."""
    made: list[Database] = []

    def factory(**options) -> Database:
        db = Database(config.parse(db_url, {"pool_min_size": 1, "pool_max_size": 1, **options}))
        made.append(db)
        return db

    yield factory
    for db in made:
        db.close()


def test_placeholders_are_numbered_in_order_of_first_use():
    assert positional("SELECT %(a)s, %(b)s, %(a)s, 100 %% 7") == (
        "SELECT $1, $2, $1, 100 % 7", ("a", "b"))
    with pytest.raises(ValueError, match="lone '%'"):
        positional("SELECT %(a)s % 2")


def test_a_get_reads_every_column_as_a_cursor_reads_it(backend):
    done = Context(id=tid(), task="proj.add", args=[1, "é"], kwargs={"z": None}, retries=3,
                   hostname="w1@host", delivery_info={"routing_key": "q1"}, group=tid(),
                   parent_id=tid())
    backend.store_result(done.id, {"a": [1, 2.5, "ü"], "b": None}, states.SUCCESS, request=done)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        failed = tid()
        backend.mark_as_failure(failed, exc, traceback="Traceback (most recent call last): ...")
    raw = tid()
    backend.store_result(raw, b"\x00\xffbytes", states.SUCCESS)  # not JSON: stored as bytes
    started = tid()
    backend.store_result(started, {"pid": 7}, states.STARTED)
    for task_id in (done.id, failed, raw, started):
        lean = backend.db.fetch_lean(backend.read_one, {"task_id": task_id})
        cursor = backend.db.fetchall(backend.queries.get_result, {"task_id": task_id})
        assert lean == cursor and len(lean) == 1, task_id
    meta = backend.get_task_meta(done.id, cache=False)
    assert (meta["result"], meta["args"], meta["kwargs"]) == ({"a": [1, 2.5, "ü"], "b": None},
                                                              [1, "é"], {"z": None})
    assert meta["date_done"] is not None and meta["retries"] == 3 and meta["queue"] == "q1"
    assert isinstance(backend.get_task_meta(failed, cache=False)["result"], KeyError)
    assert backend.get_task_meta(raw, cache=False)["result"] == b"\x00\xffbytes"
    assert backend.db.fetch_lean(backend.read_one, {"task_id": tid()}) == []
    assert backend.get_task_meta(tid(), cache=False)["status"] == states.PENDING


def test_the_read_is_prepared_once_per_session_and_again_after_the_session_lost_it(
        one_connection):
    db = one_connection()
    read = LeanRead("echo", sql.SQL("SELECT %(x)s::text, %(y)s::text IS NULL"))
    for value in ("a", "zoë ✓", "a"):
        assert db.fetch_lean(read, {"x": value, "y": None}) == [(value, True)]
    with db.connection() as conn:
        assert kojin_statements(conn) == [read.name.decode()]
        # as psycopg itself does after a DROP, ALTER, ROLLBACK or DISCARD ALL in a session
        # where it prepared statements of its own
        conn.execute("DEALLOCATE ALL")
        assert kojin_statements(conn) == []
    assert db.fetch_lean(read, {"x": "b", "y": "c"}) == [("b", False)]
    with db.connection() as conn:
        assert kojin_statements(conn) == [read.name.decode()]
    # another read of the same text (another app on the same schema) shares the statement
    twin = LeanRead("echo", sql.SQL("SELECT %(x)s::text, %(y)s::text IS NULL"))
    assert twin.name == read.name
    assert db.fetch_lean(twin, {"x": "d", "y": None}) == [("d", True)]


@pytest.mark.parametrize("options", [{"prepare_threshold": "none"}, {"prepare_threshold": 0},
                                     {"pooler": "pgbouncer"}])
def test_nothing_is_prepared_where_prepared_statements_are_off(one_connection, options):
    db = one_connection(**options)
    read = LeanRead("echo", sql.SQL("SELECT %(x)s::text"))
    for i in range(3):
        assert db.fetch_lean(read, {"x": str(i)}) == [(str(i),)]
    with db.connection() as conn:
        assert kojin_statements(conn) == []


def test_a_read_whose_connection_was_lost_runs_again_on_a_new_one(make_app, db_url):
    backend = make_app(result_backend_transport_options={"pool_max_size": 1}).backend
    done = tid()
    backend.mark_as_done(done, 42)
    assert backend.get_task_meta(done, cache=False)["result"] == 42
    with backend.db.connection() as conn:
        pid = conn.info.backend_pid
    with psycopg.connect(db_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    assert backend.get_task_meta(done, cache=False)["result"] == 42
    with backend.db.connection() as conn:
        assert conn.info.backend_pid != pid


def test_a_failed_read_raises_the_servers_error_and_the_session_goes_on(one_connection):
    db = one_connection()
    missing = LeanRead("missing", Queries("backend", "no_such_schema").get_result)
    with pytest.raises(psycopg.errors.UndefinedTable, match="no_such_schema"):
        db.fetch_lean(missing, {"task_id": "x"})
    failing = LeanRead("failing", sql.SQL("SELECT 1 / %(d)s::int"))
    assert db.fetch_lean(failing, {"d": "2"}) == [(0,)]
    with pytest.raises(psycopg.errors.DivisionByZero):
        db.fetch_lean(failing, {"d": "0"})
    assert db.fetch_lean(failing, {"d": "1"}) == [(1,)]
    assert db.fetchone("SELECT 1") == (1,)
