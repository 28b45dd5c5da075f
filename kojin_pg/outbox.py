"""Transactional enqueue (the outbox pattern): send a Celery task inside your own transaction.

.. code-block:: python

    with psycopg.connect(DSN) as conn, conn.transaction():
        conn.execute("INSERT INTO orders ...")
        kojin_pg.outbox.send_task(conn, app, "shop.tasks.ship", args=(order_id,))
    # committed: delivered once. Rolled back: never delivered.

The message row is written on the caller's connection, so it commits or rolls back with the
caller's own writes; the NOTIFY that wakes workers is delivered by PostgreSQL only at commit.
The app's broker must be kojin_pg on the same database (and schema).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import psycopg
from celery.result import AsyncResult

from . import codec, config
from .db import Queries
from .db.channels import messages_channel
from .transport.messages import publish_fields
from .transport.options import broker_settings


def _broker_schema(app: Any) -> str:
    """The schema of the app's kojin_pg broker (from its URL and transport options)."""
    url = app.conf.broker_url or ""
    if "://" in url:
        return broker_settings(url, app.conf.broker_transport_options).schema
    options = app.conf.broker_transport_options or {}
    return config.validate_identifier(options.get("schema", "kojin"))


def send_task(conn: psycopg.Connection[Any], app: Any, name: str, args: Any = (),
              kwargs: Any = None, *, queue: str | None = None, priority: int = 0,
              task_id: str | None = None, **options: Any) -> AsyncResult:
    """Publish task ``name`` on ``conn`` in its current transaction; return its AsyncResult.

    ``options`` are Celery's message options (``countdown``, ``eta``, ``expires``,
    ``retries``, ...). The message takes the same shape a kombu publish would give it.
    """
    task_id = task_id or str(uuid.uuid4())
    queue = config.check_queue_name(queue or app.conf.task_default_queue)
    payload = task_message(app, name, args, kwargs, queue=queue, priority=priority,
                           task_id=task_id, **options)
    schema = _broker_schema(app)
    conn.execute(Queries("broker", schema).publish, {
        "queue": queue, "priority": priority, "payload": codec.jsonb(codec.dumps(payload)),
        "publish_id": uuid.uuid4(), **publish_fields(payload),
        "channel": messages_channel(schema), "notify": True,
    })
    return app.AsyncResult(task_id)


def task_message(app: Any, name: str, args: Any, kwargs: Any, *, queue: str, priority: int,
                 task_id: str, **options: Any) -> dict[str, Any]:
    """The message a kombu publish of Celery task ``name`` would store (JSON body)."""
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id, name, args or (), kwargs or {}, **options)
    return {
        "body": base64.b64encode(codec.dumps(body)).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "priority": priority,
            "body_encoding": "base64",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_tag": str(uuid.uuid4()),
        },
    }
