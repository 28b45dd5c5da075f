"""The migrator: applies ``sql/NNNN_*.sql`` in order, once, under an advisory lock.

Safe to run from many processes at once (the lock serializes them; the losers find nothing left
to do). All missing migrations are applied in one transaction that holds a transaction-scoped
advisory lock, so nothing outlives it: through a transaction pooler (PgBouncer) no lock is left
behind on a server session that another client then holds. When the schema is current,
:func:`ensure_schema` costs one cheap query per process.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from ..config import Settings
from ..errors import SchemaError
from .pool import Database
from .sqlfiles import Migration, migrations

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = "kojin_pg.migrate:"


def latest_version() -> int:
    """The schema version this code needs."""
    return migrations()[-1].version


def current_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The version of ``schema`` in the database, 0 if kojin_pg was never installed there."""
    try:
        with conn.transaction():
            row = conn.execute(
                sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(
                    sql.Identifier(schema))
            ).fetchone()
    except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
        return 0
    return int(row[0]) if row else 0


def _too_new(schema: str, version: int) -> SchemaError:
    return SchemaError(
        f"schema {schema!r} is at version {version}, newer than this kojin_pg "
        f"(which knows up to {latest_version()}): upgrade kojin_pg"
    )


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Apply every missing migration to ``schema``; return the versions applied."""
    ident = sql.Identifier(schema)
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK_NAMESPACE + schema,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())").format(ident))
        version = current_version(conn, schema)  # read under the lock
        if version > latest_version():
            raise _too_new(schema, version)
        for m in migrations():
            if m.version <= version:
                continue
            _apply(conn, schema, m)
            applied.append(m)
    for m in applied:
        log.info("kojin_pg: applied migration %04d_%s to schema %s", m.version, m.name, schema)
    return [m.version for m in applied]


def _apply(conn: psycopg.Connection[Any], schema: str, m: Migration) -> None:
    ident = sql.Identifier(schema)
    conn.execute(sql.SQL(m.text).format(schema=ident))
    conn.execute(
        sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(ident),
        (m.version, m.name),
    )


#: The oldest PostgreSQL kojin_pg runs on (``server_version_num``): 14 has the functions the
#: result reads need (``pg_column_compression``); every release still supported upstream has it.
MIN_SERVER_VERSION = 140000


def check_server_version(server_version: int, safe_url: str) -> None:
    """Refuse a server older than :data:`MIN_SERVER_VERSION` with an error that says so."""
    if server_version < MIN_SERVER_VERSION:
        major, minor = divmod(server_version, 10000)
        raise SchemaError(
            f"kojin_pg needs PostgreSQL {MIN_SERVER_VERSION // 10000} or newer; the server at "
            f"{safe_url} is PostgreSQL {major}.{minor}")


def ensure_schema(db: Database, *, retry: bool = True) -> None:
    """Make sure the schema is current: migrate if allowed, else raise a clear SchemaError.

    ``retry=False``: fail at once when the server cannot be reached (the caller retries)."""
    settings: Settings = db.settings

    def work(conn: psycopg.Connection[Any]) -> None:
        check_server_version(conn.info.server_version, settings.safe_url)
        version = current_version(conn, settings.schema)
        if version == latest_version():
            return
        if version > latest_version():
            raise _too_new(settings.schema, version)
        if not settings.auto_migrate:
            raise SchemaError(
                f"schema {settings.schema!r} is at version {version}, kojin_pg needs "
                f"{latest_version()}; auto_migrate is off, so run: "
                f"kojin-pg migrate --url {settings.safe_url} --schema {settings.schema}"
            )
        migrate(conn, settings.schema)

    db.run(work, "schema check", retry=retry)
