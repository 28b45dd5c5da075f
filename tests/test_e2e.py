"""End to end: real ``celery worker`` processes with broker AND result backend on kojin_pg."""

from __future__ import annotations

import time

import psycopg
import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError
from reads import watch_reads
from workers import wait_ready

pytestmark = pytest.mark.e2e


@pytest.fixture
def app(e2e_app):
    return e2e_app


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_tasks_groups_chords(app, workers, pool):
    w = workers(pool=pool)
    wait_ready(app, w)
    add, tsum, identity = app.tasks["e2e.add"], app.tasks["e2e.tsum"], app.tasks["e2e.identity"]
    assert add.delay(2, 3).get(timeout=30) == 5
    assert group(add.s(i, i) for i in range(20))().get(timeout=60) == [2 * i for i in range(20)]
    assert chord(add.s(i, 1) for i in range(500))(tsum.s()).get(timeout=120) == \
        sum(range(1, 501))
    # chord of chords: the inner chords' bodies are the outer header
    inner = [chord([add.s(i, j) for j in range(5)], tsum.s()) for i in range(4)]
    assert chord(inner)(tsum.s()).get(timeout=120) == sum(5 * i + 10 for i in range(4))
    # chain with a chord in the middle, and a chain in a chord header
    assert chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s()), identity.s()).apply_async(
    ).get(timeout=60) == 7
    assert chord([chain(add.s(1, 1), add.s(10)), add.s(0, 1)])(tsum.s()).get(timeout=60) == 13
    # a nested group in a chord header is flattened by Celery (its freeze step reverses the
    # nested members); the body gets Celery's header result order
    nested = chord([group(identity.s(1), identity.s(2)), identity.s(3)])(identity.s())
    assert nested.get(timeout=60) in ([1, 2, 3], [2, 1, 3])
    # extended metadata landed in columns
    with psycopg.connect(app.conf.broker_url[len("kojin+"):]) as conn:
        n = conn.execute("SELECT count(*) FROM kojin.results WHERE name = 'e2e.add' "
                         "AND worker LIKE 'w0@%%' AND queue = 'celery'").fetchone()[0]
    assert n > 500
    # no chord_unlock polling task was ever used
    assert "chord_unlock" not in w.log.read_text()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_caller_that_waits_for_what_it_sends_reads_no_result(app, workers, monkeypatch, pool):
    """Each get took its task's wait slot and read, in a statement on the caller's LISTEN
    session, and with result_extended each result was announced by id and read once more.
    Now the worker announces it with its extended fields to the sender's key, held from the
    caller thread's first get on: the gets that follow run no statement (but the safety net's
    reads, due every second)."""
    w = workers(pool=pool)
    wait_ready(app, w)
    add = app.tasks["e2e.add"]
    assert add.delay(0, 0).get(timeout=30) == 0  # this thread's sender key is held from here
    reads = watch_reads(app.backend, monkeypatch, but_safety_net=True)
    assert [add.delay(i, 1).get(timeout=30) for i in range(10)] == list(range(1, 11))
    assert reads == [], f"{len(reads)} reads for 10 gets (but the safety net's)"


def test_chord_with_failing_member_and_retries(app, workers):
    w = workers()
    wait_ready(app, w)
    add, tsum, fail = app.tasks["e2e.add"], app.tasks["e2e.tsum"], app.tasks["e2e.fail"]
    result = chord([add.s(1, 1), fail.s("broken part"), add.s(2, 2)])(tsum.s())
    # (get() with propagate=True raises the header's own ValueError first, as Celery does)
    body_error = result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE"
    assert isinstance(body_error, ChordError) and "broken part" in str(body_error)
    with pytest.raises(ValueError, match="direct failure"):
        fail.delay("direct failure").get(timeout=30)
    assert app.tasks["e2e.flaky"].delay(2).get(timeout=60) == 2


def test_inspect_ping_and_control(app, workers):
    w = workers(name="pingme")
    wait_ready(app, w)
    replies = app.control.inspect(timeout=5).ping() or {}
    assert any(name.startswith("pingme@") and r == {"ok": "pong"} for name, r in replies.items())
    active_queues = app.control.inspect(timeout=5).active_queues() or {}
    assert any(q["name"] == "celery" for qs in active_queues.values() for q in qs)


def test_prefork_children_open_their_result_connection_before_their_first_task(app, workers,
                                                                               db_url):
    """Each prefork child opened its result pool in its first task's result store (8 ms here,
    13-20 ms on a loaded machine), and with max_tasks_per_child so did every replacement
    child. A child opens it as it starts, before it takes work; one that exits takes its
    connection with it."""
    w = workers(pool="prefork", concurrency=2, extra_args=["--max-tasks-per-child=1"])

    def result_connections_become(n: int) -> bool:
        deadline = time.monotonic() + 30
        with psycopg.connect(db_url, autocommit=True) as pg:
            while time.monotonic() < deadline:
                found = pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'kojin_pg.backend'").fetchone()[0]
                if found == n:
                    return True
                time.sleep(0.1)
        print(f"{found} result connections", w.tail())
        return False

    replies: dict = {}
    deadline = time.monotonic() + 60
    while not replies and time.monotonic() < deadline:
        replies = app.control.inspect(timeout=1).ping() or {}
    assert replies, w.tail()
    assert result_connections_become(2)  # one per child, no task run yet
    add = app.tasks["e2e.add"]
    assert [add.delay(i, 1).get(timeout=60) for i in range(4)] == [1, 2, 3, 4]
    app.backend.result_consumer.stop()  # this process's own: not counted
    app.backend.db.close()
    assert result_connections_become(2)  # the replacements' own, the exited ones' gone


def test_kill_9_mid_task_is_completed_by_another_worker(app, workers):
    opts = {"visibility_timeout": 3, "lease_renew_interval": 0.5}
    w1 = workers(broker_options=opts, name="victim")
    wait_ready(app, w1)
    r = app.tasks["e2e.sleep_then"].delay(4, "finished")
    deadline = time.monotonic() + 30
    while r.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.state == "STARTED"
    w1.kill()
    w2 = workers(broker_options=opts, name="rescuer")
    assert r.get(timeout=60) == "finished"
    assert app.backend.get_task_meta(r.id, cache=False)["worker"].startswith("rescuer@")
    w2.stop()


def test_long_task_is_not_redelivered_while_its_worker_lives(app, workers, db_url):
    opts = {"visibility_timeout": 1, "lease_renew_interval": 0.25}
    w1 = workers(broker_options=opts, name="one", concurrency=2)
    w2 = workers(broker_options=opts, name="two", concurrency=2)
    wait_ready(app, w1)
    r = app.tasks["e2e.sleep_then"].delay(3.5, "once")  # 3.5x the visibility timeout
    assert r.get(timeout=60) == "once"
    logs = w1.log.read_text() + w2.log.read_text()
    assert logs.count(f"Task e2e.sleep_then[{r.id}] received") == 1


def test_task_that_kills_its_worker_is_dead_lettered(app, workers, db_url):
    w = workers(pool="prefork", concurrency=2, broker_options={"max_deliveries": 2})
    wait_ready(app, w)
    r = app.tasks["e2e.die"].delay()
    deadline = time.monotonic() + 90
    dead = []
    while not dead and time.monotonic() < deadline:
        with psycopg.connect(db_url) as conn:
            dead = conn.execute("SELECT reason, delivery_count, payload->'headers'->>'id' "
                                "FROM kojin.dead_letters").fetchall()
        time.sleep(0.3)
    assert dead == [("max_deliveries", 2, r.id)]
    # the worker keeps serving
    assert app.tasks["e2e.add"].delay(20, 22).get(timeout=60) == 42


@pytest.mark.slow
def test_postgres_restart_under_load_loses_nothing(app, workers, pg_server):
    if pg_server.embedded is None:
        pytest.skip("needs the embedded server to restart it (KOJIN_PG_TEST_URL is set)")
    w = workers(concurrency=4)
    wait_ready(app, w)
    add = app.tasks["e2e.add"]
    before = [add.delay(i, 1) for i in range(200)]
    pg_server.embedded.restart("fast")
    after = [add.delay(i, 2) for i in range(200)]
    assert [r.get(timeout=120) for r in before] == [i + 1 for i in range(200)]
    assert [r.get(timeout=120) for r in after] == [i + 2 for i in range(200)]
    # and once more, harder
    pg_server.embedded.restart("immediate")
    assert add.delay(1, 1).get(timeout=120) == 2


def test_outbox_commit_delivers_rollback_does_not(app, workers, db_url):
    from kojin_pg import outbox

    w = workers()
    wait_ready(app, w)
    with psycopg.connect(db_url) as conn:
        with conn.transaction():
            committed = outbox.send_task(conn, app, "e2e.add", args=(40, 2))
        try:
            with conn.transaction():
                rolled_back = outbox.send_task(conn, app, "e2e.add", args=(1, 1))
                raise RuntimeError("abort")
        except RuntimeError:
            pass
    assert committed.get(timeout=30) == 42
    assert app.tasks["e2e.add"].delay(0, 1).get(timeout=30) == 1
    assert rolled_back.state == "PENDING"


def test_events_revoke_and_shutdown_reach_the_workers(app, workers, db_url):
    """The celeryev topic exchange carries task events (celery events, Flower); revoke and
    shutdown are broadcast to every worker through the pidbox fanout exchange.

    The workers are prefork ones: a threads-pool worker sends a task's events from the thread
    that ran it, and Celery before 5.7 drops an event that a thread adds to the event buffer
    while the worker's main thread publishes that buffer (its flush clears the whole list after
    the publish; 5.7 clears only what it published). A publish that waits for a commit makes
    that window wide enough to hit here, on Celery 5.4 about one run in three."""
    import threading

    w1 = workers(pool="prefork", concurrency=1, name="ev1", extra_args=["-E"])
    w2 = workers(pool="prefork", concurrency=1, name="ev2", extra_args=["-E"])
    wait_ready(app, w1)
    wait_ready(app, w2)
    seen: list[str] = []

    def listen():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={
                "task-succeeded": lambda e: seen.append(e["uuid"])})
            try:
                # stops after this long without an event (workers run without heartbeats)
                recv.capture(limit=None, timeout=20, wakeup=False)
            except TimeoutError:
                pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    deadline = time.monotonic() + 30
    bound = False
    while not bound and time.monotonic() < deadline:  # the receiver's queue is bound
        with psycopg.connect(db_url) as conn:
            bound = conn.execute("SELECT count(*) FROM kojin.bindings "
                                 "WHERE exchange = 'celeryev'").fetchone()[0] > 0
        time.sleep(0.1)
    assert bound
    done = app.tasks["e2e.add"].delay(2, 2)
    assert done.get(timeout=30) == 4
    while done.id not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.id in seen
    listener.join(60)
    with psycopg.connect(db_url) as conn:  # events are consumed with no_ack: none linger
        left = conn.execute("SELECT count(*) FROM kojin.messages "
                            "WHERE queue LIKE 'celeryev.%%' AND leased_by IS NOT NULL"
                            ).fetchone()[0]
    assert left == 0
    # revoke reaches the workers before the (delayed) task runs
    later = app.tasks["e2e.add"].apply_async((1, 1), countdown=3)
    app.control.revoke(later.id)
    deadline = time.monotonic() + 30
    while later.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert later.state == "REVOKED"
    # shutdown reaches both workers
    app.control.shutdown()
    for w in (w1, w2):
        assert w.proc.wait(60) == 0  # a warm shutdown, on the remote command
        assert "Got shutdown from remote" in w.log.read_text(errors="replace")
