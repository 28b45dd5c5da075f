"""Lease renewal: a live consumer keeps the messages it holds invisible to everyone else.

A claim leases a message until ``now() + visibility_timeout`` (database clock). While the
consumer lives, a daemon thread extends the leases of every message it holds, every
``lease_renew_interval`` seconds, so a long task (or an ETA task kept by a worker) is never
delivered twice. When the consumer dies the renewals stop, the leases run out, and another
consumer gets the messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..db import Database, ProcessLocal, Queries
from ..events import LEASE_LOST, log_event

log = logging.getLogger(__name__)


class _Thread:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


class LeaseKeeper:
    """Renews the leases of the messages ``held()`` returns, for consumer ``consumer_id()``."""

    def __init__(self, db: Database, queries: Queries, consumer_id: Callable[[], str],
                 held: Callable[[], list[int]], visibility_timeout: float,
                 interval: float) -> None:
        self.db = db
        self.queries = queries
        self.consumer_id = consumer_id
        self.held = held
        self.visibility_timeout = visibility_timeout
        self.interval = interval
        self._state: ProcessLocal[_Thread] = ProcessLocal(_Thread)

    def start(self) -> None:
        """Make sure the renewal thread of this process runs."""
        t = self._state.get()
        if t.thread is None or not t.thread.is_alive():
            t.stop.clear()
            t.thread = threading.Thread(target=self._run, args=(t,), daemon=True,
                                        name="kojin_pg-leases")
            t.thread.start()

    def stop(self) -> None:
        """Stop the renewal thread and wait for it to end."""
        t = self._state.pop()
        if t is None:
            return
        t.stop.set()
        if t.thread is not None and t.thread is not threading.current_thread():
            t.thread.join(timeout=5.0)

    def _run(self, t: _Thread) -> None:
        next_renewal = time.monotonic() + self.interval
        while not t.stop.wait(max(0.0, next_renewal - time.monotonic())):
            next_renewal = time.monotonic() + self.interval
            try:
                self.renew()
            except Exception as exc:  # keep going: what failed is retried next round
                log.warning("kojin_pg: lease renewal failed: %r", exc)

    def renew(self) -> list[int]:
        """Extend every held lease now; return the ids whose lease was lost."""
        held = self.held()
        if not held:
            return []
        rows = self.db.fetchall(self.queries.extend_leases, {
            "ids": held, "consumer": self.consumer_id(),
            "visibility_timeout": self.visibility_timeout}, "extend leases")
        kept = {r[0] for r in rows}
        still_held = set(self.held())
        lost = [i for i in held if i not in kept and i in still_held]
        for msg_id in lost:
            log_event(log, logging.WARNING, LEASE_LOST, message_id=msg_id,
                      consumer=self.consumer_id())
        return lost
