"""The Celery app the end-to-end tests run in real ``celery worker`` processes.

The worker imports this module (``celery -A e2e_app worker``) with ``KOJIN_E2E_URL`` set; the
tests build the same app in-process with :func:`make_app` to send tasks and read results.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

import kojin_pg  # noqa: F401  (registers the kojin+ broker URL scheme)


def make_app(url: str, broker_options: dict | None = None,
             results_url: str | None = None) -> Celery:
    """The app on the broker at ``url``, with its results there too unless ``results_url``."""
    app = Celery("e2e_app", broker="kojin+" + url, backend="kojin+" + (results_url or url),
                 set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options or {},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=4,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_chord_join_timeout=30,
    )

    @app.task(name="e2e.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="e2e.tsum", shared=False)
    def tsum(values):
        return sum(values)

    @app.task(name="e2e.identity", shared=False)
    def identity(value):
        return value

    @app.task(name="e2e.fail", shared=False)
    def fail(message):
        raise ValueError(message)

    @app.task(name="e2e.flaky", bind=True, max_retries=5, shared=False)
    def flaky(self, succeed_on):
        if self.request.retries < succeed_on:
            raise self.retry(countdown=0.3, exc=RuntimeError("not yet"))
        return self.request.retries

    @app.task(name="e2e.sleep_then", shared=False)
    def sleep_then(seconds, value):
        time.sleep(seconds)
        return value

    @app.task(name="e2e.record_sum", bind=True, shared=False)
    def record_sum(self, values, path):
        """A chord body that appends one line per execution to ``path`` (counts firings)."""
        with open(path, "a") as out:
            out.write(f"{self.request.id}\n")
        return sum(values)

    @app.task(name="e2e.write_to_file_and_return_int", shared=False)
    def write_to_file_and_return_int(file_name, i):
        # Celery's t/integration/tasks.py: proves when a chord header part has run
        with open(file_name, mode="a", buffering=1) as file_handle:
            file_handle.write(str(i) + "\n")
        return i

    @app.task(name="e2e.stamp", shared=False)
    def stamp(path, label):
        """Append ``label`` and the wall-clock time to ``path``: counts runs, and when."""
        with open(path, "a", buffering=1) as out:
            out.write(f"{label} {time.time()}\n")
        return label

    @app.task(name="e2e.retry_later", bind=True, max_retries=3, shared=False)
    def retry_later(self, path, countdown):
        """Stamps each attempt; retries once, ``countdown`` seconds later (broker-scheduled)."""
        with open(path, "a", buffering=1) as out:
            out.write(f"attempt{self.request.retries} {time.time()}\n")
        if self.request.retries < 1:
            raise self.retry(countdown=countdown)
        return self.request.retries

    @app.task(name="e2e.die", shared=False)
    def die():
        os.kill(os.getpid(), 9)

    return app


if os.environ.get("KOJIN_E2E_URL"):
    app = make_app(os.environ["KOJIN_E2E_URL"],
                   json.loads(os.environ.get("KOJIN_E2E_BROKER_OPTIONS") or "{}"),
                   os.environ.get("KOJIN_E2E_RESULTS_URL") or None)
    # settings a test gives its workers (e.g. a short result_expires)
    app.conf.update(json.loads(os.environ.get("KOJIN_E2E_CONF") or "{}"))
