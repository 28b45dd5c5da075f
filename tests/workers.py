"""Real ``celery worker`` processes for the end-to-end and fault tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Worker:
    def __init__(self, db_url: str, log: Path, pool: str, concurrency: int,
                 broker_options: dict, name: str, extra_args: tuple[str, ...] = (),
                 conf: dict | None = None, results_url: str | None = None) -> None:
        env = dict(os.environ, KOJIN_E2E_URL=db_url, KOJIN_E2E_RESULTS_URL=results_url or "",
                   KOJIN_E2E_BROKER_OPTIONS=json.dumps(broker_options),
                   KOJIN_E2E_CONF=json.dumps(conf or {}),
                   PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "e2e_app", "worker", "-P", pool,
             "-c", str(concurrency), "-l", "info", "-n", f"{name}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args],
            env=env, cwd=str(HERE), stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def kill(self) -> None:
        """kill -9 of the whole worker (its pool children too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def workers_fixture(db_url, tmp_path):
    started: list[Worker] = []

    def start(pool="threads", concurrency=4, broker_options=None, name=None, url=None,
              extra_args=(), conf=None, results_url=None):
        w = Worker(url or db_url, tmp_path / f"worker{len(started)}.log", pool, concurrency,
                   broker_options or {}, name or f"w{len(started)}", tuple(extra_args), conf,
                   results_url)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
    for w in started:
        if w.proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
            print(f"worker log:\n{w.tail()}")


def wait_ready(app, worker, timeout=90):
    try:
        assert app.tasks["e2e.add"].delay(0, 0).get(timeout=timeout) == 0
    except Exception:
        print(worker.tail())
        raise


