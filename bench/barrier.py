"""Run N worker processes that warm up, wait for one start signal, then work; time the work.

Shared by concurrent_publish.py and concurrent_store.py (run as scripts: they import this as a
sibling module). A worker calls :func:`worker` with its warm-up and its work; the parent calls
:func:`timed_run`, which starts the clock when every worker is ready (many spawned processes
on 2 cores take seconds to import and connect) and stops it when the last is done. A worker
that fails sends its traceback back, which fails the run at once instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

READY_TIMEOUT = 600.0  # seconds for every worker to start, import and connect
RUN_TIMEOUT = 900.0  # seconds for every worker to finish once started


def worker(start: Any, events: Any, warm_up: Callable[[], Any],
           work: Callable[[Any], None]) -> None:
    """In a worker process: ``work(warm_up())`` once the start signal comes."""
    try:
        state = warm_up()
        events.put(("ready", None))
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("start signal never came")
        work(state)
        events.put(("done", None))
    except BaseException:
        events.put(("error", traceback.format_exc()[-2000:]))
        sys.exit(1)  # the parent reports the traceback and fails the run


def wait_for(events: Any, kind: str, count: int, timeout: float, who: str) -> None:
    """Wait for ``count`` events of ``kind``; raise on a worker's error or the timeout."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        try:
            got, detail = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            raise RuntimeError(f"{seen}/{count} {who}s {kind} after {timeout:.0f} s") from None
        if got == "error":
            raise RuntimeError(f"a {who} failed:\n{detail}")
        if got == kind:
            seen += 1


def timed_run(target: Callable[..., None], args: tuple[Any, ...], count: int,
              who: str) -> float:
    """Start ``count`` spawned ``target(*args, start, events)`` processes; seconds from the
    start signal to the last one done."""
    ctx = multiprocessing.get_context("spawn")
    start, events = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, events), daemon=True)
             for _ in range(count)]
    for p in procs:
        p.start()
    try:
        wait_for(events, "ready", count, READY_TIMEOUT, who)
        time.sleep(0.2)  # let the last worker's warm-up settle
        t = time.perf_counter()
        start.set()
        wait_for(events, "done", count, RUN_TIMEOUT, who)
        elapsed = time.perf_counter() - t
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(60)
    return elapsed
