"""Transactional enqueue (the outbox pattern): send a Celery task inside your own transaction.

.. code-block:: python

    with psycopg.connect(DSN) as conn, kojin_pg.outbox.transaction(conn):
        conn.execute("INSERT INTO orders ...")
        kojin_pg.outbox.send_task(conn, app, "shop.tasks.ship", args=(order_id,))
    # committed: delivered once. Rolled back: never delivered.

The message row is written on the caller's connection, so it commits or rolls back with the
caller's own writes. In :func:`transaction` (``conn.transaction()`` that does one more thing),
the idle workers are woken after the commit, in a statement of its own: the commit itself
sends no NOTIFY, whose lock would make every other announcing commit of the database wait for
its flush. A process that dies between the two leaves the messages to the workers' next poll.

``send_task`` works in any transaction of the caller's (``conn.transaction()``, or one that
:func:`transaction` cannot run after, being nested in it). Then whether to wake a worker is
decided at the commit (a deferred trigger, ``sql/0008_outbox_wakeups.sql``): a NOTIFY only if a
consumer of the queue is idle, and no lock that an open business transaction would hold
against the workers (unless the caller runs ``SET CONSTRAINTS ALL IMMEDIATE`` after a send:
the decision is made then, and the queue's publishing lock is held from then to the commit).
On a schema before migration 8, every send is announced at the commit, as older versions did.
The app's broker must be kojin_pg on the same database (and schema).

Like ``app.send_task``: the queue comes from ``task_routes`` (else ``task_default_queue``)
unless ``queue=`` is given; ``countdown``/``eta`` are scheduled in the broker, ``expires`` and
unique keys apply; ``use_notify`` of the broker's options is honoured; and Celery's
``before_task_publish`` / ``after_task_publish`` signals fire. Unlike it: the message goes
straight into the routed queue by name (no exchange lookup, so a route's custom exchange or
routing key is not applied), the body is always JSON (another ``task_serializer`` is an
error), and the signals fire when the row is written, before the caller's commit.
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from celery import signals
from celery.result import AsyncResult
from psycopg import pq, sql

from . import codec, config
from .db import ProcessLocal, Queries
from .db.channels import messages_channel
from .errors import ConfigurationError
from .transport.idle import idle_space, publish_params, publishing_space, queue_key
from .transport.messages import publish_fields
from .transport.options import broker_settings

log = logging.getLogger(__name__)


def _broker(app: Any) -> tuple[str, bool]:
    """The schema of the app's kojin_pg broker and whether it notifies (from its URL and
    transport options)."""
    url = app.conf.broker_url or ""
    if "://" in url:
        settings = broker_settings(url, app.conf.broker_transport_options)
        return settings.schema, settings.use_notify
    options = app.conf.broker_transport_options or {}
    notify = config.parse("postgresql://", {"use_notify": options.get("use_notify", True)})
    return config.validate_identifier(options.get("schema", "kojin")), notify.use_notify


def _route(app: Any, name: str, args: Any, kwargs: Any, queue: str | None,
           options: dict[str, Any]) -> str:
    """The queue ``app.send_task`` would use: ``queue=``, else ``task_routes``, else default."""
    if queue is None:
        routed = app.amqp.router.route(dict(options), name, args, kwargs)
        target = routed.get("queue")
        queue = getattr(target, "name", target) or app.conf.task_default_queue
    return config.check_queue_name(queue)


def send_task(conn: psycopg.Connection[Any], app: Any, name: str, args: Any = (),
              kwargs: Any = None, *, queue: str | None = None, priority: int = 0,
              task_id: str | None = None, after_commit: AfterCommit | None = None,
              **options: Any) -> AsyncResult:
    """Publish task ``name`` on ``conn`` in its current transaction; return its AsyncResult.

    ``options`` are Celery's message options (``countdown``, ``eta``, ``expires``,
    ``retries``, ``kojin_unique_key``, ...). The message takes the shape a kombu publish would
    give it. See the module docstring for how this compares with ``app.send_task``.

    ``after_commit``: the wake-up this send joins, which the caller runs once its transaction
    has committed (:meth:`AfterCommit.announce`; ``kojin_pg.contrib.django.outbox`` does so
    with Django's ``on_commit``). By default, that of the enclosing :func:`transaction`; with
    neither, the commit wakes the workers itself.
    """
    serializer = options.pop("serializer", None) or app.conf.task_serializer
    if serializer != "json":
        raise ConfigurationError(f"the outbox writes JSON bodies; task serializer "
                                 f"{serializer!r} is not supported here")
    task_id = task_id or str(uuid.uuid4())
    queue = _route(app, name, args, kwargs, queue, options)
    payload = task_message(app, name, args, kwargs, queue=queue, priority=priority,
                           task_id=task_id, **options)
    schema, notify = _broker(app)
    signals.before_task_publish.send(
        sender=name, body=payload["body"], exchange="", routing_key=queue,
        headers=payload["headers"], properties=payload["properties"], declare=[],
        retry_policy=None)
    queries = Queries("broker", schema)
    fields = publish_fields(payload)
    params = {"queue": queue, "channel": messages_channel(schema),
              **publish_params(idle_space(schema), publishing_space(schema), queue)}
    after = after_commit if after_commit is not None else _after_commit(conn)
    at_commit = notify and after is None and _wakes_at_commit(conn, queries, schema)
    # Not probed here: the publishing lock would last the caller's whole transaction. In an
    # outbox transaction(), the wake-up follows the commit; otherwise, with migration 8, the
    # commit decides (wake_at_commit); before it, announce (older versions' way).
    conn.execute(queries.publish, {
        **params, "priority": priority, "payload": codec.jsonb(codec.dumps(payload)),
        "publish_id": uuid.uuid4(), **fields, "notify": False})
    if after is not None:
        # (a savepoint rolled back later leaves the queue here: a wake-up that finds nothing)
        if notify:
            after.add(schema, queue, fields["due_at"])
    elif at_commit:
        conn.execute(queries.wake_at_commit, {**params, "due_at": fields["due_at"]})
    elif notify:
        conn.execute(queries.announce_queue, params)
    signals.after_task_publish.send(sender=name, body=payload["body"], exchange="",
                                    routing_key=queue, headers=payload["headers"])
    return app.AsyncResult(task_id)


#: Databases and schemas (host, port, database, schema) known to have migration 8.
_AT_COMMIT: set[tuple[str, str, str, str]] = set()


def _wakes_at_commit(conn: psycopg.Connection[Any], queries: Queries, schema: str) -> bool:
    """Whether the schema has ``outbox_wakeups`` (migration 8; an application server may be
    upgraded before the workers migrate the schema). Known once per process."""
    key = (conn.info.host, str(conn.info.port), conn.info.dbname, schema)
    if key in _AT_COMMIT:
        return True
    relation = sql.Identifier(schema, "outbox_wakeups").as_string(conn)
    row = conn.execute(queries.relation_exists, {"relation": relation},
                       prepare=False).fetchone()
    if row and row[0]:
        _AT_COMMIT.add(key)
        return True
    return False


def task_message(app: Any, name: str, args: Any, kwargs: Any, *, queue: str, priority: int,
                 task_id: str, **options: Any) -> dict[str, Any]:
    """The message a kombu publish of Celery task ``name`` would store (JSON body)."""
    # kojin_pg's own message options travel as message properties, as with apply_async
    ours = {k: options.pop(k) for k in ("kojin_unique_key", "kojin_unique") if k in options}
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id, name, args or (), kwargs or {}, **options)
    return {
        "body": base64.b64encode(codec.dumps(body)).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            **ours,
            "priority": priority,
            "body_encoding": "base64",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_tag": str(uuid.uuid4()),
        },
    }


@contextmanager
def transaction(conn: psycopg.Connection[Any], **kwargs: Any) -> Iterator[psycopg.Transaction]:
    """``conn.transaction(**kwargs)``, whose outbox sends wake idle workers after its commit.

    The caller's commit then sends no NOTIFY: a NOTIFY takes a lock on the whole database at
    commit and holds it until the commit is durable, so every other announcing commit of the
    database would wait for this one's flush. Once the transaction has committed, one
    statement per queue sent to wakes its idle consumers, in a transaction of its own that
    waits for no flush (:meth:`AfterCommit.announce`). A rolled-back transaction announces
    nothing.

    Entered inside a transaction already open, this is ``conn.transaction()`` (a savepoint),
    and its sends are announced with the outer transaction's: after its commit if that is a
    ``transaction()`` too, else by its commit, as :func:`send_task` alone does.
    """
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        with conn.transaction(**kwargs) as tx:
            yield tx
        return
    sent = AfterCommit()
    state = _OPEN.get()
    with state.lock:
        state.by_conn[conn] = sent
    rolled_back = False
    try:
        with conn.transaction(**kwargs) as tx:
            try:
                yield tx
            except psycopg.Rollback:  # conn.transaction() swallows it, after rolling back
                rolled_back = True
                raise
    finally:
        with state.lock:
            state.by_conn.pop(conn, None)
    if not rolled_back:
        sent.announce(conn)


class AfterCommit:
    """The queues an :func:`transaction` sent to, and the wake-up that follows its commit."""

    def __init__(self) -> None:
        #: (schema, queue) -> the earliest due time sent there (None: a message ready now)
        self._queues: dict[tuple[str, str], datetime | None] = {}

    def add(self, schema: str, queue: str, due_at: datetime | None) -> None:
        """Remember a send to ``queue`` of ``schema`` (due at ``due_at``, None: ready now)."""
        key = (schema, queue)
        if key in self._queues:
            known = self._queues[key]
            due_at = None if known is None or due_at is None else min(known, due_at)
        self._queues[key] = due_at

    def announce(self, conn: psycopg.Connection[Any]) -> None:
        """Wake the idle consumers of the queues sent to, once the sends are committed, with
        one statement per queue: a NOTIFY if a consumer waits on it (for a scheduled message,
        only if it is the queue's earliest), at ``synchronous_commit = off``. A failure is
        logged, not raised: the caller's commit has happened, and the consumers' next poll
        finds the messages."""
        if not self._queues:
            return
        try:
            autocommit = conn.autocommit
            # each statement its own transaction, with no BEGIN and COMMIT round trips
            conn.autocommit = True
            try:
                for (schema, queue), due_at in self._queues.items():
                    # not retried: a lost wake-up is the poll's to make good (see above)
                    conn.execute(Queries("broker", schema).announce_sent, {
                        "channel": messages_channel(schema), "idle_space": idle_space(schema),
                        "queue": queue, "queue_key": queue_key(queue), "due_at": due_at})
            finally:
                conn.autocommit = autocommit
        except psycopg.Error as exc:
            log.warning("kojin_pg outbox: could not wake the consumers of %d queue(s) after "
                        "the commit (they find the messages at their next poll): %s: %s",
                        len(self._queues), type(exc).__name__, exc)


class _Open:
    """The outbox transactions open in this process, by connection (see :func:`transaction`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_conn: weakref.WeakKeyDictionary[psycopg.Connection[Any], AfterCommit] = (
            weakref.WeakKeyDictionary())


#: Per process: a forked child starts with none (and never with a lock held in its parent).
_OPEN: ProcessLocal[_Open] = ProcessLocal(_Open)


def _after_commit(conn: psycopg.Connection[Any]) -> AfterCommit | None:
    """The open :func:`transaction` of ``conn``, if its sends are announced after the commit."""
    state = _OPEN.get()
    with state.lock:
        return state.by_conn.get(conn)
