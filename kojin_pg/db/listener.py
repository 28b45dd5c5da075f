"""LISTEN connections: one per process and channel, with the one reconnect and fork policy.

Both waiting for results and waiting for messages sleep on a :class:`Listener`. It connects on
first use, again in a forked child (never on the parent's socket) and again after the connection
is lost, no sooner than a short, growing backoff. Callers never see its connection errors:
:meth:`Listener.wait` and :meth:`Listener.take` return ``None`` whenever announcements may have
been missed (notifications are off, the connection is down, or it was just re-established), and
the caller then reads what it waits for directly.

A listening session that nobody reads pins PostgreSQL's notification queue: once its socket
buffers are full the server can no longer hand it notifications, the queue's tail stops moving,
and at 100% usage every notifying commit in the database fails. So while no thread waits on a
listener, this process's sweeper thread reads its socket as data arrives and keeps what it
hears (up to :data:`BACKLOG_MAX` payloads, beyond which it reports a possible miss), and after
:data:`IDLE_SECONDS` without a waiter, or at once when it heard more than the backlog keeps, it
UNLISTENs (the session stays open; the next wait listens again and reports a possible miss).
Listeners watched by an event loop (:meth:`Listener.watch`) are read by the loop and left alone.

LISTEN needs a session of its own: behind a transaction pooler it connects to ``listen_url``
(a direct URL to the server); without one it turns itself off with a warning, and its callers
poll every ``polling_interval``.
"""

from __future__ import annotations

import logging
import select
import threading
import time
import weakref
from collections.abc import Callable
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
#: Seconds without a waiter after which a listening session is UNLISTENed. Short: up to
#: PostgreSQL 18 each listening session costs every notifying commit of the database server CPU
#: (docs/scaling.rst), while listening again costs the next waiter one LISTEN and one read.
IDLE_SECONDS = 2.0
#: Payloads kept for the next waiter while nobody waits; past this, a miss is reported instead.
BACKLOG_MAX = 10_000
#: Seconds the sweeper sleeps on the idle sockets before looking at the sessions again.
SWEEP_TICK = 0.25


class _Session:
    """This process's LISTEN connection and what it has heard but not handed out yet."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.conn: psycopg.Connection[Any] | None = None
        self.listening = False
        #: Read by an event loop whenever data arrives: never idle.
        self.watched = False
        #: Threads inside wait(), and when the last one left.
        self.waiting = 0
        self.last_used = time.monotonic()
        #: Payloads heard and not handed out yet: received while a statement ran on the
        #: session, or read by the sweeper (at most BACKLOG_MAX, see :meth:`keep`).
        self.backlog: set[str] = set()
        #: Payloads heard on the private channel and not handed out yet, in order (each one
        #: counts: they are never merged, nor dropped for a miss; its senders bound them).
        self.private: list[str] = []
        #: Announcements may have been missed since the last wait.
        self.missed = False
        #: More was heard than the backlog keeps: hearing more is of no use until a waiter
        #: comes (it reads what it waits for), so the sweeper pauses the session at once.
        self.overflowed = False
        #: How many connections this process has listened on: an event loop that watches one
        #: socket tells by it that another thread replaced the connection (see watched_session).
        self.opened = 0
        #: The private channel's name on this session (see Listener.private_channel).
        self.private_name: str | None = None
        #: Told when the session is paused for idling (its advisory locks given back).
        self.on_pause: Callable[[], None] | None = None
        self.retry_at = 0.0
        self.backoff = BACKOFF_FIRST

    def is_private(self, channel: str) -> bool:
        """Whether ``channel`` is this session's private channel."""
        return self.private_name is not None and channel == self.private_name

    def hear(self, channel: str, payload: str) -> None:
        """Keep what was heard on ``channel`` for the next waiter (see :meth:`keep`); the
        private channel's payloads are kept apart, in order."""
        if self.is_private(channel):
            self.private.append(payload)
        else:
            self.keep(payload)

    def keep(self, payload: str) -> None:
        """Keep a payload for the next waiter; past :data:`BACKLOG_MAX`, drop them all and
        report a miss instead (the waiter then reads what it waits for)."""
        self.backlog.add(payload)
        if len(self.backlog) > BACKLOG_MAX:
            self.backlog.clear()
            self.missed = True
            self.overflowed = True


class Listener:
    """Notifications of one channel for this process (safe to share between threads)."""

    def __init__(self, db: Database, channel: str, *, role: str, enabled: bool = True,
                 on_connect: Callable[[psycopg.Connection[Any]], None] | None = None,
                 on_pause: Callable[[], None] | None = None,
                 private_channel: Callable[[], str] | None = None) -> None:
        self.db = db
        self.channel = channel
        #: This process's own channel, listened on beside ``channel`` (see :meth:`take_private`).
        self.private_channel = private_channel
        self.role = role
        self.enabled = enabled
        #: Run on each new listening session, after LISTEN (to set up session state again).
        self.on_connect = on_connect
        #: Run when the session is paused after :data:`IDLE_SECONDS` without a waiter: it
        #: UNLISTENs and gives back every advisory lock it holds (wait slots, idle queues), so
        #: an idle process makes no writer announce for it.
        self.on_pause = on_pause
        self._session: ProcessLocal[_Session] = ProcessLocal(_Session)

    # -- connection ------------------------------------------------------------------------

    def ensure(self) -> bool:
        """Listen from now on (connecting if needed); False if that is not possible now."""
        return self._listening() is not None

    def _listening(self) -> psycopg.Connection[Any] | None:
        if not self.enabled:
            return None
        s = self._session.get()
        with s.lock:
            s.last_used = time.monotonic()
            if s.conn is not None and not s.conn.closed and s.listening:
                return s.conn
            if time.monotonic() < s.retry_at:
                return None
            try:
                new = s.conn is None or s.conn.closed
                if new:
                    conn = self.db.connect_listener()
                    if conn is None:
                        self._no_session()
                        return None
                    s.conn = conn
                    s.opened += 1
                    s.private_name = (self.private_channel() if self.private_channel is not None
                                      else None)
                    s.conn.add_notify_handler(lambda n: s.hear(n.channel, n.payload))
                s.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                if s.private_name is not None:
                    s.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(s.private_name)))
                if new and self.on_connect is not None:
                    self.on_connect(s.conn)
            except (psycopg.Error, OSError, DatabaseUnavailable) as exc:
                self._lost(s, exc)
                return None
            s.listening, s.backoff = True, BACKOFF_FIRST
            s.on_pause = self.on_pause
            _sweeper.get().add(s)
            return s.conn

    def _no_session(self) -> None:
        """Through a transaction pooler and without ``listen_url``: stop trying to listen."""
        self.enabled = False
        log.warning("kojin_pg: %s leads through a transaction pooler, where LISTEN does not "
                    "work, and no listen_url is set: %s polls every polling_interval instead "
                    "of waking on NOTIFY", self.db.settings.safe_url, self.role)

    def _lost(self, s: _Session, exc: BaseException) -> None:
        log_event(log, logging.WARNING, LISTEN_RECONNECT, role=self.role,
                  error=type(exc).__name__, retry_in_s=round(s.backoff, 3))
        _drop(s)
        s.missed = True
        s.retry_at = time.monotonic() + s.backoff
        s.backoff = min(s.backoff * 2, BACKOFF_MAX)

    def run(self, work: Callable[[psycopg.Connection[Any]], None]) -> bool:
        """Run ``work`` on the listening session (listening first); False if not listening
        now or the session was lost meanwhile (then a miss is reported to the next wait)."""
        if self._listening() is None:
            return False
        s = self._session.get()
        with s.lock:
            if s.conn is None or s.conn.closed:
                return False
            try:
                work(s.conn)
            except (psycopg.Error, OSError) as exc:
                self._lost(s, exc)
                return False
            finally:
                s.last_used = time.monotonic()
        return True

    def has_backlog(self) -> bool:
        """Whether announcements were read (by a statement on the session) and not taken yet."""
        s = self._session.peek()
        return s is not None and bool(s.backlog or s.private)

    @property
    def connected(self) -> bool:
        """Whether this process has a listening connection open (listening or paused)."""
        s = self._session.peek()
        return s is not None and s.conn is not None and not s.conn.closed

    @property
    def listening(self) -> bool:
        """Whether this process is listening on the channel right now."""
        s = self._session.peek()
        return s is not None and s.listening and s.conn is not None and not s.conn.closed

    def watch(self) -> int | None:
        """The socket for an event loop to watch (listening first; never paused while watched),
        or None if not listening now."""
        conn = self._listening()
        if conn is None:
            return None
        self._session.get().watched = True
        return conn.pgconn.socket

    @property
    def watched_session(self) -> int:
        """Which connection :meth:`watch` would give now (0: none is open). Another thread may
        find the session dead and listen on a new one (:meth:`run`); the old socket is closed
        then, and a poller that watched it hears nothing of either, so an event loop compares
        this with what it had when it began watching, and watches again when it differs."""
        s = self._session.peek()
        if s is None or s.conn is None or s.conn.closed:
            return 0
        return s.opened

    # -- hearing -----------------------------------------------------------------------------

    def take(self) -> set[str] | None:
        """Payloads announced so far, without blocking; None if some may have been missed."""
        return self.wait(0.0)

    def take_private(self) -> list[str]:
        """Payloads heard on the private channel so far, in order (read by :meth:`take`)."""
        s = self._session.peek()
        if s is None:
            return []
        with s.lock:
            heard, s.private = s.private, []
            return heard

    def wait(self, timeout: float, wake_fd: int | None = None) -> set[str] | None:
        """Payloads announced within ``timeout`` seconds (returning at the first); an empty set
        if none came or ``wake_fd`` became readable; None if some may have been missed."""
        conn = self._listening()
        if conn is None:
            return None
        s = self._session.get()
        with s.lock:
            s.waiting += 1
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
            with s.lock:
                self._lost(s, exc)
            return None
        finally:
            with s.lock:
                s.waiting -= 1
                s.last_used = time.monotonic()
        with s.lock:
            s.overflowed = False  # a waiter came: what overflowed is reported to it now
            if s.missed:
                s.missed = False
                return None
        return heard

    @staticmethod
    def _drain(s: _Session, conn: psycopg.Connection[Any]) -> set[str]:
        with s.lock:
            pgconn = conn.pgconn
            pgconn.consume_input()
            heard, s.backlog = s.backlog, set()
            while (n := pgconn.notifies()) is not None:
                if s.is_private(n.relname.decode()):
                    s.private.append(n.extra.decode())
                else:
                    heard.add(n.extra.decode())
            return heard

    # -- idling and closing -------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's listening connection (a forked child leaves its parent's)."""
        s = self._session.pop()
        if s is not None:
            with s.lock:
                _drop(s)


def _drop(s: _Session) -> None:
    conn, s.conn, s.listening = s.conn, None, False
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


def _idle(s: _Session, now: float) -> bool:
    """Whether the sweeper reads ``s``: listening, and nobody waits on it, watches it, or ran a
    statement on it for a sweep tick. A session in use reads its own socket; watched meanwhile,
    each reply to its statements woke the sweeper, which found it busy and polled again."""
    return (s.listening and not s.watched and not s.waiting and s.conn is not None
            and not s.conn.closed and now - s.last_used >= SWEEP_TICK)


def _sweep(s: _Session, now: float, readable: bool) -> None:
    """Read what an idle listener was sent (keeping it for the next waiter), and UNLISTEN it
    once it has idled :data:`IDLE_SECONDS`, or as soon as it has heard more than its backlog
    keeps (a flood of announcements: reading them all would cost this process CPU for nothing,
    and falling behind would hold back the notification queue)."""
    if not s.lock.acquire(blocking=False):
        return  # in use right now: not idle
    try:
        if not _idle(s, now):
            return
        assert s.conn is not None
        try:
            if readable and now - s.last_used < IDLE_SECONDS:
                pgconn = s.conn.pgconn
                pgconn.consume_input()
                while not s.overflowed and (n := pgconn.notifies()) is not None:
                    s.hear(n.relname.decode(), n.extra.decode())
            if s.overflowed or now - s.last_used >= IDLE_SECONDS:
                s.conn.execute("UNLISTEN *")  # psycopg reads what was sent meanwhile
                s.conn.execute("SELECT pg_advisory_unlock_all()")
                if s.on_pause is not None:
                    s.on_pause()
                s.listening = False
                s.missed = True  # announcements from now on are not heard
                s.overflowed = False
                s.backlog.clear()
        except (psycopg.Error, OSError):
            _drop(s)
            s.missed = True
    finally:
        s.lock.release()


class _Sweeper:
    """This process's sweeper: a daemon thread that reads, then pauses, idle listeners."""

    def __init__(self) -> None:
        self.sessions: weakref.WeakSet[_Session] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, s: _Session) -> None:
        with self.lock:
            self.sessions.add(s)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="kojin_pg-listen-sweeper")
                self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                listening = [s for s in self.sessions if s.listening and s.conn is not None]
                if not listening:  # nothing listens: the next LISTEN starts a new thread
                    self.thread = None
                    return
            poller = select.poll()
            by_fd: dict[int, _Session] = {}
            now = time.monotonic()
            for s in listening:
                if _idle(s, now):
                    try:
                        fd = s.conn.pgconn.socket  # type: ignore[union-attr]
                    except (psycopg.Error, OSError):
                        continue
                    by_fd[fd] = s
                    poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(SWEEP_TICK * 1000.0)} if by_fd else set()
            if not by_fd:
                time.sleep(SWEEP_TICK)
            now = time.monotonic()
            for fd, s in by_fd.items():
                _sweep(s, now, fd in ready)


_sweeper: ProcessLocal[_Sweeper] = ProcessLocal(_Sweeper)
