"""The kojin-pg command line: migrate, cleanup, stats, queues, dlq, demo."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import psycopg
import pytest
from kombu import Connection, Exchange, Producer, Queue

import kojin_pg  # noqa: F401
from kojin_pg.cli import main


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_migrate_and_stats(capsys, empty_db_url):
    assert "applied 1, 2" in run(capsys, "migrate", "--url", empty_db_url)
    assert "up to date" in run(capsys, "migrate", "--url", empty_db_url)
    stats = json.loads(run(capsys, "stats", "--url", empty_db_url, "--json"))
    assert stats["results"]["rows"] == 0
    assert "messages" in stats["tables"]


def test_cleanup_for_cron(capsys, db_url):
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO kojin.results (task_id, status, expires_at) "
                     "SELECT g::text, 'SUCCESS', now() - interval '1 day' "
                     "FROM generate_series(1, 1234) g")
    counts = json.loads(run(capsys, "cleanup", "--url", db_url, "--json", "--batch-size", "100"))
    assert counts["results"] == 1234


def test_queues_and_dead_letters(capsys, db_url):
    name = "cliq_" + uuid.uuid4().hex[:6]
    q = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection("kojin+" + db_url) as conn:
        q(conn.channel()).declare()
        prod = Producer(conn.channel(), exchange=q.exchange, routing_key=name,
                        serializer="json")
        for i in range(3):
            prod.publish({"i": i}, headers={"task": "proj.t"})
        ch = conn.channel()
        for _ in range(2):
            ch.basic_get(name).reject(requeue=False)
    out = run(capsys, "queues", "--url", db_url, "--json")
    row = next(r for r in json.loads(out) if r["queue"] == name)
    assert (row["ready"], row["dead"]) == (1, 2)
    listing = run(capsys, "dlq", "list", "--url", db_url)
    assert listing.count("rejected") == 2 and "proj.t" in listing
    first_id = int(listing.splitlines()[1].split()[0])
    assert json.loads(run(capsys, "dlq", "show", str(first_id), "--url", db_url))["id"] == \
        first_id
    assert "requeued 1" in run(capsys, "dlq", "requeue", str(first_id), "--url", db_url)
    assert "purged 1" in run(capsys, "dlq", "purge", "--all", "--url", db_url)
    row = next(r for r in json.loads(run(capsys, "queues", "--url", db_url, "--json"))
               if r["queue"] == name)
    assert (row["ready"], row["dead"]) == (2, 0)


def test_dlq_requeue_needs_a_selection(capsys, db_url):
    assert main(["dlq", "purge", "--url", db_url]) == 2
    assert "name the dead letters" in capsys.readouterr().err


def test_errors_hide_the_password(capsys):
    code = main(["stats", "--url", "postgresql://u:topsecret@127.0.0.1:1/db?bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown option 'bogus'" in err and "topsecret" not in err


@pytest.mark.e2e
def test_demo_runs_a_worker(db_url):
    out = subprocess.run([sys.executable, "-m", "kojin_pg.cli", "demo", "--url", db_url],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "-> 5050" in out.stdout and "-> 42" in out.stdout
