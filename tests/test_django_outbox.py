"""The outbox in Django (kojin_pg.contrib.django.outbox), in real ``transaction.atomic`` blocks.

Django's real connection (psycopg 3) to each test's fresh database, kojin_pg's tables in schema
``jobs`` behind the ``kojin`` alias; a real kombu consumer waits on the queue and polls only
every 600 s, so only a wake-up reaches it within the tests' bounds (test_transport's
``waiting_consumer``).
"""

from __future__ import annotations

import psycopg
import pytest
from bounded import until
from test_transport import heard_during, make_queue, waiting_consumer

import kojin_pg  # noqa: F401  (registers the kojin+ broker URL scheme)
from kojin_pg.db.channels import messages_channel

pytestmark = pytest.mark.timeout(120)

#: The channel the broker in schema ``jobs`` announces queues on.
CHANNEL = messages_channel("jobs")


def plain(kojin_url: str) -> str:
    """``kojin_url`` without kojin_pg's options, for psycopg."""
    return kojin_url.split("?")[0]


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

    def fail() -> None:
        with pytest.raises(RuntimeError), transaction.atomic(using="kojin"):
            send_task(celery_app, "proj.ship", args=("failed",), queue="orders")
            raise RuntimeError("the business transaction fails")

    def commit() -> None:
        with transaction.atomic(using="kojin"):
            for i in range(2):
                send_task(celery_app, "proj.ship", args=(i,), queue="orders")
            assert wakeups_left() == 0, "the commit was left a wake-up"

    got: list = []
    with waiting_consumer(kojin_url, make_queue("orders"), 2, got):
        assert heard_during(plain(kojin_url), CHANNEL, fail) == []
        heard = heard_during(plain(kojin_url), CHANNEL, commit)
        assert heard == ["orders"], f"announced {heard} for one queue's sends"
        assert until(lambda: len(got) == 2), "the idle consumer was not woken"
    assert sorted(body[0] for body, _ in got) == [[0], [1]]


def test_a_send_in_a_savepoint_rolled_back_is_neither_delivered_nor_announced(celery_app,
                                                                             kojin_url):
    """A nested ``atomic`` that rolls back takes its send with it, and Django drops its
    wake-up (each wake-up is a transaction of its own: two would be heard twice); the outer
    block's send is delivered, and nothing else within the consumer's 5 s."""
    from django.db import transaction

    from kojin_pg.contrib.django.outbox import send_task

    def send() -> None:
        with transaction.atomic(using="kojin"):
            send_task(celery_app, "proj.ship", args=("kept",), queue="orders")
            with pytest.raises(RuntimeError), transaction.atomic(using="kojin"):
                send_task(celery_app, "proj.ship", args=("dropped",), queue="orders")
                raise RuntimeError("the savepoint fails")

    got: list = []
    with waiting_consumer(kojin_url, make_queue("orders"), 2, got, timeout=5):
        heard = heard_during(plain(kojin_url), CHANNEL, send)
        assert until(lambda: len(got) == 1), "the idle consumer was not woken"
    assert heard == ["orders"], f"announced {heard}"
    assert [body[0] for body, _ in got] == [["kept"]]
    with psycopg.connect(plain(kojin_url)) as pg:
        assert pg.execute("SELECT count(*) FROM jobs.messages WHERE "
                          "payload->'headers'->>'argsrepr' LIKE '%dropped%'").fetchone() == (0,)


def test_a_send_outside_an_atomic_block_commits_and_wakes_at_once(celery_app, kojin_url):
    """In Django's autocommit mode the send commits by itself and the wake-up follows it."""
    from kojin_pg.contrib.django.outbox import send_task

    got: list = []
    with waiting_consumer(kojin_url, make_queue("orders"), 1, got):
        send_task(celery_app, "proj.ship", args=("now",), queue="orders")
        assert until(lambda: len(got) == 1), "the idle consumer was not woken"
    assert [body[0] for body, _ in got] == [["now"]]
