"""A read sent on libpq directly: the single ``get``'s statement, without psycopg's cursor.

A quarter of the client CPU of a read through a cursor goes to psycopg's cursor machinery:
a :class:`LeanRead` sends its statement on the connection's ``pgconn`` and loads the rows with a
:class:`~psycopg.adapt.Transformer` made from the connection, so a row reads exactly as a cursor
would read it (the same loaders: orjson for JSON), and waits the way a cursor waits
(:meth:`psycopg.Connection.wait`: interruptible, and green under gevent). On the bench machine
that took the read of one stored result from 107 to 82 µs of client CPU and from 185 to 157 µs
(16 rounds in turns, faster in 15); ``python -m bench backend`` measures the whole get against
the same read from pgbench, a psycopg cursor and psycopg's libpq layer.

The statement is prepared once per session under a name made from its text (psycopg's own are
named ``_pg3_*``, so the two never meet, and two schemas' statements differ). Behind a
transaction pooler, or with ``prepare_threshold`` none, a prepared statement is not the
session's to keep: there it is sent unnamed, parsed and run in one round trip. The read goes by
the connection's own ``prepare_threshold``, which :class:`~kojin_pg.db.Database` sets for each
connection once it knows whether a pooler is in between. psycopg
deallocates every prepared statement of a session after a DROP, ALTER, ROLLBACK or DISCARD ALL
there; a read that finds its statement gone prepares it again and runs once more (a read, so
safe to repeat).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq, sql
from psycopg.adapt import Transformer

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")
_INVALID_STATEMENT_NAME = b"26000"  # the prepared statement does not exist (any more)

#: The lean statements each live connection of this process has prepared, by connection.
_prepared_on: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[bytes]] = (
    weakref.WeakKeyDictionary())


def positional(text: str) -> tuple[str, tuple[str, ...]]:
    """``text`` with its ``%(name)s`` placeholders numbered ``$1``, ``$2``... in order of first
    appearance (a name used twice takes one number), and the names in that order."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        if match.group(1) is None:
            if match.group() == "%%":
                return "%"
            raise ValueError(f"a lone '%' at {match.start()} of a statement with named placeholders")
        return f"${names.setdefault(match.group(1), len(names) + 1)}"

    return _PLACEHOLDER.sub(number, text), tuple(names)


class LeanRead:
    """One read statement whose parameters are all text (or NULL), run on libpq directly."""

    def __init__(self, name: str, query: sql.SQL) -> None:
        text, self.params = positional(query.as_string(None))
        self.text = text.encode()
        # the same text, the same name: two reads of one statement (two apps on one schema)
        # share one prepared statement, and two schemas' statements never meet
        self.name = f"kojin_{name}_{hashlib.sha256(self.text).hexdigest()[:16]}".encode()

    def __repr__(self) -> str:
        return f"<LeanRead {self.name.decode()}>"

    def rows(self, conn: psycopg.Connection[Any],
             params: Mapping[str, str | None]) -> list[tuple[Any, ...]]:
        """The rows of the statement with ``params`` on ``conn``: prepared on it first where
        psycopg may prepare (``conn.prepare_threshold`` set), else sent unnamed."""
        if conn.closed:
            raise psycopg.OperationalError("the connection is closed")
        encoding = conn.info.encoding
        values = [None if (v := params[name]) is None else v.encode(encoding)
                  for name in self.params]
        with conn.lock:
            if conn.prepare_threshold is None:
                conn.pgconn.send_query_params(self.text, values)
                result = self._result(conn)
            else:
                if self.name not in _prepared_on.get(conn, ()):
                    self._prepare(conn)
                result = self._run_prepared(conn, values)
                if _sqlstate(result) == _INVALID_STATEMENT_NAME:
                    self._prepare(conn)
                    result = self._run_prepared(conn, values)
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise pg_errors.error_from_result(result, encoding=encoding)
        loader = Transformer(conn)
        loader.set_pgresult(result)
        return loader.load_rows(0, result.ntuples, tuple)

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        conn.pgconn.send_prepare(self.name, self.text)
        result = self._result(conn)
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise pg_errors.error_from_result(result, encoding=conn.info.encoding)
        _prepared_on.setdefault(conn, set()).add(self.name)

    def _run_prepared(self, conn: psycopg.Connection[Any],
                      values: list[bytes | None]) -> pq.abc.PGresult:
        conn.pgconn.send_query_prepared(self.name, values)
        return self._result(conn)

    @staticmethod
    def _result(conn: psycopg.Connection[Any]) -> pq.abc.PGresult:
        """The last result of what was sent (one statement: its only one)."""
        return conn.wait(generators.execute(conn.pgconn))[-1]


def _sqlstate(result: pq.abc.PGresult) -> bytes | None:
    if result.status != pq.ExecStatus.FATAL_ERROR:
        return None
    return result.error_field(pq.DiagnosticField.SQLSTATE)
