"""Hand-off at publish (issue 12): an idle consumer's offer, filled by a publish's statement.

A consumer on kombu's real Hub, as Celery's worker runs it, against a real PostgreSQL. These
tests check that a publish to an idle consumer reaches it with no claim, and that the hand-off
keeps the delivery promises: a dead consumer takes nothing, the prefetch window is never
overfilled, and a message handed off to a consumer that never hears of it comes back (after a
session lost at the wrong moment, or a close). Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from kombu import Connection, Producer
from test_claimer import (
    BOUND,
    Events,
    LoopConsumer,
    in_background,
    make_queue,
    publish,
    rows,
    run_loop_until,
    take_at_once,
    wait_until,
)

from kojin_pg.transport.offers import HANDOFF_MAX_BYTES, offer_space

pytestmark = pytest.mark.timeout(120)


def offers_of(db_url: str, consumer: str) -> int:
    """How many open offers ``consumer`` has."""
    with psycopg.connect(db_url) as pg:
        return pg.execute("SELECT count(*) FROM kojin.offers WHERE consumer = %s"
                          " AND token IS NOT NULL", (consumer,)).fetchone()[0]


def offer_rows(db_url: str, consumer: str) -> int:
    with psycopg.connect(db_url) as pg:
        return pg.execute("SELECT count(*) FROM kojin.offers WHERE consumer = %s",
                          (consumer,)).fetchone()[0]


def leased(db_url: str, q: Any) -> list[tuple[str | None, int]]:
    """(leased_by, delivery_count) of the messages of ``q``, by id."""
    with psycopg.connect(db_url) as pg:
        return pg.execute("SELECT leased_by, delivery_count FROM kojin.messages "
                          "WHERE queue = %s ORDER BY id", (q.name,)).fetchall()


@pytest.fixture
def events() -> Events:
    return Events()


def idle_consumer(db_url: str, events: Events, q: Any, **kwargs: Any) -> LoopConsumer:
    """A consumer of ``q`` on the Hub, run until it has offered a slot."""
    consumer = LoopConsumer(db_url, events, **kwargs)
    consumer.consume(q)
    consumer.start()
    assert run_loop_until(consumer.hub, lambda: offers_of(db_url, consumer.transport.consumer_id)
                          == 1), "the idle consumer made no offer"

    def round_over() -> bool:  # the round that offered has been delivered: the loop is idle
        s = consumer.transport.claimer._state.peek()
        return s is None or not (s.busy or s.results)
    assert run_loop_until(consumer.hub, round_over)
    return consumer


def test_an_idle_consumer_gets_a_publish_with_no_claim(db_url, events):
    q = make_queue()
    consumer = idle_consumer(db_url, events, q)
    try:
        publish(db_url, q, [{"i": 1}])
        me = consumer.transport.consumer_id
        # handed off in the publish's statement: leased to this consumer (which no claim can
        # take from it) as its first delivery, before the loop ran again
        assert leased(db_url, q) == [(me, 1)]
        assert run_loop_until(consumer.hub, lambda: consumer.got)
        assert consumer.got == [(q.name, {"i": 1})]
        # the slot is offered again, and the ack rides on that round's claim
        assert run_loop_until(consumer.hub, lambda: offers_of(db_url, me) == 1
                              and rows(db_url, q) == [])
    finally:
        consumer.close()
    assert offer_rows(db_url, me) == 0  # closing deleted its row


def test_a_dead_consumers_offer_takes_nothing_and_is_swept(db_url):
    """An offer whose consumer's LISTEN session is gone (nobody holds its live lock)."""
    q = make_queue()
    with psycopg.connect(db_url, autocommit=True) as pg:
        pg.execute("INSERT INTO kojin.offers (slot, token, consumer, queues, notify_channel,"
                   " lease, live_key) VALUES (gen_random_uuid(), gen_random_uuid(), 'ghost', %s,"
                   " 'kojin_offer_ghost', '30 min', 12345)", ([q.name],))
    publish(db_url, q, [{"i": 1}])
    assert leased(db_url, q) == [(None, 0)]  # queued as usual, for any consumer
    assert take_at_once(db_url, q, 1) == [({"i": 1}, 1)]
    from kojin_pg.db import Queries
    with psycopg.connect(db_url, autocommit=True) as pg:
        pg.execute(Queries("broker", "kojin").sweep_offers, {"offer_space": offer_space("kojin")})
        assert pg.execute("SELECT count(*) FROM kojin.offers").fetchone() == (0,)


def test_a_large_message_takes_the_ordinary_path(db_url, events):
    q = make_queue()
    consumer = idle_consumer(db_url, events, q)
    try:
        big = {"blob": "x" * HANDOFF_MAX_BYTES}
        publish(db_url, q, [big])
        assert leased(db_url, q) == [(None, 0)]  # not handed off: claimed after its NOTIFY
        assert run_loop_until(consumer.hub, lambda: consumer.got)
        assert consumer.got == [(q.name, big)]
    finally:
        consumer.close()


def test_hand_offs_never_overfill_the_prefetch_window(db_url, events):
    """Unacked messages hold their slots: with two slots, two are delivered, whether handed
    off or claimed, and the rest wait in the queue until a slot frees."""
    q = make_queue()
    held: list[Any] = []
    consumer = LoopConsumer(db_url, events, prefetch=2)
    consumer.consume(q, ack=False)
    consumer.consumers[q.name].callbacks = [lambda body, message: (consumer.got.append(body),
                                                                   held.append(message))]
    consumer.start()
    me = consumer.transport.consumer_id
    try:
        assert run_loop_until(consumer.hub, lambda: offers_of(db_url, me) == 1)
        with Connection("kojin+" + db_url) as conn:
            producer = Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                                serializer="json")
            for i in range(5):
                producer.publish({"i": i})
                for _ in range(20):  # let the loop take what it is sent
                    consumer.hub.run_once()
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
        for _ in range(50):
            consumer.hub.run_once()
        assert len(consumer.got) == 2
        assert offers_of(db_url, me) == 0
        assert [by for by, _ in leased(db_url, q)] == [me, me, None, None, None]
        for expected in (4, 5):
            for message in held:
                message.ack()
            held.clear()
            assert run_loop_until(consumer.hub, lambda n=expected: len(consumer.got) == n)
            assert len(held) <= 2
        for message in held:
            message.ack()
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert sorted(body["i"] for body in consumer.got) == [0, 1, 2, 3, 4]


def test_a_hand_off_whose_session_dies_comes_back(db_url, events):
    """The consumer's LISTEN session dies after a publish found its offer alive and before the
    publish committed: the NOTIFY that carried the message went nowhere. The consumer listens
    anew, withdraws its old offers and hands back the lease it never received; the message is
    delivered once."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q)
    me = consumer.transport.consumer_id
    stall_key = 4343
    with psycopg.connect(db_url, autocommit=True) as admin, psycopg.connect(db_url) as holder:
        admin.execute(
            "CREATE FUNCTION kojin.stall_publish() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_advisory_xact_lock_shared({stall_key}); RETURN NULL; END $$")
        admin.execute("CREATE TRIGGER stall_publish AFTER INSERT ON kojin.messages "
                      "FOR EACH STATEMENT EXECUTE FUNCTION kojin.stall_publish()")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (stall_key,))
        listener_pid = consumer.transport.wakeups.listener._session.get().conn.info.backend_pid

        def control() -> None:
            assert wait_until(lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (holder.info.backend_pid,)).fetchone()[0] == 1), "the publish never waited"
            admin.execute("SELECT pg_terminate_backend(%s)", (listener_pid,))
            holder.commit()

        try:
            # the publish stalls inside its statement, the offer taken, until control releases
            with in_background(control, _Release(holder)):
                publish(db_url, q, [{"i": 2}])
            assert leased(db_url, q)[-1] == (me, 1)  # leased to the consumer, never heard
            assert run_loop_until(consumer.hub, lambda: consumer.got, bound=BOUND * 2)
            assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        finally:
            admin.execute("DROP TRIGGER stall_publish ON kojin.messages")
            consumer.close()
    assert consumer.got == [(q.name, {"i": 2})]


class _Release:
    """What :func:`in_background` releases when its work ends: the stalling session's lock."""

    def __init__(self, holder: psycopg.Connection[Any]) -> None:
        self.holder = holder

    def release(self) -> None:
        self.holder.commit()


def test_closing_hands_back_what_was_handed_off_and_not_received(db_url, events):
    q = make_queue()
    consumer = idle_consumer(db_url, events, q)
    me = consumer.transport.consumer_id
    publish(db_url, q, [{"i": 1}])
    assert leased(db_url, q) == [(me, 1)]
    consumer.close()  # before the loop read the NOTIFY
    assert offer_rows(db_url, me) == 0
    assert leased(db_url, q) == [(None, 0)]  # back, and the delivery does not count
    assert take_at_once(db_url, q, 1) == [({"i": 1}, 1)]


def test_a_claim_leaves_room_for_a_hand_off_on_its_way(db_url, events):
    """A publish took the offer of a consumer with one free slot, and the loop has not read the
    NOTIFY yet when the claim thread claims (a wake-up for another publish): the claim must
    leave that slot to the message on its way, or the window would hold two."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=1)
    me = consumer.transport.consumer_id
    try:
        publish(db_url, q, [{"i": 1}, {"i": 2}])
        assert leased(db_url, q) == [(me, 1), (None, 0)]  # the first handed off
        # what the claim thread runs on a wake-up (here, on the test's thread)
        assert consumer.transport._claim_on_thread(consumer.channel, [q.name], 1) == []
        assert leased(db_url, q) == [(me, 1), (None, 0)]
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
    finally:
        consumer.close()
    assert [b["i"] for _, b in consumer.got] == [1, 2]
