"""Store results from several writer processes at once (the NOTIFY commit lock, result side).

usage: [BENCH_IMPORT="import kojin_pg"] python concurrent_store.py BACKEND_URL [N_PER_WRITER] [WRITERS]
prints one JSON line with the total rate of ``app.backend.store_result`` calls.

Each writer builds a Celery app on the backend URL, stores one warm-up result (connection,
schema check), reports ready and waits; the clock starts when every writer is ready and stops
when the last has stored its ``N_PER_WRITER`` results (the payload of bench/backend.py). A
writer that fails sends its error back, which fails the run at once instead of hanging.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_mod
import sys
import time
import traceback
import uuid
from typing import Any

READY_TIMEOUT = 600.0  # seconds for every writer to start, import and connect
RUN_TIMEOUT = 900.0  # seconds for every writer to finish once started


def write(url: str, n: int, start: Any, events: Any) -> None:
    """One writer process: warm up, say ready, wait for the start, store ``n`` results."""
    try:
        exec(os.environ.get("BENCH_IMPORT", ""))
        from celery import Celery, states

        app = Celery("cstore", backend=url, broker="memory://")
        app.conf.update(result_serializer="json", accept_content=["json"],
                        result_extended=True)
        backend = app.backend
        payload = {"rows": list(range(20)), "name": "x" * 100}
        ids = [str(uuid.uuid4()) for _ in range(n)]
        backend.store_result(str(uuid.uuid4()), payload, states.SUCCESS)  # warm up
        events.put(("ready", None))
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("start signal never came")
        for task_id in ids:
            backend.store_result(task_id, payload, states.SUCCESS)
        events.put(("done", None))
    except BaseException:
        events.put(("error", traceback.format_exc()[-2000:]))
        sys.exit(1)  # the parent reports the traceback and fails the run


def wait_for(events: Any, kind: str, count: int, timeout: float) -> None:
    """Wait for ``count`` events of ``kind``; raise on a writer's error or the timeout."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        try:
            got, detail = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            raise RuntimeError(f"{seen}/{count} writers {kind} after {timeout:.0f} s") from None
        if got == "error":
            raise RuntimeError(f"a writer failed:\n{detail}")
        if got == kind:
            seen += 1


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    writers = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    ctx = multiprocessing.get_context("spawn")
    start, events = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=write, args=(url, n, start, events), daemon=True)
             for _ in range(writers)]
    for p in procs:
        p.start()
    try:
        wait_for(events, "ready", writers, READY_TIMEOUT)
        time.sleep(0.2)  # let the last writer's warm-up settle
        t = time.perf_counter()
        start.set()
        wait_for(events, "done", writers, RUN_TIMEOUT)
        elapsed = time.perf_counter() - t
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(60)
    print(json.dumps({"url": url.split(":")[0], "writers": writers, "per_writer": n,
                      "seconds": round(elapsed, 3),
                      "store_per_s": round(writers * n / elapsed)}))


if __name__ == "__main__":
    main()
