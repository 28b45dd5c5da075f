"""Broker and result backend in two databases: end to end with real ``celery worker`` processes.

docs/scaling.rst proposes keeping the broker and the results apart (two servers, or two
databases of one server, whose listeners then no longer wake each other on PostgreSQL 18 and
older). Everything a user does must work the same there: tasks, groups, chords (counted in the
results database, their bodies sent through the broker) and a durable revoke, whose REVOKED
result must land where the callers read results.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from celery import Celery, chord, group
from conftest import TEMPLATE, fresh_database
from e2e_app import make_app
from kombu import Connection, Exchange, Queue
from netproxy import PgProxy, marker
from workers import wait_ready

pytestmark = pytest.mark.e2e


@pytest.fixture
def results_url(pg_server):
    """A second database with the kojin schema, for the results; dropped after the test."""
    with fresh_database(pg_server, TEMPLATE) as url:
        yield url


@pytest.fixture
def split_app(db_url, results_url):
    """The end-to-end app with its broker on ``db_url`` and its results on ``results_url``."""
    app = make_app(db_url, results_url=results_url)
    yield app
    app.backend.result_consumer.stop()


def count(url: str, query: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()[0]


@pytest.mark.timeout(180)
def test_tasks_chords_and_revoke_with_results_in_another_database(split_app, workers, db_url,
                                                                 results_url):
    app = split_app
    w = workers(pool="prefork", concurrency=2, results_url=results_url)
    wait_ready(app, w)
    add, tsum, stamp = app.tasks["e2e.add"], app.tasks["e2e.tsum"], app.tasks["e2e.stamp"]
    assert group(add.s(i, i) for i in range(10))().get(timeout=60) == [2 * i for i in range(10)]
    assert chord(add.s(i, 1) for i in range(50))(tsum.s()).get(timeout=60) == \
        sum(range(1, 51))
    assert count(results_url, "SELECT count(*) FROM kojin.results") > 60
    assert count(db_url, "SELECT count(*) FROM kojin.results") == 0

    # no worker hears the broadcast: the broker's revoke itself must record REVOKED where
    # the results are read (Celery's workers do so too from 5.5 on, when they are up)
    w.stop()
    doomed = stamp.apply_async(("/dev/null", "doomed"), countdown=30)
    doomed.revoke()
    deadline = time.monotonic() + 20
    while doomed.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert doomed.state == "REVOKED", "a revoked task's result never read REVOKED"
    assert count(db_url, "SELECT count(*) FROM kojin.messages WHERE due_at IS NOT NULL") == 0
    assert count(db_url, "SELECT count(*) FROM kojin.results") == 0


def publish_revoked(db_url: str, channel, name: str) -> str:
    """Publish one message to a new queue ``name`` on ``channel`` and flag it revoked in
    ``db_url`` (the broker's database), as a revoke flags a message that was leased when it
    came; its task id."""
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    task_id = str(uuid.uuid4())
    queue(channel).declare()
    channel.connection.client.Producer(channel).publish(
        {"n": 1}, exchange=queue.exchange, routing_key=name, serializer="json")
    with psycopg.connect(db_url) as c:
        c.execute("UPDATE kojin.messages SET revoked = true, task_id = %s WHERE queue = %s",
                  (task_id, name))
    return task_id


def result_states(url: str, task_id: str) -> list[tuple[str]]:
    with psycopg.connect(url) as c:
        return c.execute("SELECT status FROM kojin.results WHERE task_id = %s",
                         (task_id,)).fetchall()


def test_a_revoked_message_a_claim_meets_is_revoked_in_the_results_database(db_url,
                                                                            results_url):
    """A message leased when it was revoked is flagged, and the claim that meets it again drops
    it: in a worker whose app keeps its results in another database, its REVOKED result goes
    there, not into the broker's database."""
    app = Celery("split_settle", broker="kojin+" + db_url, backend="kojin+" + results_url,
                 set_as_current=False)
    assert app.conf.broker_url  # read: configured, as the app of a worker or a caller is
    name = "split_" + uuid.uuid4().hex[:8]
    try:
        with Connection("kojin+" + db_url) as conn:
            channel = conn.channel()
            task_id = publish_revoked(db_url, channel, name)
            assert channel._claim([name], 5) == []
            # a revoke is rare: it holds no connection to the results database afterwards,
            # however long this process lives (a pool would keep one for good)
            assert count(results_url, "SELECT count(*) FROM pg_stat_activity WHERE "
                                      "application_name = 'kojin_pg.revoke'") == 0
        assert result_states(results_url, task_id) == [("REVOKED",)]
        assert count(db_url, "SELECT count(*) FROM kojin.results") == 0
        assert count(db_url, "SELECT count(*) FROM kojin.messages") == 0
    finally:
        app.close()


def test_a_revoked_message_whose_settle_reply_is_lost_is_revoked_in_the_results_database(
        db_url, results_url):
    """Cut: the worker's connection to the broker, after the server committed the statement
    that drops the revoked message a claim met and before its reply reaches the worker. The
    statement is retried on a new connection and finds the message gone; the REVOKED result
    must still reach the results database, or its callers wait for it forever."""
    with PgProxy.for_url(db_url) as proxy:
        broker_url = "kojin+" + proxy.url(db_url)
        app = Celery("split_settle_cut", broker=broker_url, backend="kojin+" + results_url,
                     set_as_current=False)
        assert app.conf.broker_url
        name = "split_" + uuid.uuid4().hex[:8]
        try:
            with Connection(broker_url) as conn:
                channel = conn.channel()
                task_id = publish_revoked(db_url, channel, name)
                proxy.cut_after_reply(marker("broker", "settle"))
                assert channel._claim([name], 5) == []
                if not proxy.wait_cut(0):
                    pytest.fail("harness: the settle statement was not cut")
            assert count(db_url, "SELECT count(*) FROM kojin.messages") == 0
            assert result_states(results_url, task_id) == [("REVOKED",)]
        finally:
            app.close()
