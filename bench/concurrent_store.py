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
import os
import sys
import uuid
from typing import Any

from barrier import timed_run, worker


def write(url: str, n: int, start: Any, events: Any) -> None:
    """One writer process: warm up, say ready, wait for the start, store ``n`` results."""
    def warm_up() -> Any:
        exec(os.environ.get("BENCH_IMPORT", ""))
        from celery import Celery, states

        app = Celery("cstore", backend=url, broker="memory://")
        app.conf.update(result_serializer="json", accept_content=["json"],
                        result_extended=True)
        backend = app.backend
        backend.store_result(str(uuid.uuid4()), PAYLOAD, states.SUCCESS)  # warm up
        return backend, [str(uuid.uuid4()) for _ in range(n)]

    def work(state: Any) -> None:
        backend, ids = state
        for task_id in ids:
            backend.store_result(task_id, PAYLOAD, "SUCCESS")

    worker(start, events, warm_up, work)


PAYLOAD = {"rows": list(range(20)), "name": "x" * 100}


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    writers = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    elapsed = timed_run(write, (url, n), writers, "writer")
    print(json.dumps({"url": url.split(":")[0], "writers": writers, "per_writer": n,
                      "seconds": round(elapsed, 3),
                      "store_per_s": round(writers * n / elapsed)}))


if __name__ == "__main__":
    main()
