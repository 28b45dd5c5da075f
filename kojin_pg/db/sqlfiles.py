"""Loads the SQL text shipped with the package: migrations and named queries.

The files live in the top-level ``sql/`` folder of the source tree and are mapped into the wheel
as ``kojin_pg/sql``. Identifiers are filled in with :class:`psycopg.sql.Identifier`; values are
never formatted into SQL, only bound as parameters.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from psycopg import sql

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
#: In compact_sql: a comment (group 1), or quoted text left as it is: a string, a quoted name, a
#: dollar-quoted body (group 3 is its tag). One pattern, so a quote inside a comment opens nothing.
_COMMENT_OR_QUOTED = re.compile(
    r"(--[^\n]*|/\*[\s\S]*?\*/)"
    r"|('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|(\$(?:[A-Za-z_]\w*)?\$)[\s\S]*?\3)")
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")


def sql_dir() -> Traversable:
    """The folder holding the SQL files, in an installed wheel or in a source checkout."""
    packaged = resources.files("kojin_pg") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


@dataclass(frozen=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    text: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """All migrations, in version order."""
    found = []
    for entry in sql_dir().iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"kojin_pg SQL migrations are not numbered 1..n: {versions}")
    return tuple(found)


def compact_sql(text: str) -> str:
    """``text`` without comments and indentation, quoted text left as it is.

    The .sql files explain each statement at length; the server needs none of it, and psycopg
    parses a statement's placeholders once per process only if it is at most 4 KB long (longer
    ones on every execution: the claim was).
    """
    out: list[str] = []
    pos = 0
    for token in _COMMENT_OR_QUOTED.finditer(text):
        out.append(_unindent(text[pos:token.start()]))
        out.append(" " if token.group(1) else token.group())
        pos = token.end()
    out.append(_unindent(text[pos:]))
    return "".join(out).strip()


def _unindent(code: str) -> str:
    """Unquoted SQL without each line's indentation and trailing blanks, nor empty lines."""
    return re.sub(r"[ \t]*\n[ \t\n]*", "\n", code)


@functools.cache
def _named(group: str) -> dict[str, str]:
    text = (sql_dir() / "queries" / f"{group}.sql").read_text("utf-8")
    pieces = _NAME.split(text)
    return {pieces[i]: compact_sql(pieces[i + 1]) for i in range(1, len(pieces), 2)}


def plain_query(group: str, name: str) -> sql.SQL:
    """The query ``name`` of ``queries/<group>.sql``, one that names no identifier (a question
    about the server or the session)."""
    return sql.SQL(_named(group)[name])


class Queries:
    """The named queries of one SQL file, bound to one schema.

    ``queries.store_result`` is a ready :class:`psycopg.sql.SQL`; queries with other
    identifiers are built with :meth:`get`. Identifiers are filled in once, quoted the way
    :class:`psycopg.sql.Identifier` quotes them, so an execution only encodes the text.
    """

    def __init__(self, group: str, schema: str) -> None:
        self._texts = _named(group)
        self._schema = sql.Identifier(schema)
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], sql.SQL] = {}

    def get(self, name: str, **identifiers: str) -> sql.SQL:
        """The query ``name`` with ``{schema}`` and each ``{identifier}`` filled in."""
        key = (name, tuple(sorted(identifiers.items())))
        query = self._cache.get(key)
        if query is None:
            fields = {k: sql.Identifier(v) for k, v in identifiers.items()}
            composed = sql.SQL(self._texts[name]).format(schema=self._schema, **fields)
            query = sql.SQL(composed.as_string(None))
            self._cache[key] = query
        return query

    def __getattr__(self, name: str) -> sql.SQL:
        if name.startswith("_") or name not in self._texts:
            raise AttributeError(name)
        query = self.get(name)
        setattr(self, name, query)  # later lookups are plain attribute reads
        return query
