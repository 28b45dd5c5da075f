"""End-to-end benchmark of potatoq on its native PostgreSQL broker, through its own worker.

usage: [BENCH_POOL=threads|prefork] [BENCH_CONC=4] [BENCH_BROKER_OPTIONS=JSON]
       python potatoq_e2e.py BROKER_URL [N_THROUGHPUT] [N_LATENCY]

The same workload as e2e.py (warm-up, N_LATENCY sequential ``delay().get()`` round trips for
p50/p95/p99, N_THROUGHPUT tasks published then all results awaited, a chord of 100, and with
BENCH_CHORD1000=1 a chord of 1,000), driven through potatoq's Celery-compatible API and its own
``potatoq worker`` process. Results live in the broker's own tables (potatoq's default on
PostgreSQL: the result is written in the transaction that acknowledges the task).

``threads`` is ``potatoq worker -P threads -c N`` (one worker process running N task threads,
like Celery's threads pool); ``prefork`` is ``-P prefork -c N`` (N worker processes, one task
each). Prints one JSON line with the keys e2e.py prints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

APP = """
from potatoq import Potatoq

app = Potatoq("benchapp", broker={broker!r})
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                result_expires=3600, broker_transport_options={options!r})


@app.task
def noop(x=None):
    return x


@app.task
def tsum(xs):
    return sum(xs)
"""


def write_app(broker: str, options: dict[str, Any]) -> str:
    """A temporary directory holding ``benchapp.py`` (the two tasks of e2e.py) for ``broker``
    with broker ``options`` (potatoq's ``broker_transport_options``)."""
    d = tempfile.mkdtemp(prefix="bench_potatoq_")
    with open(os.path.join(d, "benchapp.py"), "w") as f:
        f.write(textwrap.dedent(APP.format(broker=broker, options=options)))
    return d


def start_worker(d: str, pool: str, conc: str) -> subprocess.Popen:
    """``potatoq -A benchapp worker`` with ``pool`` (threads or prefork) and ``conc`` slots."""
    env = dict(os.environ, PYTHONPATH=d)
    return subprocess.Popen(
        [sys.executable, "-m", "potatoq", "-A", "benchapp", "--no-color", "--no-emoji", "worker",
         "-P", pool, "-c", conc, "-l", "warning"],
        env=env, cwd=d, start_new_session=True,  # killed with its pool's processes if stuck
        stdout=open(os.path.join(d, "w.log"), "w"), stderr=subprocess.STDOUT)


def measure(benchapp: Any, n_tp: int, n_lat: int) -> dict[str, Any]:
    """Run the e2e.py workload against the imported ``benchapp``; the figures as a dict."""
    from potatoq import chord

    benchapp.noop.delay(0).get(timeout=60)  # warm-up, and wait for the worker
    lat = []
    for i in range(n_lat):
        t = time.perf_counter()
        benchapp.noop.delay(i).get(timeout=30)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    rs = [benchapp.noop.delay(i) for i in range(n_tp)]
    t_pub = time.perf_counter() - t
    for r in rs:
        r.get(timeout=300)
    t_all = time.perf_counter() - t
    t = time.perf_counter()
    res = chord(benchapp.noop.s(i) for i in range(100))(benchapp.tsum.s()).get(timeout=300)
    t_chord = time.perf_counter() - t
    assert res == sum(range(100)), res
    extra: dict[str, Any] = {}
    if os.environ.get("BENCH_CHORD1000"):
        t = time.perf_counter()
        res = chord(benchapp.noop.s(i) for i in range(1000))(benchapp.tsum.s()).get(timeout=600)
        extra["chord1000_s"] = round(time.perf_counter() - t, 3)
        assert res == sum(range(1000)), res
    lat.sort()
    return dict(throughput=round(n_tp / t_all, 1), publish_rate=round(n_tp / t_pub, 1),
                p50_ms=round(1000 * statistics.median(lat), 2),
                p95_ms=round(1000 * lat[int(0.95 * len(lat))], 2),
                p99_ms=round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                chord100_s=round(t_chord, 3), **extra)


def main(argv: list[str]) -> int:
    """Start the worker, run the workload, print one JSON line, stop the worker."""
    broker = argv[1]
    n_tp = int(argv[2]) if len(argv) > 2 else 2000
    n_lat = int(argv[3]) if len(argv) > 3 else 200
    pool = os.environ.get("BENCH_POOL", "threads")
    conc = os.environ.get("BENCH_CONC", "4")
    d = write_app(broker, json.loads(os.environ.get("BENCH_BROKER_OPTIONS") or "{}"))
    sys.path.insert(0, d)
    import benchapp  # noqa: PLC0415 (written just above)

    benchapp.app.broker.setup()  # create the tables before the worker races to
    w = start_worker(d, pool, conc)
    try:
        figures = measure(benchapp, n_tp, n_lat)
    except BaseException:
        sys.stderr.write(open(os.path.join(d, "w.log")).read()[-3000:])
        raise
    finally:
        w.terminate()
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait(10)
    shutil.rmtree(d, ignore_errors=True)  # a failed run keeps it: the worker's log
    print(json.dumps(dict(broker="potatoq+" + broker.split(":")[0], backend="potatoq", pool=pool,
                          **figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
