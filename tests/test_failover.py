"""Failover to a promoted standby: workers, producers and result waiters follow by themselves.

A primary and a streaming standby (``pg_basebackup -R``) run from Debian's PostgreSQL build on
two local ports. The app reaches them through one libpq multi-host URL with
``target_session_attrs=read-write``, so every new connection lands on whichever server accepts
writes. While a real ``celery worker`` runs tasks and chords, the primary is stopped with
``pg_ctl stop -m immediate`` (a crash), and the standby is promoted a little later, as a
failover manager (Patroni, RDS) would. Nothing is restarted.

Replication is synchronous (``synchronous_standby_names = '*'``): a commit returns only once the
standby has it, so every publish that returned and every stored result survives. With
asynchronous replication, commits not yet streamed at the crash are lost with the primary.

The measured figures (printed with ``-s``) are the ones the README's "High availability and
failover" section quotes.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from celery import chord
from workers import Worker, wait_ready

from kojin_pg.db import schema as kschema
from kojin_pg.dev.embedded import SYSTEM_USER, EmbeddedServer, private_dir

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DBNAME = "kojin_ha"
#: fsync off: the servers are stopped as processes, never lose the OS page cache.
SERVER_SETTINGS = (("fsync", "off"), ("shared_buffers", "32MB"), ("max_connections", "100"),
                   ("wal_level", "replica"), ("max_wal_senders", "4"))
#: Seconds between the primary's crash and the promotion (a failover manager's detection time).
DETECTION_DELAY = 2.0


def _system_bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"), reverse=True)
    if not found:
        pytest.fail("no system PostgreSQL found (apt-get install postgresql; .ci/run does it)")
    return found[0].parent


class ReplicatedPair:
    """A primary and a synchronous streaming standby in one temporary directory."""

    def __init__(self) -> None:
        self.bin_dir = _system_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="kojin_ha_"))
        self.root.chmod(0o755)
        self.run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self.primary = EmbeddedServer(self.root / "primary", SERVER_SETTINGS, self.bin_dir)
        self.standby = EmbeddedServer(self.root / "standby", SERVER_SETTINGS, self.bin_dir)

    def start(self) -> None:
        self.primary.start()
        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        with psycopg.connect(self.dsn(self.primary), autocommit=True) as conn:
            kschema.migrate(conn, "kojin")
        if self.run_as:  # pg_basebackup runs as the server's user: give it an empty directory
            user = pwd.getpwnam(self.run_as)
            private_dir(self.standby.data_dir, owner=(user.pw_uid, user.pw_gid), traversable=True)
        self._tool("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U",
                   "postgres", "-D", str(self.standby.data_dir), "-R", "-X", "stream",
                   "-c", "fast")
        self.standby.start()
        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM pg_stat_replication "
                               "WHERE sync_state = 'sync'").fetchone() != (1,):
                assert time.monotonic() < deadline, "the standby never became synchronous"
                time.sleep(0.1)

    def _tool(self, program: str, *args: str) -> None:
        subprocess.run([str(self.bin_dir / program), *args], check=True, capture_output=True,
                       timeout=60, user=self.run_as, cwd="/")

    def dsn(self, server: EmbeddedServer) -> str:
        return f"postgresql://postgres@127.0.0.1:{server.port}/{DBNAME}"

    @property
    def url(self) -> str:
        """The application's URL: both servers, writes wherever they are accepted."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:"
                f"{self.standby.port}/{DBNAME}?target_session_attrs=read-write&connect_timeout=3")

    def crash_primary(self) -> None:
        self.primary.stop("immediate")

    def promote_standby(self) -> None:
        self._tool("pg_ctl", "-D", str(self.standby.data_dir), "-w", "-t", "30", "promote")

    def destroy(self) -> None:
        for server in (self.standby, self.primary):
            try:
                server.stop("immediate")
            except Exception:  # noqa: BLE001 - best effort: the directory goes anyway
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pair():
    servers = ReplicatedPair()
    try:
        servers.start()
        yield servers
    finally:
        servers.destroy()


class Producer(threading.Thread):
    """Sends ``e2e.add`` tasks in a loop; keeps those whose publish returned (committed)."""

    def __init__(self, app) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.sent: list[tuple[float, int, object]] = []
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        add = self.app.tasks["e2e.add"]
        i = 0
        while not self.stop.is_set():
            try:
                result = add.delay(i, i)
            except Exception as exc:  # noqa: BLE001 - a refused publish is counted, not lost
                self.failed.append(type(exc).__name__)
            else:
                self.sent.append((time.monotonic(), i, result))
            i += 1
            time.sleep(0.02)


def _utc(value: dt.datetime | str) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _events(text: str, name: str) -> int:
    return len(re.findall(rf"event={name}\b", text))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_producers_and_waiters_follow_a_promoted_standby(pair, tmp_path, caplog, pool):
    from e2e_app import make_app

    caplog.set_level("WARNING")
    app = make_app(pair.url)
    body_log = tmp_path / "bodies.log"
    body_log.touch()
    worker = Worker(pair.url, tmp_path / "worker.log", pool, 4, {}, "ha")
    producer = Producer(app)
    try:
        wait_ready(app, worker, timeout=30)
        sleep_then, record = app.tasks["e2e.sleep_then"], app.tasks["e2e.record_sum"]
        producer.start()
        # a chord whose header runs across the failover, and a waiter blocked meanwhile
        across = chord(sleep_then.s(0.5, i) for i in range(16))(record.s(str(body_log)))
        slow = sleep_then.delay(3, "slow")
        waited: dict[str, object] = {}
        waiter = threading.Thread(
            target=lambda: waited.update(value=slow.get(timeout=60)), daemon=True)
        waiter.start()
        time.sleep(1.0)

        crashed_at = dt.datetime.now(dt.UTC)
        crashed = time.monotonic()
        pair.crash_primary()
        time.sleep(DETECTION_DELAY)
        pair.promote_standby()
        promoted = time.monotonic()

        # a chord sent once the new primary serves, by the same (never restarted) process
        after = chord(sleep_then.s(0.1, i) for i in range(8))(record.s(str(body_log)))
        time.sleep(3.0)
        producer.stop.set()
        producer.join(30)

        assert across.get(timeout=45) == sum(range(16))
        assert after.get(timeout=30) == sum(range(8))
        waiter.join(30)
        assert waited.get("value") == "slow", "the result waiter did not follow the failover"
        for _, i, result in producer.sent:  # every publish that returned ran, on either server
            assert result.get(timeout=30) == 2 * i
        bodies = body_log.read_text().split()
        assert sorted(bodies) == sorted({across.id, after.id}), "a chord body ran twice or never"
        assert worker.proc.poll() is None, "the worker died"

        done = [_utc(r.date_done) for _, _, r in producer.sent]
        first = min(d for d in done if d > crashed_at)
        stall = max(b[0] - a[0] for a, b in zip(producer.sent, producer.sent[1:], strict=False))
        log = worker.log.read_text(errors="replace")
        runs = re.findall(r"Task e2e\.\w+\[([0-9a-f-]+)\] succeeded", log)
        producer_retries = sum(1 for r in caplog.records
                               if getattr(r, "kojin_event", None) == "retry")
        promoted_at = crashed_at + dt.timedelta(seconds=promoted - crashed)
        print(f"\nfailover: {len(producer.sent)} tasks committed, {len(producer.failed)} "
              f"publishes refused; first task done {(first - crashed_at).total_seconds():.2f}s "
              f"after the crash, {(first - promoted_at).total_seconds():.2f}s after the "
              f"promotion; longest publish gap {stall:.2f}s; retries logged: worker "
              f"{_events(log, 'retry')}, producer/waiter process {producer_retries}; refused "
              f"connection attempts in the worker's pools {log.count('error connecting in')}; "
              f"LISTEN reconnects: worker {_events(log, 'listen_reconnect')}; redeliveries "
              f"{_events(log, 'redelivery')}; tasks run twice {len(runs) - len(set(runs))}")
        assert not producer.failed
    except BaseException:
        print(worker.tail())
        raise
    finally:
        producer.stop.set()
        worker.stop()
        app.backend.result_consumer.stop()
        app.backend.db.close()


@pytest.mark.timeout(60)
def test_without_target_session_attrs_writes_wait_for_the_promotion(pair):
    """With a host list but no ``target_session_attrs``, libpq connects to the standby while the
    primary is down; writes there must be retried on a fresh connection, not raised."""
    from celery import Celery

    url = (f"postgresql://postgres@127.0.0.1:{pair.primary.port},127.0.0.1:{pair.standby.port}"
           f"/{DBNAME}?retry_timeout=30")
    app = Celery("ro", backend="kojin+" + url, broker="memory://", set_as_current=False)
    try:
        app.backend.mark_as_done("before", 1)
        pair.crash_primary()
        promoter = threading.Timer(DETECTION_DELAY, pair.promote_standby)
        promoter.start()
        try:
            app.backend.mark_as_done("during", 2)  # must wait for the promotion, not fail
        finally:
            promoter.join(30)
        assert app.backend.get_task_meta("during")["result"] == 2
    finally:
        app.backend.db.close()
