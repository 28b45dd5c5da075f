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


@functools.cache
def _named(group: str) -> dict[str, str]:
    text = (sql_dir() / "queries" / f"{group}.sql").read_text("utf-8")
    pieces = _NAME.split(text)
    return {pieces[i]: pieces[i + 1].strip() for i in range(1, len(pieces), 2)}


class Queries:
    """The named queries of one SQL file, bound to one schema.

    ``queries.store_result`` is a ready :class:`psycopg.sql.Composed`; queries with other
    identifiers are built with :meth:`get`.
    """

    def __init__(self, group: str, schema: str) -> None:
        self._texts = _named(group)
        self._schema = sql.Identifier(schema)
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], sql.Composed] = {}

    def get(self, name: str, **identifiers: str) -> sql.Composed:
        """The query ``name`` with ``{schema}`` and each ``{identifier}`` filled in."""
        key = (name, tuple(sorted(identifiers.items())))
        query = self._cache.get(key)
        if query is None:
            fields = {k: sql.Identifier(v) for k, v in identifiers.items()}
            query = sql.SQL(self._texts[name]).format(schema=self._schema, **fields)
            self._cache[key] = query
        return query

    def __getattr__(self, name: str) -> sql.Composed:
        if name.startswith("_") or name not in self._texts:
            raise AttributeError(name)
        query = self.get(name)
        setattr(self, name, query)  # later lookups are plain attribute reads
        return query
