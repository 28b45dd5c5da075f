"""A least-privilege role for a test: DML on the ``kojin`` schema, no DDL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql


@contextmanager
def dml_role(db_url: str, role: str) -> Iterator[str]:
    """Create ``role`` (LOGIN; USAGE on schema kojin, DML on its tables, USAGE on its
    sequences) and yield ``db_url`` as that role; drop what it owns, and it, after."""
    name = sql.Identifier(role)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(name))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(name))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA kojin TO {}").format(name))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "
                             "kojin TO {}").format(name))
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA kojin TO {}").format(name))
    try:
        yield db_url.replace("postgres@", f"{role}@")
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(name))
            conn.execute(sql.SQL("DROP ROLE {}").format(name))
