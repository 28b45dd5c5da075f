"""Plans of statements as our sessions run them: prepared, then executed by name, so that the
session's ``plan_cache_mode`` picks the plan (an EXPLAIN of the statement text itself is always
planned for the values given)."""

from __future__ import annotations

import re

import psycopg
from psycopg import sql


def first_use_order(query: sql.Composable, params: dict) -> list:
    """``params``' values in the order psycopg numbers them ($1, $2, ...): first use."""
    names = re.findall(r"%\((\w+)\)s", query.as_string(None))
    return [params[n] for n in dict.fromkeys(names)]


def execute_prepared(conn: psycopg.Connection, query: sql.Composable,
                     params: dict) -> sql.Composed:
    """``EXECUTE`` of ``query``, which ``conn`` has prepared already, with ``params`` as typed
    literals: to put behind ``EXPLAIN``."""
    head = query.as_string(conn).split("%(")[0]
    name, types = conn.execute(
        "SELECT name, parameter_types::text[] FROM pg_prepared_statements "
        "WHERE starts_with(statement, %s) ORDER BY prepare_time DESC LIMIT 1", (head,),
        prepare=False).fetchone()
    values = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(t))
        for v, t in zip(first_use_order(query, params), types, strict=True))
    return sql.SQL("EXECUTE {}({})").format(sql.Identifier(name), values)
