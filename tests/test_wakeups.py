"""A wake-up is never lost: the NOTIFY gating of publishes (kojin_pg/transport/idle.py) and of
stored results (kojin_pg/backend/waiters.py) under stress, across a lost LISTEN session, and in
the interleavings found by reviewing both protocols.

Polling cannot rescue a lost wake-up here: consumers use ``polling_interval=600`` and wait up to
600 s, and result waiters wait up to 600 s per round (Celery's drain interval of 1 s, after which
the result consumer reads again anyway, is stretched; see :func:`no_safety_net`). A lost wake-up
therefore shows as a delivery that does not come within a bound that is small against 600 s; the
test then wakes the stuck waiter itself (a raw ``pg_notify``) so that it can end.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
import uuid
from typing import Any

import psycopg
from bounded import until
from celery.result import AsyncResult
from kombu import Connection, Consumer, Exchange, Producer, Queue

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)
from kojin_pg.backend.waiters import wait_slot
from kojin_pg.transport.idle import idle_space, queue_key

#: Seconds within which a woken consumer or waiter must have what it waits for (the machine is
#: small and shared; a lost wake-up waits 600 s).
BOUND = 5.0


def kurl(db_url: str) -> str:
    return "kojin+" + db_url + "?polling_interval=600"


def make_queue(name: str | None = None) -> Queue:
    name = name or "q_" + uuid.uuid4().hex[:8]
    return Queue(name, Exchange("ex_" + name, type="direct"), routing_key=name)


def advisory_holders(db_url: str, space: int, key: int) -> set[int]:
    """Backend pids holding the two-key advisory lock (space, key), shared or exclusive."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 2 AND classid = (%s::bigint & 4294967295)::oid"
            " AND objid = (%s::bigint & 4294967295)::oid", (space, key)).fetchall()
    return {r[0] for r in rows}


def raw_notify(db_url: str, channel: str, payload: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


# -- consumers that only a NOTIFY can wake -------------------------------------------------------


class IdleConsumer:
    """A kombu connection consuming ``queues`` on a thread, draining with a 600 s timeout (so
    only a NOTIFY wakes it); stopped by a message on its own stop queue."""

    def __init__(self, db_url: str, queues: list[Queue], prefetch: int = 100,
                 conn: Connection | None = None) -> None:
        self.db_url = db_url
        self.conn = conn or Connection(kurl(db_url))
        self.stop_queue = make_queue("stop_" + uuid.uuid4().hex[:8])
        self.queues = list(queues)
        self.prefetch = prefetch
        self.got: list[tuple[Any, float]] = []
        self.errors: list[BaseException] = []
        self.stopped = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> IdleConsumer:
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def _on_message(self, body: Any, message: Any) -> None:
        if isinstance(body, dict) and body.get("stop"):
            self.stopped = True
        else:
            self.got.append((body, time.time()))
        message.ack()

    def _run(self) -> None:
        try:
            channel = self.conn.channel()
            channel.basic_qos(0, self.prefetch, False)
            for q in [*self.queues, self.stop_queue]:
                q(channel).declare()
            with Consumer(channel, [*self.queues, self.stop_queue],
                          callbacks=[self._on_message], accept=["json"]):
                self.ready.set()
                while not self.stopped:
                    try:
                        self.conn.drain_events(timeout=600)
                    except TimeoutError:
                        pass
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)
            self.ready.set()

    def stop(self) -> None:
        """Stop the consumer (waking it with a raw NOTIFY if its stop message is not heard)."""
        with Connection(kurl(self.db_url)) as conn:
            Producer(conn.channel(), exchange=self.stop_queue.exchange,
                     routing_key=self.stop_queue.routing_key,
                     serializer="json").publish({"stop": True})
        self.thread.join(BOUND)
        if self.thread.is_alive():  # not woken: by an announcement, or a local nudge
            raw_notify(self.db_url, self.conn.transport.channel_name, self.stop_queue.name)
            self.conn.transport.wakeups.nudge()
            self.thread.join(20)
        self.conn.release()
        assert not self.errors, self.errors

    def listener_pid(self) -> int | None:
        s = self.conn.transport.wakeups.listener._session.peek()
        if s is None or s.conn is None or s.conn.closed:
            return None
        return s.conn.info.backend_pid


def _producer(db_url: str, qname: str, commands: Any, replies: Any) -> None:
    """A producer process: on ("burst", k, n) publish n messages with small random gaps."""
    q = make_queue(qname)
    rnd = random.Random()
    with Connection(kurl(db_url)) as conn:
        prod = Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                        serializer="json")
        replies.put("ready")
        while (cmd := commands.get()) is not None:
            _, k, n = cmd
            for i in range(n):
                if rnd.random() < 0.5:
                    time.sleep(rnd.random() * 0.004)
                prod.publish({"k": k, "i": i, "p": multiprocessing.current_process().name,
                              "at": time.time()})
            replies.put(("done", k, n))


def test_bursts_from_many_producers_always_wake_idle_consumers(db_url):
    """Producer processes publish bursts at once, mostly as many messages as there are
    consumers; the consumers (prefetch 1: each message fills a claim, so they leave idle, then
    go idle again) must have every burst within BOUND. The next burst starts as soon as the
    last one is in, while the consumers are on their way back to idle, and not before, so no
    later publish can rescue a lost one."""
    q = make_queue()
    producers, consumers = 3, 3
    ctx = multiprocessing.get_context("spawn")
    replies = ctx.Queue()
    commands = [ctx.Queue() for _ in range(producers)]
    procs = [ctx.Process(target=_producer, args=(db_url, q.name, commands[i], replies),
                         daemon=True) for i in range(producers)]
    cons = [IdleConsumer(db_url, [q], prefetch=1).start() for _ in range(consumers)]
    lost: list[tuple[int, int]] = []
    latencies: list[float] = []
    rnd = random.Random(12)
    try:
        for p in procs:
            p.start()
        for _ in procs:
            assert replies.get(timeout=60) == "ready"
        expected = 0
        deadline = time.monotonic() + 15
        k = 0
        while time.monotonic() < deadline:
            sizes = [rnd.choice([0, 1, 1, 1, 1, 2, 3]) for _ in procs]
            if not any(sizes):
                sizes[0] = 1
            for cmd, n in zip(commands, sizes, strict=True):
                cmd.put(("burst", k, n))
            for _ in procs:
                replies.get(timeout=30)
            expected += sum(sizes)
            def all_in(expected: int = expected) -> bool:
                return sum(len(c.got) for c in cons) >= expected
            if not until(all_in, BOUND, 0.001):
                lost.append((k, expected - sum(len(c.got) for c in cons)))
                for c in cons:  # wake them all so that the run can go on
                    raw_notify(db_url, c.conn.transport.channel_name, q.name)
                assert until(all_in, 20)
            time.sleep(rnd.choice([0.0, 0.0, 0.0, 0.001, 0.01, 0.1]))  # idle, or not quite yet
            k += 1
        for c in cons:
            latencies += [t - body["at"] for body, t in c.got]
    finally:
        for cmd in commands:
            cmd.put(None)
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
        for c in cons:
            c.stop()
    got = [body for c in cons for body, _ in c.got]
    assert len(got) == expected == len({(b["p"], b["k"], b["i"]) for b in got})
    assert not lost, f"bursts whose wake-up was lost (burst, messages missing): {lost}"
    assert k >= 10, "too few bursts to mean anything"
    assert max(latencies) < BOUND


# -- result waiters that only a NOTIFY can wake ----------------------------------------------------


def no_safety_net(consumer) -> None:
    """Stretch the result consumer's waits from Celery's 1 s drain interval to 600 s: then only
    an announcement (or a read of its own, as the protocol does) gets a waiter its result, not
    the read that follows every empty wait."""
    real = consumer.drain_events
    consumer.drain_events = lambda timeout=None: real(timeout=600)


def _writer(db_url: str, task_ids: list[str], seed: int, replies: Any, go: Any) -> None:
    """A writer process: store the results of ``task_ids`` at random moments."""
    from celery import Celery

    app = Celery("kojin_writer", backend="kojin+" + db_url, broker="memory://",
                 set_as_current=False)
    rnd = random.Random(seed)
    backend = app.backend
    backend.ensure_ready()
    replies.put("ready")
    go.wait(60)
    for t in task_ids:
        time.sleep(rnd.choice([0.0, 0.0, 0.001, 0.003, 0.01, 0.03, 0.1]))
        backend.mark_as_done(t, {"t": t}, request=None)
        replies.put((t, time.time()))
    replies.put("done")
    backend.db.close()


def test_waiters_get_results_stored_at_random_moments(make_app, db_url):
    """Writer processes store results at random moments; threads of two apps (two processes'
    worth of result consumers, threads sharing each) wait for them one by one with get(): every
    get returns within BOUND of its result's store, announced or read, never by a poll."""
    apps = [make_app(result_backend_transport_options={"polling_interval": 600})
            for _ in range(2)]
    for a in apps:
        a.backend.ensure_ready()
        no_safety_net(a.backend.result_consumer)
    threads_per_app, per_thread, writers = 4, 25, 2
    n_threads = threads_per_app * len(apps)
    all_ids = [str(uuid.uuid4()) for _ in range(per_thread * n_threads)]
    # waiters go through the ids in about the order the writers store them, so that many gets
    # start just before, during or just after their result's store
    ids = [all_ids[i::n_threads] for i in range(n_threads)]
    ctx = multiprocessing.get_context("spawn")
    replies, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_writer, args=(db_url, all_ids[i::writers], i, replies, go),
                         daemon=True) for i in range(writers)]
    started: dict[str, float] = {}
    returned: dict[str, float] = {}
    errors: list[BaseException] = []

    # app.backend is per thread: the waiters of an app share the main thread's backend (and
    # so its result consumer and LISTEN session), as results made in one thread do
    backends = [a.backend for a in apps]

    def waiter(a, chunk: list[str]) -> None:
        try:
            for t in chunk:
                started[t] = time.time()
                value = AsyncResult(t, app=a.app, backend=a).get(timeout=900)
                assert value == {"t": t}
                returned[t] = time.time()
        except BaseException as exc:
            errors.append(exc)

    stored: dict[str, float] = {}
    threads = [threading.Thread(target=waiter, args=(backends[i % len(apps)], chunk),
                                daemon=True)
               for i, chunk in enumerate(ids)]
    rescued: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            assert replies.get(timeout=60) == "ready"
        for th in threads:
            th.start()
        go.set()
        done = 0
        while done < writers:
            r = replies.get(timeout=60)
            if r == "done":
                done += 1
            else:
                stored[r[0]] = r[1]
        if not until(lambda: len(returned) == len(all_ids), BOUND + 5):
            rescued = [t for t in all_ids if t not in returned]
            for t in rescued:  # wake the stuck waiters so that the test can end
                raw_notify(db_url, apps[0].backend.channel, t)
        for th in threads:
            th.join(30)
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    assert not errors, errors
    assert not rescued, f"{len(rescued)} gets lost their wake-up: {rescued[:5]}"
    waited = {t: returned[t] - max(stored[t], started[t]) for t in all_ids}
    assert sum(1 for t in all_ids if stored[t] > started[t]) >= 10, "too few gets waited"
    late = {t: w for t, w in waited.items() if w > BOUND}
    assert not late, late


# -- a lost LISTEN session ---------------------------------------------------------------------


def _terminate(db_url: str, pid: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def _kill_listener_and_wait_relocked(db_url: str, consumer: Any, q: Queue) -> bool:
    """Kill ``consumer``'s LISTEN session once it holds its idle lock; whether it listens again
    on a new session and holds the lock there."""
    space = idle_space(consumer.conn.transport.settings.schema)
    key = queue_key(q.name)
    assert until(lambda: consumer.listener_pid() in advisory_holders(db_url, space, key))
    old = consumer.listener_pid()
    _terminate(db_url, old)
    return until(lambda: (consumer.listener_pid() not in (None, old)
                               and consumer.listener_pid() in advisory_holders(db_url, space,
                                                                                key)))


def test_an_idle_consumer_whose_listen_session_is_killed_is_woken_afterwards(db_url):
    q = make_queue()
    c = IdleConsumer(db_url, [q]).start()
    try:
        # the consumer listens again on a new session and holds its idle lock there
        relocked = _kill_listener_and_wait_relocked(db_url, c, q)
        with Connection(kurl(db_url)) as conn:
            Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                     serializer="json").publish({"after": 1})
        arrived = until(lambda: len(c.got) == 1)
    finally:
        c.stop()
    assert relocked, "the new LISTEN session does not hold the queue's idle lock"
    assert arrived, "a publish after the reconnect did not wake the consumer"


def test_a_waiter_whose_listen_session_is_killed_is_woken_afterwards(make_app, db_url):
    """The waiter's LISTEN session is killed while it waits; once it listens again its wait
    slot is held on the new session, and a store wakes it (no 600 s wait)."""
    app = make_app(result_backend_transport_options={"polling_interval": 2})
    backend = app.backend
    consumer = backend.result_consumer
    no_safety_net(consumer)
    t = str(uuid.uuid4())
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(
        AsyncResult(t, app=app, backend=backend).get(timeout=900)), daemon=True)
    waiter.start()

    def session_pid() -> int | None:
        s = consumer.listener._session.peek()
        if s is None or s.conn is None or s.conn.closed:
            return None
        return s.conn.info.backend_pid

    slot = wait_slot(t)
    assert until(lambda: session_pid() in advisory_holders(db_url, backend.wait_space,
                                                                slot))
    old = session_pid()
    _terminate(db_url, old)
    # after the lost session (a read and a polling_interval's nap) it listens again, slot taken
    relocked = until(lambda: (session_pid() not in (None, old) and session_pid()
                                   in advisory_holders(db_url, backend.wait_space, slot)), 15)
    time.sleep(0.3)  # sleeping on the new session now
    writer = make_app()
    writer.backend.mark_as_done(t, 42, request=None)
    waiter.join(BOUND)
    lost = waiter.is_alive()
    if lost:
        raw_notify(db_url, backend.channel, t)
        waiter.join(20)
    assert relocked, "the new LISTEN session does not hold the task's wait slot"
    assert not lost, "a store after the reconnect did not wake the waiter"
    assert got == [42]


# -- interleavings found by the review ---------------------------------------------------------


class LoopConsumer:
    """A kombu connection consuming ``queues`` through kombu's event loop (as Celery's worker
    does: claims on the claim thread, NOTIFY read by the loop), prefetch 2, acking at once."""

    def __init__(self, db_url: str, queues: list[Queue]) -> None:
        from kombu.asynchronous import Hub

        self.conn = Connection(kurl(db_url))
        self.hub = Hub()
        self.got: list[Any] = []
        self.held: list[Any] = []  # messages whose body says "hold": acked by release()
        channel = self.conn.channel()
        channel.basic_qos(0, 2, False)
        for q in queues:
            q(channel).declare()
        self.consumer = Consumer(channel, queues, callbacks=[self._on_message],
                                 accept=["json"])
        self.consumer.consume()
        self.conn.register_with_event_loop(self.hub)
        self.hub.call_repeatedly(0.2, lambda: None)  # lets stop() end the loop; claims nothing
        self.thread = threading.Thread(target=self.hub.run_forever, daemon=True)
        self.thread.start()

    def _on_message(self, body: Any, message: Any) -> None:
        self.got.append(body)
        if isinstance(body, dict) and "hold" in body:
            self.held.append(message)
        else:
            message.ack()

    def release(self) -> None:
        """Ack the held messages (on the loop), freeing their prefetch slots."""
        held, self.held = self.held, []
        self.hub.call_soon(lambda: [m.ack() for m in held])

    def listener_pid(self) -> int | None:
        s = self.conn.transport.wakeups.listener._session.peek()
        if s is None or s.conn is None or s.conn.closed:
            return None
        return s.conn.info.backend_pid

    def stop(self) -> None:
        self.hub.stop()
        self.thread.join(10)
        try:
            self.consumer.cancel()
        finally:
            self.conn.release()
            self.hub.close()


def raw_publish(conn: psycopg.Connection, transport: Any, qname: str, body: Any) -> None:
    """The transport's own publish statement, gated, in ``conn``'s transaction (uncommitted)."""
    from kojin_pg.db import Queries
    from kojin_pg.transport.idle import publish_params, publishing_space

    schema = transport.settings.schema
    conn.execute(Queries("broker", schema).publish, {
        "queue": qname, "priority": 0,
        "payload": psycopg.types.json.Jsonb({
            "body": json.dumps(body), "headers": {}, "content-type": "application/json",
            "content-encoding": "utf-8", "properties": {"body_encoding": "utf-8"}}),
        "publish_id": uuid.uuid4(), "due_at": None, "expiration": None, "task_id": None,
        "unique_key": None, **publish_params(idle_space(schema), publishing_space(schema), qname),
        "channel": transport.channel_name, "notify": True})


def publish_to(db_url: str, q: Queue, body: Any) -> None:
    with Connection(kurl(db_url)) as conn:
        Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                 serializer="json").publish(body)


def test_an_announcement_arriving_during_go_idle_wakes_the_event_loop(db_url):
    """One channel on q1 and q2, both idle. q1 gets a full batch (the consumer leaves idle for
    q1) and, when the batch is acked, the consumer goes idle for q1 again; its barrier waits
    for a publish to q1 in flight (unannounced: q1 was not idle). Meanwhile a publish to q2
    sees q2 idle and announces. The announcement reaches the LISTEN session while go_idle runs
    there (PostgreSQL sends it before that statement's ReadyForQuery, so psycopg reads it into
    the listener's backlog and the socket the loop watches stays quiet); the claim after the
    barrier is for q1 only. q2's message must still be delivered."""
    q1, q2 = make_queue(), make_queue()
    c = LoopConsumer(db_url, [q1, q2])
    t = c.conn.transport
    schema = t.settings.schema
    space = idle_space(schema)
    try:
        assert until(lambda: all(c.listener_pid() in advisory_holders(db_url, space,
                                                                          queue_key(q.name))
                                      for q in (q1, q2)))
        with psycopg.connect(db_url) as batch:  # a full batch for q1, in one commit: the
            for i in range(2):  # consumer leaves idle for q1 and holds both (prefetch 2)
                raw_publish(batch, t, q1.name, {"hold": i})
        pid = c.listener_pid()
        assert until(lambda: len(c.held) == 2
                          and pid not in advisory_holders(db_url, space, queue_key(q1.name)))
        with psycopg.connect(db_url) as publisher:  # a publish to q1 in flight: not announced
            raw_publish(publisher, t, q1.name, {"in flight": 1})
            c.release()  # room again: a claim comes back short, the consumer goes idle for q1

            def barrier_blocked() -> bool:  # ... and waits at the barrier for the publish
                with psycopg.connect(db_url) as probe:
                    return bool(probe.execute("SELECT 1 FROM pg_locks WHERE pid = %s AND NOT "
                                              "granted", (pid,)).fetchall())
            assert until(barrier_blocked), "the consumer did not go idle for q1 again"
            publish_to(db_url, q2, {"q2": 1})  # q2 is idle: announced
            time.sleep(0.5)
            busy = threading.Event()  # the loop is busy (running callbacks, as Celery's does)
            c.hub.call_soon(lambda: (busy.set(), time.sleep(1.0)))  # when go_idle ends
            assert busy.wait(5)
            publisher.commit()
        arrived = until(lambda: {"q2": 1} in c.got)
        if not arrived:
            raw_notify(db_url, t.channel_name, q2.name)
            assert until(lambda: {"q2": 1} in c.got, 10)
    finally:
        c.stop()
    assert {"in flight": 1} in c.got
    assert arrived, "the announcement of q2 was read by go_idle and lost"


def test_an_event_loop_consumer_whose_listen_session_is_killed_is_woken_afterwards(db_url):
    q = make_queue()
    c = LoopConsumer(db_url, [q])
    try:
        relocked = _kill_listener_and_wait_relocked(db_url, c, q)
        publish_to(db_url, q, {"after": 1})
        arrived = until(lambda: c.got == [{"after": 1}])
        if not arrived:
            raw_notify(db_url, c.conn.transport.channel_name, q.name)
    finally:
        c.stop()
    assert relocked, "the new LISTEN session does not hold the queue's idle lock"
    assert arrived, "a publish after the reconnect did not wake the consumer"


def test_a_wait_given_up_by_a_finalizer_never_deadlocks():
    """Celery before 5.5 gives up a wait in ``AsyncResult.__del__``, and the garbage collector
    runs finalizers in whatever thread allocates: possibly one inside the wait slots' lock, in
    the middle of taking or giving back slots. Giving up a wait must not take that lock (it was
    not reentrant: the floor run's Celery 5.4 hung in a loop of gets). Reproduced here without
    the collector: a thread gives up a wait while it holds the lock, as a finalizer would."""
    from kojin_pg.backend.waiters import WaitSlots
    from kojin_pg.db import Queries

    slots = WaitSlots(Queries("backend", "kojin"), "kojin")
    slots.add(["task-a", "task-b"])
    held = slots._held.get()

    def finalizer_inside_the_lock() -> None:
        with held.lock:
            slots.discard(["task-a"])

    thread = threading.Thread(target=finalizer_inside_the_lock, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "giving up a wait inside the slots' lock deadlocked"
    assert slots.add(["task-a", "task-b"]) == ["task-a"]  # a was given up, b is still waited
