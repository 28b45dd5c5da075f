"""The outbox in Django (kojin_pg.contrib.django.outbox), in real ``transaction.atomic`` blocks.

Django's real connection (psycopg 3) to each test's fresh database, kojin_pg's tables in schema
``jobs`` behind the ``kojin`` alias; a real kombu consumer waits on the queue and polls only
every 600 s, so only a wake-up reaches it within the tests' bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from bounded import until
from kombu import Connection, Exchange, Queue

import kojin_pg  # noqa: F401  (registers the kojin+ broker URL scheme)
from kojin_pg.db.channels import messages_channel

pytestmark = pytest.mark.timeout(120)


@contextmanager
def idle_consumer(kojin_url: str, queue: str, got: list) -> Iterator[Connection]:
    """A kombu consumer of ``queue`` on a thread, appending bodies to ``got`` and acking, idle
    on LISTEN when the block starts (it polls every 600 s); stopped at the end."""
    q = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)
    stop = threading.Event()
    with Connection("kojin+" + kojin_url + "&polling_interval=600") as conn:
        q(conn.channel()).declare()

        def consume() -> None:
            def on_message(body, message) -> None:
                got.append(body)
                message.ack()

            with conn.Consumer([q], callbacks=[on_message], accept=["json"]):
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass

        th = threading.Thread(target=consume, daemon=True)
        th.start()
        time.sleep(1.0)  # idle on LISTEN by now
        try:
            yield conn
        finally:
            stop.set()
            th.join(10)


@contextmanager
def listening(kojin_url: str) -> Iterator[list[str]]:
    """The queue names announced on the broker's channel while the block runs (read at its
    end)."""
    heard: list[str] = []
    with psycopg.connect(kojin_url.split("?")[0], autocommit=True) as listen:
        listen.execute(f'LISTEN "{messages_channel("jobs")}"')
        yield heard
        heard.extend(n.payload for n in listen.notifies(timeout=0.5))


def wakeups_left(alias: str = "kojin") -> int:
    """The outbox_wakeups rows the Django connection's transaction holds for its commit."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute("SELECT count(*) FROM jobs.outbox_wakeups")
        return int(cur.fetchone()[0])


def test_a_send_in_an_atomic_block_wakes_the_idle_consumer_after_the_commit(celery_app,
                                                                            kojin_url):
    """The send is written in the block, commits with it, and wakes the idle consumer after
    the commit (nothing is left for the commit to announce); a block that raises delivers
    and announces nothing."""
    from django.db import transaction

    from kojin_pg.contrib.django.outbox import send_task

    got: list = []
    with idle_consumer(kojin_url, "orders", got):
        with listening(kojin_url) as heard_failed:
            with pytest.raises(RuntimeError), transaction.atomic(using="kojin"):
                send_task(celery_app, "proj.ship", args=("failed",), queue="orders")
                raise RuntimeError("the business transaction fails")
        assert heard_failed == []
        with listening(kojin_url) as heard:
            with transaction.atomic(using="kojin"):
                for i in range(2):
                    send_task(celery_app, "proj.ship", args=(i,), queue="orders")
                assert wakeups_left() == 0, "the commit was left a wake-up"
        assert heard == ["orders"], f"announced {heard} for one queue's sends"
        assert until(lambda: len(got) == 2), "the idle consumer was not woken"
    assert sorted(body[0] for body in got) == [[0], [1]]


def test_a_send_in_a_savepoint_rolled_back_is_neither_delivered_nor_announced(celery_app,
                                                                             kojin_url):
    """A nested ``atomic`` that rolls back takes its send with it, and Django drops its
    wake-up (each wake-up is a transaction of its own: two would be heard twice); the outer
    block's send is delivered."""
    from django.db import transaction

    from kojin_pg.contrib.django.outbox import send_task

    got: list = []
    with idle_consumer(kojin_url, "orders", got), listening(kojin_url) as heard:
        with transaction.atomic(using="kojin"):
            send_task(celery_app, "proj.ship", args=("kept",), queue="orders")
            with pytest.raises(RuntimeError), transaction.atomic(using="kojin"):
                send_task(celery_app, "proj.ship", args=("dropped",), queue="orders")
                raise RuntimeError("the savepoint fails")
        assert until(lambda: len(got) == 1), "the idle consumer was not woken"
    assert heard == ["orders"], f"announced {heard}"
    assert [body[0] for body in got] == [["kept"]]
    with psycopg.connect(kojin_url.split("?")[0]) as pg:
        assert pg.execute("SELECT count(*) FROM jobs.messages WHERE "
                          "payload->'headers'->>'argsrepr' LIKE '%dropped%'").fetchone() == (0,)


def test_a_send_outside_an_atomic_block_commits_and_wakes_at_once(celery_app, kojin_url):
    """In Django's autocommit mode the send commits by itself and the wake-up follows it."""
    from kojin_pg.contrib.django.outbox import send_task

    got: list = []
    with idle_consumer(kojin_url, "orders", got):
        send_task(celery_app, "proj.ship", args=("now",), queue="orders")
        assert until(lambda: len(got) == 1), "the idle consumer was not woken"
    assert [body[0] for body in got] == [["now"]]
