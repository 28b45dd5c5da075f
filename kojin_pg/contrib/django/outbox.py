"""The outbox in Django: send a Celery task inside ``transaction.atomic()``.

.. code-block:: python

    from django.db import transaction
    from kojin_pg.contrib.django.outbox import send_task

    with transaction.atomic():
        order = Order.objects.create(...)
        send_task(app, "shop.tasks.ship", args=(order.pk,))
    # committed: delivered once. Rolled back: never delivered.

:func:`kojin_pg.outbox.send_task` on the Django connection's own psycopg connection (Django
4.2+ with psycopg 3), so the message commits or rolls back with the block's writes. The idle
workers are woken after the commit, by ``transaction.on_commit``: the commit itself sends no
NOTIFY, whose lock would make every other announcing commit of the database wait for its
flush. A send in a savepoint that rolls back is not announced (Django drops its callback),
and outside any atomic block the send commits at once and wakes the workers then.

The connection is ``KOJIN_PG_DATABASE``'s (see :mod:`.conf`) unless ``using`` names another; it
must be the database of the app's kojin_pg broker, and the business writes that go with the
message must be made on it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from celery.result import AsyncResult
from django.db import connections, transaction

from kojin_pg import outbox
from kojin_pg.errors import ConfigurationError

from . import conf

#: Per thread (Django's connections are), by alias: the wake-up the current atomic block's
#: sends join, and the on_commit callback that runs it.
_pending = threading.local()


def send_task(app: Any, name: str, args: Any = (), kwargs: Any = None, *,
              using: str | None = None, **options: Any) -> AsyncResult:
    """Publish task ``name`` in the current atomic block of the ``using`` connection (default
    ``KOJIN_PG_DATABASE``) and wake the idle workers after its commit; return its
    AsyncResult. ``options`` are those of :func:`kojin_pg.outbox.send_task` (``queue``,
    ``priority``, ``countdown``, ...)."""
    alias = using or conf.database()
    wrapper = connections[alias]
    wrapper.ensure_connection()
    conn = wrapper.connection
    if not isinstance(conn, psycopg.Connection):
        raise ConfigurationError(
            f"the outbox needs psycopg 3 under Django's database {alias!r}; it runs on "
            f"{type(conn).__module__}.{type(conn).__name__}")
    return outbox.send_task(conn, app, name, args, kwargs, after_commit=_wake_up(alias),
                            **options)


def _wake_up(alias: str) -> outbox.AfterCommit:
    """The wake-up of the atomic block open on ``alias``: one per block, run by its commit's
    ``on_commit`` callback, so that many sends to a queue wake its workers once. A block
    rolled back drops the callback (and a savepoint rolled back, one registered in it): the
    next send starts a new one."""
    by_alias: dict[str, tuple[outbox.AfterCommit, Callable[[], None]]] = (
        _pending.__dict__.setdefault("by_alias", {}))
    wrapper = connections[alias]
    known = by_alias.get(alias)
    if known is not None and wrapper.in_atomic_block and _registered(wrapper, known[1]):
        return known[0]
    sent = outbox.AfterCommit()

    def announce() -> None:
        if by_alias.get(alias, (None,))[0] is sent:
            del by_alias[alias]
        # looked up again: this runs once the block has committed, and Django may have
        # closed the connection since (then the workers' next poll finds the messages)
        conn = connections[alias].connection
        if conn is not None:
            sent.announce(conn)

    by_alias[alias] = (sent, announce)
    transaction.on_commit(announce, using=alias)  # outside a block: at once
    return sent


def _registered(wrapper: Any, callback: Callable[[], None]) -> bool:
    """Whether ``callback`` still waits in the connection's on_commit list (Django keeps
    ``(savepoint ids, callback, robust)`` there; a rollback removes what it undoes)."""
    return any(callback in entry for entry in getattr(wrapper, "run_on_commit", ()))
