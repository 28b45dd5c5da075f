"""The kombu transport against a real PostgreSQL: delivery, leases, dead letters, routing."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from plans import execute_prepared
from psycopg import sql

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)
from kojin_pg.db import Queries
from kojin_pg.errors import ConfigurationError, PayloadError


def kurl(db_url: str) -> str:
    return "kojin+" + db_url


def make_queue(name=None, exchange_type="direct"):
    name = name or "q_" + uuid.uuid4().hex[:8]
    return Queue(name, Exchange("ex_" + name, type=exchange_type), routing_key=name)


def publish(conn, q, bodies, **kw):
    prod = Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                    serializer="json")
    for b in bodies:
        prod.publish(b, **kw)


def consume(conn: Connection, q: Queue, n: int, *, ack: bool = True, timeout: float = 10,
            prefetch: int = 100, errors: list | None = None, into: list | None = None) -> list:
    """Up to ``n`` (body, message) pairs within ``timeout`` (appended to ``into`` as they come,
    when given). With ``errors``, exceptions raised by drain_events are collected there and
    draining goes on, instead of raising."""
    got = [] if into is None else into

    def on_message(body, message):
        got.append((body, message))
        if ack:
            message.ack()

    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    deadline = time.monotonic() + timeout
    with Consumer(channel, [q], callbacks=[on_message], accept=["json"]):
        while len(got) < n and (left := deadline - time.monotonic()) > 0:
            try:
                conn.drain_events(timeout=min(0.5, left))
            except TimeoutError:
                pass
            except Exception as exc:
                if errors is None:
                    raise
                errors.append(exc)
    return got


def count(db_url, table="messages"):
    with psycopg.connect(db_url) as c:
        return c.execute(f"SELECT count(*) FROM kojin.{table}").fetchone()[0]


def test_publish_consume_ack_deletes(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i} for i in range(20)])
        got = consume(conn, q, 20)
    assert [b["i"] for b, _ in got] == list(range(20))
    assert count(db_url) == 0


@pytest.mark.parametrize("transport", ["kojin_pg.transport:Transport", "class"])
def test_plain_url_with_transport_class(db_url, transport):
    from kojin_pg.transport import Transport

    q = make_queue()
    with Connection(db_url, transport=Transport if transport == "class" else transport) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"x": 1}])
        assert [b for b, _ in consume(conn, q, 1)] == [{"x": 1}]


def test_reject_requeue_and_dead_letter(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"n": 1}])
        (_, m), = consume(conn, q, 1, ack=False)
        m.reject(requeue=True)
        (b, m2), = consume(conn, q, 1, ack=False)
        assert b == {"n": 1} and m2.delivery_info["redelivered"]
        m2.reject(requeue=False)
    assert count(db_url) == 0
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT queue, reason, delivery_count FROM kojin.dead_letters"
                         ).fetchall() == [(q.name, "rejected", 2)]


HOLD_AND_HANG = """
import sys, time
from kombu import Connection
import kojin_pg
conn = Connection("kojin+" + sys.argv[1],
                  transport_options={"visibility_timeout": 1, "lease_renew_interval": 0.25})
message = conn.channel().basic_get(sys.argv[2])
print(message.payload["n"], flush=True)
time.sleep(600)  # holds the lease (renewing it) until killed
"""


def test_lease_expiry_redelivers(db_url):
    """A consumer killed with -9 hands nothing back: only its lease running out returns the
    message (a clean close would requeue it and prove nothing about leases)."""
    import os
    import signal
    import subprocess
    import sys

    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"n": 1}])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_HANG, db_url, q.name],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    with psycopg.connect(db_url) as pg:  # still leased by the dead consumer
        assert pg.execute("SELECT leased_by IS NOT NULL, delivery_count FROM kojin.messages"
                          ).fetchall() == [(True, 1)]
    with Connection(kurl(db_url)) as conn2:
        (b, m), = consume(conn2, q, 1, timeout=10)
        assert b == {"n": 1} and m.delivery_info["delivery_count"] == 2


def test_lease_extension_keeps_a_long_held_message(db_url):
    q = make_queue()
    opts = {"visibility_timeout": 1, "lease_renew_interval": 0.25}
    with Connection(kurl(db_url), transport_options=opts) as holder, \
            Connection(kurl(db_url), transport_options=opts) as other:
        q(holder.channel()).declare()
        publish(holder, q, [{"n": 1}])
        (_, m), = consume(holder, q, 1, ack=False)
        # hold it 3x longer than the visibility timeout: nobody else may get it
        assert consume(other, q, 1, timeout=3.0) == []
        m.ack()
    assert count(db_url) == 0


def test_max_deliveries_moves_to_dead_letters(db_url):
    q = make_queue()
    opts = {"max_deliveries": 2}
    with Connection(kurl(db_url), transport_options=opts) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"poison": True}, {"ok": True}])
        for _ in range(2):
            for _b, m in consume(conn, q, 2, ack=False):
                if _b.get("poison"):
                    m.reject(requeue=True)
                else:
                    m.ack()
        assert consume(conn, q, 1, timeout=1) == []
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT reason, delivery_count, payload->'headers' IS NOT NULL "
                        "FROM kojin.dead_letters").fetchall()
    assert row == [("max_deliveries", 2, True)]
    assert count(db_url) == 0


def test_dead_and_revoked_messages_settled_on_the_way_do_not_shorten_a_batch(db_url):
    """A claim that picks messages it must not deliver (dead, revoked) buries or drops them and
    fills their places: a short batch would tell the consumer that the queue has ended."""
    q = make_queue()
    with Connection(kurl(db_url), transport_options={"max_deliveries": 2}) as conn:
        ch = conn.channel()
        q(ch).declare()
        publish(conn, q, [{"i": i} for i in range(5)])
        task_id = uuid.uuid4().hex
        with psycopg.connect(db_url) as c:
            ids = [r[0] for r in c.execute("SELECT id FROM kojin.messages WHERE queue = %s "
                                           "ORDER BY id", (q.name,))]
            c.execute("UPDATE kojin.messages SET delivery_count = 2 WHERE id = %s", (ids[0],))
            c.execute("UPDATE kojin.messages SET revoked = true, task_id = %s WHERE id = %s",
                      (task_id, ids[1]))
        got = ch._claim([q.name], 3)
        assert [p["properties"]["delivery_tag"] for p, _ in got] == ids[2:5]
        with psycopg.connect(db_url) as c:
            dead = c.execute("SELECT id, reason FROM kojin.dead_letters").fetchall()
            revoked = c.execute("SELECT status FROM kojin.results WHERE task_id = %s",
                                (task_id,)).fetchall()
            left = c.execute("SELECT count(*) FROM kojin.messages WHERE id = ANY(%s)",
                             (ids[:2],)).fetchone()[0]
        assert dead == [(ids[0], "max_deliveries")]
        assert revoked == [("REVOKED",)] and left == 0


def test_priorities_then_fifo(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": 1}, {"i": 2}], priority=1)
        publish(conn, q, [{"i": 3}], priority=9)
        publish(conn, q, [{"i": 4}], priority=0)
        got = consume(conn, q, 4)
    assert [b["i"] for b, _ in got] == [3, 1, 2, 4]


def test_fanout_reaches_queues_of_other_connections(db_url):
    ex = Exchange("fan_" + uuid.uuid4().hex[:6], type="fanout")
    queues = [Queue("fq_" + uuid.uuid4().hex[:6], ex) for _ in range(3)]
    conns = [Connection(kurl(db_url)) for _ in queues]
    try:
        for conn, q in zip(conns, queues, strict=True):
            q(conn.channel()).declare()
        with Connection(kurl(db_url)) as producer:
            ch = producer.channel()
            ex(ch).declare()
            Producer(ch, exchange=ex, serializer="json").publish({"hello": "all"})
        for conn, q in zip(conns, queues, strict=True):
            assert [b for b, _ in consume(conn, q, 1)] == [{"hello": "all"}]
    finally:
        for c in conns:
            c.close()


def test_direct_routing_across_processes(db_url):
    """A producer that never declared the queue routes by the bindings in the database."""
    q = make_queue()
    with Connection(kurl(db_url)) as consumer_conn:
        q(consumer_conn.channel()).declare()
        with Connection(kurl(db_url)) as producer:
            ch = producer.channel()
            q.exchange(ch).declare()
            Producer(ch, exchange=q.exchange, routing_key=q.routing_key,
                     serializer="json").publish({"routed": 1})
        assert [b for b, _ in consume(consumer_conn, q, 1)] == [{"routed": 1}]


def test_purge_and_size(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        ch = conn.channel()
        q(ch).declare()
        publish(conn, q, [{"i": i} for i in range(7)])
        assert q(ch).queue_declare(passive=True).message_count == 7
        assert q(ch).purge() == 7
        assert q(ch).queue_declare(passive=True).message_count == 0


def _consume_in_child(db_url, qname, out):
    q = Queue(qname, Exchange("ex_" + qname, type="direct"), routing_key=qname)
    with Connection(kurl(db_url)) as conn:
        got = consume(conn, q, 10_000, timeout=8, prefetch=10)
    out.put([b["i"] for b, _ in got])


def test_many_concurrent_consumers_each_message_once(db_url):
    q = make_queue()
    n = 2000
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i} for i in range(n)])
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume_in_child, args=(db_url, q.name, out)) for _ in range(4)]
    for p in procs:
        p.start()
    seen = [i for _ in procs for i in out.get(timeout=120)]
    for p in procs:
        p.join(30)
    assert sorted(seen) == list(range(n))  # every message exactly once
    assert count(db_url) == 0


@pytest.mark.parametrize("name", ["q'; DROP TABLE kojin.messages; --", 'q"x', "ünïcødé queue",
                                  "a" * 255])
def test_hostile_queue_names_are_data(db_url, name):
    q = Queue(name, Exchange("ex", type="direct"), routing_key=name)
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"ok": 1}])
        assert [b for b, _ in consume(conn, q, 1)] == [{"ok": 1}]
    assert count(db_url) == 0


@pytest.mark.parametrize("name", ["", "a" * 256, "nul\x00byte"])
def test_invalid_queue_names_rejected(db_url, name):
    with Connection(kurl(db_url)) as conn:
        with pytest.raises(ConfigurationError, match="invalid queue"):
            conn.channel()._new_queue(name)


def test_oversized_and_empty_payloads(db_url):
    q = make_queue()
    with Connection(kurl(db_url), transport_options={"max_message_bytes": 10_000}) as conn:
        q(conn.channel()).declare()
        with pytest.raises(PayloadError, match="larger than max_message_bytes"):
            publish(conn, q, ["x" * 20_000])
        publish(conn, q, [""])
        assert [b for b, _ in consume(conn, q, 1)] == [""]


def test_unknown_transport_option_is_named(db_url):
    with Connection(kurl(db_url), transport_options={"visibilty_timeout": 5}) as conn:
        with pytest.raises(ConfigurationError, match="visibilty_timeout"):
            conn.channel()


def test_channel_close_hands_back_unacked(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": 1}])
        consume(conn, q, 1, ack=False)
    with Connection(kurl(db_url)) as conn2:  # visible again at once, not after the lease
        assert [b for b, _ in consume(conn2, q, 1, timeout=2)] == [{"i": 1}]


def test_outbox_commit_and_rollback(db_url):
    from celery import Celery

    from kojin_pg import outbox

    app = Celery("ob", broker=kurl(db_url), backend="kojin+" + db_url, set_as_current=False)
    with psycopg.connect(db_url) as conn:
        with conn.transaction():
            outbox.send_task(conn, app, "proj.add", args=(1, 2))
        try:
            with conn.transaction():
                outbox.send_task(conn, app, "proj.add", args=(3, 4))
                raise RuntimeError("the business transaction fails")
        except RuntimeError:
            pass
    q = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")
    with Connection(kurl(db_url)) as conn:
        got = consume(conn, q, 2, timeout=2)
    assert len(got) == 1
    body, message = got[0]
    assert message.headers["task"] == "proj.add" and body[0] == [1, 2]


def test_outbox_routes_signals_notify_and_schedules_like_send_task(db_url):
    from celery import Celery, signals

    from kojin_pg import outbox

    app = Celery("ob", broker=kurl(db_url), backend="kojin+" + db_url, set_as_current=False)
    app.conf.task_routes = {"proj.report": {"queue": "reports"}}
    app.conf.broker_transport_options = {"use_notify": False}
    seen = []

    def before(sender=None, routing_key=None, **kw):
        seen.append(("before", sender, routing_key))

    def after(sender=None, routing_key=None, **kw):
        seen.append(("after", sender, routing_key))

    signals.before_task_publish.connect(before, weak=False)
    signals.after_task_publish.connect(after, weak=False)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("LISTEN kojin_msgs_kojin")  # a session hears its own notifications
            with conn.transaction():
                outbox.send_task(conn, app, "proj.report", args=(1,))
                outbox.send_task(conn, app, "proj.later", args=(2,), countdown=600)
            heard = list(conn.notifies(timeout=0.5, stop_after=1))
            rows = conn.execute("SELECT queue, due_at IS NOT NULL FROM kojin.messages "
                                "ORDER BY id").fetchall()
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert rows == [("reports", False), ("celery", True)]  # task_routes; countdown scheduled
    assert heard == []  # use_notify=False honoured
    assert seen == [("before", "proj.report", "reports"), ("after", "proj.report", "reports"),
                    ("before", "proj.later", "celery"), ("after", "proj.later", "celery")]


def test_a_publishing_process_holds_one_connection(db_url):
    """64 producer processes on a stock PostgreSQL (max_connections 100) failed with "too many
    clients": each held two connections, because the first publish found its pool still
    connecting and made it grow. A process that only publishes, one thread at a time, needs
    one."""
    q = make_queue()
    # (no upkeep round meanwhile: one meeting a publish would need a second connection)
    with Connection(kurl(db_url) + "?sweep_interval=600") as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i} for i in range(50)])
        with psycopg.connect(db_url, autocommit=True) as pg:
            held = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND application_name = 'kojin_pg.broker'"
                              ).fetchone()[0]
    assert held == 1


def test_a_process_that_only_publishes_keeps_one_connection_for_good(db_url):
    """A publishing process ran the queue upkeep too, through its publish pool: a round that
    met a publish made the pool grow to a second connection, kept for its 10 minutes of
    max_idle, so a busy producer held two after all (and 64 of them passed a stock server's
    max_connections of 100). Sweeping is the consumers' work; a process that only publishes
    holds one connection however many upkeep rounds pass."""
    q = make_queue()
    with Connection(kurl(db_url) + "?sweep_interval=0.05") as conn:
        q(conn.channel()).declare()
        producer = Producer(conn.channel(), exchange=q.exchange, routing_key=q.routing_key,
                            serializer="json")
        deadline = time.monotonic() + 1.5  # about 30 upkeep rounds
        while time.monotonic() < deadline:
            producer.publish({"i": 1})
        with psycopg.connect(db_url, autocommit=True) as pg:
            held = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND application_name = 'kojin_pg.broker'"
                              ).fetchone()[0]
    assert held == 1


def test_the_kombu_connections_of_a_process_share_one_publishing_pool(db_url):
    """Celery's producer pool keeps a kombu connection for each thread that published (up to
    broker_pool_limit), and a worker holds three (consuming, remote control, publishing). Each
    had a pool of its own, open for the life of the process: a web process whose 8 threads had
    each sent a task held 8 connections. They share the process's pool for the database, which
    grows with the statements in flight; publishing one at a time needs one connection. The
    pool closes with the last of them."""
    q = make_queue()

    def held() -> int:
        with psycopg.connect(db_url, autocommit=True) as pg:
            return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                              "current_database() AND application_name = 'kojin_pg.broker'"
                              ).fetchone()[0]

    conns = [Connection(kurl(db_url) + "?sweep_interval=600") for _ in range(4)]
    try:
        q(conns[0].channel()).declare()
        for conn in conns:
            publish(conn, q, [{"i": 1}])
        in_use = held()
        conns[0].release()  # the others go on publishing through the pool
        publish(conns[1], q, [{"i": 2}])
    finally:
        for conn in conns:
            conn.release()
    deadline = time.monotonic() + 10
    while (left := held()) and time.monotonic() < deadline:
        time.sleep(0.05)  # a closed connection's server process may take a moment to go
    assert (in_use, left) == (1, 0)


def test_sessions_never_jit_compile(db_url, make_app):
    """A stock PostgreSQL has JIT on (with LLVM). A claim's generic plan over a million queued
    rows passes jit_above_cost, and compiling was nearly all of each 27 ms claim there
    (``python -m bench scale --stock``): every session kojin_pg opens runs with JIT off. (The
    embedded server has no LLVM, so only the setting can be seen here.)"""
    def jit(db) -> str:
        return db.run(lambda c: c.execute("SELECT current_setting('jit')").fetchone()[0])

    with Connection(kurl(db_url)) as conn:
        conn.channel()
        transport = conn.transport
        assert {"publish": jit(transport.db), "claim": jit(transport.consumer_db),
                "result": jit(make_app().backend.db)} == \
            {"publish": "off", "claim": "off", "result": "off"}


def test_a_claim_updates_its_messages_in_place(db_url):
    """A claim changes only columns no index reads, so PostgreSQL can update each message in
    place (HOT: no new entry in any of its 7 indexes, a WAL record of the changed bytes) when
    its page has room. Most of a batch claimed from a fresh table must be HOT updates; it was
    none while the claim index carried visible_at (migration 9)."""
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i, "pad": "x" * 200} for i in range(20)])
        assert len(consume(conn, q, 20, prefetch=20)) == 20
    # the consumer's backend reports its counts as it exits
    deadline = time.monotonic() + 10
    updated = hot = 0
    while updated < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
        with psycopg.connect(db_url) as pg:
            updated, hot = pg.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE schemaname = 'kojin' AND relname = 'messages'").fetchone()
    assert updated >= 20, "harness: the claims' updates were never counted"
    assert hot >= updated / 2, f"{hot} of {updated} claim updates were HOT"


def test_consumer_plans_made_on_an_empty_table_never_scan_it(db_url):
    """A consumer session plans each statement once (generic) and keeps the plan while the
    messages table grows and shrinks under it. Planned while the table was nearly empty, the
    claim's lease and its acks by id (``id = ANY(...)``) and the ack on its own were scans of
    the whole table, at every call from then on: on a stock server, 848 of 1,442 claims of a
    prefork run read every page of it (up to 700), their median 0.67 ms against 0.24, and 188
    of 576 acks took 0.54 ms against 0.06 (auto_explain). Consumer sessions now plan without
    sequential scans, so each of these finds its rows by index whatever the table's size."""
    args = {"claim": {"acks": [], "queues": ["q_plan"], "n": 10, "visibility_timeout": 30.0,
                      "consumer": "plan-test", "max_deliveries": 5},
            "ack": {"ids": [1, 2]}}

    queries = Queries("broker", "kojin")
    statements = {name: getattr(queries, name) for name in args}

    def plans_after_growth(conn: psycopg.Connection) -> dict[str, list[str]]:
        for name, params in args.items():  # prepared now, planned on a nearly empty table
            conn.execute(statements[name], params, prepare=True)
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("INSERT INTO kojin.messages (queue, payload) "
                          "SELECT 'q_plan_other', '{}' FROM generate_series(1, 5000)")
        plans = {}
        for name, params in args.items():
            plans[name] = [row[0] for row in conn.execute(
                sql.SQL("EXPLAIN ") + execute_prepared(conn, statements[name], params))]
        return plans

    with Connection(kurl(db_url)) as conn:
        conn.channel()
        plans = conn.transport.consumer_db.run(plans_after_growth)
    for name, plan in plans.items():
        assert any("Scan on messages" in line for line in plan), f"harness: {plan}"
        assert not any("Seq Scan on messages" in line for line in plan), \
            f"{name}:\n" + "\n".join(plan)


def test_corrupted_message_goes_to_dead_letters_and_does_not_block(db_url):
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": 1}])
        with psycopg.connect(db_url, autocommit=True) as pg:
            pg.execute("INSERT INTO kojin.messages (queue, payload) VALUES (%s, '{\"junk\": 1}')",
                       (q.name,))
            pg.execute("INSERT INTO kojin.messages (queue, payload) VALUES (%s, '[1, 2]')",
                       (q.name,))
        publish(conn, q, [{"i": 2}])
        got = consume(conn, q, 2, timeout=5)
    assert [b["i"] for b, _ in got] == [1, 2]
    with psycopg.connect(db_url) as pg:
        rows = pg.execute("SELECT reason, error FROM kojin.dead_letters ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["undecodable", "undecodable"]
    assert all("properties" in r[1] or "not a kombu message" in r[1] for r in rows)
    assert count(db_url) == 0


def test_ack_is_applied_promptly_without_another_drain(db_url):
    """Acks ride on the next claim; a consumer that stops draining still gets them applied."""
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": 1}])
        message = conn.channel().basic_get(q.name)
        message.ack()
        deadline = time.monotonic() + 5
        while count(db_url) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert count(db_url) == 0  # still connected, never drained again


def _plan_buffers(node) -> int:
    return node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)


def test_claim_reads_the_same_few_pages_at_any_backlog(db_url):
    """The claim walks the index in delivery order and stops: its cost must not grow with the
    backlog (a claim that reads and sorts the whole queue would touch thousands of pages)."""
    import json as _json

    from kojin_pg.db import Queries

    claim = Queries("broker", "kojin").claim
    params = {"acks": [], "queues": ["big", "other"], "n": 16, "max_deliveries": 10,
              "visibility_timeout": 60.0, "consumer": "test", "revoked_result": None,
              "result_expires": 60.0, "results_channel": "kojin_results_kojin"}
    with psycopg.connect(db_url) as conn:
        # scheduled first (lower ids, the head of the queue's order): the claim must not walk them
        conn.execute("INSERT INTO kojin.messages (queue, payload, due_at, visible_at) "
                     "SELECT 'big', jsonb_build_object('properties', '{}'::jsonb, 'i', g), "
                     "now() + interval '1 hour', now() + interval '1 hour' "
                     "FROM generate_series(1, 50000) g")
        conn.execute("INSERT INTO kojin.messages (queue, payload) SELECT 'big', "
                     "jsonb_build_object('properties', '{}'::jsonb, 'i', g) "
                     "FROM generate_series(1, 50000) g")
        conn.commit()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE kojin.messages")
    # as planned for the given batch, and as the consumer pool plans it: once, generically
    for mode in ("auto", "force_generic_plan"):
        with psycopg.connect(db_url) as conn:
            conn.execute(psycopg.sql.SQL("SET plan_cache_mode = {}").format(
                psycopg.sql.SQL(mode)))
            explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + claim
            plan = conn.execute(explain, params).fetchone()[0]
            conn.rollback()
        if isinstance(plan, str):
            plan = _json.loads(plan)
        total = _plan_buffers(plan[0]["Plan"])
        assert total < 300, f"claim ({mode}) touched {total} pages with 50,000 messages " \
            "queued and 50,000 scheduled"


def test_leases_lost_with_a_connection_are_handed_back(db_url):
    """A claim retried after a lost connection first returns leases it never received."""
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": 1}, {"i": 2}])
        held = conn.channel().basic_get(q.name)  # really received: must stay leased
        transport = conn.transport
        with psycopg.connect(db_url, autocommit=True) as pg:
            # what a committed claim whose answer was lost leaves behind
            pg.execute("UPDATE kojin.messages SET leased_by = %s, "
                       "visible_at = now() + interval '1 hour' WHERE id <> %s",
                       (transport.consumer_id, held.delivery_tag))
            with transport.consumer_db.connection() as c:
                transport.release_orphans(c, keep=[])
            rows = pg.execute("SELECT id, leased_by IS NULL, visible_at <= now() "
                              "FROM kojin.messages ORDER BY id").fetchall()
        assert rows == [(held.delivery_tag, False, False), (held.delivery_tag + 1, True, True)]
        held.ack()


def test_no_ack_consumers_remove_what_they_receive(db_url):
    """no_ack (e.g. Celery's event receivers): delivered means done; nothing stays leased."""
    q = make_queue()
    got = []
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i} for i in range(5)])
        ch = conn.channel()
        with Consumer(ch, [q], callbacks=[lambda b, m: got.append(b["i"])], accept=["json"],
                      no_ack=True):
            deadline = time.monotonic() + 10
            while len(got) < 5 and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
        publish(conn, q, [{"i": 5}])
        assert ch.basic_get(q.name, no_ack=True).payload == {"i": 5}
        deadline = time.monotonic() + 5
        while count(db_url) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got == [0, 1, 2, 3, 4]
    assert count(db_url) == 0


def test_a_process_that_only_publishes_opens_no_consumer_pool(db_url):
    """Publishing and the queue upkeep go through the publishing pool: a web process that only
    sends tasks must not hold consumer connections too (64 producers held 256 connections)."""
    q = make_queue()
    with Connection(kurl(db_url) + "?sweep_interval=0.2") as conn:
        q(conn.channel()).declare()
        publish(conn, q, [{"i": i} for i in range(3)])
        time.sleep(1.0)  # several upkeep rounds
        with psycopg.connect(db_url, autocommit=True) as admin:
            roles = [r[0] for r in admin.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()").fetchall()]
    assert "kojin_pg.consumer" not in roles, f"a publishing process opened consumer sessions: {roles}"
    assert "kojin_pg.broker" in roles


@contextmanager
def waiting_consumer(db_url: str, q: Queue, n: int, got: list,
                     timeout: float = 20) -> Iterator[Connection]:
    """A consumer of ``q`` on a thread, taking up to ``n`` messages into ``got``, that polls
    only every 600 s (so only a wake-up reaches it in time) and is idle on LISTEN when the
    block starts; its thread is joined at the end. ``db_url`` may carry options already."""
    sep = "&" if "?" in db_url else "?"
    with Connection(f"{kurl(db_url)}{sep}polling_interval=600") as conn:
        q(conn.channel()).declare()
        th = threading.Thread(target=consume, args=(conn, q, n),
                              kwargs={"timeout": timeout, "into": got})
        th.start()
        time.sleep(1.0)  # idle on LISTEN by now
        try:
            yield conn
        finally:
            th.join(timeout + 5)


def heard_during(db_url: str, channel: str, work) -> list[str]:
    """Payloads announced on ``channel`` while ``work()`` runs."""
    with psycopg.connect(db_url, autocommit=True) as listen:
        listen.execute(f'LISTEN "{channel}"')
        work()
        return [n.payload for n in listen.notifies(timeout=0.5)]


def test_publishes_nobody_waits_for_are_not_announced(db_url):
    """A NOTIFY serializes every notifying commit across its flush: a publish announces its
    message only when a consumer of the queue may be waiting (issue 12)."""
    q = make_queue()
    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        heard = heard_during(db_url, conn.transport.channel_name,
                       lambda: publish(conn, q, [{"i": i} for i in range(20)]))
        assert heard == [], f"{len(heard)} publishes with no consumer waiting were announced"
        assert len(consume(conn, q, 20)) == 20  # consumes, drains the queue, then waits
        got = []
        with Connection(kurl(db_url) + "?polling_interval=30") as waiter:
            th = threading.Thread(target=lambda: got.extend(consume(waiter, q, 1, timeout=20)))
            th.start()
            time.sleep(1.0)  # the waiter is idle on LISTEN now
            heard = heard_during(db_url, conn.transport.channel_name,
                           lambda: publish(conn, q, [{"late": 1}]))
            th.join(25)
    assert q.name in heard, "a publish with a consumer waiting was not announced"
    assert [b for b, _ in got] == [{"late": 1}]


def test_outbox_sends_nobody_waits_for_are_not_announced(db_url):
    """The outbox, too, announces only when a consumer of the queue may be waiting, decided
    at the caller's commit (it used to NOTIFY on every send)."""
    from celery import Celery

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)

    def send(n: int) -> None:
        with psycopg.connect(db_url) as conn, conn.transaction():
            for i in range(n):
                outbox.send_task(conn, app, "proj.add", args=(i,), queue=q.name)

    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        heard = heard_during(db_url, conn.transport.channel_name, lambda: send(5))
        assert heard == [], f"{len(heard)} outbox sends with no consumer waiting were announced"
        assert len(consume(conn, q, 5)) == 5
    got = []
    with Connection(kurl(db_url) + "?polling_interval=600") as waiter:
        th = threading.Thread(target=lambda: got.extend(consume(waiter, q, 1, timeout=20)))
        th.start()
        time.sleep(1.0)  # the waiter is idle on LISTEN now
        heard = heard_during(db_url, waiter.transport.channel_name, lambda: send(1))
        th.join(25)
    assert q.name in heard, "an outbox send with a consumer waiting was not announced"
    assert [b[0] for b, _ in got] == [[0]]
    with psycopg.connect(db_url) as pg:  # the commit-time wake-ups leave no rows behind
        assert pg.execute("SELECT count(*) FROM kojin.outbox_wakeups").fetchone() == (0,)


def test_an_outbox_on_a_schema_before_migration_8_announces_every_send(db_url):
    """An application server upgraded before the workers migrate the schema: the outbox finds
    no outbox_wakeups table and announces at the commit, as older versions did, instead of
    failing the business transaction."""
    from celery import Celery

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    with psycopg.connect(db_url, autocommit=True) as pg:
        pg.execute("DROP TABLE kojin.outbox_wakeups")

    def send() -> None:
        with psycopg.connect(db_url) as conn, conn.transaction():
            conn.execute("CREATE TEMP TABLE orders (id int)")  # the business's own write
            outbox.send_task(conn, app, "proj.add", args=(1,), queue=q.name)

    with Connection(kurl(db_url)) as conn:
        q(conn.channel()).declare()
        heard = heard_during(db_url, conn.transport.channel_name, send)
        assert [b[0] for b, _ in consume(conn, q, 1)] == [[1]]
    assert heard == [q.name]


def test_an_outbox_transaction_wakes_the_idle_consumer_after_its_commit(db_url):
    """``outbox.transaction`` leaves the wake-up out of the caller's transaction: nothing of it
    is written there (no outbox_wakeups row for the commit to act on), and once the commit is
    done the idle consumer is woken (it polls only every 600 s), once for the queue however
    many sends went to it. A rolled-back transaction (an exception, or psycopg's Rollback)
    announces nothing and delivers nothing."""
    from celery import Celery

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    got: list = []

    def roll_back() -> None:
        with psycopg.connect(db_url) as conn:
            with pytest.raises(RuntimeError), outbox.transaction(conn):
                outbox.send_task(conn, app, "proj.add", args=("failed",), queue=q.name)
                raise RuntimeError("the business transaction fails")
            with outbox.transaction(conn):
                outbox.send_task(conn, app, "proj.add", args=("rolled back",), queue=q.name)
                raise psycopg.Rollback()

    def send() -> None:
        with psycopg.connect(db_url) as conn:
            with outbox.transaction(conn):
                for i in range(3):
                    outbox.send_task(conn, app, "proj.add", args=(i,), queue=q.name)
                assert conn.execute("SELECT count(*) FROM kojin.outbox_wakeups"
                                    ).fetchone() == (0,), "the commit was left a wake-up"
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with waiting_consumer(db_url, q, 3, got) as waiter:
        assert heard_during(db_url, waiter.transport.channel_name, roll_back) == []
        heard = heard_during(db_url, waiter.transport.channel_name, send)
    assert heard == [q.name], f"announced {heard} for one queue's sends"
    assert sorted(b[0] for b, _ in got) == [[0], [1], [2]]
    with psycopg.connect(db_url) as pg:
        assert pg.execute("SELECT count(*) FROM kojin.messages WHERE queue = %s",
                          (q.name,)).fetchone() == (0,)


def test_an_outbox_commit_that_waits_to_be_durable_holds_up_no_other_announcement(db_url):
    """A NOTIFY takes a lock on the whole database at commit, held until the commit is
    durable (issue 12: "none inside the caller's transaction for the outbox"). With
    ``outbox.transaction`` the caller's commit sends none: here a standby that never confirms
    holds that commit, and a publish to an idle consumer meanwhile must be announced and
    delivered; the outbox's message is announced once its commit is durable."""
    from bounded import until
    from celery import Celery
    from syncrep import standby_never_confirms

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    got: list = []

    def business() -> None:
        # the test server runs at synchronous_commit=off; a user's runs at on
        with psycopg.connect(db_url, options="-c synchronous_commit=on") as conn, \
                outbox.transaction(conn):
            conn.execute("CREATE TEMP TABLE orders (id int)")  # the business's own write
            outbox.send_task(conn, app, "proj.add", args=("outbox",), queue=q.name)

    with waiting_consumer(db_url, q, 2, got, timeout=40), \
            Connection(kurl(db_url) + "?synchronous_commit=local") as producer:
        with standby_never_confirms(db_url) as commits:
            commits.start(business)
            assert until(lambda: commits.waiting() == 2), \
                "the outbox's commit never waited for the standby"
            sent = threading.Thread(target=publish, args=(producer, q, [{"plain": 1}]))
            sent.start()
            sent.join(10)
            assert not sent.is_alive(), \
                "a publish's announcement waited for an outbox commit to be durable"
            assert until(lambda: len(got) == 1), "the idle consumer did not get the publish"
    assert [b for b, _ in got][0] == {"plain": 1}
    assert len(got) == 2 and got[1][0][0] == ["outbox"], "the outbox commit woke nobody"


def test_an_outbox_transaction_inside_another_wakes_at_the_outer_commit(db_url):
    """Entered inside a transaction already open, ``outbox.transaction`` is a savepoint and
    cannot run after the commit: its sends are announced by the outer commit, as
    ``send_task`` alone does."""
    from celery import Celery

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    got: list = []
    with waiting_consumer(db_url, q, 1, got) as waiter:
        def send() -> None:
            with psycopg.connect(db_url) as conn, conn.transaction():
                with outbox.transaction(conn):
                    outbox.send_task(conn, app, "proj.add", args=("inner",), queue=q.name)
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS

        heard = heard_during(db_url, waiter.transport.channel_name, send)
    assert heard == [q.name]
    assert [b[0] for b, _ in got] == [["inner"]]


def test_an_outbox_transaction_announces_a_scheduled_send_only_as_the_queues_earliest(db_url):
    """As a publish does, the wake-up after the commit announces a scheduled message only when
    it is the queue's earliest (the idle consumers set their timers by it), and a ready one
    always. The consumer's idle lock is taken here as a consumer going idle takes it."""
    from celery import Celery

    from kojin_pg import outbox
    from kojin_pg.transport.idle import idle_space, queue_key

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    with Connection(kurl(db_url)) as conn, psycopg.connect(db_url, autocommit=True) as idle:
        q(conn.channel()).declare()
        idle.execute("SELECT pg_advisory_lock_shared(%s, %s)",
                     (idle_space("kojin"), queue_key(q.name)))

        def send(*countdowns: int | None) -> None:
            with psycopg.connect(db_url) as business, outbox.transaction(business):
                for countdown in countdowns:
                    outbox.send_task(business, app, "proj.add", queue=q.name,
                                     countdown=countdown)

        channel = conn.transport.channel_name
        assert heard_during(db_url, channel, lambda: send(600, 300)) == [q.name]
        assert heard_during(db_url, channel, lambda: send(900)) == []
        assert heard_during(db_url, channel, lambda: send(900, None)) == [q.name]


def test_an_outbox_announcement_that_fails_after_the_commit_raises_nothing(db_url, caplog):
    """The caller's transaction is committed when the announcement is sent: if that fails
    (here the connection is gone), the caller gets no exception for a commit that happened,
    only a warning, and the message waits for the consumers' next poll."""
    from kojin_pg import outbox

    conn = psycopg.connect(db_url)
    conn.close()
    sent = outbox.AfterCommit()
    sent.add("kojin", "q_gone", None)
    sent.announce(conn)
    assert "could not wake" in caplog.text


def test_an_open_outbox_transaction_holds_up_no_consumer_and_no_publisher(db_url):
    """The outbox decides whether to announce at the caller's commit, not when it sends: a
    business transaction left open (for seconds, or forever) must not make a consumer going
    idle wait for it, nor the publishers queued behind that consumer; its commit then wakes
    the idle consumer at once (it polls only every 600 s)."""
    from celery import Celery

    from kojin_pg import outbox

    q = make_queue()
    app = Celery("ob", broker=kurl(db_url), set_as_current=False)
    got: list = []
    with Connection(kurl(db_url) + "?polling_interval=600") as consumer, \
            Connection(kurl(db_url)) as producer:
        q(consumer.channel()).declare()
        with psycopg.connect(db_url) as business:
            outbox.send_task(business, app, "proj.add", args=("outbox",), queue=q.name)
            th = threading.Thread(target=consume, args=(consumer, q, 2),
                                  kwargs={"timeout": 20, "into": got})
            th.start()
            time.sleep(1.0)  # the consumer went idle while the business transaction is open
            sent = threading.Thread(target=publish, args=(producer, q, [{"plain": 1}]))
            sent.start()
            sent.join(10)
            assert not sent.is_alive(), "a publish waited for an open outbox transaction"
            deadline = time.monotonic() + 10
            while len(got) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(got) == 1, "the consumer did not get a plain publish meanwhile"
            business.commit()
        th.join(15)
    assert [b for b, _ in got][0] == {"plain": 1}
    assert len(got) == 2 and got[1][0][0] == ["outbox"], "the outbox commit woke nobody"


def test_a_consumer_going_idle_during_a_publish_gets_its_message(db_url):
    """The publish's probe ran before the consumer said it waits, so it will not announce; the
    consumer's barrier must wait for that publish's commit and its next claim see the message,
    with no polling to rescue it (the consumer waits up to 600 s; a lost wake-up shows as no
    delivery within the 10 s the test gives)."""
    from kojin_pg.db import Queries
    from kojin_pg.transport.idle import idle_space, publish_params, publishing_space

    q = make_queue()
    with Connection(kurl(db_url) + "?polling_interval=600") as conn:
        q(conn.channel()).declare()
        schema = conn.transport.settings.schema
        with psycopg.connect(db_url) as publisher:  # a transaction, committed later
            publisher.execute(Queries("broker", schema).publish, {
                "queue": q.name, "priority": 0,
                "payload": psycopg.types.json.Jsonb({"body": '{"x": 1}', "headers": {},
                                                     "content-type": "application/json",
                                                     "content-encoding": "utf-8",
                                                     "properties": {"body_encoding": "utf-8"}}),
                "publish_id": uuid.uuid4(), "due_at": None, "expiration": None,
                "task_id": None, "unique_key": None,
                **publish_params(idle_space(schema), publishing_space(schema), q.name),
                "channel": conn.transport.channel_name, "notify": True})
            got: list = []

            def wait_once() -> None:  # one long wait: no periodic look can rescue it
                channel = conn.channel()
                with Consumer(channel, [q], callbacks=[lambda b, m: (got.append(b), m.ack())],
                              accept=["json"]):
                    try:
                        conn.drain_events(timeout=600)
                    except TimeoutError:
                        pass
            th = threading.Thread(target=wait_once)
            th.start()
            time.sleep(1.0)  # the consumer found nothing and is going idle: blocked on us
            assert not got
            publisher.commit()
            th.join(10)
            delivered = list(got)
            if th.is_alive():  # lost: wake it so the test can end
                publisher.execute("SELECT pg_notify(%s, %s)", (conn.transport.channel_name,
                                                                q.name))
                publisher.commit()
                th.join(10)
    assert delivered == [{"x": 1}], "the wake-up was lost"
