"""Retries after a lost connection must be idempotent (issue 10 item 5).

kojin_pg's ``Database.run`` retries every ``OperationalError`` on a new connection, and says that
only idempotent work may pass through it: a lost connection can hide a commit. Each test here
loses a connection at the worst moment with a real TCP proxy (``tests/netproxy.py``) between a
kojin_pg process and the real server, driven through kombu's and Celery's public APIs, and
checks the database afterwards. What is cut is said in each docstring.

Harness checks (the cut happened, the scenario was reached) use ``pytest.fail``, apart from the
assertions about the outcome. Each test failed before issue 10's fix.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from celery import Celery, states
from celery.app.task import Context
from kombu import Connection, Consumer, Exchange, Producer, Queue
from netproxy import PgProxy, marker

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)

pytestmark = pytest.mark.timeout(60)

CUT_WAIT = 15  # seconds a harness step may take before the test reports a broken harness


@pytest.fixture
def proxy(db_url):
    with PgProxy.for_url(db_url) as p:
        yield p


def sql_rows(db_url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


def make_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def test_publish_whose_commit_reply_is_lost_is_enqueued_once(db_url, proxy):
    """Cut: the connection that runs the publish INSERT, after the server committed it and
    before its reply (CommandComplete ... ReadyForQuery) reaches the client."""
    q = make_queue("lost_publish_reply")
    with Connection("kojin+" + proxy.url(db_url)) as conn:
        channel = conn.channel()
        q(channel).declare()
        proxy.cut_after_reply(marker("broker", "publish_message"))
        Producer(channel, exchange=q.exchange, routing_key=q.routing_key).publish({"n": 1})
        if not proxy.wait_cut(CUT_WAIT):
            pytest.fail("harness: the publish was not cut")
    rows = sql_rows(db_url, "SELECT count(*) FROM kojin.messages WHERE queue = %s", (q.name,))
    assert rows[0][0] == 1, f"one publish enqueued {rows[0][0]} messages"


@pytest.fixture
def chord_app(db_url, proxy):
    """A Celery app whose result backend reaches PostgreSQL through the proxy; the chord body
    runs eagerly and records each firing in a table (read directly, not through the proxy)."""
    app = Celery("kojin_lost", backend="kojin+" + proxy.url(db_url), broker="memory://",
                 set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=True, result_extended=True)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE fired (group_id text, value jsonb)")

    @app.task(name="record", shared=False)
    def record(values, group_id):
        from psycopg.types.json import Jsonb

        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO fired VALUES (%s, %s)", (group_id, Jsonb(values)))
        return values

    yield app
    app.backend.result_consumer.stop()
    app.backend.db.close()


def test_add_to_chord_whose_commit_reply_is_lost_counts_once(chord_app, db_url, proxy):
    """Cut: the connection that runs ``add_to_chord`` (what Celery calls when a header task
    replaces itself), after the server committed the increment and before its reply reaches the
    client. Then the three parts report, and the body must fire once."""
    backend = chord_app.backend
    gid = str(uuid.uuid4())
    body = chord_app.tasks["record"].s(group_id=gid)
    body.freeze()
    backend.apply_chord((gid, []), body)
    backend.set_chord_size(gid, 2)
    proxy.cut_after_reply(marker("backend", "add_to_chord"))
    backend.add_to_chord(gid, chord_app.AsyncResult(f"{gid}-2"))
    if not proxy.wait_cut(CUT_WAIT):
        pytest.fail("harness: add_to_chord was not cut")
    for index in range(3):
        request = Context(id=f"{gid}-{index}", group=gid, group_index=index, chord=dict(body))
        backend.on_chord_part_return(request, states.SUCCESS, index)
    fired = sql_rows(db_url, "SELECT value FROM fired WHERE group_id = %s", (gid,))
    assert fired == [([0, 1, 2],)], f"3 parts of a chord of 2 + 1 added: body fired {fired}"


@pytest.mark.parametrize("action", ["requeue", "dead_letter"])
def test_late_requeue_or_dead_letter_leaves_the_new_holder_alone(db_url, proxy, action):
    """Cut: consumer A (through the proxy, visibility_timeout 1 s) holds a message and rejects
    it. Its ``requeue`` / ``dead_letter`` request is held back and the network pauses (A's lease
    renewals are held too) until A's lease has lapsed and consumer B (direct connection) has
    taken the message; then A's connection is dropped without the request reaching the server.
    Database.run retries it on a new connection: that late statement must not touch B's lease."""
    name = "late_" + action
    a = Connection("kojin+" + proxy.url(db_url),
                   transport_options={"visibility_timeout": 1, "lease_renew_interval": 0.25})
    b = Connection("kojin+" + db_url)
    taken = []
    try:
        qa, qb = a.SimpleQueue(name), b.SimpleQueue(name)
        qb.put({"n": 1})
        held = qa.get(timeout=10)
        msg_id = held.delivery_tag

        def partition_until_b_takes_it() -> None:
            proxy.pause()
            try:
                deadline = time.monotonic() + CUT_WAIT
                while time.monotonic() < deadline:
                    lapsed = sql_rows(db_url, "SELECT visible_at <= now() FROM kojin.messages "
                                      "WHERE id = %s", (msg_id,))
                    if lapsed and lapsed[0][0]:
                        break
                    time.sleep(0.1)
                taken.append(qb.get(timeout=5))
            finally:
                proxy.resume()

        query = "requeue" if action == "requeue" else "dead_letter"
        proxy.cut_before_send(marker("broker", query), before_close=partition_until_b_takes_it)
        if action == "requeue":
            held.requeue()
        else:
            held.reject(requeue=False)
        if not proxy.wait_cut(CUT_WAIT) or not taken or taken[0].delivery_tag != msg_id:
            pytest.fail(f"harness: B did not take the message during the cut ({taken!r})")
        b_id = b.default_channel.connection.consumer_id
        row = sql_rows(db_url, "SELECT leased_by, visible_at > now() FROM kojin.messages "
                       "WHERE id = %s", (msg_id,))
        dead = sql_rows(db_url, "SELECT count(*) FROM kojin.dead_letters WHERE id = %s",
                        (msg_id,))[0][0]
        assert row == [(b_id, True)] and dead == 0, (
            f"B holds message {msg_id}, but after A's late {action}: row {row}, dead letters {dead}")
        taken[0].ack()
    finally:
        a.release()
        b.release()


def test_ack_landing_during_release_orphans_is_not_redelivered(db_url, proxy, monkeypatch):
    """Cut: consumer A (through the proxy) holds M1 unacked; A's next claim (which leases M2)
    commits and its reply is lost, so ``Database.run`` retries it, first calling
    ``release_orphans`` to hand back leases the lost attempt took. A acks M1 exactly between
    ``release_orphans`` reading the pending acks and reading the held ids: the interleaving is
    forced by running the ack when ``release_orphans`` asks for the held ids (a wrapper around
    ``Transport.held_ids``, only on that retry). The ack's own DELETE is held in the proxy
    until the retried claim has run, as a busy lease thread may delay it. M1 must not come back.
    """
    q = make_queue("orphans")
    got: list = []
    with Connection("kojin+" + proxy.url(db_url)) as a, Connection("kojin+" + db_url) as b:
        channel = a.channel()
        q(channel).declare()
        producer = Producer(b.channel(), exchange=q.exchange, routing_key=q.routing_key)
        producer.publish({"m": 1})
        transport = a.transport
        acked_in_between: list[int] = []
        armed: list[bool] = []
        real_held_ids = transport.held_ids

        def held_ids_with_an_ack_landing() -> list[int]:
            if armed and not acked_in_between:
                first = got[0]
                first.ack()  # the worker finishes M1 right now
                acked_in_between.append(first.delivery_tag)
            return real_held_ids()

        monkeypatch.setattr(transport, "held_ids", held_ids_with_an_ack_landing)
        with Consumer(channel, [q], callbacks=[lambda body, m: got.append(m)]):
            deadline = time.monotonic() + CUT_WAIT
            while not got and time.monotonic() < deadline:
                try:
                    a.drain_events(timeout=1)
                except TimeoutError:
                    pass
            if [m.payload for m in got] != [{"m": 1}]:
                pytest.fail(f"harness: M1 was not delivered ({got!r})")
            proxy.hold(marker("broker", "ack"))
            proxy.cut_after_reply(marker("broker", "claim"), before_close=lambda: armed.append(True))
            producer.publish({"m": 2})
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    a.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
            proxy.release()
            if not proxy.wait_cut(0) or not acked_in_between:
                pytest.fail("harness: the claim was not cut, or no ack landed in release_orphans")
            bodies = [m.payload for m in got]
            assert bodies == [{"m": 1}, {"m": 2}], f"A acked M1 once, then received {bodies}"
