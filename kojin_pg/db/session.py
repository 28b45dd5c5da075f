"""How each server session kojin_pg opens is set up: JSON codecs, pooler detection, settings."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads

from .. import codec

#: Settings of every direct session. JIT off: every statement here is short, but a generic
#: plan's estimates (a LIMIT of unknown size over a million queued rows) pass jit_above_cost,
#: and compiling was nearly all of a 27 ms claim on a stock PostgreSQL 15 (on by default there).
SESSION_SETTINGS = {"jit": "off"}

#: And of LISTEN sessions: READ COMMITTED whatever the server's default, because their
#: statements take locks, then read what committed while they waited (backend/waiters.py).
#: Their statements are planned once per session: each get runs wait_and_read there, and the
#: server, finding a custom plan cheaper than the generic one, planned it again on every call,
#: which took longer than running it. Its reads go by the results' key either way (see
#: test_reads_by_task_id_read_those_rows_however_many_results_are_stored); the rest take
#: advisory locks and read no table.
LISTENER_SETTINGS = {"default_transaction_isolation": "read committed",
                     "plan_cache_mode": "force_generic_plan"}


def behind_pooler(conn: psycopg.Connection[Any]) -> bool:
    """True if ``conn`` reaches its server through a pooler or proxy.

    A pooler cannot pass on the server's backend pid and cancel key (the client may be served
    by any server connection), so it makes up its own: the pid the connection was given at
    start-up is not the one of the backend that runs its statements.
    """
    row = conn.execute("SELECT pg_backend_pid()", prepare=False).fetchone()
    return row is None or row[0] != conn.info.backend_pid


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Use orjson for json/jsonb on this connection, both ways."""
    set_json_dumps(codec.dumps, context=conn)
    set_json_loads(codec.loads, context=conn)


def set_session(conn: psycopg.Connection[Any], settings: dict[str, str]) -> None:
    """Set these server settings for the rest of the session, in one round trip (not behind a
    transaction pooler, where the session is shared)."""
    conn.execute("SELECT set_config(name, value, false) FROM unnest(%s::text[], %s::text[])"
                 " AS s(name, value)", (list(settings), list(settings.values())), prepare=False)
