"""Broker-side scheduling, identity and uniqueness (issue 11), at the transport: ETA messages
are held by the database until due, claims never walk them, a due one wakes its consumer by a
timer (not a poll), priorities hold among due ones, and bad input has a clear, documented fate.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from kombu import Connection
from test_transport import consume, kurl, make_queue, publish

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)

#: A polling interval far longer than any wait below: a due message must come by the timer.
NO_POLLING = {"polling_interval": 30}


def eta_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def task_headers(eta: str | None, **more) -> dict:
    return {"id": str(uuid.uuid4()), "task": "t.noop", "eta": eta, **more}


def stored(db_url: str, queue: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT due_at IS NOT NULL, leased_by IS NOT NULL, task_id "
                            "FROM kojin.messages WHERE queue = %s ORDER BY id",
                            (queue,)).fetchall()


def test_eta_message_is_held_by_the_broker_until_due(db_url):
    q = make_queue()
    with Connection(kurl(db_url), transport_options=NO_POLLING) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"later": 1}], headers=task_headers(eta_in(2.5)))
        assert [r[:2] for r in stored(db_url, q.name)] == [(True, False)]
        early = consume(conn, q, 1, timeout=1.5)
        assert early == [], "a scheduled message was delivered before it was due"
        assert [r[:2] for r in stored(db_url, q.name)] == [(True, False)]  # not leased either
        started = time.monotonic()
        got = consume(conn, q, 1, timeout=10)
        waited = time.monotonic() - started
    assert [b for b, _ in got] == [{"later": 1}]
    # woken by the due-time timer: well inside the 30 s polling interval
    assert waited < NO_POLLING["polling_interval"] / 3


def test_due_messages_keep_their_priorities(db_url):
    q = make_queue()
    eta = eta_in(1.5)
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        for priority in (1, 9, 5):
            publish(conn, q, [{"p": priority}], priority=priority, headers=task_headers(eta))
        time.sleep(2.0)
        got = consume(conn, q, 3, timeout=10)
    assert [b["p"] for b, _ in got] == [9, 5, 1]


def test_eta_that_cannot_be_read_or_has_no_timezone_is_delivered_at_once(db_url):
    """Documented: the worker reads such an eta with the app's timezone (or rejects it), which
    the broker does not know; holding it could only make it late."""
    q = make_queue()
    naive = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"eta": "garbage"}], headers=task_headers("not a date"))
        publish(conn, q, [{"eta": "naive"}], headers=task_headers(naive))
        got = consume(conn, q, 2, timeout=5)
    assert sorted(b["eta"] for b, _ in got) == ["garbage", "naive"]


def test_eta_years_ahead_is_scheduled_and_revocable(db_url):
    from kojin_pg.db import Database, Queries
    from kojin_pg.transport.revoke import revoke_tasks

    q = make_queue()
    headers = task_headers((datetime.now(UTC) + timedelta(days=3650)).isoformat())
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"far": 1}], headers=headers)
        assert consume(conn, q, 1, timeout=1) == []
    assert stored(db_url, q.name) == [(True, False, headers["id"])]
    db = Database(kojin_pg.parse(db_url))
    try:
        done = revoke_tasks(db, Queries("broker", "kojin"), "kojin", [headers["id"]])
    finally:
        db.close()
    assert (done.deleted, done.recorded) == (1, 1)
    assert stored(db_url, q.name) == []
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT status FROM kojin.results WHERE task_id = %s",
                         (headers["id"],)).fetchone() == ("REVOKED",)


def test_unique_key_publishes_once_while_queued_and_again_once_taken(db_url):
    q = make_queue()
    big_key = "k" * 10_000  # stored as its digest
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        for i in range(3):
            publish(conn, q, [{"i": i}], kojin_unique_key=big_key)
        assert len(stored(db_url, q.name)) == 1
        (body, _), = consume(conn, q, 1, timeout=5)
        publish(conn, q, [{"i": 3}], kojin_unique_key=big_key)  # the first was taken
        again = consume(conn, q, 1, timeout=5)
    assert body == {"i": 0} and [b for b, _ in again] == [{"i": 3}]


def test_purge_takes_scheduled_messages_too(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"now": 1}])
        publish(conn, q, [{"later": 1}], headers=task_headers(eta_in(600)))
        assert q(conn.channel()).purge() == 2
    assert stored(db_url, q.name) == []
