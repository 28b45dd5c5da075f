"""A prefork child opens its result connection as it starts, not in its first task.

A process's first result store opened its pool: a connection test, the pool's first connection
with its session settings, and the schema check, 8 ms on an idle machine and 13-20 ms on a
loaded one. Every prefork child paid it in its first task, and with ``worker_max_tasks_per_child``
so did every child that replaced one. Celery sends ``worker_process_init`` in each child before
the child takes work, so the child opens them then (this module is imported with the backend,
which the worker loads before it forks: its banner names it). A failure there is only logged:
the first store tries again, as it always did.

The main process opens nothing here: in a prefork worker it stores results only now and then
(a revoked or timed-out task), and a pool kept open there would sit idle for its whole life.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app
from celery.signals import worker_process_init

log = logging.getLogger(__name__)


@worker_process_init.connect(weak=False, dispatch_uid="kojin_pg.backend.warmup")
def open_results_connection(**_: Any) -> None:
    """In a new prefork child: open the app's kojin_pg result pool, if that is its backend."""
    from .results import PostgresBackend

    try:
        backend = current_app.backend
        if isinstance(backend, PostgresBackend):
            backend.open_connections()
    except Exception as exc:  # the first store connects instead
        log.warning("kojin_pg: could not open the result connection of a new worker process "
                    "ahead of its first task: %r", exc)
