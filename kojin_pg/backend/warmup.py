"""A prefork child opens its result connection as it starts, not in its first task.

A process's first result store opened its pool: a connection test, the pool's first connection
with its session settings, and the schema check, 8 ms on an idle machine and 13-20 ms on a
loaded one. Every prefork child paid it in its first task, and with ``worker_max_tasks_per_child``
so did every child that replaced one. Celery sends ``worker_process_init`` in each new child,
so the child opens them then (this module is imported with the backend, which the worker loads
before it forks: its banner names it), on a thread of its own: the signal must return at once.
Under ``--max-tasks-per-child=1`` Celery leaves a task waiting 5 s for a child now and then,
with any broker and backend (here 4 to 9 tasks in 20); handlers that took 20 ms to return made
it happen to half of them or more, and bench/e2e.py's run took minutes instead of seconds. A
first task that comes while the thread is connecting waits for that connection rather than
opening another. A failure is only logged: the first store tries again, as it always did.

The main process opens nothing here: in a prefork worker it stores results only now and then
(a revoked or timed-out task), and a pool kept open there would sit idle for its whole life.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import current_app
from celery.signals import worker_process_init

log = logging.getLogger(__name__)


@worker_process_init.connect(weak=False, dispatch_uid="kojin_pg.backend.warmup")
def open_results_connection(**_: Any) -> None:
    """In a new prefork child: :func:`start_opening` the current app's result connection."""
    start_opening(current_app)


def start_opening(app: Any) -> None:
    """Open ``app``'s kojin_pg result pool (if that is its backend) on a thread that ends when
    it is open, and return at once."""
    from .results import PostgresBackend

    backend = app.backend
    if isinstance(backend, PostgresBackend):
        threading.Thread(target=_open, args=(backend,), daemon=True,
                         name="kojin_pg-results-warmup").start()


def _open(backend: Any) -> None:
    try:
        backend.open_connections()
    except Exception as exc:  # the first store connects instead
        log.warning("kojin_pg: could not open the result connection of a new worker process "
                    "ahead of its first task: %r", exc)
