"""Publish from several processes at once (the NOTIFY commit-lock trap).

usage: [BENCH_IMPORT="import kojin_pg"] python concurrent_publish.py URL [N_PER_PRODUCER] [PRODUCERS]
prints one JSON line with the total publish rate.

Each producer connects, declares the queue and publishes one warm-up message, then reports
ready; the clock starts only when every producer is ready (64 spawned processes on 2 cores
take many seconds to import and connect), and stops when the last one has published. A
producer that fails sends its error back, which fails the run at once instead of hanging.
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

READY_TIMEOUT = 600.0  # seconds for every producer to start, import and connect
RUN_TIMEOUT = 900.0  # seconds for every producer to finish once started


def produce(url: str, queue: str, n: int, start: Any, events: Any) -> None:
    """One producer process: warm up, say ready, wait for the start, publish ``n``."""
    try:
        exec(os.environ.get("BENCH_IMPORT", ""))
        from kombu import Connection, Exchange, Producer, Queue

        q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
        body = {"task": "noop", "args": [1, 2, 3], "kwargs": {}, "pad": "x" * 200}
        with Connection(url) as conn:
            ch = conn.channel()
            q(ch).declare()
            prod = Producer(ch, exchange=q.exchange, routing_key=queue, serializer="json")
            prod.publish(body)  # connect and warm up before the clock starts
            events.put(("ready", None))
            if not start.wait(READY_TIMEOUT):
                raise RuntimeError("start signal never came")
            for _ in range(n):
                prod.publish(body)
        events.put(("done", None))
    except BaseException:
        events.put(("error", traceback.format_exc()[-2000:]))
        sys.exit(1)  # the parent reports the traceback and fails the run


def wait_for(events: Any, kind: str, count: int, timeout: float) -> None:
    """Wait for ``count`` events of ``kind``; raise on a producer's error or the timeout."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        try:
            got, detail = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            raise RuntimeError(f"{seen}/{count} producers {kind} after {timeout:.0f} s") from None
        if got == "error":
            raise RuntimeError(f"a producer failed:\n{detail}")
        if got == kind:
            seen += 1


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    producers = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    queue = "cbench_" + uuid.uuid4().hex[:8]
    ctx = multiprocessing.get_context("spawn")
    start, events = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=produce, args=(url, queue, n, start, events), daemon=True)
             for _ in range(producers)]
    for p in procs:
        p.start()
    try:
        wait_for(events, "ready", producers, READY_TIMEOUT)
        time.sleep(0.2)  # let the last producer's warm-up settle
        t = time.perf_counter()
        start.set()
        wait_for(events, "done", producers, RUN_TIMEOUT)
        elapsed = time.perf_counter() - t
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(60)
    print(json.dumps({"url": url.split(":")[0], "producers": producers, "per_producer": n,
                      "seconds": round(elapsed, 3),
                      "publish_per_s": round(producers * n / elapsed)}))


if __name__ == "__main__":
    main()
