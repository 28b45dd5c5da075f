"""What goes wrong as a deployment ages (issue 10): pinned NOTIFY queue, queue arguments and
message expiry, clean hand-backs counted as deliveries, a bad body stalling a batch, shutdown and
reconnect edges. Each test drives kojin_pg through kombu's and Celery's public APIs against the
real test PostgreSQL; the ones that fail on today's code carry a strict xfail naming the item.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import psycopg
import pytest

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)

#: Stores (and publishes) done while an idle process holds its LISTEN connection (issue 10:
#: the queue starts to fill after about 60,000; done means 200,000 leave it empty).
NOTIFICATIONS = 200_000
NOTIFY_BATCH = 10_000
#: pg_notification_queue_usage() a listener that keeps up shows in passing (one or two SLRU
#: segments, about 9e-5 each, while a batch is being read); an idle LISTEN connection passes
#: it after about 80,000 notifications and reaches 0.0012 at 200,000.
USAGE_IN_PASSING = 3e-4


def kurl(db_url: str) -> str:
    return "kojin+" + db_url


# -- item 1: an idle listener must not pin PostgreSQL's NOTIFY queue -------------------------

IDLE_RESULT_WAITER = textwrap.dedent("""
    import sys
    from celery import Celery
    import kojin_pg
    url, task_id = sys.argv[1], sys.argv[2]
    app = Celery("idle_waiter", backend="kojin+" + url, broker="memory://", set_as_current=False)
    print(app.AsyncResult(task_id).get(timeout=30), flush=True)
    sys.stdin.read()  # idle like a web server between requests, until the test lets go
""")

IDLE_BROKER_CONSUMER = textwrap.dedent("""
    import sys
    from kombu import Connection
    import kojin_pg
    url, queue = sys.argv[1], sys.argv[2]
    conn = Connection("kojin+" + url)
    simple = conn.SimpleQueue(queue)
    simple.put({"once": True})
    message = simple.get(timeout=30)
    message.ack()
    try:
        simple.get(timeout=1)  # nothing more: this wait is on LISTEN
    except simple.Empty:
        pass
    print(message.payload["once"], flush=True)
    sys.stdin.read()  # idle, connection open, until the test lets go
""")


def _start_idle(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == "True" or line == "1", f"the idle process did not start: {line!r}"
    return proc


def _flood(db_url: str, statement: str, channel: str) -> list[float]:
    """Run ``statement`` (NOTIFY_BATCH notifications on ``channel`` per call) until
    NOTIFICATIONS were sent; return pg_notification_queue_usage() after each batch."""
    usage = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(NOTIFICATIONS // NOTIFY_BATCH):
            conn.execute(statement, {"n": NOTIFY_BATCH, "channel": channel})
            usage.append(conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0])
    return usage


def _stop_idle(proc: subprocess.Popen) -> None:
    alive = proc.poll() is None
    proc.stdin.close()
    proc.wait(30)
    assert alive, "the idle process died during the test: nothing was listening"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 10 item 1: a process that waited for a result once "
                   "keeps LISTENing without reading; its backend stops draining the NOTIFY queue")
def test_idle_result_waiter_does_not_pin_the_notify_queue(make_app, db_url):
    backend = make_app().backend
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, 1)
    waiter = _start_idle(IDLE_RESULT_WAITER, db_url, task_id)
    try:
        # what store_result sends: one notification per stored result, payload the task id
        usage = _flood(db_url, """
            WITH stored AS (
                INSERT INTO kojin.results (task_id, status, result, date_done, expires_at)
                SELECT gen_random_uuid()::text, 'SUCCESS', '1'::jsonb, now(),
                       now() + interval '1 day'
                FROM generate_series(1, %(n)s)
                RETURNING task_id)
            SELECT count(pg_notify(%(channel)s, task_id)) FROM stored""", "kojin_results_kojin")
    finally:
        _stop_idle(waiter)
    assert max(usage) < USAGE_IN_PASSING, \
        f"NOTIFY queue usage after each {NOTIFY_BATCH} stores: {usage}"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 10 item 1: a kombu connection that waited once "
                   "keeps LISTENing without reading; its backend stops draining the NOTIFY queue")
def test_idle_broker_connection_does_not_pin_the_notify_queue(db_url):
    consumer = _start_idle(IDLE_BROKER_CONSUMER, db_url, "idle_" + uuid.uuid4().hex[:8])
    try:
        # what a publish sends: one notification per message, payload the queue name (here
        # as many queues as messages, named like Celery's event queues, so none is folded
        # into another by PostgreSQL's per-transaction deduplication)
        usage = _flood(db_url, """
            SELECT count(pg_notify(%(channel)s, 'celeryev.' || gen_random_uuid()))
            FROM generate_series(1, %(n)s)""", "kojin_msgs_kojin")
    finally:
        _stop_idle(consumer)
    assert max(usage) < USAGE_IN_PASSING, \
        f"NOTIFY queue usage after each {NOTIFY_BATCH} publishes: {usage}"
