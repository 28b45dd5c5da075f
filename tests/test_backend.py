"""The result backend against a real PostgreSQL: every backend method, TTL, cleanup, waiting."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest
from bounded import until
from celery import states
from celery.app.task import Context
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult
from netproxy import PgProxy
from plans import execute_prepared
from psycopg import sql
from reads import watch_heard, watch_reads
from syncrep import standby_never_confirms

from kojin_pg.backend.waiters import wait_slot
from kojin_pg.backend.warmup import start_opening
from kojin_pg.errors import ConfigurationError, PayloadError


def tid() -> str:
    return str(uuid.uuid4())


def request(**kw) -> Context:
    base = dict(id=tid(), task="proj.add", args=[1, 2], kwargs={"z": 3}, hostname="w1@host",
                retries=2, delivery_info={"routing_key": "celery"}, group=None, parent_id=None)
    base.update(kw)
    return Context(base)


def test_store_and_get_with_extended_metadata(backend, db_url):
    req = request()
    backend.store_result(req.id, {"a": [1, 2], "b": "x"}, states.SUCCESS, request=req)
    meta = backend.get_task_meta(req.id, cache=False)
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == {"a": [1, 2], "b": "x"}
    assert (meta["name"], meta["args"], meta["kwargs"]) == ("proj.add", [1, 2], {"z": 3})
    assert (meta["worker"], meta["retries"], meta["queue"]) == ("w1@host", 2, "celery")
    assert meta["date_done"] is not None
    # The result is real JSONB, queryable in SQL; the metadata lives in columns.
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT result->'a'->>1, name, worker, jsonb_typeof(result) "
            "FROM kojin.results WHERE task_id = %s", (req.id,)).fetchone()
    assert row == ("2", "proj.add", "w1@host", "object")


def test_python_types_round_trip_like_kombu_json(backend):
    import datetime
    import decimal

    value = {"when": datetime.datetime(2024, 1, 2, 3, 4, 5), "d": decimal.Decimal("1.5"),
             "big": 2**70, "nul": "a\x00b", "nested": [[1], {"k": None}]}
    t = tid()
    backend.store_result(t, value, states.SUCCESS)
    assert backend.get_task_meta(t, cache=False)["result"] == value


def test_failure_restores_exception_and_traceback(backend):
    t = tid()
    backend.mark_as_failure(t, KeyError("missing"), traceback="Traceback: here")
    meta = backend.get_task_meta(t, cache=False)
    assert meta["status"] == states.FAILURE
    assert isinstance(meta["result"], KeyError)
    assert meta["traceback"] == "Traceback: here"


def test_success_is_never_overwritten(backend):
    t = tid()
    backend.mark_as_done(t, 1)
    backend.mark_as_failure(t, ValueError("late duplicate"))
    backend.mark_as_started(t)
    assert backend.get_task_meta(t, cache=False)["result"] == 1


def test_pending_and_progress_states(backend):
    t = tid()
    assert backend.get_task_meta(t)["status"] == states.PENDING
    backend.store_result(t, {"progress": 50}, "PROGRESS")
    assert backend.get_task_meta(t, cache=False) ["result"] == {"progress": 50}
    assert backend.task_result_exists(t)
    assert not backend.task_result_exists(tid())


def test_pickle_serializer_uses_bytea(make_app, db_url):
    app = make_app(result_serializer="pickle", accept_content=["pickle", "json"])
    b = app.backend
    t = tid()
    value = {1, 2, 3}  # not JSON-encodable
    b.store_result(t, value, states.SUCCESS, request=request(id=t))
    meta = b.get_task_meta(t, cache=False)
    assert meta["result"] == value
    assert meta["args"] == [1, 2]
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT result IS NULL, result_bytes IS NOT NULL FROM kojin.results "
                           "WHERE task_id = %s", (t,)).fetchone()
    assert row == (True, True)


def test_unserializable_result_is_a_clear_error_and_backend_keeps_working(backend):
    t = tid()
    with pytest.raises(PayloadError, match="cannot be encoded as JSON"):
        backend.store_result(t, {"x": object()}, states.SUCCESS)
    assert backend.get_task_meta(t)["status"] == states.PENDING
    backend.store_result(t, "fine", states.SUCCESS)
    assert backend.get_task_meta(t)["result"] == "fine"


def test_forget(backend):
    t = tid()
    backend.mark_as_done(t, 1)
    AsyncResult(t, backend=backend).forget()
    assert backend.get_task_meta(t)["status"] == states.PENDING


def test_get_many_reads_everything_in_one_query(backend, monkeypatch):
    ids = [tid() for _ in range(2000)]
    for i, t in enumerate(ids):
        backend.store_result(t, i, states.SUCCESS)
    backend._cache.clear()
    calls = []
    real = backend.db.fetchall
    monkeypatch.setattr(backend.db, "fetchall", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = dict(backend.get_many(ids, timeout=10))
    assert {t: m["result"] for t, m in got.items()} == {t: i for i, t in enumerate(ids)}
    assert len(calls) == 1


def test_get_many_waits_for_late_results(backend):
    ids = [tid() for _ in range(3)]
    backend.mark_as_done(ids[0], 0)
    timer = threading.Timer(0.3, lambda: [backend.mark_as_done(t, 1) for t in ids[1:]])
    timer.start()
    got = dict(backend.get_many(ids, timeout=20, interval=5))
    timer.join()
    assert set(got) == set(ids)
    with pytest.raises(backend.TimeoutError):
        list(backend.get_many([tid()], timeout=0.2, interval=0.05))


def test_ttl_is_applied_at_read_time(make_app, db_url):
    app = make_app(result_expires=3600)
    b = app.backend
    t, fresh = tid(), tid()
    b.mark_as_done(t, 1)
    b.mark_as_done(fresh, 2)
    with psycopg.connect(db_url) as conn:
        exp = conn.execute("SELECT expires_at - now() > interval '59 minutes' FROM kojin.results "
                           "WHERE task_id = %s", (t,)).fetchone()[0]
        assert exp
        conn.execute("UPDATE kojin.results SET expires_at = now() - interval '1 second' "
                     "WHERE task_id = %s", (t,))
    b._cache.clear()
    assert b.get_task_meta(t)["status"] == states.PENDING
    assert [k for k, _ in b.get_many([t, fresh], max_iterations=1)] == [fresh]
    assert b.cleanup()["results"] == 1
    assert b.get_task_meta(fresh, cache=False)["result"] == 2


def test_no_expiry_when_result_expires_is_none(make_app, db_url):
    b = make_app(result_expires=None).backend
    t = tid()
    b.mark_as_done(t, 1)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT expires_at FROM kojin.results").fetchone() == (None,)


def test_cleanup_in_batches_leaves_fresh_rows(make_app, db_url, monkeypatch):
    b = make_app(result_backend_transport_options={"cleanup_batch_size": 5000}).backend
    b.ensure_ready()
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO kojin.results (task_id, status, expires_at) "
            "SELECT 'old-' || g, 'SUCCESS', now() - interval '1 hour' "
            "FROM generate_series(1, 50000) g")
        conn.execute(
            "INSERT INTO kojin.results (task_id, status, expires_at) "
            "SELECT 'new-' || g, 'SUCCESS', now() + interval '1 hour' "
            "FROM generate_series(1, 100) g")
        conn.execute("INSERT INTO kojin.groups (group_id, result, expires_at) "
                     "VALUES ('g-old', '{}', now() - interval '1 hour')")
    batches = []
    real = b.db.fetchone
    monkeypatch.setattr(b.db, "fetchone", lambda *a, **k: batches.append(1) or real(*a, **k))
    counts = b.cleanup()
    assert counts == {"results": 50000, "groups": 1, "chords": 0, "chord_parts": 0}
    assert len(batches) >= 50000 // 5000  # bounded batches, not one giant delete
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM kojin.results").fetchone() == (100,)


def test_backend_cleanup_task_calls_cleanup(app, db_url):
    b = app.backend
    t = tid()
    b.mark_as_done(t, 1)
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE kojin.results SET expires_at = now() - interval '1 second'")
    app.tasks["celery.backend_cleanup"]()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM kojin.results").fetchone() == (0,)


def test_group_save_restore_delete(make_app):
    app, elsewhere = make_app(), make_app()
    backend = app.backend
    ids = [tid() for _ in range(3)]
    gr = GroupResult(tid(), [AsyncResult(i, app=app) for i in ids], app=app)
    gr.save()
    group_id = gr.id
    # Restored where nothing waits on these ids yet, as in another process (Celery before 5.7
    # wakes only the first result object per task id in one backend).
    restored = GroupResult.restore(group_id, app=elsewhere)
    assert [r.id for r in restored.results] == ids
    for i, t in enumerate(ids):
        backend.mark_as_done(t, i)
    assert restored.join_native(timeout=10) == [0, 1, 2]
    restored.delete()
    assert GroupResult.restore(group_id, app=app) is None


def test_async_result_get_wakes_on_notify(app, backend):
    t = tid()
    timer = threading.Timer(0.2, backend.mark_as_done, (t, "done"))
    timer.start()
    assert AsyncResult(t, app=app).get(timeout=20) == "done"
    timer.join()


def test_get_propagates_failure(app, backend):
    t = tid()
    threading.Timer(0.1, backend.mark_as_failure, (t, ValueError("bad"))).start()
    with pytest.raises(ValueError, match="bad"):
        AsyncResult(t, app=app).get(timeout=20)


def test_join_native_of_a_group(app, backend):
    ids = [tid() for _ in range(50)]
    gr = GroupResult(tid(), [AsyncResult(i, app=app) for i in ids], app=app)

    def finish():
        for i, t in enumerate(ids):
            backend.mark_as_done(t, i)

    threading.Timer(0.2, finish).start()
    assert gr.join_native(timeout=30) == list(range(50))


def test_polling_fallback_without_notify(make_app):
    app = make_app(result_backend_transport_options={"use_notify": False,
                                                      "polling_interval": 0.05})
    b = app.backend
    t = tid()
    threading.Timer(0.2, b.mark_as_done, (t, 7)).start()
    assert AsyncResult(t, app=app).get(timeout=20) == 7
    assert not b.result_consumer.listener.connected


def test_many_threads_waiting_at_once(app, backend):
    ids = [tid() for _ in range(16)]
    out: dict[str, object] = {}

    def wait(t):
        out[t] = AsyncResult(t, app=app).get(timeout=30)

    threads = [threading.Thread(target=wait, args=(t,)) for t in ids]
    for th in threads:
        th.start()
    for i, t in enumerate(ids):
        backend.mark_as_done(t, i)
    for th in threads:
        th.join(30)
    assert out == {t: i for i, t in enumerate(ids)}


def test_waiting_threads_are_woken_by_their_own_result(app, backend):
    """The thread that reads the listening session woke every waiting thread whenever it let
    go, and each went round Celery's wait loop again: 32 caller threads called drain_events
    10 times per task between them (ad hoc, with ``python -m bench callers``' workload). A
    waiting thread is now woken when its own result is in, or to read next."""
    consumer = backend.result_consumer
    drains: list[int] = []
    real = consumer.drain_events
    consumer.drain_events = lambda timeout=None: (drains.append(1), real(timeout))[1]
    ids = [tid() for _ in range(16)]
    got: dict[str, int] = {}

    def wait(task_id: str) -> None:
        got[task_id] = AsyncResult(task_id, app=app, backend=backend).get(timeout=20)

    threads = [threading.Thread(target=wait, args=(t,)) for t in ids]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all of them wait now
        before = len(drains)
        for i, task_id in enumerate(ids):
            backend.mark_as_done(task_id, i)
            time.sleep(0.05)
        for thread in threads:
            thread.join(20)
    finally:
        consumer.drain_events = real
    assert got == {t: i for i, t in enumerate(ids)}
    assert len(drains) - before <= 3 * len(ids), \
        f"{len(drains) - before} drains for {len(ids)} results, one at a time"


def test_the_threads_of_a_process_share_one_listening_session_and_one_pool(app, db_url):
    # Celery gives each thread a backend instance of its own unless the backend says it is
    # thread-safe (and threads that first ask at the same moment each build one even then): 8
    # threads waiting for results held 8 listening sessions, each woken by every notifying
    # commit of the database, and 8 pools that never closed, 16 connections in all.
    ids: list[str] = []
    while len(ids) < 8:  # one wait slot each, so that pg_locks shows every wait
        t = tid()
        if wait_slot(t) not in {wait_slot(i) for i in ids}:
            ids.append(t)
    out: dict[str, object] = {}
    shared: set[tuple[int, int]] = set()

    def wait(t):
        result = AsyncResult(t, app=app)
        shared.add((id(result.backend.result_consumer), id(result.backend.db)))
        out[t] = result.get(timeout=30)

    threads = [threading.Thread(target=wait, args=(t,)) for t in ids]
    for th in threads:
        th.start()
    wait_locks = ("SELECT count(*), count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory'"
                  " AND granted AND mode = 'ShareLock' AND database = (SELECT oid FROM"
                  " pg_database WHERE datname = current_database())")
    with psycopg.connect(db_url, autocommit=True) as pg:
        deadline = time.monotonic() + 30
        while (held := pg.execute(wait_locks).fetchone())[0] < len(ids):
            assert time.monotonic() < deadline, "the threads never took their wait slots"
            time.sleep(0.05)
    for i, t in enumerate(ids):
        app.backend.mark_as_done(t, i)
    for th in threads:
        th.join(30)
    assert out == {t: i for i, t in enumerate(ids)}
    assert held == (len(ids), 1)  # every wait on one listening session
    assert len(shared) == 1


def test_threads_waiting_for_the_same_task_all_get_its_result(app):
    # The threads share one backend: Celery before 5.7 registers only the first of several
    # result objects waiting for one task id, and the others waited out their timeouts.
    t = tid()
    out: list[object] = []
    waiting = threading.Barrier(5)

    def wait():
        result = AsyncResult(t, app=app)
        waiting.wait()
        out.append(result.get(timeout=30))

    threads = [threading.Thread(target=wait) for _ in range(4)]
    for th in threads:
        th.start()
    waiting.wait()
    time.sleep(0.2)  # let them register before the result is stored
    app.backend.mark_as_done(t, "done")
    for th in threads:
        th.join(40)
    assert out == ["done"] * 4


def test_a_get_delivered_on_its_wait_skips_the_next_drain_whatever_other_threads_drain(
        app, backend):
    # Celery < 5.5 drains once more after on_wait_for_pending has delivered the result, and the
    # consumer skips that drain. The threads share the consumer: another thread's drain took
    # the skip for itself, and the get then waited out its timeout.
    consumer = backend.result_consumer
    t = tid()
    backend.mark_as_done(t, 1)
    delivered, other_drained, returned = threading.Event(), threading.Event(), threading.Event()

    def get_like_celery_before_5_5():
        consumer.on_wait_for_pending(AsyncResult(t, app=app))
        delivered.set()
        other_drained.wait(30)
        consumer.drain_events(timeout=120)
        returned.set()

    threading.Thread(target=get_like_celery_before_5_5, daemon=True).start()
    assert delivered.wait(30)
    consumer.drain_events(timeout=0)  # another thread, with nothing to wait for
    other_drained.set()
    assert returned.wait(30), "the get waited out its timeout"


def test_a_new_worker_process_opens_its_result_connection_without_waiting_for_it(make_app,
                                                                                  db_url):
    # Celery's worker_process_init must return at once: handlers that took 20 ms made half the
    # tasks or more wait 5 s for a child under --max-tasks-per-child=1 (see .warmup). Here the
    # network holds the connection attempt, and the handler returns all the same; the pool
    # opens once the network lets it.
    with PgProxy.for_url(db_url) as proxy:
        app = make_app(result_backend="kojin+" + proxy.url(db_url) + "&connect_timeout=60")
        backend = app.backend
        proxy.pause()
        returned = threading.Event()
        threading.Thread(target=lambda: (start_opening(app), returned.set()), daemon=True).start()
        try:
            assert returned.wait(30), "it waited for the connection"
        finally:
            proxy.resume()
        deadline = time.monotonic() + 30
        while backend.db._pool.peek() is None:
            assert time.monotonic() < deadline, "the result pool was never opened"
            time.sleep(0.05)
        backend.db.close()


def _child_uses_backend(app, t, q):
    try:
        app.backend.mark_as_done(t, "from child")
        q.put(app.backend.get_task_meta(t, cache=False)["result"])
    except Exception as exc:  # report to the parent
        q.put(repr(exc))


def test_safe_after_fork(app, backend):
    t0 = tid()
    backend.mark_as_done(t0, "parent")  # the parent's pool is open before the fork
    AsyncResult(t0, app=app).get(timeout=10)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    t = tid()
    p = ctx.Process(target=_child_uses_backend, args=(app, t, q))
    p.start()
    assert q.get(timeout=60) == "from child"
    p.join(30)
    assert p.exitcode == 0
    # the parent's connections still work after the child used (and left) its own
    backend.mark_as_done(tid(), 1)
    assert backend.get_task_meta(t, cache=False)["result"] == "from child"


def test_backend_pickles(app, backend):
    clone = pickle.loads(pickle.dumps(backend))
    assert clone.url == backend.url and clone.expires == backend.expires


def test_survives_terminated_connections(app, backend, db_url):
    t = tid()
    backend.mark_as_done(t, 1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name LIKE 'kojin_pg%%' AND pid <> pg_backend_pid()")
    t2 = tid()
    backend.mark_as_done(t2, 2)
    assert backend.get_task_meta(t2, cache=False)["result"] == 2
    timer = threading.Timer(0.2, backend.mark_as_done, (tid(), 0))
    timer.start()
    timer.join()


def test_password_never_shown(pg_server, db_url):
    from celery import Celery

    url = db_url.replace("postgres@", "postgres:hunter2-secret@")
    app = Celery("x", backend="kojin+" + url, broker="memory://", set_as_current=False)
    b = app.backend
    assert "hunter2-secret" not in repr(b)
    assert "hunter2-secret" not in b.as_uri()
    assert "hunter2-secret" in b.as_uri(include_password=True)
    assert "hunter2-secret" not in repr(b.settings)


def test_hostile_schema_rejected(db_url):
    from celery import Celery

    app = Celery("x", backend="kojin+" + db_url + "?schema=kojin;drop", broker="memory://",
                 set_as_current=False)
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        app.backend  # noqa: B018


def test_custom_schema_is_created_on_first_use(make_app, db_url):
    b = make_app(result_backend_transport_options={"schema": "celery_results"}).backend
    t = tid()
    b.mark_as_done(t, 5)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT result FROM celery_results.results").fetchone() == (5,)


def test_synchronous_commit_off_is_opt_in(make_app, db_url):
    # (the test server runs with synchronous_commit = off: the source tells who set it)
    setting = "SELECT setting, source FROM pg_settings WHERE name = 'synchronous_commit'"
    b = make_app(result_backend_transport_options={"synchronous_commit": "off"}).backend
    with b.db.connection() as conn:
        assert conn.execute(setting).fetchone() == ("off", "session")
    default = make_app().backend
    with default.db.connection() as conn:
        assert conn.execute(setting).fetchone()[1] != "session"


def test_corrupted_result_row_is_a_named_failure_not_a_blocker(make_app, db_url):
    b = make_app(result_serializer="pickle", accept_content=["pickle", "json"]).backend
    good, bad = tid(), tid()
    b.mark_as_done(good, "fine")
    b.mark_as_done(bad, "will be corrupted")
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE kojin.results SET result_bytes = decode('00ff1337', 'hex') "
                     "WHERE task_id = %s", (bad,))
    b._cache.clear()
    got = dict(b.get_many([good, bad], timeout=5))
    assert got[good]["result"] == "fine"
    assert got[bad]["status"] == states.FAILURE
    assert isinstance(got[bad]["result"], PayloadError)
    assert bad in str(got[bad]["result"])


def test_missing_database_fails_at_once_with_the_cause(pg_server):
    from celery import Celery

    url = pg_server.url.rsplit("/", 1)[0] + "/no_such_database_here"
    app = Celery("x", backend="kojin+" + url, broker="memory://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="no_such_database_here.*does not exist"):
        app.backend.get_task_meta("t")


def test_a_waiter_takes_an_announced_result_without_reading_it(app, backend, make_app):
    """A small result travels in its NOTIFY: the waiter needs no read. Proof: the writer stores
    it already expired, so a read would find nothing, and the wait still returns the value."""
    writer = make_app(result_expires=0.000001).backend
    t, failed = tid(), tid()
    threading.Timer(0.2, writer.mark_as_done, (t, {"n": [1, 2]})).start()
    assert AsyncResult(t, app=app).get(timeout=5) == {"n": [1, 2]}
    assert backend.get_task_meta(t, cache=False)["status"] == states.PENDING  # a read: expired
    threading.Timer(0.2, writer.mark_as_failure, (failed, ValueError("bad"))).start()
    with pytest.raises(ValueError, match="bad"):
        AsyncResult(failed, app=app).get(timeout=5)


def test_an_extended_result_is_announced_with_what_a_read_gives(app, backend, make_app):
    """With result_extended (the tests' apps have it on; the Django admin wants it), every
    result was announced by its task id alone, so each waiter read the row after the NOTIFY:
    a statement per get. The announcement carries the extended fields too. Proof: the writer
    stores it already expired, and the waiter still gets it, with the meta a read gives."""
    writer = make_app(result_expires=0.000001).backend
    t = tid()
    req = request(id=t, task="tasks.add", args=[2, 3], kwargs={"z": 3})
    threading.Timer(0.2, writer.store_result, (t, 5, states.SUCCESS), {"request": req}).start()
    result = AsyncResult(t, app=app)
    assert result.get(timeout=5) == 5
    assert (result.name, result.args, result.kwargs, result.worker, result.retries,
            result.queue) == ("tasks.add", [2, 3], {"z": 3}, "w1@host", 2, "celery")
    same = tid()  # the same result, kept: what a read of it gives
    backend.store_result(same, 5, states.SUCCESS, request=request(
        id=same, task="tasks.add", args=[2, 3], kwargs={"z": 3}))
    read = backend.get_task_meta(same, cache=False)
    differ = ("task_id", "date_done")
    assert {k: v for k, v in result._cache.items() if k not in differ} == \
        {k: v for k, v in read.items() if k not in differ}


def test_large_results_are_announced_by_id_and_read(app):
    big = tid()
    threading.Timer(0.2, app.backend.mark_as_done, (big, "x" * 10_000)).start()
    assert AsyncResult(big, app=app).get(timeout=10) == "x" * 10_000


def _announcements(db_url: str, channel: str, work) -> list[str]:
    """The payloads announced on ``channel`` while ``work()`` runs."""
    with psycopg.connect(db_url, autocommit=True) as listen:
        listen.execute(f'LISTEN "{channel}"')
        work()
        return [n.payload for n in listen.notifies(timeout=0.5)]


def test_results_nobody_waits_for_are_not_announced(app, backend, db_url):
    """Each NOTIFY serializes notifying commits database-wide: a result is announced only
    if someone may wait for it (issue 12)."""
    unwaited = [tid() for _ in range(20)]
    heard = _announcements(db_url, backend.channel,
                           lambda: [backend.mark_as_done(t, 1) for t in unwaited])
    assert heard == [], f"{len(heard)} results nobody waited for were announced"
    waited = tid()
    threading.Timer(0.3, backend.mark_as_done, (waited, 2)).start()
    heard = _announcements(db_url, backend.channel,
                           lambda: AsyncResult(waited, app=app).get(timeout=10))
    assert any(waited in p for p in heard), "a result someone waited for was not announced"


def test_a_writer_does_not_take_another_writer_for_a_waiter(backend, db_url):
    """Nobody waits; one writer's store of a task is not committed yet when another writer
    stores a task of the same wait slot: neither announces. (A writer used to hold the slot
    exclusively until its commit, so the other took it for a waiter and announced: with 16
    writers and 256 slots, a few percent of all stores paid the database-wide NOTIFY lock.)"""
    first = tid()
    second = next(t for t in (tid() for _ in range(100_000)) if wait_slot(t) == wait_slot(first))
    with psycopg.connect(db_url) as open_writer:
        open_writer.execute(backend.queries.store_result,
                            backend.store_params(first, 1, states.SUCCESS))
        heard = _announcements(db_url, backend.channel,
                               lambda: backend.mark_as_done(second, 2))
        open_writer.commit()
    assert heard == [], "a store was announced to a writer, not a waiter"
    assert backend.get_task_meta(first, cache=False)["result"] == 1


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_a_waiter_arriving_during_the_writers_commit_reads_the_result(app, backend, db_url,
                                                                      isolation):
    """The writer found nobody waiting and does not announce; a waiter that starts meanwhile
    must not miss the result: its wait slot waits for the writer's commit, then it reads. Also
    on a server whose default isolation is REPEATABLE READ (the read would see a snapshot from
    before the wait, unless the LISTEN session runs in READ COMMITTED)."""
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}")
                      .format(sql.Identifier(admin.info.dbname), sql.Literal(isolation)))
    t = tid()
    params = backend.store_params(t, 7, states.SUCCESS)
    consumer = backend.result_consumer
    safety_reads = []
    real_deliver = consumer._deliver
    consumer._deliver = lambda ids: safety_reads.append(set(ids)) or real_deliver(ids)
    got: list = []
    with psycopg.connect(db_url) as writer:  # a transaction: stored, not yet committed
        writer.execute(backend.queries.store_result, params)
        waiter = threading.Thread(target=lambda: got.append(  # app.backend is per thread:
            AsyncResult(t, app=app, backend=backend).get(timeout=20)))  # the one watched here
        waiter.start()
        time.sleep(0.3)  # the waiter is blocked on its wait slot now
        assert not got
        writer.commit()
    waiter.join(20)
    consumer._deliver = real_deliver
    assert got == [7]
    # (a safety-net read of nothing, which Celery 5.4's drainer makes once more after the
    # result is in, is not one)
    assert not [ids for ids in safety_reads if t in ids], \
        "the waiter needed the safety-net read: a wake-up was lost"


def test_a_result_nobody_announced_reaches_a_waiter_on_a_busy_channel(app, backend, db_url):
    """A result stored without a NOTIFY (an older writer during a rolling deploy, a row written
    by hand) reaches its waiter by the safety-net read, even while the channel is busy with
    other processes' results: the read is due every second, not only after a silent one."""
    t = tid()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(
        AsyncResult(t, app=app, backend=backend).get(timeout=20)))
    waiter.start()
    stop = threading.Event()

    def others_results() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not stop.wait(0.1):
                conn.execute("SELECT pg_notify(%s, %s)", (backend.channel, tid()))

    noise = threading.Thread(target=others_results)
    noise.start()
    try:
        time.sleep(1.5)  # waiting, and hearing others' results every 0.1 s
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO kojin.results (task_id, status, result, date_done) "
                         "VALUES (%s, 'SUCCESS', '5', now())", (t,))  # announced to nobody
        waiter.join(20)
    finally:
        stop.set()
        noise.join(5)
    assert got == [5], "a result nobody announced never reached its waiter"


def test_an_idle_waiter_gives_its_wait_slots_back(app, backend, db_url, monkeypatch):
    """A get() that timed out leaves its task waited for; once the process idles, its LISTEN
    session is paused and gives its wait slots back, so no writer announces for it for months."""
    from kojin_pg.db import listener

    monkeypatch.setattr(listener, "IDLE_SECONDS", 0.5)
    with pytest.raises(CeleryTimeoutError):
        AsyncResult(tid(), app=app).get(timeout=0.3)  # never stored: still waited for

    def slot_locks() -> int:
        with psycopg.connect(db_url) as conn:
            return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                "AND objsubid = 2 AND classid = %s::bigint::oid",
                                (backend.wait_space & 0xFFFFFFFF,)).fetchone()[0]
    assert slot_locks() == 1
    deadline = time.monotonic() + 10
    while slot_locks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slot_locks() == 0, "an idle process still holds its wait slots"
    t = tid()  # waiting again takes the slot again, and the wake-up works
    threading.Timer(0.3, backend.mark_as_done, (t, 3)).start()
    assert AsyncResult(t, app=app).get(timeout=10) == 3


def test_a_process_that_stopped_waiting_stops_listening_within_seconds(app, backend):
    """Up to PostgreSQL 18 every commit that sends a NOTIFY wakes every listening session of
    the database, about 15 us of server CPU each (``python -m bench listeners``). A process that
    waited for one result kept listening for 30 s after, so a web tier whose processes each get
    a result every few seconds listened all the time: 40 such processes cut one client's
    notifying commits from 8,300/s to 1,500/s. Nobody waiting, the session now pauses within a
    few seconds (the next get listens again and reads what it waits for)."""
    t = tid()
    backend.mark_as_done(t, 1)
    assert AsyncResult(t, app=app).get(timeout=10) == 1
    listener = backend.result_consumer.listener
    assert listener.listening
    deadline = time.monotonic() + 10
    while listener.listening and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not listener.listening, "a process nobody waits in still listens 10 s on"
    # the next wait listens again and is woken by its result's NOTIFY, not by a poll: after a
    # pause the first wait hears that it may have missed some, reads, and waits on the socket
    polls: list[float] = []
    poll = backend.result_consumer._poll
    backend.result_consumer._poll = lambda wait: (polls.append(wait), poll(wait))[1]
    t = tid()
    threading.Timer(0.3, backend.mark_as_done, (t, 2)).start()
    assert AsyncResult(t, app=app).get(timeout=10) == 2
    assert listener.listening
    assert polls == [], "a wait after the pause polled instead of waiting for its NOTIFY"


def test_a_get_of_a_stored_result_never_waits_on_the_socket(backend, monkeypatch):
    """Celery < 5.5 drains events once more after ``on_wait_for_pending`` has delivered an
    already stored result; that drain slept on the listening socket for its whole timeout
    (1 s), so each ``get`` of a stored result took a second on the floor's Celery 5.4. (Newer
    Celery does not drain then, so only the floor run could fail this before the fix.)"""
    first = str(uuid.uuid4())
    backend.mark_as_done(first, 1)
    assert backend.app.AsyncResult(first).get(timeout=10) == 1  # listening from here on
    waits: list[float] = []
    monkeypatch.setattr(backend.result_consumer.listener, "wait",
                        lambda timeout, wake_fd=None: waits.append(timeout) or set())
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, 2)
    assert backend.app.AsyncResult(task_id).get(timeout=10) == 2
    assert waits == []


def test_an_idle_drain_still_waits(backend, monkeypatch):
    """With nothing awaited and nothing just delivered (a green drainer's loop), a drain still
    waits on the listening socket instead of returning at once and spinning its caller."""
    waits: list[float] = []
    monkeypatch.setattr(backend.result_consumer.listener, "wait",
                        lambda timeout, wake_fd=None: waits.append(timeout) or set())
    backend.result_consumer.drain_events(timeout=0.01)
    assert waits == [0.01]


# -- reading ahead (kojin_pg/backend/readahead.py) -------------------------------------------


@pytest.fixture
def result_reads(backend, monkeypatch):
    """The parameters of every statement of ``backend`` that reads results, as they run."""
    return watch_reads(backend, monkeypatch)


def send(app, n: int) -> list[AsyncResult]:
    """Send ``n`` tasks from this process (to the memory broker), as ``delay()`` does."""
    return [app.send_task("proj.noop", args=(i,)) for i in range(n)]


def test_a_loop_of_gets_reads_the_results_sent_here_a_few_statements_at_a_time(
        backend, result_reads):
    """A caller that sends tasks and then gets each result paid one statement per result,
    although they were all stored; Redis's backend pushes them to the caller with no request."""
    results = send(backend.app, 40)
    for i, r in enumerate(results):
        backend.mark_as_done(r.id, i)
    assert [r.get(timeout=10) for r in results] == list(range(40))
    assert len(result_reads) <= 8, len(result_reads)


def test_a_caller_that_sent_more_than_is_remembered_reads_no_result_twice(
        backend, result_reads, monkeypatch):
    """A caller that sent more tasks than are remembered for reading ahead, then got them in
    order, had the first gets (of tasks forgotten) read ahead the newest ones, which were kept
    until the kept results overflowed and were dropped, and read again when asked for:
    4,977 reads for 6,000 tasks (``bench.server_cost``). Reading ahead now stops while what it
    keeps is full, so each result is read once, and the ones remembered a few at a time."""
    from kojin_pg.backend import readahead

    monkeypatch.setattr(readahead, "SENT_MAX", 200)
    monkeypatch.setattr(readahead, "KEPT_MAX", 50)
    results = send(backend.app, 300)
    for i, r in enumerate(results):
        backend.mark_as_done(r.id, i)
    assert [r.get(timeout=10) for r in results] == list(range(300))
    read = [t for params in result_reads for t in [params["task_id"], *params["ahead"]]]
    twice = [t for t, n in Counter(read).items() if n > 1]
    assert not twice, f"{len(twice)} results read twice, {len(result_reads)} reads"
    # the 100 forgotten ones a read each; the 200 remembered, a few at a time
    assert len(result_reads) <= 100 + 20, len(result_reads)


def test_results_read_ahead_are_final_and_given_out_once(backend, result_reads):
    first, running, done = send(backend.app, 3)
    backend.mark_as_done(first.id, "first")
    backend.store_result(running.id, None, states.STARTED)
    backend.mark_as_done(done.id, "done")
    assert first.get(timeout=10) == "first"
    assert result_reads[-1]["ahead"] == [running.id]
    kept = backend.result_consumer.readahead
    assert kept.take(running.id) is None  # a state that may change is never kept
    backend.mark_as_done(running.id, "finished later")
    assert running.get(timeout=10) == "finished later"  # reads ``done`` ahead
    assert result_reads[-1]["ahead"] == [done.id]
    reads = len(result_reads)
    assert done.get(timeout=10) == "done"
    assert len(result_reads) == reads  # read ahead: no statement
    assert backend.app.AsyncResult(done.id).get(timeout=10) == "done"
    assert len(result_reads) == reads + 1  # given out once: asked again, read again


def test_large_results_are_not_read_ahead(backend, result_reads):
    first, large = send(backend.app, 2)
    backend.mark_as_done(first.id, 1)
    backend.mark_as_done(large.id, "x" * 10_000)
    assert first.get(timeout=10) == 1
    assert result_reads[-1]["ahead"] == [large.id]
    assert backend.result_consumer.readahead.take(large.id) is None
    assert large.get(timeout=10) == "x" * 10_000


def test_a_forgotten_result_read_ahead_is_not_given_out(backend):
    first, second = send(backend.app, 2)
    backend.mark_as_done(first.id, 1)
    backend.mark_as_done(second.id, 2)
    assert first.get(timeout=10) == 1  # reads the second ahead
    second.forget()
    with pytest.raises(CeleryTimeoutError):
        backend.app.AsyncResult(second.id).get(timeout=0.5)


def test_gets_of_results_read_ahead_never_wait_on_the_socket(backend, monkeypatch):
    """As for a stored result read by the get itself (Celery < 5.5 drains once more)."""
    results = send(backend.app, 4)
    for i, r in enumerate(results):
        backend.mark_as_done(r.id, i)
    assert results[0].get(timeout=10) == 0  # listening from here on; reads ahead
    waits: list[float] = []
    monkeypatch.setattr(backend.result_consumer.listener, "wait",
                        lambda timeout, wake_fd=None: waits.append(timeout) or set())
    assert [r.get(timeout=10) for r in results[1:]] == [1, 2, 3]
    assert waits == []


def test_reading_ahead_without_notifications(make_app, monkeypatch):
    app = make_app(result_backend_transport_options={"use_notify": False})
    reads = watch_reads(app.backend, monkeypatch)
    results = send(app, 40)
    for i, r in enumerate(results):
        app.backend.mark_as_done(r.id, i)
    assert [r.get(timeout=10, interval=0.01) for r in results] == list(range(40))
    assert len(reads) <= 8, len(reads)


def rows_read_from(plan: dict, table: str) -> int:
    """How many rows of ``table`` a plan (EXPLAIN ANALYZE, FORMAT JSON) read, kept or not."""
    read = 0
    if plan.get("Relation Name") == table:
        read += (plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1)
                 + plan.get("Rows Removed by Filter", 0)
                 + plan.get("Rows Removed by Index Recheck", 0))
    return read + sum(rows_read_from(child, table) for child in plan.get("Plans", []))


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_reads_by_task_id_read_those_rows_however_many_results_are_stored(
        backend, db_url, plan_cache_mode):
    """A read of results by task id (a get with what it reads ahead, get_many, one result)
    looked them up by the primary key only while the planner's statistics said the results
    table was large: on one that grew since it was last analyzed (new, or growing faster than
    autovacuum analyzes it), the read ahead took every finished result through the status
    index and kept the 64 it asked for, so each get cost as much as the table held (here 3,000
    rows read for 65 asked; the server's CPU for it grew with the table). A session plans a
    prepared statement in both ways (custom, then generic)."""
    from kojin_pg.backend.readahead import KEPT_BYTES_MAX

    stored = 3000
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO kojin.results (task_id, status, result, date_done, expires_at)
                        SELECT 't' || i, 'SUCCESS', to_jsonb(i), now(), now() + interval '1 day'
                        FROM generate_series(1, %s) AS i""", (stored,))
        ids = [f"t{i}" for i in range(1, 66)]
        conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(plan_cache_mode)))
        q = backend.queries
        reads = {
            "wait_and_read": (q.wait_and_read, backend.result_consumer.slots.read_params(
                ids[0], ids[1:], KEPT_BYTES_MAX)),
            "get_results": (q.get_results, {"task_ids": ids}),
            "get_result": (q.get_result, {"task_id": ids[0]}),
        }
        conn.prepare_threshold = 0  # each read prepared at once, as a session does after a few
        for name, (query, params) in reads.items():
            conn.execute(query, params).fetchall()
            (plan,), = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ")
                                    + execute_prepared(conn, query, params)).fetchone()
            read = rows_read_from(plan["Plan"], "results")
            assert read <= len(ids), f"{name} read {read} rows of results for {len(ids)} ids"


def test_the_listening_session_plans_its_wait_and_read_once(app, backend):
    """Each get takes its wait slot and reads its result in one statement on the LISTEN
    session (wait_and_read), prepared after a few. The server planned it again for every
    execution: a custom plan looked cheaper than the generic one, yet planning the statement
    took longer than running it (pg_stat_statements, 8 caller threads: 260 us planned against
    180 us run)."""
    for i in range(20):
        t = tid()
        backend.mark_as_done(t, i)
        assert AsyncResult(t, app=app).get(timeout=10) == i
    plans: list[tuple[int, int]] = []
    assert backend.result_consumer.listener.run(lambda conn: plans.extend(conn.execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE %s", ("%take_wait_slots_and_read%",), prepare=False).fetchall()))
    (generic, custom), = plans
    assert custom == 0 and generic > 0, (generic, custom)


def test_what_is_remembered_for_reading_ahead_is_bounded():
    from kojin_pg.backend import readahead

    ahead = readahead.ReadAhead()
    for i in range(readahead.SENT_MAX + 10):
        ahead.sent(f"t{i}")
    ahead.read("t-asked", [], [{"task_id": f"k{i}", "status": states.SUCCESS}
                               for i in range(readahead.KEPT_MAX + 10)])
    state = ahead._state.get()
    assert len(state.sent) == readahead.SENT_MAX and "t0" not in state.sent
    assert len(state.kept) == readahead.KEPT_MAX and "k0" not in state.kept


# -- waiting by sender key (kojin_pg/backend/waiters.py: senders) ----------------------------


@pytest.fixture
def plain_backend(make_app):
    """A backend whose small results are announced with their value (no result_extended)."""
    return make_app(result_extended=False).backend


@pytest.fixture
def plain_reads(plain_backend, monkeypatch):
    """As ``result_reads``, for ``plain_backend``."""
    return watch_reads(plain_backend, monkeypatch)


def stored_by_a_worker(backend, task_id: str, value, reply_to: str) -> None:
    """Store ``value`` as a worker does: with the task's request, which names its sender."""
    backend.store_result(task_id, value, states.SUCCESS,
                         request=request(id=task_id, reply_to=reply_to))


def test_a_thread_that_waits_for_what_it_sends_gets_each_result_without_a_statement(
        plain_backend, monkeypatch):
    """A caller's get took its task's wait slot and read the result, in one statement on the
    LISTEN session, for every task: 0.8 statements per task for 8 calling threads, on top of
    the publish and the worker's store (``python -m bench callers``). A thread's tasks are now
    announced by its sender key, held from its first get on: its later gets run no statement
    (but the safety net's reads, due every second), whether the result was stored before the
    get or during it, and each result is announced."""
    app = plain_backend.app
    first, = send(app, 1)
    stored_by_a_worker(plain_backend, first.id, -1, app.thread_oid)
    assert first.get(timeout=10) == -1  # one read: this thread's sender key is held from here
    reads = watch_reads(plain_backend, monkeypatch, but_safety_net=True)
    heard = watch_heard(plain_backend, monkeypatch)
    ids = []
    for i in range(10):
        r, = send(app, 1)
        ids.append(r.id)
        if i % 2:
            stored_by_a_worker(plain_backend, r.id, i, app.thread_oid)
        else:
            threading.Timer(0.1, stored_by_a_worker,
                            (plain_backend, r.id, i, app.thread_oid)).start()
        assert r.get(timeout=10) == i
    assert reads == [], f"{len(reads)} reads for 10 gets"
    plain_backend.result_consumer.drain_events(timeout=0.2)  # one the safety net read first
    assert set(ids) <= heard, "a result was not announced to its sender"


def test_a_result_heard_before_its_get_is_kept_for_it(plain_backend, plain_reads):
    """Another thread reading the listening session hears a result before its get asks for
    it: it is kept, and the get takes it without a read or a wait."""
    app = plain_backend.app
    warm, = send(app, 1)
    stored_by_a_worker(plain_backend, warm.id, 0, app.thread_oid)
    assert warm.get(timeout=10) == 0
    mine, = send(app, 1)
    other = tid()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(
        AsyncResult(other, app=app, backend=plain_backend).get(timeout=10)))
    waiter.start()
    time.sleep(0.3)  # the other thread reads the listening session now
    stored_by_a_worker(plain_backend, mine.id, "mine", app.thread_oid)
    time.sleep(0.3)  # ... and hears it
    plain_backend.mark_as_done(other, "other")
    waiter.join(10)
    assert got == ["other"]
    reads = len(plain_reads)
    waits: list[float] = []
    listener = plain_backend.result_consumer.listener
    real_wait = listener.wait
    listener.wait = lambda timeout, wake_fd=None: (waits.append(timeout),
                                                   real_wait(timeout, wake_fd))[1]
    try:
        assert mine.get(timeout=10) == "mine"
    finally:
        listener.wait = real_wait
    assert len(plain_reads) == reads, "the get read a result it had heard already"
    assert waits == [], "the get waited for a result it had heard already"


def test_a_result_stored_without_naming_its_sender_still_reaches_its_get(plain_backend,
                                                                      plain_reads):
    """A writer that does not name the sender (a store without the task's request, a worker of
    an older version during a rolling deploy) does not announce a result waited for by its
    sender key: the safety-net read finds it, and once no announcement followed for a second,
    the process waits with wait slots for a while (its gets take their slot and read)."""
    app = plain_backend.app
    warm, = send(app, 1)
    stored_by_a_worker(plain_backend, warm.id, 0, app.thread_oid)
    assert warm.get(timeout=10) == 0
    unnamed, = send(app, 1)
    threading.Timer(0.1, plain_backend.mark_as_done, (unnamed.id, 1)).start()  # no request
    reads = len(plain_reads)
    assert unnamed.get(timeout=10) == 1
    assert [r.get("task_ids") for r in plain_reads[reads:]] == [[unnamed.id]], \
        "waited for by its sender key, it is read by the safety net only"
    for i in range(6):  # taken for unannounced once none was heard for a second
        later, = send(app, 1)
        threading.Timer(0.1, plain_backend.mark_as_done, (later.id, i)).start()
        assert later.get(timeout=10) == i
        if plain_reads[-1].get("task_id") == later.id:
            break  # it took its slot and read
    else:
        raise AssertionError("after unannounced results, gets still wait by sender key")


def test_results_of_a_sender_nobody_waits_for_are_not_announced(app, backend, db_url):
    """A thread's results are announced only once a get in its process waited for one: a
    sender that nobody waits for makes no writer announce."""
    sent = send(app, 20)
    heard = _announcements(db_url, backend.channel, lambda: [
        stored_by_a_worker(backend, r.id, 1, app.thread_oid) for r in sent])
    assert heard == [], f"{len(heard)} results nobody waited for were announced"


def test_a_thread_that_sends_a_batch_before_getting_it_has_its_results_read_ahead(
        plain_backend, db_url, monkeypatch):
    """A thread that sends a batch and then gets each result (``[r.get() for r in results]``)
    had every result of the batch announced, each a NOTIFY that serializes notifying commits
    database-wide, where one read gets them dozens at a time (see .readahead). Past a few
    tasks sent without a get, its sender key is given back: the rest are not announced, and
    the gets read them ahead."""
    from kojin_pg.backend.waiters import SENDS_AHEAD_MAX

    app = plain_backend.app
    warm, = send(app, 1)
    stored_by_a_worker(plain_backend, warm.id, 0, app.thread_oid)
    assert warm.get(timeout=10) == 0  # this thread's sender key is held from here
    batch = send(app, 40)
    heard = _announcements(db_url, plain_backend.channel, lambda: [
        stored_by_a_worker(plain_backend, r.id, i, app.thread_oid) for i, r in enumerate(batch)])
    assert len(heard) <= SENDS_AHEAD_MAX, f"{len(heard)} of a batch of 40 were announced"
    reads = watch_reads(plain_backend, monkeypatch)
    assert [r.get(timeout=10) for r in batch] == list(range(40))
    assert len(reads) <= 8, f"{len(reads)} reads for a batch of 40"


def test_a_get_of_a_batch_does_not_take_its_senders_key_again(plain_backend, db_url):
    """The first get of a batch took its sender's key again, so the batch's results stored
    after it were each announced (a batch outruns its worker: most are stored after the first
    get). A get wants the key again only once fewer than SENDS_AHEAD_MAX tasks were sent after
    its own."""
    from kojin_pg.backend.waiters import SENDS_AHEAD_MAX

    app = plain_backend.app
    warm, = send(app, 1)
    stored_by_a_worker(plain_backend, warm.id, 0, app.thread_oid)
    assert warm.get(timeout=10) == 0  # this thread's sender key is held from here
    first, *rest = send(app, 40)
    stored_by_a_worker(plain_backend, first.id, "first", app.thread_oid)
    assert first.get(timeout=10) == "first"
    heard = _announcements(db_url, plain_backend.channel, lambda: [
        stored_by_a_worker(plain_backend, r.id, i, app.thread_oid) for i, r in enumerate(rest)])
    assert len(heard) <= SENDS_AHEAD_MAX, f"{len(heard)} of the 39 stored after a get announced"
    assert [r.get(timeout=10) for r in rest] == list(range(39))


def test_a_store_is_announced_while_its_commit_is_made_durable_and_holds_up_no_other(
        make_app, db_url):
    """A NOTIFY takes a lock on the whole database at commit, held until the commit is
    durable: its WAL flushed and, with synchronous standbys, confirmed. A store that announced
    its result in its own transaction made every other announcing commit of the database wait
    for its flush, one flush after another (32 caller threads: on average 11 backends waited
    on that lock, issue 12). Migration 12 announced after a durable commit, so a waiter heard
    of a result one flush after it was written; migration 13 announces with a commit that does
    not wait, and waits for the flush after. Here a standby that never confirms holds one
    store: its waiter hears the result while the store still waits for the standby (it returns
    only once its commit is durable), and another result, stored and announced meanwhile,
    gets through."""
    held = make_app(result_backend_transport_options={"synchronous_commit": "on"}).backend
    other = make_app(result_backend_transport_options={"synchronous_commit": "local"}).backend
    a, b = tid(), tid()
    with psycopg.connect(db_url, autocommit=True) as waiter:
        for t in (a, b):  # a waiter holds both results' wait slots: both are announced
            waiter.execute("SELECT pg_advisory_lock_shared(%s, %s)",
                           (held.wait_space, wait_slot(t)))
        waiter.execute(sql.SQL("LISTEN {}").format(sql.Identifier(held.channel)))
        with standby_never_confirms(db_url) as commits:
            storing = commits.start(held.mark_as_done, a, 1)
            assert until(lambda: commits.waiting() == 2), \
                "the held store's commit never waited for the standby"
            heard = [n.payload for n in waiter.notifies(timeout=5, stop_after=1)]
            assert len(heard) == 1 and a in heard[0], \
                "a result was announced only once its store's commit was durable"
            assert storing.is_alive(), "a store returned before its commit was durable"
            through = commits.start(other.mark_as_done, b, 2)
            through.join(10)
            assert not through.is_alive(), \
                "an announced store waited for another store's commit to be durable"
            heard = [n.payload for n in waiter.notifies(timeout=5, stop_after=1)]
            assert len(heard) == 1 and b in heard[0]
            assert storing.is_alive(), "a store returned before its commit was durable"
        storing.join(10)
        assert not storing.is_alive(), "the held store never returned once durable"
        assert [n.payload for n in waiter.notifies(timeout=0.5)] == [], \
            "a store announced its result twice"
    assert held.get_task_meta(a, cache=False)["result"] == 1
