"""Scale workloads of kojin_pg on one database.

usage: python scale.py backlog URL [MAX_BACKLOG]   claim latency as the backlog grows
       python scale.py cleanup URL [N_EXPIRED]     cleanup time, store/get latency meanwhile
prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import uuid

import psycopg
from celery import Celery, states
from kombu import Connection, Exchange, Queue

import kojin_pg  # noqa: F401


def claim_ack_latencies(conn: Connection, channel, queue: str, n: int = 300) -> list[float]:
    """Seconds of each of ``n`` claim+ack round trips (basic_get, ack, the ack applied now)."""
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        channel.basic_get(queue).ack()
        conn.transport.acks.flush()
        lat.append(time.perf_counter() - t)
    return lat


def backlog(url: str, max_backlog: int) -> dict:
    """Median latency of a one-message claim+ack with 0 ... max_backlog messages queued."""
    qname = "backlog_" + uuid.uuid4().hex[:6]
    q = Queue(qname, Exchange(qname, type="direct"), routing_key=qname)
    out = {}
    with Connection("kojin+" + url) as conn:
        ch = conn.channel()
        q(ch).declare()
        payload = json.dumps({"body": "eyJ4IjogMX0=", "content-encoding": "utf-8",
                              "content-type": "application/json", "headers": {},
                              "properties": {"body_encoding": "base64", "delivery_info": {},
                                             "priority": 0, "delivery_tag": "x"}})
        filled = 0
        for target in (1_000, 10_000, 100_000, max_backlog):
            with psycopg.connect(url, autocommit=True) as pg:
                # the 300 measured claims come off the top of the backlog
                pg.execute("INSERT INTO kojin.messages (queue, payload) "
                           "SELECT %s, %s::jsonb FROM generate_series(1, %s)",
                           (qname, payload, target + 300 - filled))
                pg.execute("VACUUM ANALYZE kojin.messages")
            lat = claim_ack_latencies(conn, ch, qname)
            filled = target
            out[str(target)] = round(1000 * statistics.median(lat), 3)
        q(ch).purge()
    return {"workload": "claim+ack latency ms by backlog", **out}


def cleanup(url: str, n: int) -> dict:
    """Delete n expired results while another thread stores and reads; report both."""
    app = Celery("scale", backend="kojin+" + url, broker="memory://")
    b = app.backend
    b.ensure_ready()
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("INSERT INTO kojin.results (task_id, status, result, expires_at) "
                   "SELECT 'old-' || g, 'SUCCESS', '1', now() - interval '1 hour' "
                   "FROM generate_series(1, %s) g", (n,))
    lat: list[float] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            tid = str(uuid.uuid4())
            t = time.perf_counter()
            b.store_result(tid, {"x": 1}, states.SUCCESS)
            b.get_task_meta(tid, cache=False)
            lat.append(time.perf_counter() - t)

    th = threading.Thread(target=traffic)
    th.start()
    time.sleep(1)
    before = list(lat)
    t = time.perf_counter()
    counts = b.cleanup()
    elapsed = time.perf_counter() - t
    during = lat[len(before):]
    stop.set()
    th.join()
    return {"workload": "cleanup", "expired": n, "deleted": counts["results"],
            "seconds": round(elapsed, 2), "rows_per_s": round(n / elapsed),
            "store_get_ms_p50_before": round(1000 * statistics.median(before), 2),
            "store_get_ms_p50_during": round(1000 * statistics.median(during), 2),
            "store_get_ms_max_during": round(1000 * max(during), 2)}


if __name__ == "__main__":
    what, url = sys.argv[1], sys.argv[2]
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
    print(json.dumps(backlog(url, size) if what == "backlog" else cleanup(url, size)))
