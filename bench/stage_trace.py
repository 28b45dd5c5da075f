"""Imported by the bench app of bench/stages.py (``BENCH_IMPORT``) in the caller and the worker:
stamps each task's stages with ``time.time()`` into one file per process under
``BENCH_TRACE_DIR``, as ``stage task_id time`` lines.

The stages: the caller's ``delay()`` (Celery's before/after_task_publish signals), and inside it
kojin_pg's publish statement (``Database.fetchall`` for "publish"); the worker's main process
receiving the task (task_received), a child or thread starting and finishing it
(task_prerun/task_postrun; the result is stored in between); the caller's ``get()`` returning.
Instrumentation only: nothing here runs outside bench/stages.py.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import signals
from celery.result import AsyncResult

_DIR = os.environ["BENCH_TRACE_DIR"]
_files: dict[int, Any] = {}
_current = threading.local()


def stamp(stage: str, task_id: str | None) -> None:
    """Write one stage of one task, now (a forked child writes a file of its own)."""
    pid = os.getpid()
    out = _files.get(pid)
    if out is None:
        out = _files[pid] = open(os.path.join(_DIR, f"{pid}.log"), "a", buffering=1)
    out.write(f"{stage} {task_id} {time.time():.6f}\n")


@signals.before_task_publish.connect
def _publish_started(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    _current.task_id = (headers or {}).get("id")
    stamp("publish", _current.task_id)


@signals.after_task_publish.connect
def _published(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    stamp("published", (headers or {}).get("id"))


@signals.task_received.connect
def _received(request: Any = None, **kwargs: Any) -> None:
    stamp("received", request.id)


@signals.task_prerun.connect
def _started(task_id: str | None = None, **kwargs: Any) -> None:
    stamp("started", task_id)


@signals.task_postrun.connect
def _finished(task_id: str | None = None, **kwargs: Any) -> None:
    stamp("stored", task_id)


_get = AsyncResult.get


def _traced_get(self: AsyncResult, *args: Any, **kwargs: Any) -> Any:
    value = _get(self, *args, **kwargs)
    stamp("got", self.id)
    return value


AsyncResult.get = _traced_get

try:
    from kojin_pg.db.pool import Database
except ImportError:  # Redis's run
    pass
else:
    _fetchall = Database.fetchall

    def _traced_fetchall(self: Database, query: Any, params: Any = None,
                         what: str = "query") -> Any:
        if what != "publish":
            return _fetchall(self, query, params, what)
        task_id = getattr(_current, "task_id", None)
        stamp("statement", task_id)
        try:
            return _fetchall(self, query, params, what)
        finally:
            stamp("statement_done", task_id)

    Database.fetchall = _traced_fetchall
