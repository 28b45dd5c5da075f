"""kombu transport on PostgreSQL: at-least-once delivery with leases and dead letters.

URL and options
---------------
``broker_url = "kojin+postgresql://user:password@host/dbname"`` (the app module must import
``kojin_pg``, which registers the ``kojin`` alias with kombu), or, with no import at all,
``broker_transport = "kojin_pg.transport:Transport"`` with a plain ``postgresql://`` URL.
``broker_transport_options`` (or the URL query) take ``visibility_timeout`` (default 1800 s),
``max_deliveries`` (10), ``polling_interval`` (1 s; a safety net, wake-ups come by NOTIFY),
``use_notify``, ``schema``, ``pool_min_size``/``pool_max_size``, ``lease_renew_interval``,
``max_message_bytes``, and kombu's generic ``body_encoding`` and connection retry options.

Semantics
---------
- Publish inserts a row into ``<schema>.messages`` and NOTIFYs the queue's consumers at commit.
- A consumer claims up to its free prefetch slots in one statement (``FOR UPDATE SKIP LOCKED``),
  highest priority first, then FIFO. The claim is a lease: the row stays invisible until
  ``visible_at`` (now + visibility_timeout) and counts the delivery.
- While a consumer lives it extends the leases of the messages it holds, so long tasks and
  ETA/countdown tasks kept by a worker are not delivered twice. When it dies, the leases run out
  and another consumer gets the messages.
- Ack deletes the row. Reject with requeue makes it visible again; reject without requeue moves
  it to ``dead_letters``; so does a claim of a message already delivered ``max_deliveries`` times.
- Exchange bindings live in the database, so direct, topic and fanout routing work across
  processes (Celery remote control and events).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from queue import Empty
from typing import Any

import psycopg
from kombu.transport import virtual
from kombu.utils.objects import cached_property

from . import codec, config
from .db import Database
from .errors import ConfigurationError, DatabaseUnavailable, PayloadError
from .events import DEAD_LETTER, LEASE_LOST, LISTEN_RECONNECT, REDELIVERY, log_event
from .schema import ensure_schema
from .sqlfiles import Queries

log = logging.getLogger(__name__)

#: kombu's own transport options, accepted and left to kombu.
KOMBU_OPTIONS = frozenset({
    "body_encoding", "deadletter_queue", "max_retries", "interval_start", "interval_step",
    "interval_max", "connect_timeout", "confirm_publish", "client_properties",
})
#: Messages claimed at once when the channel has no prefetch limit.
DEFAULT_BATCH = 16
#: Seconds a routing table read from the database is reused for a key found in it.
ROUTING_CACHE_SECONDS = 5.0


def messages_channel(schema: str) -> str:
    """The NOTIFY channel announcing new messages (payload: the queue name)."""
    return f"kojin_msgs_{schema}"


def check_queue_name(name: str) -> str:
    """Queue and exchange names are stored as data, never spliced into SQL; only bound size."""
    if not isinstance(name, str) or not 0 < len(name) <= 255 or "\x00" in name:
        raise ConfigurationError(
            f"invalid queue or exchange name {name!r}: 1-255 characters, no NUL")
    return name


def _malformed(payload: Any) -> str | None:
    """Why ``payload`` is not a kombu message we can deliver, or None if it is one."""
    if not isinstance(payload, dict):
        return f"not a kombu message: a JSON {type(payload).__name__}"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "not a kombu message: no 'properties' object"
    info = props.get("delivery_info", {})
    if not isinstance(info, dict):
        return "not a kombu message: 'delivery_info' is not an object"
    if not isinstance(payload.get("body", ""), str | bytes | type(None)):
        return "not a kombu message: 'body' is not a string"
    return None


class QoS(virtual.QoS):
    """Prefetch accounting; ack, reject and restore act on the database rows."""

    def ack(self, delivery_tag: int) -> None:
        # The DELETE rides on the consumer's next claim (or the lease thread's flush a few ms
        # later), so a task never waits for its ack's round trip.
        transport = self.channel.connection
        transport.defer_ack(delivery_tag)
        super().ack(delivery_tag)
        transport.waiter.wake()

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        if requeue:
            self.channel._requeue([delivery_tag])
        else:
            self.channel._dead_letter([delivery_tag], "rejected", "rejected by the consumer")
        self._quick_ack(delivery_tag)
        self.channel.connection.waiter.wake()

    def restore_unacked(self) -> list[Any]:
        """Give every unacked message back at once (channel close, worker shutdown)."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if tags:
            try:
                self.channel._requeue(tags)
            except Exception as exc:
                # The leases run out by themselves: nothing is lost, only delayed.
                log.warning("kojin_pg: could not hand back %d messages (%r); they return "
                            "when their lease runs out", len(tags), exc)
        return []

    def held(self) -> list[int]:
        """Delivery tags (message ids) delivered and not yet acked or rejected."""
        for _ in range(3):
            try:
                dirty = set(self._dirty)
                return [tag for tag in list(self._delivered) if tag not in dirty]
            except RuntimeError:  # changed size during iteration: another thread acked
                continue
        return []


class Channel(virtual.Channel):
    """A kombu channel whose queues are rows of one PostgreSQL table."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._routes: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}
        #: Queues consumed with no_ack (Celery's event receivers): delivered means done.
        self._no_ack_queues: set[str] = set()

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.connection.defer_ack(message.delivery_tag)
        return message

    @property
    def _db(self) -> Database:
        return self.connection.db

    @property
    def _q(self) -> Queries:
        return self.connection.queries

    @property
    def _settings(self) -> config.Settings:
        return self.connection.settings

    def _fetch(self, query: Any, params: dict[str, Any], what: str) -> list[tuple[Any, ...]]:
        self.connection.ensure_ready()
        return self._db.fetchall(query, params, what)

    def _fetch_lazy_commit(self, query: Any, params: dict[str, Any],
                           what: str) -> list[tuple[Any, ...]]:
        """For claims, acks and requeues: see :attr:`Transport.consumer_db`."""
        self.connection.ensure_ready()
        return self.connection.consumer_db.fetchall(query, params, what)

    # -- publishing --------------------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> Any:
        encoded = codec.dumps(message)
        if len(encoded) > self._settings.max_message_bytes:
            raise PayloadError(
                f"message of {len(encoded)} bytes is larger than max_message_bytes "
                f"({self._settings.max_message_bytes})")
        return codec.jsonb(encoded)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        check_queue_name(queue)
        self._fetch(self._q.publish, {
            "queue": queue, "priority": self._get_message_priority(message),
            "payload": self._encode(message), "delay": 0.0,
            "channel": self.connection.channel_name, "notify": self._settings.use_notify,
        }, "publish")

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        self._fetch(self._q.publish_fanout, {
            "exchange": check_queue_name(exchange),
            "priority": self._get_message_priority(message), "payload": self._encode(message),
            "channel": self.connection.channel_name, "notify": self._settings.use_notify,
        }, "publish_fanout")

    # -- bindings ----------------------------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        check_queue_name(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        rows = self._fetch(self._q.has_queue, {"queue": check_queue_name(queue)}, "has_queue")
        return bool(rows and rows[0][0])

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self._fetch(self._q.bind, {
            "exchange": check_queue_name(exchange), "routing_key": routing_key or "",
            "pattern": pattern or "", "queue": check_queue_name(queue)}, "queue_bind")
        self._routes.pop(exchange, None)

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: Any = None, **kwargs: Any) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        if exchange:
            self._fetch(self._q.unbind, {"exchange": exchange, "routing_key": routing_key or "",
                                         "queue": queue}, "queue_unbind")
            self._routes.pop(exchange, None)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """The bindings of ``exchange``, from the database (shared by every process)."""
        cached = self._routes.get(exchange)
        if cached and time.monotonic() - cached[0] < ROUTING_CACHE_SECONDS:
            return cached[1]
        rows = [tuple(r) for r in self._fetch(self._q.bindings_of, {"exchange": exchange},
                                              "bindings")]
        self._routes[exchange] = (time.monotonic(), rows)  # type: ignore[assignment]
        return rows  # type: ignore[return-value]

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        queues = super()._lookup(exchange, routing_key, default)
        if exchange and not queues and exchange in self._routes:
            # a queue bound by another process since we read the table: read it again
            self._routes.pop(exchange, None)
            queues = super()._lookup(exchange, routing_key, default)
        return queues

    # -- consuming ---------------------------------------------------------------------------

    def _claim(self, queues: Iterable[str], n: int) -> list[tuple[Any, ...]]:
        s = self._settings
        transport = self.connection
        acks = transport.take_acks()
        params = {"acks": acks, "queues": list(queues), "n": n,
                  "max_deliveries": s.max_deliveries, "visibility_timeout": s.visibility_timeout,
                  "consumer": transport.consumer_id}
        attempts = 0

        def claim(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # the attempt whose connection was lost may have committed its leases
                transport.release_orphans(conn, keep=acks)
            return conn.execute(self._q.claim, params).fetchall()

        transport.ensure_ready()
        try:
            rows = transport.consumer_db.run(claim, "claim")
        except BaseException:
            transport.return_acks(acks)
            raise
        delivered = []
        for msg_id, queue, payload, count, dead, _priority in rows:
            if dead:
                log_event(log, logging.WARNING, DEAD_LETTER, message_id=msg_id, queue=queue,
                          reason="max_deliveries", deliveries=count)
                continue
            problem = _malformed(payload)
            if problem:
                # One bad row must not block the queue: bury it with the reason, go on.
                self._dead_letter([msg_id], "undecodable", problem)
                continue
            if count > 1:
                log_event(log, logging.INFO, REDELIVERY, message_id=msg_id, queue=queue,
                          delivery=count, task=(payload.get("headers") or {}).get("task"))
            props = payload["properties"]
            props["delivery_tag"] = msg_id
            info = props.setdefault("delivery_info", {})
            info["redelivered"] = count > 1
            info["delivery_count"] = count
            delivered.append((payload, queue))
        if delivered:
            self.connection.leases.start()
        return delivered

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        claimed = self._claim([check_queue_name(queue)], 1)
        if not claimed:
            raise Empty()
        return claimed[0][0]

    def _get_many(self, queues: list[str], timeout: float | None = None) -> None:
        only = self.connection.claim_only
        if only is not None and only.isdisjoint(queues):
            raise Empty()  # an event loop wake-up announced other queues: no query here
        n = self.qos.can_consume_max_estimate() or DEFAULT_BATCH
        claimed = self._claim(queues, n)
        self.connection.last_claim_full = len(claimed) >= n
        if not claimed:
            raise Empty()
        deliver = self.connection._deliver
        for payload, queue in claimed:
            if queue in self._no_ack_queues:
                # nobody will ack it: the delivery itself is the ack
                self.connection.defer_ack(payload["properties"]["delivery_tag"])
            deliver(payload, queue)

    def _size(self, queue: str) -> int:
        rows = self._fetch(self._q.queue_size, {"queue": check_queue_name(queue)}, "size")
        return int(rows[0][0])

    def _purge(self, queue: str) -> int:
        rows = self._fetch(self._q.purge, {"queue": check_queue_name(queue)}, "purge")
        return int(rows[0][0])

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._fetch(self._q.delete_queue, {"queue": check_queue_name(queue)}, "delete_queue")

    # -- acknowledgements ----------------------------------------------------------------------


    def _requeue(self, ids: list[int]) -> None:
        self._fetch_lazy_commit(self._q.requeue, {
            "ids": ids, "channel": self.connection.channel_name,
            "notify": self._settings.use_notify}, "requeue")

    def _dead_letter(self, ids: list[int], reason: str, error: str | None) -> None:
        self._fetch_lazy_commit(self._q.dead_letter,
                                {"ids": ids, "reason": reason, "error": error}, "dead_letter")
        for msg_id in ids:
            log_event(log, logging.WARNING, DEAD_LETTER, message_id=msg_id, reason=reason,
                      error=error)

    def _restore(self, message: Any) -> None:
        self._requeue([message.delivery_tag])

    def _restore_at_beginning(self, message: Any) -> None:
        self._requeue([message.delivery_tag])

    def active_queues(self) -> list[str]:
        """Queues this channel consumes from."""
        return list(self._active_queues)


class NotifyWaiter:
    """Sleeps until a message is announced for one of our queues, an ack frees a prefetch
    slot, or the timeout passes. One LISTEN connection per transport, replaced after fork."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._pid = -1
        self._conn: psycopg.Connection[Any] | None = None

    def _reset(self) -> None:
        self._conn = None  # a parent's socket: not ours to use or close
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        """Interrupt a wait (called from any thread)."""
        if self._pid == os.getpid():
            try:
                os.write(self._wake_w, b"!")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: a wake-up is pending anyway

    def _in_this_process(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def _listening(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = self.transport.db.listen(self.transport.channel_name)
        return conn

    def wake_fd(self) -> int:
        """The read end of the wake-up pipe (for an event loop)."""
        self._in_this_process()
        return self._wake_r

    def listen_fd(self) -> int | None:
        """The LISTEN connection's socket (connecting it now), or None without notifications."""
        self._in_this_process()
        if not self.transport.settings.use_notify:
            return None
        return self._listening().pgconn.socket

    def heard(self) -> set[str]:
        """Queues announced since the last call, without blocking (for an event loop)."""
        conn = self._conn
        if conn is None:
            return set()
        conn.pgconn.consume_input()
        queues = set()
        while (n := conn.pgconn.notifies()) is not None:
            queues.add(n.extra.decode())
        return queues

    def wait(self, timeout: float, queues: set[str]) -> None:
        """Block up to ``timeout`` seconds; return early on news for ``queues``."""
        self._in_this_process()
        if not self.transport.settings.use_notify:
            self._sleep(min(timeout, self.transport.settings.polling_interval))
            return
        deadline = time.monotonic() + timeout
        try:
            conn = self._listening()
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([conn.pgconn.socket, self._wake_r], [], [], left)
                if self._wake_r in ready:
                    self.drain_wakeups()
                    return
                if ready and (not queues or self.heard() & queues):
                    return
        except (psycopg.Error, OSError, ValueError) as exc:
            log_event(log, logging.WARNING, LISTEN_RECONNECT, role="broker",
                      error=type(exc).__name__)
            self.close()
            self._sleep(min(max(deadline - time.monotonic(), 0.0), 0.5))

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
            if ready:
                self.drain_wakeups()

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except psycopg.Error:
                pass


class LeaseKeeper:
    """Extends the leases of the messages held by this transport's channels, in a daemon thread,
    so a consumer that lives never sees its messages redelivered to another one."""

    #: Seconds an ack may wait for the consumer's next claim before the thread applies it.
    ACK_DELAY = 0.005

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._acks_waiting = threading.Event()
        self._pid = os.getpid()

    def start(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's thread does not exist here
            self._thread, self._pid = None, os.getpid()
            self._stop, self._acks_waiting = threading.Event(), threading.Event()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kojin_pg-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._acks_waiting.set()

    def acks_waiting(self) -> None:
        """Acks were deferred: apply them soon unless a claim takes them first."""
        self._acks_waiting.set()

    def _run(self) -> None:
        interval = self.transport.settings.renew_interval
        next_renewal = time.monotonic() + interval
        while not self._stop.is_set():
            self._acks_waiting.wait(max(0.0, next_renewal - time.monotonic()))
            if self._stop.is_set():
                break
            try:
                if self._acks_waiting.is_set():
                    self._acks_waiting.clear()
                    time.sleep(self.ACK_DELAY)
                    self.transport.flush_acks()
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + interval
                    self.renew()
            except Exception as exc:  # keep going: what failed is retried next round
                log.warning("kojin_pg: ack flush or lease renewal failed: %r", exc)

    def renew(self) -> list[int]:
        """Extend every held lease now; return the ids whose lease was lost."""
        held = self.transport.held_ids()
        if not held:
            return []
        rows = self.transport.consumer_db.fetchall(self.transport.queries.extend_leases, {
            "ids": held, "consumer": self.transport.consumer_id,
            "visibility_timeout": self.transport.settings.visibility_timeout}, "extend leases")
        kept = {r[0] for r in rows}
        still_held = set(self.transport.held_ids())
        lost = [i for i in held if i not in kept and i in still_held]
        for msg_id in lost:
            log_event(log, logging.WARNING, LEASE_LOST, message_id=msg_id,
                      consumer=self.transport.consumer_id)
        return lost


class Transport(virtual.Transport):
    """kombu transport storing queues in PostgreSQL. See the module docstring."""

    Channel = Channel

    can_parse_url = True
    default_port = 5432
    driver_type = "postgresql"
    driver_name = "psycopg"
    polling_interval = 1.0

    connection_errors = virtual.Transport.connection_errors + (
        psycopg.OperationalError, DatabaseUnavailable)
    channel_errors = virtual.Transport.channel_errors + (psycopg.DatabaseError,)

    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False)

    #: Batches claimed per event-loop callback before yielding to the loop.
    DRAIN_BATCHES_PER_TICK = 4

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ready = False
        self.waiter = NotifyWaiter(self)
        self.leases = LeaseKeeper(self)
        self._ack_lock = threading.Lock()
        self._acks: list[int] = []
        self._hub: Any = None
        self._listen_fd: int | None = None
        #: Event-loop drains: claim only on channels consuming these queues (None: all).
        self.claim_only: set[str] | None = None
        #: Whether the last claim filled its batch (more may be waiting).
        self.last_claim_full = False

    @cached_property
    def settings(self) -> config.Settings:
        options = {k: v for k, v in (self.client.transport_options or {}).items()
                   if k not in KOMBU_OPTIONS}
        return config.parse(self._url(), options)

    def _url(self) -> str:
        return config.url_from_kombu(self.client)

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL for banners and logs (kombu's own parser fails on host lists)."""
        url = "kojin+" + self._url()
        return url if include_password else config.mask_url(url)

    @cached_property
    def db(self) -> Database:
        """Pool for publishing (durable commits unless ``synchronous_commit`` says otherwise)."""
        session = []
        if self.settings.synchronous_commit:
            session.append(("synchronous_commit", self.settings.synchronous_commit))
        return Database(self.settings, role="kojin_pg.broker", session_settings=session)

    @cached_property
    def consumer_db(self) -> Database:
        """Pool for claims, acks, requeues, dead-lettering and lease extensions.

        These commit with ``synchronous_commit = off``: a PostgreSQL crash can lose the last
        fraction of a second of them, and then a message is delivered once more, which
        at-least-once delivery allows. Publishes never go through here.
        """
        return Database(self.settings, role="kojin_pg.consumer",
                        session_settings=[("synchronous_commit", "off")])

    @cached_property
    def queries(self) -> Queries:
        return Queries("broker", self.settings.schema)

    @cached_property
    def channel_name(self) -> str:
        return messages_channel(self.settings.schema)

    def ensure_ready(self) -> None:
        """Check (and with auto_migrate apply) the schema once per transport."""
        if not self._ready:
            ensure_schema(self.db)
            self._ready = True

    def establish_connection(self) -> Transport:
        self.ensure_ready()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        self.leases.stop()
        try:
            super().close_connection(connection)
            self.flush_acks()
        finally:
            self.waiter.close()
            self.db.close()
            self.consumer_db.close()

    def defer_ack(self, message_id: int) -> None:
        """Queue an ack; it is applied with the next claim or within a few milliseconds."""
        with self._ack_lock:
            self._acks.append(message_id)
        self.leases.start()
        self.leases.acks_waiting()

    def take_acks(self) -> list[int]:
        """Remove and return the queued acks (the caller applies them)."""
        with self._ack_lock:
            acks, self._acks = self._acks, []
        return acks

    def return_acks(self, acks: list[int]) -> None:
        """Put back acks whose application failed, to be tried again."""
        if acks:
            with self._ack_lock:
                self._acks[:0] = acks

    def flush_acks(self) -> None:
        """Apply every queued ack now (one DELETE)."""
        acks = self.take_acks()
        if not acks:
            return
        try:
            self.consumer_db.execute(self.queries.ack, {"ids": acks}, "ack")
        except BaseException:
            self.return_acks(acks)
            raise

    def release_orphans(self, conn: psycopg.Connection[Any], keep: list[int]) -> None:
        """Hand back messages leased to this consumer that it never received (see claim)."""
        with self._ack_lock:
            pending = list(self._acks)
        conn.execute(self.queries.release_orphans, {
            "consumer": self.consumer_id, "keep": self.held_ids() + pending + list(keep),
            "channel": self.channel_name, "notify": self.settings.use_notify})

    def held_ids(self) -> list[int]:
        """Ids of the messages delivered by this transport's channels and not yet acked."""
        ids: list[int] = []
        for channel in list(self.channels):
            if channel._qos is not None:
                ids.extend(channel._qos.held())
        return ids

    def _consumed_queues(self) -> set[str]:
        queues: set[str] = set()
        for channel in list(self.channels):
            queues.update(channel._active_queues)
        return queues

    # -- Celery's event loop (kombu hub): used by the worker for every pool ------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Wake on NOTIFY and on acks through the loop's poller, instead of blocking."""
        self._hub = loop
        loop.add_reader(self.waiter.wake_fd(), self._on_wakeup)
        self._arm_listen(loop)
        loop.call_repeatedly(self.settings.polling_interval, self._drain_nowait)
        loop.call_soon(self._drain_nowait)

    def _arm_listen(self, loop: Any) -> None:
        try:
            fd = self.waiter.listen_fd()
        except (psycopg.Error, OSError, DatabaseUnavailable) as exc:
            log_event(log, logging.WARNING, LISTEN_RECONNECT, role="broker",
                      error=type(exc).__name__)
            loop.call_later(1.0, self._arm_listen, loop)
            return
        self._listen_fd = fd
        if fd is not None:
            loop.add_reader(fd, self._on_notify)

    def _on_notify(self) -> None:
        try:
            heard = self.waiter.heard()
        except (psycopg.Error, OSError, ValueError) as exc:
            log_event(log, logging.WARNING, LISTEN_RECONNECT, role="broker",
                      error=type(exc).__name__)
            if self._listen_fd is not None:
                self._hub.remove_reader(self._listen_fd)
                self._listen_fd = None
            self.waiter.close()
            self._hub.call_later(0.5, self._arm_listen, self._hub)
            self._drain_nowait()  # the polling safety net covers the gap meanwhile
            return
        announced = heard & self._consumed_queues()
        if announced:
            self._drain_nowait(announced)

    def _on_wakeup(self) -> None:
        self.waiter.drain_wakeups()
        self._drain_nowait()

    def _drain_nowait(self, queues: set[str] | None = None) -> None:
        """Deliver what is ready now (on ``queues`` only, if given), a few full batches at a
        time, then apply the acks no claim took along."""
        self.claim_only = queues
        try:
            for _ in range(self.DRAIN_BATCHES_PER_TICK):
                self.last_claim_full = False
                try:
                    self.cycle.get(self._deliver, timeout=0)
                except Empty:
                    break
                if not self.last_claim_full:
                    break  # the queues are drained: no need to ask again
            else:
                self._hub.call_soon(self._drain_nowait, queues)  # more ready: let the loop run
        finally:
            self.claim_only = None
        self.flush_acks()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver ready messages; when there are none, sleep on LISTEN instead of polling."""
        started = time.monotonic()
        safety = self.settings.polling_interval
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            wait = safety
            if timeout is not None:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError()
                wait = min(wait, left)
            self.waiter.wait(wait, self._consumed_queues())
