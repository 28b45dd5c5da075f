"""``kojin-pg demo``: a real Celery worker on kojin_pg, a task, a group and a chord.

Uses ``--url`` or ``KOJIN_PG_URL``, else starts the zero-setup embedded PostgreSQL (and stops it
again afterwards unless it was already running): the one command allowed to start it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DEMO_APP = textwrap.dedent('''
    import os
    import kojin_pg  # registers the kojin+ broker URL scheme
    from celery import Celery

    url = os.environ["KOJIN_DEMO_URL"]
    app = Celery("kojin_demo", broker="kojin+" + url, backend="kojin+" + url)
    app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def tsum(values):
        return sum(values)
''')


def run_demo(url: str | None = None) -> int:
    """Start a worker, send work, print what came back and how long it took."""
    from ..config import mask_url, plain_url
    from .embedded import EmbeddedServer

    server = None
    url = url or os.environ.get("KOJIN_PG_URL")
    if not url:
        server = EmbeddedServer()
        if server.running_port() is not None:
            server = None  # someone else's running server: use it, leave it running
            url = EmbeddedServer().start()
        else:
            url = server.start()
    url = plain_url(url)
    print(f"kojin_pg demo on {mask_url(url)}")
    workdir = Path(tempfile.mkdtemp(prefix="kojin_demo_"))
    (workdir / "kojin_demo.py").write_text(DEMO_APP)
    env = dict(os.environ, KOJIN_DEMO_URL=url,
               PYTHONPATH=str(workdir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = (workdir / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "kojin_demo", "worker", "-P", "threads", "-c", "4",
         "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=str(workdir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ["KOJIN_DEMO_URL"] = url
    sys.path.insert(0, str(workdir))
    finished = False
    try:
        import kojin_demo  # type: ignore[import-not-found]
        from celery import chord, group

        t = time.perf_counter()
        print(f"task   add(2, 3)              -> {kojin_demo.add.delay(2, 3).get(timeout=120)}"
              f"   ({(time.perf_counter() - t) * 1000:.0f} ms, includes worker start)")
        t = time.perf_counter()
        value = kojin_demo.add.delay(40, 2).get(timeout=30)
        print(f"task   add(40, 2)             -> {value}   "
              f"({(time.perf_counter() - t) * 1000:.1f} ms round trip)")
        t = time.perf_counter()
        values = group(kojin_demo.add.s(i, i) for i in range(10))().get(timeout=60)
        print(f"group  10 x add(i, i)         -> {values}   "
              f"({(time.perf_counter() - t) * 1000:.1f} ms)")
        t = time.perf_counter()
        total = chord(kojin_demo.add.s(i, 1) for i in range(100))(kojin_demo.tsum.s()).get(
            timeout=120)
        print(f"chord  100 x add(i, 1) | tsum -> {total}   "
              f"({(time.perf_counter() - t) * 1000:.1f} ms)")
        print("results are rows of kojin.results; try: SELECT task_id, status, result "
              "FROM kojin.results;")
        finished = True
        return 0
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()
        sys.path.remove(str(workdir))
        if finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # the worker's log is the evidence
            print(f"the demo's worker log: {workdir / 'worker.log'}", file=sys.stderr)
        if server is not None:
            server.stop()
