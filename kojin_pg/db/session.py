"""How each server session kojin_pg opens is set up: JSON codecs, pooler detection, settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads

from .. import codec
from .sqlfiles import plain_query

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


@dataclass(frozen=True)
class ServerFacts:
    """What a first connection finds out about the server, once per process and database."""

    #: The connection reaches its server through a pooler or proxy. A pooler cannot pass on
    #: the server's backend pid and cancel key (the client may be served by any server
    #: connection), so it makes up its own: the pid the connection was given at start-up is
    #: not the one of the backend that runs its statements.
    behind_pooler: bool
    #: This role may write a logical-decoding message (``pg_logical_emit_message``), which an
    #: announced store or publish writes to wait for its flush (sql/0013).
    may_write_logical_messages: bool


def learn_the_server(conn: psycopg.Connection[Any]) -> ServerFacts:
    """Ask the server of ``conn`` what :class:`ServerFacts` holds, in one round trip."""
    # an aggregate's one row always comes
    pid, may_write = conn.execute(plain_query("session", "what_the_server_tells"),
                                  prepare=False).fetchone() or (None, False)
    return ServerFacts(behind_pooler=pid != conn.info.backend_pid,
                       may_write_logical_messages=bool(may_write))


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Use orjson for json/jsonb on this connection, both ways."""
    set_json_dumps(codec.dumps, context=conn)
    set_json_loads(codec.loads, context=conn)


def set_session(conn: psycopg.Connection[Any], settings: dict[str, str]) -> None:
    """Set these server settings for the rest of the session, in one round trip (not behind a
    transaction pooler, where the session is shared)."""
    conn.execute("SELECT set_config(name, value, false) FROM unnest(%s::text[], %s::text[])"
                 " AS s(name, value)", (list(settings), list(settings.values())), prepare=False)
