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
import os
import sys
import uuid
from typing import Any

from barrier import timed_run, worker


def produce(url: str, queue: str, n: int, start: Any, events: Any) -> None:
    """One producer process: warm up, say ready, wait for the start, publish ``n``."""
    def warm_up() -> Any:
        exec(os.environ.get("BENCH_IMPORT", ""))
        from kombu import Connection, Exchange, Producer, Queue

        q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
        conn = Connection(url)
        ch = conn.channel()
        q(ch).declare()
        prod = Producer(ch, exchange=q.exchange, routing_key=queue, serializer="json")
        prod.publish(BODY)  # connect and warm up before the clock starts
        return conn, prod

    def work(state: Any) -> None:
        conn, prod = state
        with conn:
            for _ in range(n):
                prod.publish(BODY)

    worker(start, events, warm_up, work)


BODY = {"task": "noop", "args": [1, 2, 3], "kwargs": {}, "pad": "x" * 200}


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    producers = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    queue = "cbench_" + uuid.uuid4().hex[:8]
    elapsed = timed_run(produce, (url, queue, n), producers, "producer")
    print(json.dumps({"url": url.split(":")[0], "producers": producers, "per_producer": n,
                      "seconds": round(elapsed, 3),
                      "publish_per_s": round(producers * n / elapsed)}))


if __name__ == "__main__":
    main()
