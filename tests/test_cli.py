"""The kojin-pg command line: options, exit codes, queues, bindings, dead letters, cleanup, demo."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import uuid

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

import kojin_pg  # noqa: F401
from kojin_pg.cli import main
from kojin_pg.outbox import send_task


def run(capsys, *argv) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def fails(capsys, code: int, *argv) -> str:
    assert main(list(argv)) == code
    return capsys.readouterr().err


def declare(url: str, name: str, exchange: str | None = None, type_: str = "direct") -> None:
    q = Queue(name, Exchange(exchange or name, type=type_), routing_key=name)
    with Connection("kojin+" + url) as conn:
        q(conn.channel()).declare()


def test_migrate_and_stats(capsys, empty_db_url):
    assert "applied 1, 2" in run(capsys, "migrate", "--url", empty_db_url)
    assert "up to date" in run(capsys, "migrate", "--url", empty_db_url)
    assert json.loads(run(capsys, "--json", "migrate", "--url", empty_db_url))["applied"] == []
    stats = json.loads(run(capsys, "stats", "--url", empty_db_url, "--json"))
    assert stats["results"]["rows"] == 0
    assert "messages" in {t["table"] for t in stats["tables"]}
    assert 0.0 <= stats["notify_queue_usage"] < 0.5
    text = run(capsys, "stats", "--url", empty_db_url)
    assert "NOTIFY queue usage: 0.0%" in text and "WARNING" not in text


def test_global_options_before_or_after_the_command(capsys, db_url):
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO kojin.dead_letters (id, queue, payload, delivery_count, "
                     "reason, error, enqueued_at) VALUES (12, 'q', '{}', 1, 'rejected', "
                     "'boom', now())")
    assert "rejected" in run(capsys, "--url", db_url, "dlq", "list")
    assert json.loads(run(capsys, "dlq", "show", "12", "--url", db_url, "--json"))["id"] == 12
    assert json.loads(run(capsys, "--json", "dlq", "show", "12", "--url", db_url))["id"] == 12
    assert json.loads(run(capsys, "--url", db_url, "--json", "queues"))[0]["queue"] == "q"
    # a value given before the command is not reset by the subcommand's defaults
    err = fails(capsys, 1, "--schema", "elsewhere", "stats", "--url", db_url)
    assert "'elsewhere' has no kojin_pg tables" in err


def test_no_url_is_a_usage_error_and_starts_no_server(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KOJIN_PG_URL", raising=False)
    monkeypatch.setenv("KOJIN_PG_EMBEDDED_DIR", str(tmp_path / "embedded"))
    for argv in (["stats"], ["migrate"], ["cleanup"], ["queues"], ["queues", "delete", "x"],
                 ["bindings", "prune"], ["dlq", "list"], ["metrics", "--port", "1"]):
        err = fails(capsys, 2, *argv)
        assert "no database URL given: pass --url or set KOJIN_PG_URL" in err, argv
    assert not (tmp_path / "embedded").exists()


def test_exit_codes(capsys, db_url, empty_db_url):
    with pytest.raises(SystemExit) as exc:  # argparse: usage
        main(["dlq", "frobnicate"])
    assert exc.value.code == 2
    assert "no dead letter with id 999" in fails(capsys, 1, "dlq", "show", "999", "--url", db_url)
    assert "run kojin-pg migrate" in fails(capsys, 1, "stats", "--url", empty_db_url)
    assert "name the dead letters" in fails(capsys, 2, "dlq", "purge", "--url", db_url)
    err = fails(capsys, 1, "stats", "--url", "postgresql://u@127.0.0.1:1/db?retry_timeout=0.2")
    assert "cannot connect" in err or "did not answer" in err


def test_errors_hide_the_password(capsys):
    err = fails(capsys, 2, "stats", "--url", "postgresql://u:topsecret@127.0.0.1:1/db?bogus=1")
    assert "unknown option 'bogus'" in err and "topsecret" not in err


def test_queues_full_names_empty_declared_and_scheduled(capsys, db_url):
    long_name = "reports.monthly.invoices.for-every-customer-in-every-region." + "x" * 20
    declare(db_url, long_name)
    busy = "busy_" + uuid.uuid4().hex[:6]
    declare(db_url, busy)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO kojin.messages (queue, payload, visible_at, leased_by) VALUES "
                     "(%(q)s, '{}', now(), NULL), (%(q)s, '{}', now(), NULL), "
                     "(%(q)s, '{}', now() + interval '1 hour', NULL), "
                     "(%(q)s, '{}', now() + interval '1 hour', 'c1')", {"q": busy})
    rows = {r["queue"]: r for r in json.loads(run(capsys, "queues", "--url", db_url, "--json"))}
    assert rows[long_name] == {"queue": long_name, "ready": 0, "leased": 0, "scheduled": 0,
                               "dead": 0, "oldest_ready_age_s": None, "bindings": 1,
                               "next_due_s": None}
    assert (rows[busy]["ready"], rows[busy]["scheduled"], rows[busy]["leased"]) == (2, 1, 1)
    text = run(capsys, "queues", "list", "--url", db_url)
    assert long_name in text and "scheduled" in text.splitlines()[0]
    assert long_name in run(capsys, "stats", "--url", db_url)


def test_scheduled_list_cancel_and_revoke(capsys, db_url):
    q = "sched_" + uuid.uuid4().hex[:6]
    declare(db_url, q)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with psycopg.connect(db_url) as conn:
        msg_ids = [conn.execute(
            "INSERT INTO kojin.messages (queue, payload, visible_at, due_at, task_id) VALUES "
            "(%s, jsonb_build_object('headers', jsonb_build_object('task', 'shop.ship')), "
            "now() + interval '1 hour', now() + interval '1 hour', %s) RETURNING id",
            (q, task_id)).fetchone()[0] for task_id in ids]
    listed = json.loads(run(capsys, "scheduled", "list", "--url", db_url, "--json"))
    assert [m["task_id"] for m in listed] == ids and listed[0]["task"] == "shop.ship"
    queues = {r["queue"]: r for r in json.loads(run(capsys, "queues", "--url", db_url, "--json"))}
    assert queues[q]["scheduled"] == 3 and 3000 < queues[q]["next_due_s"] <= 3600
    out = json.loads(run(capsys, "scheduled", "cancel", str(msg_ids[0]), "--url", db_url,
                         "--json"))
    assert out == {"deleted": 1, "flagged": 0, "recorded": 1}
    assert "1 queued or scheduled messages deleted" in run(capsys, "revoke", ids[1],
                                                            "--url", db_url)
    with psycopg.connect(db_url) as conn:
        left = conn.execute("SELECT task_id FROM kojin.messages WHERE queue = %s",
                            (q,)).fetchall()
        revoked = conn.execute("SELECT task_id FROM kojin.results WHERE status = 'REVOKED' "
                               "ORDER BY task_id").fetchall()
    assert left == [(ids[2],)]
    assert revoked == sorted([(ids[0],), (ids[1],)])
    fails(capsys, 1, "scheduled", "cancel", "999999", "--url", db_url)


def test_revoke_records_revoked_in_the_results_database_given(capsys, db_url, pg_server):
    """Results kept in another database (docs/scaling.rst): ``--results-url`` says where the
    REVOKED results go; the broker's database gets none."""
    from conftest import TEMPLATE, fresh_database

    q = "sched_" + uuid.uuid4().hex[:6]
    declare(db_url, q)
    task_id = str(uuid.uuid4())
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO kojin.messages (queue, payload, visible_at, due_at, task_id) VALUES "
            "(%s, '{}', now() + interval '1 hour', now() + interval '1 hour', %s)",
            (q, task_id))
    with fresh_database(pg_server, TEMPLATE) as results_url:
        out = json.loads(run(capsys, "revoke", task_id, "--results-url", results_url,
                             "--url", db_url, "--json"))
        assert out == {"deleted": 1, "flagged": 0, "recorded": 1}
        with psycopg.connect(results_url) as conn:
            assert conn.execute("SELECT status FROM kojin.results WHERE task_id = %s",
                                (task_id,)).fetchall() == [("REVOKED",)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM kojin.results").fetchone()[0] == 0
    # a results URL without kojin_pg's schema is an error before anything is revoked, and no
    # schema is made there
    other = str(uuid.uuid4())
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO kojin.messages (queue, payload, visible_at, due_at, task_id) VALUES "
            "(%s, '{}', now() + interval '1 hour', now() + interval '1 hour', %s)", (q, other))
    with fresh_database(pg_server, None) as empty_url:
        fails(capsys, 1, "revoke", other, "--results-url", empty_url, "--url", db_url)
        with psycopg.connect(empty_url) as conn:
            assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'kojin'"
                                ).fetchone()[0] == 0
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM kojin.messages WHERE task_id = %s",
                            (other,)).fetchone()[0] == 1


def test_queues_delete(capsys, db_url):
    name = "doomed_" + uuid.uuid4().hex[:6]
    declare(db_url, name)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO kojin.messages (queue, payload) VALUES (%s, '{}')", (name,))
    assert "holds 1 messages" in fails(capsys, 1, "queues", "delete", name, "--if-empty",
                                       "--url", db_url)
    assert f"deleted queue {name}: 1 messages, 1 bindings" in run(
        capsys, "queues", "delete", name, "--url", db_url)
    assert name not in run(capsys, "queues", "--url", db_url)
    assert "no queue named 'nope'" in fails(capsys, 1, "queues", "delete", "nope", "--url", db_url)


def test_dead_letters_show_the_error_and_the_decoded_task(capsys, db_url):
    name = "cliq_" + uuid.uuid4().hex[:6]
    declare(db_url, name)
    app = Celery("proj", set_as_current=False)
    with psycopg.connect(db_url) as conn:
        task_id = send_task(conn, app, "proj.add", (2, 3), {"z": "ü"}, queue=name).id
    with Connection("kojin+" + db_url) as conn:
        Producer(conn.channel(), exchange=Exchange(name, type="direct"), routing_key=name,
                 serializer="json").publish(
            {"i": 1}, headers={"task": "proj.other"})
        ch = conn.channel()
        for _ in range(2):
            message = ch.basic_get(name)
            ch.qos.reject(message.delivery_tag, requeue=False)
    with psycopg.connect(db_url) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM kojin.dead_letters ORDER BY id").fetchall()]
        conn.execute("UPDATE kojin.dead_letters SET error = 'ValueError: bad input\nline 2' "
                     "WHERE id = %s", (ids[0],))
        conn.execute("UPDATE kojin.dead_letters SET error = 'Traceback (most recent call "
                     "last):\n  File \"t.py\"\nKeyError: 42' WHERE id = %s", (ids[1],))
    listing = run(capsys, "dlq", "list", "--url", db_url)
    assert listing.count("rejected") == 2 and "proj.add" in listing and name in listing
    assert "ValueError: bad input" in listing and "line 2" not in listing
    assert "KeyError: 42" in listing and "Traceback" not in listing
    shown = json.loads(run(capsys, "dlq", "show", str(ids[0]), "--url", db_url, "--json"))
    assert shown["message"]["task"] == "proj.add" and shown["message"]["id"] == task_id
    assert (shown["message"]["args"], shown["message"]["kwargs"]) == ([2, 3], {"z": "ü"})
    assert shown["error"] == "ValueError: bad input\nline 2"
    text = run(capsys, "dlq", "show", str(ids[0]), str(ids[1]), "--url", db_url)
    assert "args:           [2, 3]" in text and 'kwargs:         {"z": "ü"}' in text
    assert "body:           {'i': 1}" in text and "line 2" in text and "Traceback" in text
    assert "requeued 1 dead letters" in run(capsys, "dlq", "requeue", str(ids[0]),
                                             "--url", db_url)
    assert "purged 1 dead letters" in run(capsys, "dlq", "purge", "--all", "--url", db_url)
    row = next(r for r in json.loads(run(capsys, "queues", "--url", db_url, "--json"))
               if r["queue"] == name)
    assert (row["ready"], row["dead"]) == (1, 0)


def _bury(url: str, n: int, queue: str = "bulk") -> None:
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO kojin.dead_letters (id, queue, payload, delivery_count, "
                     "reason, enqueued_at) SELECT g, %s, '{}', 10, 'max_deliveries', now() "
                     "FROM generate_series(1, %s) g", (queue, n))


def test_requeue_all_in_batches_prints_one_final_line(capsys, db_url):
    _bury(db_url, 12_001)
    code = main(["dlq", "requeue", "--all", "--url", db_url])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == "requeued 12,001 dead letters\n" and captured.err == ""
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM kojin.messages").fetchone()[0] == 12_001
        assert conn.execute("SELECT count(*) FROM kojin.dead_letters").fetchone()[0] == 0


def test_progress_on_a_terminal(db_url):
    _bury(db_url, 10_001)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "kojin_pg.cli", "dlq", "purge", "--all",
                               "--url", db_url], stdout=subprocess.PIPE, stderr=slave,
                              text=True, timeout=120)
        os.close(slave)
        slave = -1
        progress = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            progress += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0 and proc.stdout == "purged 10,001 dead letters\n"
    assert b"\r\x1b[Kpurged dead letters: 5,000\r" in progress


def test_cleanup_for_cron(capsys, db_url):
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO kojin.results (task_id, status, expires_at) "
                     "SELECT g::text, 'SUCCESS', now() - interval '1 day' "
                     "FROM generate_series(1, 1234) g")
    counts = json.loads(run(capsys, "cleanup", "--url", db_url, "--json", "--batch-size", "100"))
    assert counts["results"] == 1234
    assert run(capsys, "cleanup", "--url", db_url).startswith("deleted 0 expired rows")


def _age(url: str, queue: str, hours: float, leased: bool = False, delivered: int = 0) -> None:
    """A message of ``queue`` enqueued ``hours`` ago, and every binding of it that old."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO kojin.messages (queue, payload, enqueued_at, visible_at, leased_by, "
            "delivery_count) VALUES (%(q)s, '{}', now() - make_interval(hours => %(h)s), "
            "CASE WHEN %(l)s THEN now() + interval '1 hour' ELSE now() END, "
            "CASE WHEN %(l)s THEN 'c1' END, %(d)s)",
            {"q": queue, "h": hours, "l": leased, "d": delivered})
        conn.execute("UPDATE kojin.bindings SET created_at = now() - interval '3 hours' "
                     "WHERE queue = %s", (queue,))


def test_bindings_list_and_prune_unused_queues(capsys, db_url):
    events = "celeryev." + str(uuid.uuid4())      # an event receiver that went away
    live_pidbox = "w1@host.celery.pidbox"          # a live worker's idle remote-control queue
    backlog = "slow.celery.pidbox"                 # in use: a consumer holds a lease
    stopped = "reports"                            # workers stopped: looks unused
    declare(db_url, events, "celeryev", "topic")
    declare(db_url, live_pidbox, "celery.pidbox", "fanout")
    declare(db_url, backlog, "celery.pidbox", "fanout")
    declare(db_url, stopped)
    _age(db_url, events, 2)
    _age(db_url, backlog, 2, leased=True)
    _age(db_url, stopped, 2)
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE kojin.bindings SET created_at = now() - interval '3 hours'")
    listed = json.loads(run(capsys, "bindings", "list", "--url", db_url, "--json"))
    status = {b["queue"]: b["status"] for b in listed}
    assert status == {events: "unused", live_pidbox: "idle", backlog: "in use",
                      stopped: "unused"}
    # with a longer horizon, two hours without a delivery is not evidence yet
    status = {b["queue"]: b["status"] for b in json.loads(run(
        capsys, "bindings", "--url", db_url, "--json", "list", "--older-than", "1d"))}
    assert status[events] == "waiting"
    assert run(capsys, "bindings", "prune", "--dry-run", "--url", db_url) == \
        f"would prune {events}\nwould prune 1 unused queues\n"
    assert f"pruned {events}" in run(capsys, "bindings", "prune", "--url", db_url)
    remaining = {b["queue"] for b in json.loads(run(capsys, "bindings", "--url", db_url,
                                                    "--json"))}
    assert remaining == {live_pidbox, backlog, stopped}
    assert f"pruned {stopped}" in run(capsys, "bindings", "prune", "--any-queue",
                                      "--url", db_url)
    with psycopg.connect(db_url) as conn:
        left = {r[0] for r in conn.execute("SELECT DISTINCT queue FROM kojin.messages")}
    assert left == {backlog}


@pytest.mark.e2e
def test_demo_runs_a_worker(db_url, tmp_path):
    """The demo works, and a run that went well leaves no working directory behind."""
    out = subprocess.run([sys.executable, "-m", "kojin_pg.cli", "demo", "--url", db_url],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "-> 5050" in out.stdout and "-> 42" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_stats_warns_when_the_notify_queue_fills(capsys):
    """A listener idle in a transaction holds the NOTIFY queue (made small here) until it fills."""
    from kojin_pg.dev.embedded import temporary_server

    server = temporary_server(settings=(("max_notify_queue_pages", "64"),))  # 512 kB
    try:
        url = server.url
        run(capsys, "migrate", "--url", url)
        listener = psycopg.connect(url)
        listener.execute("LISTEN kojin_test_channel")
        listener.commit()
        listener.execute("SELECT 1")  # idle in transaction: reads no notifications
        with psycopg.connect(url) as sender:
            for i in range(40):
                sender.execute("SELECT pg_notify('kojin_test_channel', %s)",
                               (f"{i:04d}" + "x" * 7900,))
                sender.commit()
        stats = json.loads(run(capsys, "stats", "--url", url, "--json"))
        assert stats["notify_queue_usage"] > 0.5
        text = run(capsys, "stats", "--url", url)
        assert "WARNING: the NOTIFY queue is over 50% full" in text
        listener.close()
    finally:
        server.destroy()
