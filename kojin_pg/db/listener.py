"""LISTEN connections: one per process and channel, with the one reconnect and fork policy.

Both waiting for results and waiting for messages sleep on a :class:`Listener`. It connects on
first use, again in a forked child (never on the parent's socket) and again after the connection
is lost, no sooner than a short, growing backoff. Callers never see its connection errors:
:meth:`Listener.wait` and :meth:`Listener.take` return ``None`` whenever announcements may have
been missed (notifications are off, the connection is down, or it was just re-established), and
the caller then reads what it waits for directly. :meth:`Listener.pause` UNLISTENs while nothing
waits, so an idle process never holds back PostgreSQL's notification queue.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Any

import psycopg
from psycopg import sql

from ..errors import DatabaseUnavailable
from ..events import LISTEN_RECONNECT, log_event
from .forksafe import ProcessLocal
from .pool import Database

log = logging.getLogger(__name__)

#: Seconds between reconnect attempts: the first, and the most.
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 2.0


class _Session:
    """This process's LISTEN connection and what it has heard but not handed out yet."""

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.listening = False
        #: Payloads psycopg received while running a statement (LISTEN/UNLISTEN).
        self.backlog: set[str] = set()
        #: Announcements may have been missed since the last wait (the connection was lost).
        self.missed = False
        self.retry_at = 0.0
        self.backoff = BACKOFF_FIRST


class Listener:
    """Notifications of one channel for this process. Not for concurrent use by two threads."""

    def __init__(self, db: Database, channel: str, *, role: str, enabled: bool = True) -> None:
        self.db = db
        self.channel = channel
        self.role = role
        self.enabled = enabled
        self._session: ProcessLocal[_Session] = ProcessLocal(_Session)

    # -- connection ------------------------------------------------------------------------

    def ensure(self) -> bool:
        """Listen from now on (connecting if needed); False if that is not possible now."""
        return self._listening() is not None

    def _listening(self) -> psycopg.Connection[Any] | None:
        if not self.enabled:
            return None
        s = self._session.get()
        if s.conn is not None and not s.conn.closed and s.listening:
            return s.conn
        if time.monotonic() < s.retry_at:
            return None
        try:
            if s.conn is None or s.conn.closed:
                s.conn = self.db.connect()
                s.conn.add_notify_handler(lambda n: s.backlog.add(n.payload))
            s.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except (psycopg.Error, OSError, DatabaseUnavailable) as exc:
            self._lost(s, exc)
            return None
        s.listening, s.backoff = True, BACKOFF_FIRST
        return s.conn

    def _lost(self, s: _Session, exc: BaseException) -> None:
        log_event(log, logging.WARNING, LISTEN_RECONNECT, role=self.role,
                  error=type(exc).__name__, retry_in_s=round(s.backoff, 3))
        self._drop(s)
        s.missed = True
        s.retry_at = time.monotonic() + s.backoff
        s.backoff = min(s.backoff * 2, BACKOFF_MAX)

    @staticmethod
    def _drop(s: _Session) -> None:
        conn, s.conn, s.listening = s.conn, None, False
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    @property
    def connected(self) -> bool:
        """Whether this process has a listening connection open (listening or paused)."""
        s = self._session.peek()
        return s is not None and s.conn is not None and not s.conn.closed

    def fileno(self) -> int | None:
        """The socket to watch for announcements (listening first), or None if not listening."""
        conn = self._listening()
        if conn is None:
            return None
        return conn.pgconn.socket

    # -- hearing -----------------------------------------------------------------------------

    def take(self) -> set[str] | None:
        """Payloads announced so far, without blocking; None if some may have been missed."""
        return self.wait(0.0)

    def wait(self, timeout: float, wake_fd: int | None = None) -> set[str] | None:
        """Payloads announced within ``timeout`` seconds (returning at the first); an empty set
        if none came or ``wake_fd`` became readable; None if some may have been missed."""
        conn = self._listening()
        s = self._session.get()
        if conn is None:
            return None
        try:
            heard = self._drain(s, conn)
            if not heard and timeout > 0 and not s.missed:
                poller = select.poll()  # poll, not select: descriptors above 1024 work too
                poller.register(conn.pgconn.socket, select.POLLIN)
                if wake_fd is not None:
                    poller.register(wake_fd, select.POLLIN)
                poller.poll(timeout * 1000.0)
                heard = self._drain(s, conn)
        except (psycopg.Error, OSError, ValueError) as exc:
            self._lost(s, exc)
            return None
        if s.missed:
            s.missed = False
            return None
        return heard

    @staticmethod
    def _drain(s: _Session, conn: psycopg.Connection[Any]) -> set[str]:
        pgconn = conn.pgconn
        pgconn.consume_input()
        heard, s.backlog = s.backlog, set()
        while (n := pgconn.notifies()) is not None:
            heard.add(n.extra.decode())
        return heard

    # -- idling and closing -------------------------------------------------------------------

    def pause(self) -> None:
        """Stop listening (the session stays open): nothing here waits for announcements."""
        s = self._session.peek()
        if s is None or s.conn is None or not s.listening:
            return
        try:
            s.conn.execute("UNLISTEN *")
            s.listening = False
            s.backlog.clear()
        except (psycopg.Error, OSError) as exc:
            self._lost(s, exc)

    def close(self) -> None:
        """Close this process's listening connection (a forked child leaves its parent's)."""
        s = self._session.pop()
        if s is not None:
            self._drop(s)
