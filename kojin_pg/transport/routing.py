"""Exchange bindings in the database, so routing works across processes.

kombu's virtual transport routes a published message through the exchange's binding table
(direct, topic or fanout). Ours lives in ``<schema>.bindings``, shared by every process, so
Celery's remote control (fanout) and events (topic) reach consumers in other processes. Each
channel keeps the tables it read for :data:`ROUTING_CACHE_SECONDS`; a key with no match is
read again at once (a queue may have been bound elsewhere since).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import check_queue_name
from ..db import Queries

#: Seconds a routing table read from the database is reused for a key found in it.
ROUTING_CACHE_SECONDS = 5.0

Row = tuple[str, str, str]


class Bindings:
    """The binding tables of the exchanges one channel routes through."""

    def __init__(self, queries: Queries,
                 fetch: Callable[[Any, dict[str, Any], str], list[tuple[Any, ...]]]) -> None:
        self._q = queries
        self._fetch = fetch
        self._tables: dict[str, tuple[float, list[Row]]] = {}

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Bind ``queue`` to ``exchange`` (idempotent)."""
        self._fetch(self._q.bind, {
            "exchange": check_queue_name(exchange), "routing_key": routing_key or "",
            "pattern": pattern or "", "queue": check_queue_name(queue)}, "queue_bind")
        self.forget(exchange)

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        """Remove one binding."""
        self._fetch(self._q.unbind, {"exchange": exchange, "routing_key": routing_key or "",
                                     "queue": queue}, "queue_unbind")
        self.forget(exchange)

    def table(self, exchange: str) -> list[Row]:
        """The bindings of ``exchange`` as kombu's routing rows (routing key, pattern, queue)."""
        cached = self._tables.get(exchange)
        if cached and time.monotonic() - cached[0] < ROUTING_CACHE_SECONDS:
            return cached[1]
        rows: list[Row] = [(r[0], r[1], r[2]) for r in self._fetch(
            self._q.bindings_of, {"exchange": exchange}, "bindings")]
        self._tables[exchange] = (time.monotonic(), rows)
        return rows

    def is_cached(self, exchange: str) -> bool:
        """Whether the table of ``exchange`` comes from the cache."""
        return exchange in self._tables

    def forget(self, exchange: str) -> None:
        """Drop the cached table of ``exchange``: the next lookup reads the database."""
        self._tables.pop(exchange, None)
