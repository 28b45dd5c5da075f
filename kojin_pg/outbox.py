"""Transactional enqueue (the outbox pattern): send a Celery task inside your own transaction.

.. code-block:: python

    with psycopg.connect(DSN) as conn, conn.transaction():
        conn.execute("INSERT INTO orders ...")
        kojin_pg.outbox.send_task(conn, app, "shop.tasks.ship", args=(order_id,))
    # committed: delivered once. Rolled back: never delivered.

The message row is written on the caller's connection, so it commits or rolls back with the
caller's own writes. Whether to wake a worker is decided at the commit (a deferred trigger,
``sql/0008_outbox_wakeups.sql``): a NOTIFY only if a consumer of the queue is idle, and no lock
that an open business transaction would hold against the workers (unless the caller runs
``SET CONSTRAINTS ALL IMMEDIATE`` after a send: the decision is made then, and the queue's
publishing lock is held from then to the commit). On a schema before migration 8, every send
is announced at the commit, as older versions did.
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
import uuid
from typing import Any

import psycopg
from celery import signals
from celery.result import AsyncResult
from psycopg import sql

from . import codec, config
from .db import Queries
from .db.channels import messages_channel
from .errors import ConfigurationError
from .transport.idle import idle_space, publish_params, publishing_space
from .transport.messages import publish_fields
from .transport.options import broker_settings


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
              task_id: str | None = None, **options: Any) -> AsyncResult:
    """Publish task ``name`` on ``conn`` in its current transaction; return its AsyncResult.

    ``options`` are Celery's message options (``countdown``, ``eta``, ``expires``,
    ``retries``, ``kojin_unique_key``, ...). The message takes the shape a kombu publish would
    give it. See the module docstring for how this compares with ``app.send_task``.
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
    at_commit = notify and _wakes_at_commit(conn, queries, schema)
    # Not probed here: the publishing lock would last the caller's whole transaction. With
    # migration 8, the commit decides (wake_at_commit); before it, announce (older versions' way).
    conn.execute(queries.publish, {
        **params, "priority": priority, "payload": codec.jsonb(codec.dumps(payload)),
        "publish_id": uuid.uuid4(), **fields, "notify": False})
    if at_commit:
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
