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
- Publish inserts a row into ``<schema>.messages`` and, if a consumer of the queue is idle,
  NOTIFYs it once the row is committed (see :mod:`.idle` and :mod:`.offers`).
- A consumer claims up to its free prefetch slots in one statement (``FOR UPDATE SKIP LOCKED``),
  highest priority first, then FIFO. The claim is a lease: the row stays invisible until
  ``visible_at`` (now + visibility_timeout) and counts the delivery.
- While a consumer lives it extends the leases of the messages it holds (:mod:`.leases`), so
  long tasks and ETA/countdown tasks kept by a worker are not delivered twice. When it dies, the
  leases run out and another consumer gets the messages.
- Ack deletes the row (:mod:`.acks`). Reject with requeue makes it visible again; reject without
  requeue moves it to ``dead_letters``; so does a claim of a message already delivered
  ``max_deliveries`` times.
- Exchange bindings live in the database (:mod:`.routing`), so direct, topic and fanout routing
  work across processes (Celery remote control and events).

Modules: :mod:`.transport` (the kombu Transport, event loop and blocking waits),
:mod:`.channel` (publish, claim, hand back), :mod:`.qos`, :mod:`.acks`, :mod:`.leases`,
:mod:`.wakeups`, :mod:`.routing`, :mod:`.messages`, :mod:`.options`.
"""

from __future__ import annotations

from ..db.channels import messages_channel
from .channel import Channel
from .qos import QoS
from .transport import Transport

__all__ = ["Channel", "QoS", "Transport", "messages_channel"]
