"""The admin's SQL that is not a model query: queue counts, filter choices, and moving dead
letters. It runs kojin_pg's own named queries (``sql/queries/*.sql``) on the Django connection
of ``KOJIN_PG_DATABASE``, so the admin does what ``kojin-pg queues`` and ``kojin-pg dlq`` do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, transaction
from psycopg import sql

from kojin_pg.db import Queries

from . import conf


@dataclass(frozen=True)
class QueueCounts:
    """One queue's messages by state, as ``kojin-pg queues`` reports them."""

    name: str
    ready: int = 0
    leased: int = 0
    delayed: int = 0
    dead: int = 0
    oldest_ready_age_s: float | None = None


def _run(query: sql.SQL, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    alias = conf.database()
    with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def queue_counts() -> list[QueueCounts]:
    """Every queue holding messages or dead letters, with its counts, by name."""
    broker = Queries("broker", conf.schema())
    dead = dict(_run(broker.dead_letter_counts))
    queues = {name: QueueCounts(name, ready, leased, delayed, dead.pop(name, 0), age)
              for name, ready, leased, delayed, age in _run(broker.queue_stats)}
    queues.update((name, QueueCounts(name, dead=n)) for name, n in dead.items())
    return [queues[name] for name in sorted(queues)]


def distinct_values(table: str, column: str, limit: int = 200) -> list[Any]:
    """Up to ``limit`` distinct values of an indexed ``column`` of ``table``, in order."""
    query = Queries("django", conf.schema()).get("distinct_values", table=table, column=column)
    return [value for (value,) in _run(query, {"limit": limit})]


def estimated_rows(table: str) -> int:
    """The planner's row estimate for ``table`` (-1 when it was never analyzed)."""
    rows = _run(Queries("django", conf.schema()).estimated_rows,
                {"table": f"{conf.schema()}.{table}"})
    return int(rows[0][0]) if rows else -1


def _selection(ids: Sequence[int]) -> dict[str, Any]:
    return {"ids": list(ids), "queue": None, "all": False}


def requeue_dead_letters(ids: Sequence[int]) -> int:
    """Move these dead letters back to their queues (``dlq_requeue``); returns how many moved."""
    from kojin_pg.db.channels import messages_channel

    schema = conf.schema()
    rows = _run(Queries("broker", schema).dlq_requeue,
                {**_selection(ids), "channel": messages_channel(schema)})
    return int(rows[0][0]) if rows else 0


def purge_dead_letters(ids: Sequence[int]) -> int:
    """Delete these dead letters (``dlq_purge``); returns how many were deleted."""
    rows = _run(Queries("broker", conf.schema()).dlq_purge, _selection(ids))
    return int(rows[0][0]) if rows else 0
