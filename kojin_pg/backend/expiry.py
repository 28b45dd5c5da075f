"""Deleting expired results, groups and chord rows in bounded batches.

Each batch is its own short transaction that skips locked rows, so readers and writers are
never blocked for long. The result backend's ``cleanup()`` (what Celery's
``celery.backend_cleanup`` calls) and ``kojin-pg cleanup`` both run :func:`delete_expired`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..db import Database, Queries

#: Tables cleaned, in that order.
EXPIRING_TABLES = ("results", "groups", "chords", "chord_parts")


def delete_expired(db: Database, queries: Queries, batch: int,
                   progress: Callable[[int, str], None] | None = None) -> dict[str, int]:
    """Delete every expired row; return how many went per table. ``progress(done, table)`` is
    called after each batch."""
    counts: dict[str, int] = {}
    done = 0
    for table in EXPIRING_TABLES:
        query = queries.get("delete_expired", table=table)
        total = 0
        while True:
            row = db.fetchone(query, {"batch": batch}, f"cleanup {table}")
            deleted = int(row[0]) if row else 0
            total += deleted
            done += deleted
            if progress is not None:
                progress(done, table)
            if deleted < batch:
                break
        counts[table] = total
    return counts
