"""Hand-off at publish (issue 12): an idle consumer's offer, filled by a publish's statement.

A consumer on kombu's real Hub, as Celery's worker runs it, against a real PostgreSQL. These
tests check that a publish to an idle consumer reaches it with no claim, and that the hand-off
keeps the delivery promises: a dead consumer takes nothing, the prefetch window is never
overfilled, and a message handed off to a consumer that never hears of it comes back (after a
session lost at the wrong moment, or a close). Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from bounded import until
from kombu import Connection, Producer
from syncrep import standby_never_confirms
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
)

from kojin_pg.transport import offers as offers_module
from kojin_pg.transport.offers import HANDOFF_MAX_BYTES, offer_space

pytestmark = pytest.mark.timeout(120)


def open_slots(db_url: str, consumer: str) -> int:
    """How many slots ``consumer`` offers now."""
    with psycopg.connect(db_url) as pg:
        return pg.execute("SELECT coalesce(sum(open_slots), 0) FROM kojin.offers"
                          " WHERE consumer = %s AND token IS NOT NULL", (consumer,)).fetchone()[0]


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


def stall_inserts(admin: psycopg.Connection[Any], holder: psycopg.Connection[Any], key: int,
                  *, handed_off_only: bool = False) -> None:
    """Make every insert into the messages (with ``handed_off_only``, a hand-off's only) wait
    inside its statement until ``holder``, which takes the advisory lock ``key`` now, commits.
    The caller drops the trigger ``stall_inserts`` when done."""
    admin.execute(
        "CREATE FUNCTION kojin.stall_inserts() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN PERFORM pg_advisory_xact_lock_shared({int(key)}); RETURN NULL; END $$")
    admin.execute("CREATE TRIGGER stall_inserts AFTER INSERT ON kojin.messages FOR EACH ROW "
                  + ("WHEN (NEW.leased_by IS NOT NULL) " if handed_off_only else "")
                  + "EXECUTE FUNCTION kojin.stall_inserts()")
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))


def idle_consumer(db_url: str, events: Events, q: Any, *, ack: bool = True,
                  **kwargs: Any) -> LoopConsumer:
    """A consumer of ``q`` on the Hub, run until it has offered a slot."""
    consumer = LoopConsumer(db_url, events, **kwargs)
    consumer.consume(q, ack=ack)
    consumer.start()
    assert run_loop_until(consumer.hub, lambda: open_slots(db_url,
                                                           consumer.transport.consumer_id)
                          == consumer.channel.claim_size()), "the idle consumer made no offer"

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
        # the offer keeps its other slots open, and the ack buffer applies the ack
        assert open_slots(db_url, me) == 99  # of the 100 the idle consumer offered
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
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
        assert run_loop_until(consumer.hub, lambda: open_slots(db_url, me) == 2)
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
        assert open_slots(db_url, me) == 0
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
        stall_inserts(admin, holder, stall_key)
        listener_pid = consumer.transport.wakeups.listener._session.get().conn.info.backend_pid

        def control() -> None:
            assert until(lambda: admin.execute(
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
            admin.execute("DROP TRIGGER stall_inserts ON kojin.messages")
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
        assert consumer.transport._claim_on_thread(consumer.channel, [q.name], 1) == ([], 0)
        assert leased(db_url, q) == [(me, 1), (None, 0)]
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
    finally:
        consumer.close()
    assert [b["i"] for _, b in consumer.got] == [1, 2]


def test_a_hand_off_delivered_after_the_claim_was_planned_keeps_its_slot(db_url, events):
    """The loop planned a claim for its one free slot; before the claim thread withdrew the
    offer, a publish took it and the loop delivered the hand-off. The slot the plan counted is
    taken now: the claim must take nothing, or the window would hold two."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=1, ack=False)
    try:
        [ask] = consumer.transport._claim_plan(None)  # on the loop: one slot free
        publish(db_url, q, [{"i": 1}, {"i": 2}])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 1)
        # the planned claim, run now (what the claim thread does after the loop went on)
        assert consumer.transport._claim_on_thread(*ask) == ([], 0)
        assert [by for by, _ in leased(db_url, q)] == [consumer.transport.consumer_id, None]
    finally:
        consumer.close()


def offer_token(db_url: str, consumer: str) -> Any:
    """The token of ``consumer``'s open offer (on every row of it with a slot still open)."""
    with psycopg.connect(db_url) as pg:
        (token,), = pg.execute("SELECT DISTINCT token FROM kojin.offers WHERE consumer = %s"
                               " AND token IS NOT NULL", (consumer,)).fetchall()
        return token


def settle(consumer: LoopConsumer, turns: int = 50) -> None:
    """Let the loop take and answer everything it was sent (rounds included)."""
    for _ in range(turns):
        consumer.hub.run_once()


def test_one_offer_takes_as_many_publishes_as_the_consumer_has_free_slots(db_url, events):
    """A drained consumer with four free slots offers all four at once: four publishes fill
    them with no statement of the consumer's between them, and a fifth waits in the queue."""
    q = make_queue()
    held: list[Any] = []
    consumer = idle_consumer(db_url, events, q, prefetch=4, ack=False)
    consumer.consumers[q.name].callbacks = [lambda body, message: (consumer.got.append(body),
                                                                   held.append(message))]
    me = consumer.transport.consumer_id
    try:
        token = offer_token(db_url, me)
        publish(db_url, q, [{"i": 0}])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 1)
        settle(consumer)
        assert offer_token(db_url, me) == token  # the same offer, not made again
        publish(db_url, q, [{"i": i} for i in range(1, 5)])  # the loop does not run meanwhile
        assert [by for by, _ in leased(db_url, q)] == [me, me, me, me, None]
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 4)
        settle(consumer)
        assert len(consumer.got) == 4 and open_slots(db_url, me) == 0  # the window is full
        for message in held:
            message.ack()
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 5)
        held[-1].ack()
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert sorted(body["i"] for body in consumer.got) == [0, 1, 2, 3, 4]


def test_an_offer_running_low_is_topped_up_and_never_runs_out(db_url, events):
    """A consumer that keeps up, fed one message at a time, used up its offer every prefetch
    window's worth of publishes and made a new one; a publish that came before the new offer
    was committed missed it, was announced and waited for a claim, and the claims that followed
    withdrew the new offer (in a prefork worker fed one task at a time, traced: 2 or 3 tasks in
    every 63 took 3-7 ms more). Once a quarter of its slots are left, the offer gets the slots
    freed since it was made: one offer takes every publish."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    me = consumer.transport.consumer_id
    sent = 10
    try:
        token = offer_token(db_url, me)
        for i in range(sent):
            publish(db_url, q, [{"i": i}])
            assert leased(db_url, q) == [(me, 1)], f"publish {i} was not handed off"
            assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
            settle(consumer)
            assert offer_token(db_url, me) == token, f"the offer ran out after {i + 1}"
        assert open_slots(db_url, me) <= 4
    finally:
        consumer.close()
    assert [body["i"] for _, body in consumer.got] == list(range(sent))


def test_publishes_take_the_offers_of_idle_consumers_in_turn(db_url, events):
    """Two idle consumers, four free slots each: four publishes go two to each, as blocked
    BRPOPs are served in turn, not all to the first offer found."""
    q = make_queue()
    a = idle_consumer(db_url, events, q, prefetch=4, ack=False)
    b = idle_consumer(db_url, events, q, prefetch=4, ack=False)
    try:
        publish(db_url, q, [{"i": i} for i in range(4)])
        by = Counter(who for who, _ in leased(db_url, q))
        assert by == {a.transport.consumer_id: 2, b.transport.consumer_id: 2}
        assert run_loop_until(a.hub, lambda: len(a.got) == 2)
        assert run_loop_until(b.hub, lambda: len(b.got) == 2)
    finally:
        a.close()
        b.close()


def test_a_claim_cut_short_by_hand_offs_on_their_way_claims_when_they_arrive(db_url, events):
    """A publish announced its message while another filled the consumer's one free slot (it
    skipped the offer, locked by the other): the claim the announcement caused must leave the
    slot to the hand-off on its way, so it claims nothing. The announcement is used up by then;
    the consumer must still claim the message once the hand-off has arrived and been acked."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=1)
    stall_key = 4344
    with psycopg.connect(db_url, autocommit=True) as admin, psycopg.connect(db_url) as holder:
        stall_inserts(admin, holder, stall_key, handed_off_only=True)

        def blocked(what: str) -> bool:
            return admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid))"
                " > 0 AND query LIKE %s", (what,)).fetchone()[0] == 1

        try:
            # the first publish fills the slot and stalls before its commit, holding the offer
            with in_background(lambda: publish(db_url, q, [{"i": 1}]), _Release(holder)):
                assert until(lambda: blocked("%publish_message(%")), "the hand-off never waited"
                publish(db_url, q, [{"i": 2}])  # skips the locked offer: announced
                assert [by for by, _ in leased(db_url, q)] == [None]
                # the announcement's claim withdraws the offer, waiting for the first publish
                assert run_loop_until(consumer.hub, lambda: blocked("%open_slots = 0%"))
                holder.commit()
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
            assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        finally:
            admin.execute("DROP TRIGGER stall_inserts ON kojin.messages")
            consumer.close()
    assert [body["i"] for _, body in consumer.got] == [1, 2]


def test_a_listen_session_replaced_off_the_loop_is_watched_again(db_url, events):
    """The LISTEN session died and the claim thread (a statement on it, then listening again)
    replaced it before the loop read the dead socket: the loop's poller never hears of the old
    socket again, nor of the new one. The new session makes offers live (its lock) and takes
    the publishers' announcements; a loop that did not watch it would never hear a hand-off."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q)
    listener = consumer.transport.wakeups.listener
    try:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)",
                          (listener._session.get().conn.info.backend_pid,))
        # off the loop, as the claim thread's idle.enter() does: the statement finds the
        # session dead and closes it, and the next use listens on a new one
        assert not listener.run(lambda conn: conn.execute("SELECT 1"))
        listener._session.get().retry_at = 0.0
        assert listener.ensure()
        publish(db_url, q, [{"i": 1}])
        assert run_loop_until(consumer.hub, lambda: consumer.got)
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1})]


def test_publishes_in_flight_at_once_both_hand_off_to_one_idle_consumer(db_url, events):
    """A publish that fills a slot locks the row of the offer until it commits. With the
    offer on one row, a second publish meanwhile skipped it and took the ordinary path: an
    announcement, then the consumer's withdraw, claim and new offer (three statements where a
    hand-off needs none). Publishers that send at once, as a web application's do, mostly
    missed the offer (8 caller threads: 65% of their publishes). The offer is spread over
    several rows, so the second publish fills another."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    me = consumer.transport.consumer_id
    with psycopg.connect(db_url, autocommit=True) as admin, psycopg.connect(db_url) as holder:
        stall_inserts(admin, holder, 4345, handed_off_only=True)

        def stalled() -> int:  # publishes stalled in their hand-off's insert
            return admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid))"
                " > 0 AND query LIKE %s", ("%publish_message(%",)).fetchone()[0]

        try:
            with in_background(lambda: publish(db_url, q, [{"i": 1}]), _Release(holder)):
                assert until(lambda: stalled() == 1), "the first hand-off never waited"
                with in_background(lambda: publish(db_url, q, [{"i": 2}]), _Release(holder)):
                    # stalled as a hand-off too, or committed as an ordinary publish
                    assert until(lambda: stalled() == 2 or leased(db_url, q))
                    assert leased(db_url, q) == [] and stalled() == 2, \
                        "the second publish took the ordinary path"
                    holder.commit()
            assert [by for by, _ in leased(db_url, q)] == [me, me]
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
            assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        finally:
            admin.execute("DROP TRIGGER stall_inserts ON kojin.messages")
            consumer.close()
    assert sorted(body["i"] for _, body in consumer.got) == [1, 2]


def test_a_claim_beside_an_open_offer_leaves_it_open(db_url, events):
    """An idle consumer's offer is open and the loop hears of a message that took the ordinary
    path (too large to hand off). The offer still had a slot to spare beside it, freed by an
    ack. The claim used to withdraw the offer first and make a new one after: two statements
    more, and a window in which every publish missed the offer, was announced and caused the
    next such round (in a prefork worker fed by one publisher, 780 announced claims for 2,000
    tasks). The claim takes the spare slot and the offer stays as it is."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    me = consumer.transport.consumer_id
    try:
        token = offer_token(db_url, me)
        publish(db_url, q, [{"i": 1}])  # handed off, delivered and acked: a slot to spare
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        big = {"blob": "x" * HANDOFF_MAX_BYTES}
        publish(db_url, q, [big])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        settle(consumer)
        assert offer_token(db_url, me) == token, "the claim withdrew the open offer"
        assert open_slots(db_url, me) == 3
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1}), (q.name, big)]


def count_polling_rounds(consumer: LoopConsumer, monkeypatch: Any) -> Counter[str]:
    """A counter of ``consumer``'s polling rounds from now on (``rounds["polling"]``)."""
    offers = consumer.transport.offers
    check_late = offers.check_late
    rounds: Counter[str] = Counter()

    def counted() -> bool:  # called once by each polling round
        rounds["polling"] += 1
        return check_late()
    monkeypatch.setattr(offers, "check_late", counted)
    return rounds


def test_a_polling_round_leaves_an_open_offer_open(db_url, events, monkeypatch):
    """The polling round looks for hand-offs lost on their way. It used to withdraw the open
    offer to learn how many of its slots publishes had filled, and make a new one: two
    statements more per channel each second, even in an idle worker, and a window in which a
    publish missed the offer, was announced and waited for the claims of the round (in a
    prefork worker fed one task at a time, the task that met a polling round took 4-8 ms more).
    The round reads how many slots are filled instead, and the offer stays as it is."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4, polling_interval=0.05)
    me = consumer.transport.consumer_id
    rounds = count_polling_rounds(consumer, monkeypatch)
    try:
        token = offer_token(db_url, me)
        publish(db_url, q, [{"i": 1}])  # handed off: a slot filled, for the rounds to count
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        assert run_loop_until(consumer.hub, lambda: rounds["polling"] >= 3)
        settle(consumer)
        assert offer_token(db_url, me) == token, "a polling round withdrew the open offer"
        assert open_slots(db_url, me) == 3
        publish(db_url, q, [{"i": 2}])
        assert leased(db_url, q) == [(me, 1)]  # handed off to the same offer
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1}), (q.name, {"i": 2})]


def test_an_idle_consumers_polling_round_leaves_its_offer_open(db_url, events, monkeypatch):
    """An idle consumer's offer holds every free slot, so a polling round's claim had no room
    beside it: the round withdrew the offer, claimed nothing and made a new one, each second,
    for each channel of every idle worker (two writes, and dead rows in ``offers``). The round
    now looks whether anything waits (a read) and leaves the offer open. A message that waits
    unannounced (its wake-up lost) is still found by the next round, and claimed."""
    q = make_queue()
    scratch = make_queue()
    publish(db_url, scratch, [{"i": 1}])  # a real message's payload, queued nowhere useful
    consumer = idle_consumer(db_url, events, q, prefetch=4, polling_interval=0.05)
    me = consumer.transport.consumer_id
    rounds = count_polling_rounds(consumer, monkeypatch)
    try:
        token = offer_token(db_url, me)
        assert run_loop_until(consumer.hub, lambda: rounds["polling"] >= 3)
        settle(consumer)
        assert offer_token(db_url, me) == token, "a polling round withdrew the idle offer"
        assert open_slots(db_url, me) == 4
        with psycopg.connect(db_url, autocommit=True) as pg:  # queued, and no NOTIFY
            pg.execute("UPDATE kojin.messages SET queue = %s WHERE queue = %s",
                       (q.name, scratch.name))
        assert run_loop_until(consumer.hub, lambda: consumer.got), \
            "a polling round did not find the message that waited"
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1})]


def test_a_message_scheduled_for_an_idle_consumer_comes_when_due(db_url, events):
    """A scheduled message wakes the idle consumers of its queue when it is the queue's
    earliest, so that they set their timers. The round it causes has no room beside the offer
    and only looks (nothing is due yet): the look reports when the message is due, as a claim
    does, and the consumer's timer claims it then, with no polling round."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)  # polls once an hour
    try:
        eta = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()  # past ETA_THRESHOLD
        publish(db_url, q, [{"i": 1}],
                headers={"id": f"scheduled-{q.name}", "task": "t.noop", "eta": eta})
        assert leased(db_url, q) == [(None, 0)]  # scheduled: not handed off
        assert run_loop_until(consumer.hub, lambda: consumer.got), \
            "the scheduled message never came"
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1})]


def test_a_polling_round_withdraws_an_offer_of_a_queue_no_longer_consumed(db_url, events,
                                                                          monkeypatch):
    """The open offer names the queues it was made for. Once the consumer cancels one of them,
    the next polling round withdraws the offer (and offers again on the queues it consumes),
    so a publish to the cancelled queue stays there for other consumers."""
    q, cancelled = make_queue(), make_queue()
    consumer = LoopConsumer(db_url, events, prefetch=4, polling_interval=0.05)
    me = consumer.transport.consumer_id
    try:
        consumer.consume(q)
        consumer.consume(cancelled)
        consumer.start()
        assert run_loop_until(consumer.hub, lambda: open_slots(db_url, me) == 4)
        publish(db_url, q, [{"i": 0}])  # handed off, delivered and acked: a slot to spare
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        consumer.consumers[cancelled.name].cancel()
        rounds = count_polling_rounds(consumer, monkeypatch)
        assert run_loop_until(consumer.hub, lambda: rounds["polling"] >= 3)
        settle(consumer)
        publish(db_url, cancelled, [{"i": 1}])
        assert leased(db_url, cancelled) == [(None, 0)]  # queued, for any consumer of it
        publish(db_url, q, [{"i": 2}])
        assert leased(db_url, q) == [(me, 1)]  # the new offer takes it
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 0}), (q.name, {"i": 2})]
    assert take_at_once(db_url, cancelled, 1) == [({"i": 1}, 1)]


def test_a_claim_beside_an_open_offer_that_comes_back_full_claims_again(db_url, events):
    """Three large messages are announced while the open offer leaves one slot beside it: the
    claim of one comes back full, so more may be waiting, and the consumer (which stops
    saying it is idle after a full claim, so no announcement would come) claims again until
    it has them all, with no polling."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    try:
        publish(db_url, q, [{"i": 0}])
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
        publish(db_url, q, [{"i": i, "blob": "x" * HANDOFF_MAX_BYTES} for i in (1, 2, 3)])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 4)
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert [body["i"] for _, body in consumer.got] == [0, 1, 2, 3]


def test_a_hand_off_arrives_while_its_publish_is_made_durable_and_holds_up_no_other(
        db_url, events):
    """A NOTIFY takes a lock on the whole database at commit, held until the commit is
    durable. A publish that handed off its message in its own transaction made every other
    announcing commit wait for its flush (issue 12: 32 threads sending tasks, on average 6
    publishes waited on that lock). Migration 12 handed off after a durable commit, so the
    worker started one flush after the publish; migration 13 hands off with a commit that does
    not wait, and waits for the flush after. Here a standby that never confirms holds one
    publish: its message reaches the idle consumer while the publish still waits for the
    standby (it returns only once its commit is durable), and another publisher's hand-off
    meanwhile gets through."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    me = consumer.transport.consumer_id

    def publish_at(level: str, body: dict[str, int]) -> None:  # declared already: no write
        with Connection(f"kojin+{db_url}?synchronous_commit={level}") as conn:
            Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                     serializer="json", auto_declare=False).publish(body)

    try:
        with standby_never_confirms(db_url) as commits:
            publishing = commits.start(publish_at, "on", {"i": 1})
            assert until(lambda: commits.waiting() == 2), \
                "the held publish's commit never waited for the standby"
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 1), \
                "a hand-off arrived only once its publish's commit was durable"
            assert publishing.is_alive(), "a publish returned before its commit was durable"
            through = commits.start(publish_at, "local", {"i": 2})
            through.join(10)
            assert not through.is_alive(), \
                "a hand-off waited for another publish's commit to be durable"
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
            assert publishing.is_alive(), "a publish returned before its commit was durable"
        publishing.join(10)
        assert not publishing.is_alive(), "the held publish never returned once durable"
        assert [by for by, _ in leased(db_url, q)] in ([me, me], [me], [])
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert [body["i"] for _, body in consumer.got] == [1, 2]


@pytest.mark.parametrize("offer", ["withdrawn", "left-open"])
def test_a_hand_off_whose_notify_never_came_is_taken_back(db_url, events, monkeypatch, offer):
    """A publish hands off its message after its commit (sql/0012): a publisher whose session
    ended in between left the message leased to the consumer, its slot filled, and no NOTIFY
    on its way. The consumer finds the hand-off late and takes back what it holds and never
    received; the message is then delivered as any queued one. Either a claim withdrew the
    offer (here for a message too large to hand off) and the hand-off is still on its way
    after it, or the offer stays open and a polling round counts its filled slots."""
    monkeypatch.setattr(offers_module, "HANDOFF_LATE_SECONDS", 0.5)
    q = make_queue()
    scratch = make_queue()
    publish(db_url, scratch, [{"i": 1}])  # a real message's payload, queued nowhere useful
    consumer = idle_consumer(db_url, events, q, prefetch=4, polling_interval=0.2)
    me = consumer.transport.consumer_id
    big = {"i": 0, "blob": "x" * HANDOFF_MAX_BYTES}
    withdrawn = offer == "withdrawn"
    try:
        with psycopg.connect(db_url, autocommit=True) as pg:
            # what the publish's first transaction commits, with no second one to announce it
            pg.execute(
                "WITH o AS (UPDATE kojin.offers SET open_slots = open_slots - 1,"
                "  token = CASE WHEN open_slots > 1 THEN token END WHERE slot = ("
                "  SELECT slot FROM kojin.offers WHERE consumer = %s AND open_slots > 0"
                "  ORDER BY served_at LIMIT 1) RETURNING consumer, lease),"
                " m AS (DELETE FROM kojin.messages WHERE queue = %s RETURNING payload)"
                " INSERT INTO kojin.messages (queue, payload, visible_at, publish_id, leased_by,"
                "  delivery_count) SELECT %s, m.payload, now() + o.lease, gen_random_uuid(),"
                "  o.consumer, 1 FROM o, m", (me, scratch.name, q.name))
        assert leased(db_url, q) == [(me, 1)]
        if withdrawn:  # announced: the claim for it withdraws the offer first
            publish(db_url, q, [big])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 1 + withdrawn,
                              bound=BOUND * 2), "the lost hand-off never came back"
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, big)] * withdrawn + [(q.name, {"i": 1})]


def test_a_publish_at_synchronous_commit_off_hands_off_in_its_one_transaction(db_url, events):
    """At ``synchronous_commit=off`` no commit waits for a flush, so a publish runs the plain
    statement (announcing in its own transaction) rather than the procedure: its hand-off
    reaches the idle consumer all the same."""
    q = make_queue()
    consumer = idle_consumer(db_url, events, q, prefetch=4)
    me = consumer.transport.consumer_id
    try:
        with Connection(f"kojin+{db_url}?synchronous_commit=off") as conn:
            assert not conn.transport.db.announces_before_the_flush()
            Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                     serializer="json", auto_declare=False).publish({"i": 1})
        assert leased(db_url, q) == [(me, 1)]  # handed off in the publish's statement
        assert run_loop_until(consumer.hub, lambda: consumer.got)
        assert run_loop_until(consumer.hub, lambda: rows(db_url, q) == [])
    finally:
        consumer.close()
    assert consumer.got == [(q.name, {"i": 1})]
