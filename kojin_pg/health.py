"""Reads the health figures of one kojin_pg schema, one query per group of figures.

Shared by ``kojin-pg stats`` / ``queues`` and the Prometheus collector (:mod:`kojin_pg.metrics`),
so the command line and the dashboards always show the same numbers. Every function takes a
:class:`Reader` (a :class:`~kojin_pg.db.Database`, or one transaction via :func:`snapshot`) and
the schema name; nothing here writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.abc import Query

from .db import Database, Queries


class Reader(Protocol):
    """What the figures are read through: :class:`~kojin_pg.db.Database` has this shape."""

    def fetchall(self, query: Query, params: Any = None,
                 what: str = "query") -> list[tuple[Any, ...]]: ...

    def fetchone(self, query: Query, params: Any = None,
                 what: str = "query") -> tuple[Any, ...] | None: ...

#: Above this share of the NOTIFY queue in use, ``stats`` warns (at 1.0 every NOTIFY fails).
NOTIFY_USAGE_WARNING = 0.5


@dataclass(frozen=True)
class QueueFigures:
    """One queue: message counts by state, dead letters, oldest ready age, bindings."""

    queue: str
    ready: int
    leased: int
    scheduled: int
    dead: int
    oldest_ready_age_s: float | None
    bindings: int
    #: Seconds until the next scheduled message is due (None: nothing scheduled).
    next_due_s: float | None = None


@dataclass(frozen=True)
class ResultFigures:
    """The results table: rows, rows past ``expires_at`` awaiting cleanup, total bytes."""

    rows: int
    expired_not_cleaned: int
    bytes: int


@dataclass(frozen=True)
class TableFigures:
    """One kojin table from ``pg_stat_user_tables`` (tuple counts are estimates)."""

    table: str
    live_estimate: int
    dead_tuples: int
    last_vacuum: datetime | None
    bytes: int
    rows_inserted: int
    rows_deleted: int


@dataclass(frozen=True)
class OldestTransaction:
    """The oldest open transaction of the database: it holds back vacuum of every table."""

    age_seconds: float
    pid: int
    application_name: str
    state: str | None


@dataclass(frozen=True)
class ServerFigures:
    """Server-wide figures: NOTIFY queue usage (0..1) and the oldest open transaction."""

    notify_queue_usage: float
    oldest_transaction: OldestTransaction | None


@dataclass(frozen=True)
class LastMinute:
    """Work done in the last minute, as far as the tables show it."""

    results_finished: int
    dead_lettered: int


def queues(db: Reader, schema: str) -> list[QueueFigures]:
    """Every queue with messages, dead letters or bindings (declared but empty queues too)."""
    rows = db.fetchall(Queries("admin", schema).queue_overview, what="queue overview")
    return [QueueFigures(*row) for row in rows]


def results(db: Reader, schema: str) -> ResultFigures:
    """Rows of the results table, expired ones not yet deleted, and its size."""
    row = db.fetchone(Queries("admin", schema).result_stats, {"schema": schema},
                      "result stats")
    return ResultFigures(*(row or (0, 0, 0)))


def tables(db: Reader, schema: str) -> list[TableFigures]:
    """Tuple estimates, vacuum, size and insert/delete counters of each kojin table."""
    rows = db.fetchall(Queries("admin", schema).table_health, {"schema": schema}, "table health")
    return [TableFigures(*row) for row in rows]


def server(db: Reader, schema: str) -> ServerFigures:
    """NOTIFY queue usage and the oldest open transaction of this database."""
    row = db.fetchone(Queries("admin", schema).server_health, what="server health")
    usage, age, pid, app, state = row or (0.0, None, None, None, None)
    oldest = None if age is None else OldestTransaction(age, pid, app or "", state)
    return ServerFigures(float(usage), oldest)


def last_minute(db: Reader, schema: str) -> LastMinute:
    """Results finished and messages dead-lettered in the last minute."""
    row = db.fetchone(Queries("admin", schema).last_minute, what="last minute")
    return LastMinute(*(row or (0, 0)))


@dataclass(frozen=True)
class Snapshot:
    """Every group of figures, read in one transaction."""

    queues: list[QueueFigures]
    results: ResultFigures
    last_minute: LastMinute
    tables: list[TableFigures]
    server: ServerFigures


class _Transaction:
    """A :class:`Reader` over one connection inside an open transaction."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def fetchall(self, query: Query, params: Any = None,
                 what: str = "query") -> list[tuple[Any, ...]]:
        return self.conn.execute(query, params).fetchall()

    def fetchone(self, query: Query, params: Any = None,
                 what: str = "query") -> tuple[Any, ...] | None:
        return self.conn.execute(query, params).fetchone()


def snapshot(db: Database, schema: str, timeout: float = 10.0) -> Snapshot:
    """All figures in one read-only transaction that gives up after ``timeout`` seconds
    (``SET LOCAL statement_timeout``: a scrape never piles up behind a locked table)."""
    def read(conn: psycopg.Connection[Any]) -> Snapshot:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)",
                         (f"{int(timeout * 1000)}ms",))
            tx = _Transaction(conn)
            return Snapshot(queues(tx, schema), results(tx, schema), last_minute(tx, schema),
                            tables(tx, schema), server(tx, schema))
    return db.run(read, "health snapshot")


def as_dict(figures: Any) -> Any:
    """A figures dataclass (or a list of them) as plain JSON-ready data."""
    if isinstance(figures, list):
        return [as_dict(f) for f in figures]
    data = asdict(figures)
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    return data
