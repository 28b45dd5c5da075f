"""Deleting expired results, groups and chord rows in bounded batches.

Each batch is its own short transaction that skips locked rows, so readers and writers are
never blocked for long. The result backend's ``cleanup()`` (what Celery's
``celery.backend_cleanup`` calls) and ``kojin-pg cleanup`` both run :func:`delete_expired`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..db import Database, Queries

#: Tables with an ``expires_at`` column, cleaned in that order; chord parts go after their
#: chord (they have no expiry of their own, so a long chord keeps every part it collected).
EXPIRING_TABLES = ("results", "groups", "chords")


def delete_expired(db: Database, queries: Queries, batch: int,
                   progress: Callable[[int, str], None] | None = None) -> dict[str, int]:
    """Delete every expired row; return how many went per table. ``progress(done, table)`` is
    called after each batch."""
    counts: dict[str, int] = {}
    done = 0
    steps = [(table, queries.get("delete_expired", table=table)) for table in EXPIRING_TABLES]
    steps.append(("chord_parts", queries.delete_orphan_chord_parts))
    for table, query in steps:
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
