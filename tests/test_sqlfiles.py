"""The named queries as sent to the server: compact enough for psycopg to parse once."""

from __future__ import annotations

import psycopg
import psycopg._queries
import pytest

from kojin_pg.db import Queries
from kojin_pg.db.sqlfiles import _named, compact_sql

#: psycopg parses a statement's placeholders once per process only up to this length; a longer
#: one is parsed again on every execution (psycopg/_queries.py, MAX_CACHED_STATEMENT_LENGTH).
PSYCOPG_CACHED_LENGTH = getattr(psycopg._queries, "MAX_CACHED_STATEMENT_LENGTH", 4096)

#: The identifiers that queries other than {schema} take, with a value to render them.
IDENTIFIERS = {"table": "results", "column": "status"}


@pytest.mark.parametrize("group", ["admin", "backend", "broker", "django"])
def test_every_named_query_fits_psycopg_statement_cache(group):
    queries = Queries(group, "kojin")
    too_long = {}
    for name, text in _named(group).items():
        needed = {k: v for k, v in IDENTIFIERS.items() if "{" + k + "}" in text}
        rendered = queries.get(name, **needed).as_bytes(None)
        if len(rendered) > PSYCOPG_CACHED_LENGTH:
            too_long[name] = len(rendered)
    assert not too_long, f"parsed on every execution by psycopg: {too_long}"


def test_compacting_keeps_strings_and_quoted_names_and_drops_comments(db_url):
    text = """
        -- a comment's apostrophe opens no string
        SELECT '-- kept' AS "a--b",   /* a block comment */
               'it''s' AS q,  -- trailing comment
               $$ -- kept too $$ AS d
    """
    compacted = compact_sql(text)
    assert "comment" not in compacted
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(compacted)
        assert cur.fetchone() == ("-- kept", "it's", " -- kept too ")
        assert cur.description is not None and cur.description[0].name == "a--b"


def test_queries_render_a_schema_name_that_needs_quoting():
    query = Queries("broker", 'my "odd" schema').get("queue_size")
    assert '"my ""odd"" schema".' in query.as_string(None)
