"""Pooled connections: one pool per process and database, with retries on connection loss.

Every operation that goes through :meth:`Database.run` is retried with exponential backoff when
the connection fails (server restart, terminated backend, network blip) until
``retry_timeout`` runs out; then :class:`~kojin_pg.errors.DatabaseUnavailable` is raised.
Only idempotent work may be passed to it: a lost connection can hide a commit.

Behind a transaction pooler (PgBouncer ``pool_mode = transaction``: the ``pooler`` option, or
found on connecting because the backend pid the server reports is not the one the connection
was given) a session is shared with other clients, so nothing may outlive a transaction:
statements are never prepared, and ``synchronous_commit`` is set with ``SET LOCAL`` inside the
transaction of each :meth:`Database.run` (sent with ``BEGIN`` in one round trip, plus one for
``COMMIT``) instead of once per session. A direct server keeps the session-level setting, which
costs nothing per statement.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.abc import Query
from psycopg_pool import ConnectionPool, PoolTimeout

from ..config import Settings, scrub
from ..errors import ConfigurationError, DatabaseUnavailable
from ..events import RETRY, log_event
from .forksafe import ProcessLocal
from .lean import LeanRead
from .session import LISTENER_SETTINGS, SESSION_SETTINGS, configure_connection, learn_the_server, set_session

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Server messages of a FATAL that passes (restart, overload), unlike "does not exist".
_TRANSIENT_FATALS = ("starting up", "shutting down", "in recovery", "too many clients",
                     "terminating connection", "not yet accepting")

#: Seconds a connection attempt may take unless the URL or the caller says otherwise.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Errors after which an idempotent operation may simply be tried again.
_NOT_TRANSIENT = (PoolTimeout, pg_errors.QueryCanceled)

#: The server answered, but is a standby (a failover in progress, or a host list without
#: target_session_attrs=read-write): nothing was done, and a fresh connection may reach the
#: primary.
_ON_A_STANDBY = pg_errors.ReadOnlySqlTransaction


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry on a fresh connection can cure."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    return isinstance(exc, psycopg.OperationalError | DatabaseUnavailable | _ON_A_STANDBY)


class Database:
    """The connections of this process to one PostgreSQL database.

    The pool is created on first use, not in the constructor, and a forked child gets a pool of
    its own (see :mod:`kojin_pg.db.forksafe`). ``synchronous_commit`` (default: the
    ``synchronous_commit`` option, else the server's) applies to every session of the pool, or
    behind a transaction pooler to every transaction of :meth:`run`. ``generic_plans`` makes
    the sessions plan each prepared statement once (not behind a pooler: nothing is prepared
    there).
    """

    def __init__(self, settings: Settings, *, role: str = "kojin_pg",
                 synchronous_commit: str | None = None,
                 generic_plans: bool = False,
                 connect_timeout: float | None = None) -> None:
        self.settings = settings
        self.role = role
        self.synchronous_commit = synchronous_commit or settings.synchronous_commit
        #: Plan prepared statements once per session (``plan_cache_mode``), never as a scan
        #: of a whole table (``enable_seqscan``), see _configure.
        self.generic_plans = generic_plans
        #: Seconds a connection attempt may take (a ``connect_timeout`` in the URL wins).
        self.connect_timeout = connect_timeout or DEFAULT_CONNECT_TIMEOUT
        self._pool: ProcessLocal[ConnectionPool] = ProcessLocal(self._open_pool)
        #: Whether the URL leads through a transaction pooler (None: not found out yet).
        self._pooled: bool | None = {"transaction": True, "none": False}.get(settings.pooler)
        #: Whether this role may write logical-decoding messages (None: not found out yet).
        self._may_write_logical_messages: bool | None = None

    def __repr__(self) -> str:
        return f"<Database {self.settings.safe_url} schema={self.settings.schema} {self.role}>"

    # -- connections -----------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True}
        if "application_name" not in self.settings.conninfo:
            kwargs["application_name"] = self.role
        if "connect_timeout" not in self.settings.conninfo:
            # libpq takes whole seconds (and waits for ever on 0)
            kwargs["connect_timeout"] = max(1, round(self.connect_timeout))
        return kwargs

    @property
    def pooled(self) -> bool:
        """Whether the URL leads through a transaction pooler (found out on first connect)."""
        if self._pooled is None:
            self.connect().close()
        return bool(self._pooled)

    def announces_before_the_flush(self) -> bool:
        """Whether a statement that writes and announces (a store, a publish: the procedures
        of sql/0012 and sql/0013) commits its write and announcement without waiting for the
        WAL flush, then waits for the flush in a second transaction: no commit that waits
        for its flush holds the database's NOTIFY lock, and the announcement goes out while
        the flush is under way. Not when commits do not wait for a flush
        (``synchronous_commit=off``), nor when :meth:`run` runs each statement in a
        transaction of its own (behind a pooler, with ``synchronous_commit`` set), nor when
        this role may not write the logical-decoding message that waits for the flush."""
        if self.synchronous_commit == "off" or (self.synchronous_commit and self.pooled):
            return False
        if self._may_write_logical_messages is None:
            self.connect().close()
        return bool(self._may_write_logical_messages)

    def _learn(self, conn: psycopg.Connection[Any]) -> None:
        if self._pooled is not None and self._may_write_logical_messages is not None:
            return
        facts = learn_the_server(conn)
        if self._pooled is None:
            self._pooled = facts.behind_pooler
            if self._pooled:
                log.info("kojin_pg: %s leads through a pooler: no prepared statements, "
                         "settings per transaction", self.settings.safe_url)
        self._may_write_logical_messages = facts.may_write_logical_messages
        if not facts.may_write_logical_messages and self.synchronous_commit != "off":
            log.warning("kojin_pg: the role of %s may not execute pg_logical_emit_message, so "
                        "each announced store and publish holds the database's NOTIFY lock "
                        "while its commit is flushed. To lift that, GRANT EXECUTE ON FUNCTION "
                        "pg_logical_emit_message(boolean, text, text, boolean) to it (before "
                        "PostgreSQL 17: (boolean, text, text))", self.settings.safe_url)

    def _configure(self, conn: psycopg.Connection[Any],
                   session: dict[str, str] | None = None) -> None:
        """Set up a new connection: codecs, prepared statements, and (not behind a pooler) the
        session settings, with ``session``'s on top, in one round trip."""
        configure_connection(conn)
        self._learn(conn)
        conn.prepare_threshold = None if self._pooled else self.settings.prepare_after
        if self._pooled:
            return
        settings = {**SESSION_SETTINGS, **(session or {})}
        if self.synchronous_commit:
            settings["synchronous_commit"] = self.synchronous_commit
        if self.generic_plans:
            # The claim's many CTEs take three times longer to plan than to run, and the
            # server never switches its prepared statement to a generic plan by itself
            # (the array and LIMIT parameters keep each custom plan looking cheaper).
            settings["plan_cache_mode"] = "force_generic_plan"
            # A plan made once is kept while the table grows and shrinks under it: one made
            # while the messages table was nearly empty found rows by id with a scan of the
            # whole table, and went on scanning it (up to 700 pages a claim on a stock
            # server). Claims, acks, lease renewals and hand-backs have an index for their
            # rows. A statement that has none (a sweep of the small queues and consumers
            # tables, handing back all of a consumer's leases) gets the same sequential scan,
            # only costed higher, and takes the same time: release_orphans at 300,000 queued
            # on a stock server, 41-46 ms with the setting on or off and JIT off, as in every
            # session here (with JIT on it compiled the higher-costed plan: 340 ms).
            settings["enable_seqscan"] = "off"
        set_session(conn, settings)

    def connect(self, session: dict[str, str] | None = None) -> psycopg.Connection[Any]:
        """A new dedicated connection (for LISTEN or a long-lived consumer), not pooled, with
        ``session``'s settings beside the usual ones."""
        conn = psycopg.Connection.connect(self.settings.conninfo, **self._connect_kwargs())
        try:
            self._configure(conn, session)
        except BaseException:
            conn.close()
            raise
        return conn

    def connect_listener(self) -> psycopg.Connection[Any] | None:
        """A new connection to LISTEN on: to ``listen_url`` if given, else to the URL unless it
        leads through a transaction pooler (where LISTEN would land on a shared server session
        and hear nothing reliably): then None."""
        listen = self.settings.listen_url
        if listen is None:
            conn = self.connect(LISTENER_SETTINGS)
            if self._pooled:
                conn.close()
                return None
            return conn
        kwargs = self._connect_kwargs()
        if "application_name" not in listen:
            kwargs["application_name"] = self.role
        if "connect_timeout" in listen:
            kwargs.pop("connect_timeout", None)
        try:
            conn = psycopg.Connection.connect(listen, **kwargs)
        except psycopg.OperationalError as exc:
            # the listen URL's password must not reach logs through the error text
            raise psycopg.OperationalError(scrub(str(exc), listen)) from None
        configure_connection(conn)
        set_session(conn, {**SESSION_SETTINGS, **LISTENER_SETTINGS})
        return conn

    def _probe(self) -> None:
        """Connect once before opening the pool, so a bad URL fails at once and names why.

        (A pool retries in the background and would only report a timeout.) A server that
        refuses us for good (no such database or role, authentication) is a configuration
        error; one that is down or restarting is :class:`DatabaseUnavailable`, retried.
        """
        try:
            with psycopg.Connection.connect(self.settings.conninfo,
                                            **self._connect_kwargs()) as conn:
                self._learn(conn)
        except psycopg.OperationalError as exc:
            text = scrub(str(exc).strip(), self.settings.conninfo)
            message = f"cannot connect to PostgreSQL at {self.settings.safe_url}: {text}"
            if "FATAL" in text and not any(t in text for t in _TRANSIENT_FATALS):
                raise ConfigurationError(message) from None
            raise DatabaseUnavailable(message) from None

    def pool(self) -> ConnectionPool:
        """This process's pool, opened on first use."""
        return self._pool.get()

    def _open_pool(self) -> ConnectionPool:
        self._probe()
        s = self.settings
        pool = ConnectionPool(
            s.conninfo, min_size=s.pool_min_size, max_size=s.pool_max_size,
            timeout=s.pool_timeout, kwargs=self._connect_kwargs(),
            configure=self._configure, open=False, name=self.role,
            reconnect_timeout=max(s.retry_timeout, 1.0),
        )
        # Wait for the first connections: a first request that found the pool still connecting
        # would make it grow, and every process would hold one connection more than it needs
        # (64 producers: 128 connections, past a stock server's max_connections of 100).
        pool.open(wait=True, timeout=s.pool_timeout)
        return pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection for the duration of the block."""
        with self.pool().connection() as conn:
            yield conn

    def close(self) -> None:
        """Close this process's pool (a forked child leaves its parent's pool alone)."""
        pool = self._pool.pop()
        if pool is not None:
            pool.close()

    # -- retrying execution ----------------------------------------------------------------

    def run(self, work: Callable[[psycopg.Connection[Any]], T], what: str = "query",
            *, retry: bool = True) -> T:
        """Run ``work(conn)`` on a pooled connection, retrying it after connection loss (unless
        ``retry`` is false: for work that the next periodic round does anyway)."""
        deadline = time.monotonic() + self.settings.retry_timeout
        attempt = 0
        while True:
            try:
                pool = self.pool()
                conn = pool.getconn()  # getconn/putconn: a third of the cost of pool.connection()
                try:
                    return self._call(conn, work)
                except _ON_A_STANDBY:
                    conn.close()  # the pool replaces a closed connection: find the primary
                    raise
                finally:
                    pool.putconn(conn)
            except Exception as exc:
                if not retry or not is_transient(exc):
                    raise
                attempt += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    cause = scrub(str(exc), self.settings.conninfo)
                    raise DatabaseUnavailable(
                        f"{what} failed: PostgreSQL at {self.settings.safe_url} did not answer "
                        f"after {attempt} attempts in {self.settings.retry_timeout:g}s: {cause}"
                    ) from exc
                delay = min(remaining, 2.0, 0.05 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1)
                log_event(log, logging.WARNING, RETRY, operation=what, attempt=attempt,
                          error=type(exc).__name__, delay_s=round(delay, 3), role=self.role)
                if (live := self._pool.peek()) is not None:
                    live.check()  # drop every other dead idle connection at once
                time.sleep(delay)

    def _call(self, conn: psycopg.Connection[Any], work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work(conn)``; behind a pooler, in a transaction that sets ``synchronous_commit``
        locally (so the shared server session keeps its own setting)."""
        if not (self._pooled and self.synchronous_commit):
            return work(conn)
        conn.execute(sql.SQL("BEGIN; SET LOCAL synchronous_commit = {}").format(
            sql.Literal(self.synchronous_commit)))  # one round trip: the simple protocol
        try:
            result = work(conn)
        except BaseException:
            if not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    pass
            raise
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            # work caught an error itself: COMMIT would roll back without a word
            conn.execute("ROLLBACK")
            raise pg_errors.InFailedSqlTransaction(
                "a statement failed inside the transaction and its error was caught")
        conn.execute("COMMIT")
        return result

    def execute(self, query: Query, params: Any = None, what: str = "query") -> int:
        """Execute one statement; return the affected row count."""
        def work(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(query, params).rowcount
        return self.run(work, what)

    def fetchall(self, query: Query, params: Any = None, what: str = "query") -> list[tuple[Any, ...]]:
        """Execute one statement and return all its rows (none for a statement without rows)."""
        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []
        return self.run(work, what)

    def fetch_lean(self, read: LeanRead, params: Mapping[str, str | None],
                   what: str = "query") -> list[tuple[Any, ...]]:
        """The rows of ``read`` (see :mod:`.lean`): prepared on each connection that psycopg
        may prepare on (none behind a pooler, nor with ``prepare_threshold`` none)."""
        # safe to retry: a read
        return self.run(lambda conn: read.rows(conn, params), what)

    def fetchone(self, query: Query, params: Any = None, what: str = "query") -> tuple[Any, ...] | None:
        """Execute one statement and return its first row, if any."""
        def work(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(query, params).fetchone()
        return self.run(work, what)

