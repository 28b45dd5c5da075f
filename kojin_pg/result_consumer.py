"""Waiting for results without polling: LISTEN on one channel per schema.

Every stored result is announced with ``pg_notify(channel, task_id)`` in the same transaction as
the write. Each process keeps one listening connection (made on first wait, replaced after
fork and after connection loss). A wake-up reads the announced results that someone here waits
for, in one query. As a safety net against lost notifications (the listening connection
dropped, a result written by something that does not notify), a wait that hears nothing reads
the awaited results once before waiting again. With ``use_notify=False`` (PgBouncer in
transaction mode) it polls every ``polling_interval`` instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from celery import states
from celery.backends.asynchronous import BaseResultConsumer

from .errors import DatabaseUnavailable
from .events import LISTEN_RECONNECT, log_event

log = logging.getLogger(__name__)


class ResultConsumer(BaseResultConsumer):
    """Celery's async result consumer, fed by PostgreSQL notifications."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection_errors = (psycopg.OperationalError, DatabaseUnavailable)
        self._reset()

    def _reset(self) -> None:
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        self._read_lock = threading.Lock()
        self._read_done = threading.Condition(threading.Lock())

    @property
    def _use_notify(self) -> bool:
        return bool(self.backend.settings.use_notify)

    # -- the listening connection ----------------------------------------------------------

    def _listening(self) -> psycopg.Connection[Any] | None:
        """The LISTEN connection of this process, connected on first use."""
        if self._pid != os.getpid():
            self._reset()  # after fork: the parent's socket is not ours to use or close
        if not self._use_notify:
            return None
        conn = self._conn
        if conn is None or conn.closed:
            self.backend.ensure_ready()
            conn = self.backend.db.listen(self.backend.channel)
            self._conn = conn
        return conn

    def _reconnect(self) -> None:
        log_event(log, logging.WARNING, LISTEN_RECONNECT, role="results")
        old, self._conn = self._conn, None
        if old is not None:
            try:
                old.close()
            except psycopg.Error:
                pass
        deadline = time.monotonic() + self.backend.settings.retry_timeout
        delay = 0.05
        while True:
            try:
                self._listening()
                break
            except self._connection_errors:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        # Results stored while we were not listening were announced to nobody: read them.
        self._deliver(self._awaited())

    # -- BaseResultConsumer ------------------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        """Start listening (if not yet) for ``initial_task_id``."""
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Make sure results announced from now on reach this process."""
        with self.reconnect_on_error():
            self._listening()

    def cancel_for(self, task_id: str) -> None:
        """Nothing to undo: one channel serves every task."""

    def stop(self) -> None:
        """Close the listening connection."""
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            conn.close()

    def on_after_fork(self) -> None:
        self._reset()
        super().on_after_fork()

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # Listening is on already (consume_from ran): whatever was stored before is read here,
        # whatever is stored later will be announced.
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)
                if meta["status"] in states.READY_STATES:
                    # read directly, so nothing else takes it out of the buffer again
                    buffered = self._pending_messages.pop(meta["task_id"], None)
                    if buffered is not None:
                        self._pending_messages.total -= len(buffered)

    def drain_events(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for announced results and hand them to their waiters."""
        wait = 1.0 if timeout is None else max(timeout, 0.0)
        if not self._read_lock.acquire(blocking=False):
            # Another thread reads the connection; whatever it reads for us, it delivers.
            with self._read_done:
                self._read_done.wait(wait)
            return
        try:
            with self.reconnect_on_error():
                conn = self._listening()
                if conn is None:
                    self._poll(wait)
                    return
                announced = {n.payload for n in conn.notifies(timeout=wait, stop_after=1)}
                if announced:
                    awaited = self._awaited()
                    self._deliver(announced & awaited)
                else:
                    self._deliver(self._awaited())  # heard nothing: the safety-net read
        finally:
            self._read_lock.release()
            with self._read_done:
                self._read_done.notify_all()

    # -- helpers -----------------------------------------------------------------------------

    def _awaited(self) -> set[str]:
        ids: set[str] = set()
        for mapping in self._pending_results:
            ids.update(mapping.keys())
        return ids

    def _deliver(self, task_ids: Iterable[str]) -> int:
        metas = self.backend.fetch_metas(task_ids)
        for meta in metas.values():
            self.on_state_change(meta, True)
        return sum(1 for m in metas.values() if m["status"] in states.READY_STATES)

    def _poll(self, wait: float) -> None:
        if not self._deliver(self._awaited()):
            time.sleep(min(wait, self.backend.settings.polling_interval))

    def wait_for_any(self, task_ids: set[str], timeout: float) -> None:
        """Sleep until one of ``task_ids`` may have changed, or ``timeout`` passes (get_many)."""
        if timeout <= 0:
            return
        conn = None
        if self._read_lock.acquire(blocking=False):
            try:
                try:
                    conn = self._listening()
                except self._connection_errors:
                    conn = None
                if conn is not None:
                    deadline = time.monotonic() + timeout
                    while (left := deadline - time.monotonic()) > 0:
                        heard = {n.payload for n in conn.notifies(timeout=left, stop_after=1)}
                        # announcements for other waiters of this process reach them too
                        self._deliver((heard - task_ids) & self._awaited())
                        if heard & task_ids:
                            return
            except self._connection_errors:
                self._conn = None
            finally:
                self._read_lock.release()
        if conn is None:
            time.sleep(min(timeout, self.backend.settings.polling_interval))
