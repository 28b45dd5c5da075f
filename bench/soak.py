"""Soak: mixed load for a while, sampling table sizes; they must stay bounded.

usage: python -m bench.soak [MINUTES] [URL]   (default 30 minutes, embedded server)
Runs a kojin_pg worker (threads, c=4) and a producer sending tasks, groups and chords with
short result expiry and periodic cleanup; every 30 s prints the row counts, dead tuples and
total size of the messages and results tables, and at the end whether they stayed bounded.
Not part of the test suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg

APP = textwrap.dedent("""
    import os
    import kojin_pg
    from celery import Celery
    url = os.environ["SOAK_URL"]
    app = Celery("soakapp", broker="kojin+" + url, backend="kojin+" + url)
    app.conf.update(result_expires=60, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def tsum(xs):
        return sum(xs)
""")


def sample(url: str) -> dict:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) "
            "FROM pg_stat_user_tables WHERE schemaname = 'kojin' "
            "AND relname IN ('messages', 'results', 'chord_parts', 'chords')").fetchall()
    return {name: {"live": live, "dead": dead, "bytes": size} for name, live, dead, size in rows}


def main() -> int:
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 30
    server = None
    url = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("KOJIN_PG_URL")
    if not url:
        from kojin_pg.dev.embedded import temporary_server

        server = temporary_server()
        url = server.url
    d = Path(tempfile.mkdtemp())
    (d / "soakapp.py").write_text(APP)
    env = dict(os.environ, SOAK_URL=url, PYTHONPATH=str(d))
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "soakapp", "worker", "-P",
                               "threads", "-c", "4", "-l", "warning"], env=env, cwd=d,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    os.environ["SOAK_URL"] = url
    sys.path.insert(0, str(d))
    samples = []
    try:
        import soakapp
        from celery import chord, group

        soakapp.add.delay(0, 0).get(timeout=120)
        start = time.monotonic()
        end = start + 60 * minutes
        next_sample = time.monotonic()
        sent = 0
        while time.monotonic() < end:
            group(soakapp.add.s(i, i) for i in range(20))().get(timeout=120)
            chord(soakapp.add.s(i, 1) for i in range(20))(soakapp.tsum.s()).get(timeout=120)
            sent += 41
            if time.monotonic() >= next_sample:
                soakapp.app.backend.cleanup()
                s = sample(url)
                samples.append(s)
                print(json.dumps({"t_min": round((time.monotonic() - start) / 60, 1),
                                  "tasks": sent,
                                  **s}), flush=True)
                next_sample += 30
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        if server is not None:
            server.destroy()
    half = samples[len(samples) // 2:]
    if len(samples) >= 4:
        first, last = half[0], samples[-1]
        grew = {t: last[t]["bytes"] / max(first[t]["bytes"], 1) for t in last}
        print(json.dumps({"size_growth_second_half": {t: round(g, 2) for t, g in grew.items()},
                          "bounded": all(g < 2.0 for g in grew.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
