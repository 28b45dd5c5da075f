"""Publish from several processes at once (the NOTIFY commit-lock trap).

usage: [BENCH_IMPORT="import kojin_pg"] python concurrent_publish.py URL [N_PER_PRODUCER] [PRODUCERS]
prints one JSON line with the total publish rate.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import uuid


def produce(url: str, queue: str, n: int, start, done) -> None:
    exec(os.environ.get("BENCH_IMPORT", ""))
    from kombu import Connection, Exchange, Producer, Queue

    q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
    body = {"task": "noop", "args": [1, 2, 3], "kwargs": {}, "pad": "x" * 200}
    with Connection(url) as conn:
        ch = conn.channel()
        q(ch).declare()
        prod = Producer(ch, exchange=q.exchange, routing_key=queue, serializer="json")
        prod.publish(body)  # connect and warm up before the clock starts
        start.wait()
        for _ in range(n):
            prod.publish(body)
    done.put(1)


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    producers = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    queue = "cbench_" + uuid.uuid4().hex[:8]
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=produce, args=(url, queue, n, start, done))
             for _ in range(producers)]
    for p in procs:
        p.start()
    time.sleep(3)  # let every producer connect
    t = time.perf_counter()
    start.set()
    for _ in procs:
        done.get(timeout=600)
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join(60)
    print(json.dumps({"url": url.split(":")[0], "producers": producers,
                      "publish_per_s": round(producers * n / elapsed)}))


if __name__ == "__main__":
    main()
