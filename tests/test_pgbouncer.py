"""kojin_pg behind a real PgBouncer in transaction pooling mode (Debian's ``pgbouncer``).

Through it: nothing prepared (psycopg would prepare after 5 runs, and a prepared statement
lands on whichever server connection the next transaction gets), no session setting reaching
other clients, migrations under a transaction-scoped lock, and wake-ups on a direct
``listen_url`` connection, with real ``celery worker`` processes for over a minute.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import psycopg
import pytest
from celery import chord, group
from e2e_app import make_app
from pgbouncer import PgBouncer, version
from psycopg import sql
from workers import wait_ready

from kojin_pg import config
from kojin_pg.db.lean import LeanRead
from kojin_pg.db.pool import Database
from kojin_pg.db.sqlfiles import migrations

#: Server connections PgBouncer may open to the test database: few, so they are shared.
POOL_SIZE = 8
#: Seconds of mixed work through PgBouncer (many times 5 runs of every statement).
WORK_SECONDS = 62


@pytest.fixture
def bouncer(pg_server):
    b = PgBouncer(pg_server.url, pool_size=POOL_SIZE)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _session_default_on(url: str) -> None:
    """New sessions of this database start with ``synchronous_commit = on`` (the test server
    runs with ``off``), so a leaked ``off`` shows."""
    dbname = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(
            sql.Identifier(dbname)))


def _via(bouncer: PgBouncer, db_url: str) -> str:
    """``db_url`` through PgBouncer, listening on the direct server (``listen_url``)."""
    return bouncer.url(db_url) + "?listen_url=" + quote(db_url, safe="")


def test_pooler_found_and_nothing_prepared(bouncer, db_url):
    through = bouncer.url(db_url)
    direct, pooled = Database(config.parse(db_url)), Database(config.parse(through))
    others = [Database(config.parse(through)) for _ in range(3)]
    try:
        assert not direct.pooled and pooled.pooled
        # interleaved clients, one statement run 10 times each: had it been prepared after 5
        # runs, the name would clash on the shared server connections
        for i in range(10):
            for db in (pooled, *others):
                assert db.fetchone("SELECT %s::int + 1", (i,)) == (i + 1,)
        # nor a single get's read, sent on libpq directly (kojin_pg/db/lean.py)
        read = LeanRead("echo", sql.SQL("SELECT %(x)s::text"))
        for i in range(10):
            for db in (pooled, *others):
                assert db.fetch_lean(read, {"x": str(i)}) == [(str(i),)]
        # the server sessions behind the pooler: none holds a statement of ours
        for _ in range(2 * POOL_SIZE):
            assert pooled.fetchone("SELECT count(*) FROM pg_prepared_statements") == (0,)
        with pooled.connection() as conn:
            assert conn.prepare_threshold is None
        with direct.connection() as conn:
            assert conn.prepare_threshold == 5
    finally:
        for db in (direct, pooled, *others):
            db.close()


def test_a_process_whose_first_statement_is_a_get_prepares_nothing_behind_a_pooler(pg_server,
                                                                                 db_url):
    """The pooler is found on a process's first connection: a single get's read sent before it
    was found must not take the server for a direct one."""
    one_server_session = PgBouncer(pg_server.url, pool_size=1)
    one_server_session.start()
    fresh = Database(config.parse(one_server_session.url(db_url)))
    try:
        read = LeanRead("echo", sql.SQL("SELECT %(x)s::text"))
        assert fresh.fetch_lean(read, {"x": "first"}) == [("first",)]
        assert fresh.pooled
        assert fresh.fetchone("SELECT count(*) FROM pg_prepared_statements") == (0,)
    finally:
        fresh.close()
        one_server_session.stop()


def test_synchronous_commit_is_set_per_transaction(bouncer, db_url):
    _session_default_on(db_url)
    through = bouncer.url(db_url)
    consumer = Database(config.parse(through, {"pool_max_size": 2}), synchronous_commit="off")
    try:
        with psycopg.connect(through, autocommit=True, prepare_threshold=None) as other:
            for _ in range(20):
                assert consumer.fetchone("SELECT current_setting('synchronous_commit')") == ("off",)
                assert consumer.execute("SELECT 1") == 1
                # the same server session, next transaction, another client: the default
                assert other.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        consumer.close()


def test_pooler_option_and_prepare_threshold(db_url):
    for options, expected in (({"pooler": "pgbouncer"}, None), ({"prepare_threshold": "none"}, None),
                              ({"prepare_threshold": 0}, None), ({"prepare_threshold": 2}, 2)):
        db = Database(config.parse(db_url, options))
        try:
            with db.connection() as conn:
                assert conn.prepare_threshold == expected, options
        finally:
            db.close()
    with pytest.raises(config.ConfigurationError, match="invalid pooler"):
        config.parse(db_url, {"pooler": "session"})
    secret = config.parse(db_url, {"listen_url": "postgresql://u:hunter2@h/db"})
    assert "hunter2" not in repr(secret)


def test_without_listen_url_it_polls_and_says_so(bouncer, db_url, caplog):
    from kojin_pg.db.listener import Listener

    db = Database(config.parse(bouncer.url(db_url)))
    listener = Listener(db, "kojin_test", role="results")
    try:
        assert listener.wait(0.1) is None  # the caller polls
        assert not listener.enabled
        assert "no listen_url is set" in caplog.text
    finally:
        listener.close()
        db.close()


def test_six_concurrent_migrations_finish(bouncer, empty_db_url):
    url = bouncer.url(empty_db_url)
    procs = [subprocess.Popen([sys.executable, "-m", "kojin_pg.cli", "migrate", "--url", url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(6)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 6, outputs
    with psycopg.connect(empty_db_url) as conn:
        held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                            ).fetchone()[0]
        versions = conn.execute("SELECT count(*) FROM kojin.schema_migrations").fetchone()[0]
    assert held == 0
    assert versions == len(migrations())


class _Sampler(threading.Thread):
    """20 other clients of the same PgBouncer asking for their ``synchronous_commit``."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: dict[str, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conns = [psycopg.connect(self.url, autocommit=True, prepare_threshold=None)
                     for _ in range(20)]
            while not self.stop.is_set():
                for conn in conns:
                    (value,) = conn.execute("SHOW synchronous_commit").fetchone()
                    self.seen[value] = self.seen.get(value, 0) + 1
                self.stop.wait(0.05)
            for conn in conns:
                conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.e2e
def test_workers_results_groups_chords_revoke_cleanup_through_pgbouncer(bouncer, db_url,
                                                                         workers):
    _session_default_on(db_url)
    via = _via(bouncer, db_url)
    # one queue each way (chord bodies too: the workers route them by their default queue)
    wb = workers(pool="prefork", concurrency=2, url=via, name="bouncer",
                 conf={"task_default_queue": "through"})
    wd = workers(pool="prefork", concurrency=2, url=db_url, name="direct",
                 conf={"task_default_queue": "direct"})
    app_b, app_d = make_app(via), make_app(db_url)
    for app, queue in ((app_b, "through"), (app_d, "direct")):
        app.conf.task_default_queue = queue
    sampler = _Sampler(bouncer.url(db_url))
    try:
        wait_ready(app_b, wb)
        wait_ready(app_d, wd)
        sampler.start()
        add_b, add_d = app_b.tasks["e2e.add"], app_d.tasks["e2e.add"]
        tsum = app_b.tasks["e2e.tsum"]
        through: list[float] = []
        direct: list[float] = []
        rounds = 0
        deadline = time.monotonic() + WORK_SECONDS
        while time.monotonic() < deadline:
            # side by side: one delay().get() each way, then a group and a chord through it
            for add, times in ((add_b, through), (add_d, direct)):
                t0 = time.perf_counter()
                assert add.delay(rounds, 1).get(timeout=30) == rounds + 1
                times.append(time.perf_counter() - t0)
            if rounds % 5 == 0:
                assert group(add_b.s(i, rounds) for i in range(10))().get(timeout=30) == \
                    [i + rounds for i in range(10)]
                assert chord(add_b.s(i, 1) for i in range(10))(tsum.s()).get(timeout=30) == 55
            rounds += 1
        # revoke of a queued task, over the broker through PgBouncer
        later = add_b.apply_async((1, 1), countdown=3)
        app_b.control.revoke(later.id)
        revoke_by = time.monotonic() + 20
        while later.state != "REVOKED" and time.monotonic() < revoke_by:
            time.sleep(0.2)
        assert later.state == "REVOKED"
        # cleanup (celery.backend_cleanup on the worker) removes expired results
        with psycopg.connect(db_url, autocommit=True) as conn:
            expired = conn.execute("UPDATE kojin.results SET expires_at = now() - interval '1 s'"
                                   " WHERE name = 'e2e.add' AND queue = 'through'").rowcount
        assert expired > 0
        app_b.tasks["celery.backend_cleanup"].delay().get(timeout=30)
        with psycopg.connect(db_url) as conn:
            left = conn.execute("SELECT count(*) FROM kojin.results WHERE expires_at < now()"
                                ).fetchone()[0]
        assert left == 0
    finally:
        sampler.stop.set()
        sampler.join(10)
        for app in (app_b, app_d):
            app.backend.result_consumer.stop()
            app.backend.db.close()
            app.close()
    assert sampler.error is None, sampler.error
    # no session setting escaped: 20 other clients never saw the consumers' off
    assert set(sampler.seen) == {"on"}, sampler.seen
    assert sum(sampler.seen.values()) >= 20 * 50
    for w in (wb, wd):
        text = w.log.read_text(errors="replace")
        assert "PreparedStatement" not in text and "InvalidSqlStatementName" not in text, w.tail()
    ratio = statistics.median(through) / statistics.median(direct)
    print(f"\n{version()}, {rounds} rounds; delay().get() p50 through PgBouncer "
          f"{statistics.median(through) * 1000:.2f} ms, direct "
          f"{statistics.median(direct) * 1000:.2f} ms: ratio {ratio:.2f}")
    assert ratio < 2.0, (through, direct)


def test_per_transaction_setting_never_hides_a_caught_error(db_url):
    """Behind a pooler the work of one ``run`` is one transaction: an error the work caught
    itself aborts it, and that is raised, not committed as a silent rollback."""
    db = Database(config.parse(db_url, {"pooler": "transaction"}), synchronous_commit="off")

    def work(conn):
        conn.execute("CREATE TABLE kojin_caught (x int)")
        try:
            conn.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero:
            pass

    try:
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            db.run(work)
        assert db.fetchone("SELECT to_regclass('kojin_caught')") == (None,)
        assert db.fetchone("SELECT current_setting('synchronous_commit')") == ("off",)
    finally:
        db.close()
