"""Pooled connections: one pool per process and database, with retries on connection loss.

Every operation that goes through :meth:`Database.run` is retried with exponential backoff when
the connection fails (server restart, terminated backend, network blip) until
``retry_timeout`` runs out; then :class:`~kojin_pg.errors.DatabaseUnavailable` is raised.
Only idempotent work may be passed to it: a lost connection can hide a commit.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.abc import Query
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from .. import codec
from ..config import Settings, scrub
from ..errors import ConfigurationError, DatabaseUnavailable
from ..events import RETRY, log_event
from .forksafe import ProcessLocal

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


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Use orjson for json/jsonb on this connection, both ways."""
    set_json_dumps(codec.dumps, context=conn)
    set_json_loads(codec.loads, context=conn)


class Database:
    """The connections of this process to one PostgreSQL database.

    The pool is created on first use, not in the constructor, and a forked child gets a pool of
    its own (see :mod:`kojin_pg.db.forksafe`). ``synchronous_commit`` (default: the
    ``synchronous_commit`` option, else the server's) applies to every session of the pool.
    """

    def __init__(self, settings: Settings, *, role: str = "kojin_pg",
                 synchronous_commit: str | None = None,
                 connect_timeout: float | None = None) -> None:
        self.settings = settings
        self.role = role
        self.synchronous_commit = synchronous_commit or settings.synchronous_commit
        #: Seconds a connection attempt may take (a ``connect_timeout`` in the URL wins).
        self.connect_timeout = connect_timeout or DEFAULT_CONNECT_TIMEOUT
        self._pool: ProcessLocal[ConnectionPool] = ProcessLocal(self._open_pool)

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

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        configure_connection(conn)
        if self.synchronous_commit:
            conn.execute("SELECT set_config('synchronous_commit', %s, false)",
                         (self.synchronous_commit,))

    def connect(self, **overrides: Any) -> psycopg.Connection[Any]:
        """A new dedicated connection (for LISTEN or a long-lived consumer), not pooled."""
        kwargs = self._connect_kwargs()
        kwargs.update(overrides)
        conn = psycopg.Connection.connect(self.settings.conninfo, **kwargs)
        self._configure(conn)
        return conn

    def _probe(self) -> None:
        """Connect once before opening the pool, so a bad URL fails at once and names why.

        (A pool retries in the background and would only report a timeout.) A server that
        refuses us for good (no such database or role, authentication) is a configuration
        error; one that is down or restarting is :class:`DatabaseUnavailable`, retried.
        """
        try:
            psycopg.Connection.connect(self.settings.conninfo, **self._connect_kwargs()).close()
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
        pool.open(wait=False)
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
                    return work(conn)
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

    def fetchone(self, query: Query, params: Any = None, what: str = "query") -> tuple[Any, ...] | None:
        """Execute one statement and return its first row, if any."""
        def work(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(query, params).fetchone()
        return self.run(work, what)

