"""What a publish or a store that returned has written survives a crash of the server.

A publish or store that announces commits its write and its announcement without waiting for
the WAL flush, then waits for a flush in a second transaction before it returns (sql/0013). If
that second transaction did not wait (a transaction that writes no WAL commits without waiting,
whatever ``synchronous_commit`` says), the caller would be told of writes that a crash then
loses. Here the server is stopped with ``immediate`` while writes that announce flow: its
processes quit without writing out the WAL they hold in memory, as in a crash (the test server
runs with ``fsync`` off, so what was written to the operating system survives; a write that was
never written out does not). Every write that returned before must be there afterwards.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from bounded import until
from kombu import Connection, Producer
from test_claimer import make_queue

from kojin_pg.backend.waiters import wait_slot
from kojin_pg.transport.idle import idle_space, queue_key

pytestmark = pytest.mark.timeout(180)

#: Writes that must have returned before the crash.
BEFORE_THE_CRASH = 200


def returned_before_a_crash(pg_server: Any, write: Callable[[int], None]) -> list[int]:
    """Run ``write(0)``, ``write(1)``, ... on a thread; once ``BEFORE_THE_CRASH`` have
    returned, stop the server with ``immediate`` under it and start it again. The numbers
    whose write returned before the stop began."""
    returned: list[int] = []
    crashing = threading.Event()

    def writer() -> None:
        i = 0
        while not crashing.is_set():
            try:
                write(i)
            except Exception:  # the crash: the writes that returned are what counts
                return
            if not crashing.is_set():
                returned.append(i)
            i += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert until(lambda: len(returned) >= BEFORE_THE_CRASH, bound=60), "the writes did not flow"
    crashing.set()
    counted = list(returned)
    pg_server.embedded.restart("immediate")
    thread.join(60)
    assert not thread.is_alive(), "the writer never came back from the crash"
    return counted


@pytest.fixture
def embedded(pg_server: Any) -> Any:
    if pg_server.embedded is None:
        pytest.skip("needs the embedded server to crash it (KOJIN_PG_TEST_URL is set)")
    return pg_server


def test_every_announced_publish_that_returned_survives_a_crash(embedded, db_url):
    q = make_queue()
    name = q.name
    with Connection(f"kojin+{db_url}?synchronous_commit=on") as conn, \
            psycopg.connect(db_url, autocommit=True) as idle:
        q(conn.channel()).declare()
        # as an idle consumer does: every publish to the queue announces
        idle.execute("SELECT pg_advisory_lock(%s, %s)", (idle_space("kojin"), queue_key(name)))
        producer = Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                            serializer="json", auto_declare=False)
        returned = returned_before_a_crash(
            embedded, lambda i: producer.publish({}, headers={"i": i}))
    with psycopg.connect(db_url) as pg:
        kept = {int(i) for (i,) in pg.execute(
            "SELECT payload->'headers'->>'i' FROM kojin.messages WHERE queue = %s", (name,))}
    lost = sorted(set(returned) - kept)
    assert not lost, f"{len(lost)} publishes that returned were lost in the crash: {lost[:10]}"


def test_every_announced_store_that_returned_survives_a_crash(embedded, make_app, db_url):
    backend = make_app(result_backend_transport_options={"synchronous_commit": "on"}).backend
    ids = [str(uuid.uuid4()) for _ in range(BEFORE_THE_CRASH * 20)]
    with psycopg.connect(db_url, autocommit=True) as waiter:
        # as a waiting process does: every store announces
        waiter.execute("SELECT count(pg_advisory_lock_shared(%s, s)) FROM unnest(%s::int[]) s",
                       (backend.wait_space, sorted({wait_slot(t) for t in ids})))
        returned = returned_before_a_crash(embedded, lambda i: backend.mark_as_done(ids[i], i))
    with psycopg.connect(db_url) as pg:
        kept = {row[0] for row in pg.execute(
            "SELECT task_id FROM kojin.results WHERE task_id = ANY(%s)",
            ([ids[i] for i in returned],))}
    lost = [i for i in returned if ids[i] not in kept]
    assert not lost, f"{len(lost)} stores that returned were lost in the crash: {lost[:10]}"
