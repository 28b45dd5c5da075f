"""Claims under Celery's event loop (issue 12): kombu's real Hub, a real PostgreSQL.

When Celery drives the transport through its event loop, a claim runs on the claim thread
(:mod:`kojin_pg.transport.claimer`), not on the loop. These tests stall a claim in the
database the real way: another session holds an advisory lock, and a trigger on
``kojin.messages`` (in the test's own database) makes every claim statement wait for it, while
publishes, acks, hand-backs and consumer (de)registration, which are other statements, go on.
The tests watch what the loop does meanwhile, then release the lock.

Every wait is bounded; the assertions compare the order of events, never durations.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from bounded import BOUND, until
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)
from kojin_pg.transport import Transport
from kojin_pg.transport.channel import Channel

pytestmark = pytest.mark.timeout(120)


class Events:
    """What happened, in order, from any thread: (what, detail) pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, Any]] = []

    def add(self, what: str, detail: Any = None) -> None:
        with self._lock:
            self._items.append((what, detail))

    def items(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self._items)

    def names(self) -> list[str]:
        return [what for what, _ in self.items()]

    def count(self, what: str, after: str | None = None) -> int:
        """How many ``what`` there were (only after the first ``after``, if given)."""
        names = self.names()
        if after is not None:
            if after not in names:
                return 0
            names = names[names.index(after):]
        return names.count(what)


def recording_transport(events: Events,
                        claims_stop_timeout: float | None = None) -> type[Transport]:
    """The real transport, recording its claims, wake-ups and deliveries into ``events``
    (and waiting ``claims_stop_timeout`` seconds on close for a claim under way, if given)."""

    class RecordingChannel(Channel):
        def _claim(self, queues: list[str], n: int) -> list[tuple[dict[str, Any], str]]:
            events.add("claim start", threading.current_thread())
            try:
                return super()._claim(queues, n)
            finally:
                events.add("claim end", threading.current_thread())

        def waiting(self, queues: list[str]) -> bool:
            events.add("look", threading.current_thread())
            return super().waiting(queues)

    class RecordingTransport(Transport):
        Channel = RecordingChannel
        if claims_stop_timeout is not None:
            CLAIMS_STOP_TIMEOUT = claims_stop_timeout

        def _drain_nowait(self, announced: set[str] | None = None) -> None:
            events.add("wake", announced)
            super()._drain_nowait(announced)

        def _on_claimed(self) -> None:
            try:
                super()._on_claimed()
            finally:
                events.add("claimed delivered")

    return RecordingTransport


class Stall:
    """Another session holding an advisory lock that every claim waits for (a trigger on
    ``kojin.messages``, in this test's own database, makes each claim statement take it)."""

    KEY = 4242

    def __init__(self, db_url: str) -> None:
        self.watcher = psycopg.connect(db_url, autocommit=True)
        self.watcher.execute(
            "CREATE FUNCTION kojin.stall_claims() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF current_query() LIKE '%WITH acked AS (%' THEN "
            f"PERFORM pg_advisory_xact_lock_shared({self.KEY}); END IF; RETURN NULL; END $$")
        self.watcher.execute(
            "CREATE TRIGGER stall_claims BEFORE UPDATE ON kojin.messages "
            "FOR EACH STATEMENT EXECUTE FUNCTION kojin.stall_claims()")
        self.holder = psycopg.connect(db_url)
        self.holder.execute("SELECT pg_advisory_xact_lock(%s)", (self.KEY,))
        self.released = False

    def claims_waiting(self) -> int:
        """How many claim statements wait for this session's lock now (known by their
        opening: the server keeps only the first 1024 bytes of a statement's text)."""
        return self.watcher.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE %s = ANY(pg_blocking_pids(pid)) AND query LIKE %s",
            (self.holder.info.backend_pid, "%WITH acked AS (%")).fetchone()[0]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.holder.commit()

    def close(self) -> None:
        try:
            self.release()
        finally:
            self.holder.close()
            self.watcher.close()


def run_loop_until(hub: Hub, condition: Callable[[], Any], bound: float = BOUND) -> bool:
    """Run the event loop until ``condition`` holds (True) or ``bound`` seconds pass."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() >= deadline:
            return False
        hub.run_once()
    return True


@contextmanager
def in_background(work: Callable[[], None], stall: Stall) -> Iterator[None]:
    """Run ``work`` on a thread (the test's side: it watches the database and releases the
    stall); on the way out join it, release the stall whatever happened, and raise what
    ``work`` raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failure.append(exc)
        finally:
            stall.release()

    thread = threading.Thread(target=run, name="test-control", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(BOUND * 3)
        stall.release()
    assert not thread.is_alive(), "the test's control thread did not finish"
    if failure:
        raise failure[0]


def make_queue() -> Queue:
    name = "q_" + uuid.uuid4().hex[:8]
    return Queue(name, Exchange("ex_" + name, type="direct"), routing_key=name)


def publish(db_url: str, q: Queue, bodies: list[Any], **kwargs: Any) -> None:
    """Publish each of ``bodies`` to ``q`` (declared first), with kombu's ``kwargs``."""
    with Connection("kojin+" + db_url) as conn:
        channel = conn.channel()
        q(channel).declare()
        producer = Producer(channel, exchange=q.exchange, routing_key=q.routing_key,
                            serializer="json")
        for body in bodies:
            producer.publish(body, **kwargs)


class LoopConsumer:
    """A kombu connection consuming through kombu's Hub, as Celery's worker does."""

    def __init__(self, db_url: str, events: Events, *, prefetch: int = 100,
                 claims_stop_timeout: float | None = None,
                 polling_interval: float = 3600) -> None:
        # no polling safety net during the test (unless asked): every claim comes from a
        # wake-up we caused
        self.conn = Connection(db_url,
                               transport=recording_transport(events, claims_stop_timeout),
                               transport_options={"polling_interval": polling_interval})
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.basic_qos(0, prefetch, False)
        self.events = events
        self.hub = Hub()
        self.consumers: dict[str, Consumer] = {}
        self.got: list[tuple[str, Any]] = []

    @property
    def transport(self) -> Transport:
        return self.conn.transport

    def consume(self, q: Queue, *, ack: bool = True, channel: Any = None) -> Consumer:
        """Consume ``q`` on this connection's channel (or on ``channel``)."""
        channel = channel or self.channel

        def on_message(body: Any, message: Any) -> None:
            self.got.append((q.name, body))
            self.events.add("message", (q.name, body))
            if ack:
                message.ack()

        q(channel).declare()
        consumer = Consumer(channel, [q], callbacks=[on_message], accept=["json"])
        consumer.consume()
        self.consumers[q.name] = consumer
        return consumer

    def start(self) -> None:
        """Hand the connection to the event loop (the first claim is then scheduled), with
        a ticker so the loop never sleeps long between the tests' checks."""
        self.hub.call_repeatedly(0.01, self.events.add, "tick")
        self.conn.register_with_event_loop(self.hub)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.hub.close()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def stall(db_url: str) -> Iterator[Stall]:
    s = Stall(db_url)
    try:
        yield s
    finally:
        s.close()


def rows(db_url: str, q: Queue) -> list[tuple[Any, ...]]:
    """(leased_by IS NULL, visible now, delivery_count) of the messages of ``q``, by id."""
    with psycopg.connect(db_url) as pg:
        return pg.execute(
            "SELECT leased_by IS NULL, visible_at <= now(), delivery_count "
            "FROM kojin.messages WHERE queue = %s ORDER BY id", (q.name,)).fetchall()


def dead_letters(db_url: str) -> int:
    with psycopg.connect(db_url) as pg:
        return pg.execute("SELECT count(*) FROM kojin.dead_letters").fetchone()[0]


def take_at_once(db_url: str, q: Queue, n: int) -> list[Any]:
    """``n`` messages of ``q`` got by another consumer right away (no waiting for a lease to
    run out: the default visibility timeout is half an hour); acked. Their (body, delivery
    count) pairs."""
    got = []
    with Connection("kojin+" + db_url) as conn:
        channel = conn.channel()
        for _ in range(n):
            message = channel.basic_get(q.name)
            assert message is not None, f"only {len(got)} of {n} messages were visible"
            got.append((message.payload, message.delivery_info["delivery_count"]))
            message.ack()
    return got


# -- 1. the loop never waits on a claim -----------------------------------------------------------

def test_the_loop_runs_on_while_a_claim_waits_in_the_database(db_url, events, stall):
    q = make_queue()
    publish(db_url, q, [{"i": i} for i in range(3)])
    consumer = LoopConsumer(db_url, events)
    try:
        consumer.consume(q)

        def control() -> None:
            assert until(stall.claims_waiting), "no claim ever waited for the lock"
            events.add("claim waits")
            # the loop's timer fires a few times while the claim still waits (bounded: on
            # a loop that blocks on the claim it never does, and the test fails below)
            until(lambda: events.count("tick", after="claim waits") >= 3)
            assert stall.claims_waiting() == 1, "the claim stopped waiting before the release"
            events.add("release")

        with in_background(control, stall):
            consumer.start()
            delivered = run_loop_until(consumer.hub, lambda: len(consumer.got) == 3,
                                       bound=BOUND * 3)
    finally:
        consumer.close()
    names = events.names()
    waits, release = names.index("claim waits"), names.index("release")
    assert names[waits:release].count("tick") >= 3, \
        "the event loop's timer did not fire while the claim waited in the database"
    assert delivered and sorted(b["i"] for _, b in consumer.got) == [0, 1, 2]
    assert names.index("message") > release
    claim_threads = {t for what, t in events.items() if what == "claim start"}
    assert threading.current_thread() not in claim_threads  # claims ran off the loop thread


# -- 2. wake-ups during a claim merge into one follow-up claim ----------------------------------

def test_wakeups_during_a_claim_cause_one_follow_up_claim(db_url, events, stall):
    q = make_queue()
    publish(db_url, q, [])  # declared, empty
    consumer = LoopConsumer(db_url, events)
    try:
        consumer.consume(q, ack=False)  # an ack would nudge the loop: wake-ups of its own

        def control() -> None:
            assert until(stall.claims_waiting), "no claim ever waited for the lock"
            events.add("claim waits")
            transport = consumer.transport

            def taken_by_the_loop(wake_up: Callable[[], None], what: str) -> None:
                wakes = events.count("wake")
                wake_up()
                assert until(lambda: events.count("wake") > wakes), \
                    f"the loop did not take the {what} while the claim waited"

            def publish_announced(i: int) -> None:
                # a consumer busy claiming is not idle, so the publish itself does not NOTIFY
                # (see kojin_pg/transport/idle.py): announce it as it would to an idle one
                publish(db_url, q, [{"i": i}])
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_notify(%s, %s)", (transport.channel_name, q.name))

            for i in range(3):
                # an announced publish (the NOTIFY reaches the loop), then a nudge (as an ack
                # on a pool thread does); each waits for the loop to take it before the next
                taken_by_the_loop(lambda i=i: publish_announced(i), "NOTIFY")
                taken_by_the_loop(transport.wakeups.nudge, "nudge")
            assert stall.claims_waiting() == 1, "the claim stopped waiting before the release"
            events.add("release")

        with in_background(control, stall):
            consumer.start()
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 3,
                                  bound=BOUND * 3), f"delivered {consumer.got}"
        # the follow-up round ends (the first may have brought every message) ...
        run_loop_until(consumer.hub,
                       lambda: events.count("claim end") + events.count("look") >= 3)
        # ... and the loop goes on for a while: a claim still owed to one of the wake-ups
        # would start here (each is asked for on the loop, at once, when the one before
        # delivers)
        last = len(events.names())
        assert run_loop_until(consumer.hub,
                              lambda: events.names()[last:].count("tick") >= 20)
    finally:
        consumer.close()
    names = events.names()
    waits, release = names.index("claim waits"), names.index("release")
    assert names[waits:release].count("wake") == 6
    assert names[waits:release].count("claim start") == 0  # still the first claim
    # the first round (its claim, then the claim after saying the consumer waits: see
    # kojin_pg/transport/idle.py) and one follow-up for all six wake-ups, not one each; with
    # nothing left to claim beside the offer the first round made, the follow-up only looks
    assert names.count("claim start") + names.count("look") == 3, names
    assert names.count("claim end") == names.count("claim start")
    assert sorted(b["i"] for _, b in consumer.got) == [0, 1, 2]


# -- 3. a consumer cancelled during its claim: the messages go back ------------------------------

@pytest.mark.parametrize("other_consumer", [False, True],
                         ids=["last-consumer", "one-of-two-consumers"])
def test_cancelled_during_a_claim_hands_the_messages_back(db_url, events, stall,
                                                          other_consumer):
    cancelled_q, kept_q = make_queue(), make_queue()
    publish(db_url, cancelled_q, [{"i": i} for i in range(3)])
    publish(db_url, kept_q, [{"k": i} for i in range(2)])
    consumer = LoopConsumer(db_url, events)
    try:
        to_cancel = consumer.consume(cancelled_q)
        if other_consumer:  # the same channel goes on consuming another queue
            consumer.consume(kept_q)
        cancel_now = threading.Event()

        def cancel_on_the_loop() -> None:  # a timer callback: runs on the loop
            if cancel_now.is_set() and "cancelled" not in events.names():
                to_cancel.cancel()
                events.add("cancelled")

        def control() -> None:
            assert until(stall.claims_waiting), "no claim ever waited for the lock"
            events.add("claim waits")
            cancel_now.set()
            assert until(lambda: "cancelled" in events.names()), \
                "the loop did not cancel the consumer while the claim waited"
            assert stall.claims_waiting() == 1, "the claim stopped waiting before the release"
            events.add("release")

        with in_background(control, stall):
            consumer.hub.call_repeatedly(0.01, cancel_on_the_loop)
            consumer.start()
            # the claim comes back after the release and the loop takes what it leased
            assert run_loop_until(consumer.hub, lambda: events.count(
                "claimed delivered", after="release") >= 1, bound=BOUND * 3)
            if other_consumer:
                assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 2)
        names = events.names()
        assert names.index("cancelled") < names.index("release") < names.index("claim end")
        # back in the queue at once: not leased, visible now, this delivery not counted
        assert rows(db_url, cancelled_q) == [(True, True, 0)] * 3
        assert dead_letters(db_url) == 0
        assert all(queue != cancelled_q.name for queue, _ in consumer.got)
        if other_consumer:
            assert sorted(b["k"] for _, b in consumer.got) == [0, 1]
        # another consumer gets them right away, as first deliveries
        got = take_at_once(db_url, cancelled_q, 3)
        assert sorted((body["i"], count) for body, count in got) == [(0, 1), (1, 1), (2, 1)]
    finally:
        consumer.close()


# -- 4. closing during a claim: the thread is joined, nothing stays leased ----------------------

def test_close_during_a_claim_joins_the_thread_and_leaves_nothing_leased(db_url, events,
                                                                          stall):
    q = make_queue()
    publish(db_url, q, [{"i": i} for i in range(3)])
    consumer = LoopConsumer(db_url, events)
    closed = False
    try:
        consumer.consume(q)
        consumer_id = consumer.transport.consumer_id
        watcher = stall.watcher

        def deregistered() -> bool:  # the close went past its channels and consumers
            return watcher.execute("SELECT NOT EXISTS (SELECT 1 FROM kojin.consumers "
                                   "WHERE consumer = %s)", (consumer_id,)).fetchone()[0]

        def control() -> None:
            assert until(stall.claims_waiting), "no claim ever waited for the lock"
            events.add("claim waits")
            # release only once the close is under way, so the claim ends during the close
            assert until(deregistered), "the close never deregistered the consumer"
            assert stall.claims_waiting() == 1, "the claim stopped waiting before the release"
            events.add("release")

        with in_background(control, stall):
            consumer.start()
            assert run_loop_until(consumer.hub, lambda: "claim waits" in events.names())
            events.add("close")
            consumer.close()
            closed = True
            events.add("closed")
    finally:
        if not closed:
            consumer.close()
    names = events.names()
    assert names.index("claim waits") < names.index("close") < names.index("release") \
        < names.index("claim end") < names.index("closed")
    assert "message" not in names  # nothing was delivered: the loop had stopped
    claim_thread = next(t for what, t in events.items() if what == "claim start")
    assert claim_thread is not threading.current_thread()
    assert not claim_thread.is_alive()  # joined by the close
    # what the claim leased during the close went back: not leased, visible, not counted
    assert rows(db_url, q) == [(True, True, 0)] * 3
    got = take_at_once(db_url, q, 3)
    assert sorted((body["i"], count) for body, count in got) == [(0, 1), (1, 1), (2, 1)]


# -- 5. a channel closed during its claim (the connection goes on) --------------------------------

@pytest.mark.parametrize("closed", ["claiming", "next-in-line"])
def test_channel_closed_during_a_claim_hands_the_messages_back(db_url, events, stall, closed):
    """Celery closes a channel and keeps the connection, e.g. when it resets its remote
    control (pidbox) consumer. Two channels consume, so one claim round has two claims, run
    one after the other; the first waits in the database while the loop closes either the
    channel of that claim or the channel whose claim is next in line. What the closed
    channel's claim leased goes back, and the loop goes on delivering to the other channel."""
    first_q, second_q = make_queue(), make_queue()
    publish(db_url, first_q, [{"i": i} for i in range(3)])
    publish(db_url, second_q, [{"i": i} for i in range(3)])
    consumer = LoopConsumer(db_url, events)
    try:
        second_channel = consumer.conn.channel()
        second_channel.basic_qos(0, 100, False)
        consumer.consume(first_q)  # the first channel: its claim is the first of each round
        consumer.consume(second_q, channel=second_channel)
        if closed == "claiming":
            to_close, closed_q, kept_q = consumer.channel, first_q, second_q
        else:
            to_close, closed_q, kept_q = second_channel, second_q, first_q
        close_now = threading.Event()

        def close_on_the_loop() -> None:  # a timer callback: runs on the loop
            if close_now.is_set() and "channel closed" not in events.names():
                to_close.close()
                events.add("channel closed")

        def control() -> None:
            assert until(stall.claims_waiting), "no claim ever waited for the lock"
            events.add("claim waits")
            close_now.set()
            assert until(lambda: "channel closed" in events.names()), \
                "the loop did not close the channel while the claim waited"
            assert stall.claims_waiting() == 1, "the claim stopped waiting before the release"
            events.add("release")

        with in_background(control, stall):
            consumer.hub.call_repeatedly(0.01, close_on_the_loop)
            consumer.start()
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 3,
                                  bound=BOUND * 3), f"delivered {consumer.got}"
        names = events.names()
        assert names.index("channel closed") < names.index("release") < names.index("claim end")
        assert {queue for queue, _ in consumer.got} == {kept_q.name}
        # the closed channel's messages: back in the queue at once, this delivery not counted
        assert rows(db_url, closed_q) == [(True, True, 0)] * 3
        assert dead_letters(db_url) == 0
        # the loop and the connection go on
        publish(db_url, kept_q, [{"i": 3}])
        assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 4)
        assert sorted(b["i"] for _, b in consumer.got) == [0, 1, 2, 3]
        got = take_at_once(db_url, closed_q, 3)
        assert sorted((body["i"], count) for body, count in got) == [(0, 1), (1, 1), (2, 1)]
    finally:
        consumer.close()


# -- 6. a claim whose connection is lost while it waits ------------------------------------------

def test_claim_retried_on_the_thread_after_its_connection_is_lost(db_url, events, stall):
    """The claim's server session dies while the claim waits: the claim thread retries it on a
    new connection (handing back what the lost attempt may have leased), and the loop never
    sees the loss."""
    q = make_queue()
    publish(db_url, q, [{"i": i} for i in range(3)])
    consumer = LoopConsumer(db_url, events)

    def waiting_claims() -> list[int]:
        return [pid for (pid,) in stall.watcher.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE %s = ANY(pg_blocking_pids(pid)) AND query LIKE %s",
            (stall.holder.info.backend_pid, "%WITH acked AS (%")).fetchall()]

    try:
        consumer.consume(q)

        def control() -> None:
            assert until(waiting_claims), "no claim ever waited for the lock"
            (first,) = waiting_claims()
            stall.watcher.execute("SELECT pg_terminate_backend(%s)", (first,))
            events.add("claim session killed")
            assert until(lambda: waiting_claims() not in ([], [first])), \
                "the claim was not retried on a new session"
            events.add("release")

        with in_background(control, stall):
            consumer.start()
            assert run_loop_until(consumer.hub, lambda: len(consumer.got) == 3,
                                  bound=BOUND * 3), f"delivered {consumer.got}"
    finally:
        consumer.close()
    names = events.names()
    assert names.index("claim session killed") < names.index("release") \
        < names.index("claim end") < names.index("message")
    # retried inside the one claim, on its thread (a later look, after the consumer says it
    # waits, is another claim)
    assert names[:names.index("claim end")].count("claim start") == 1
    assert sorted(b["i"] for _, b in consumer.got) == [0, 1, 2]
    assert rows(db_url, q) == []  # all acked, nothing left leased


# -- 7. closing gives up waiting for a claim that takes too long --------------------------------

def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_that_gives_up_on_a_claim_leaves_nothing_leased(db_url, events, stall):
    """A claim outlasts the close's wait for it (a database that hangs, or one being retried
    through an outage while Celery reconnects): when that claim ends at last, what it leased
    goes back at once, and it writes nothing into a descriptor that the process reused."""
    q = make_queue()
    publish(db_url, q, [{"i": i} for i in range(3)])
    # the close waits a moment only, not the default seconds: the claim outlasts it
    consumer = LoopConsumer(db_url, events, claims_stop_timeout=0.1)
    stray_r = stray_w = -1
    try:
        consumer.consume(q)
        consumer.start()
        assert run_loop_until(consumer.hub, stall.claims_waiting)
        write_fd = consumer.transport.claimer._state.peek().write_fd
        consumer.close()
        events.add("closed")
        assert stall.claims_waiting() == 1  # the close did not wait for it to end
        claim_thread = next(t for what, t in events.items() if what == "claim start")
        if not _fd_open(write_fd):
            # the close closed the claim thread's pipe: a file the process opens now may get
            # its number (here: a pipe of the test's own), and the claim would write into it
            stray_r, stray_w = os.pipe()
            os.dup2(stray_w, write_fd)
            os.set_blocking(stray_r, False)
        events.add("release")
        stall.release()
        claim_thread.join(BOUND)
        assert not claim_thread.is_alive(), "the claim thread never ended"
        # nothing the late claim started again is left running: lease renewal, consumer pool
        left = [t.name for t in threading.enumerate()
                if t.name == "kojin_pg-leases" or t.name.startswith("kojin_pg.consumer")]
        assert left == []
    finally:
        stall.release()
    names = events.names()
    assert names.index("closed") < names.index("release") < names.index("claim end")
    if stray_r != -1:
        try:
            stray = os.read(stray_r, 100)
        except BlockingIOError:
            stray = b""
        finally:
            for fd in (stray_r, stray_w, write_fd):
                os.close(fd)
        assert stray == b"", "the claim thread wrote into a descriptor it no longer owned"
    # what the late claim leased is back in the queue at once, not counted
    assert rows(db_url, q) == [(True, True, 0)] * 3
