"""Unique enqueue: a task that is already queued or scheduled with the same key is not sent
again, and the caller learns which task holds the key.

.. code-block:: python

    result, created = kojin_pg.unique.send_unique(app, "shop.reindex", args=(shop_id,))
    # created is False when an equal task was still waiting: result is that task's

The key is ``key=...`` (any text or JSON value), or by default the task's name, args and
kwargs. It is a unique index of the messages table (never a read-then-write), so of any number
of concurrent senders exactly one enqueues. The key is released when a worker takes the task:
from then on an equal task may be enqueued again. ``apply_async(kojin_unique_key=...)`` (or
``kojin_unique=True``) deduplicates the same way through the ordinary publish path, but Celery
then returns the AsyncResult of the dropped duplicate, which stays PENDING: use
:func:`send_unique` to get the first one's.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery.result import AsyncResult

from . import codec, config
from .errors import ConfigurationError
from .outbox import task_message
from .transport.messages import publish_fields
from .transport.scheduling import unique_key
from .transport.transport import Transport


def send_unique(app: Any, name: str, args: Any = (), kwargs: Any = None, *,
                key: Any = None, queue: str | None = None, priority: int = 0,
                **options: Any) -> tuple[AsyncResult, bool]:
    """Send task ``name`` unless one with the same key is queued or scheduled in ``queue``.

    Returns the AsyncResult of the task that holds the key, and whether it is the one this call
    sent. ``options`` are Celery's message options (``countdown``, ``eta``, ``expires``, ...).
    """
    queue = config.check_queue_name(queue or app.conf.task_default_queue)
    task_id = str(uuid.uuid4())
    payload = task_message(app, name, args, kwargs, queue=queue, priority=priority,
                           task_id=task_id, **options)
    if key is not None:
        payload["properties"]["kojin_unique_key"] = key
    else:
        payload["properties"]["kojin_unique"] = True
    fields = publish_fields(payload)
    with app.connection_for_write() as conn:
        transport = conn.transport
        if not isinstance(transport, Transport):
            raise ConfigurationError("send_unique needs the app's broker to be kojin_pg")
        transport.ensure_ready()
        # Safe to repeat after a lost connection: the key makes the retry find its own row.
        row = transport.db.fetchone(transport.queries.publish_unique, {
            "queue": queue, "priority": priority, "payload": codec.jsonb(codec.dumps(payload)),
            "expiration": fields["expiration"], "due_at": fields["due_at"],
            "task_id": task_id, "unique_key": fields["unique_key"] or unique_key(payload),
            "channel": transport.channel_name, "notify": transport.settings.use_notify,
        }, "publish_unique")
    if row is None:  # the queue was deleted (expired or auto-deleted): nothing was enqueued
        raise ConfigurationError(f"queue {queue!r} was deleted; declare it again to use it")
    holder, inserted = row[0], bool(row[1])
    return app.AsyncResult(holder), inserted
