"""Prometheus metrics: the real exporter (``kojin-pg metrics``) scraped over HTTP, and the
collector mounted in an application's registry and WSGI app."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kojin_pg import metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def fill(url: str) -> None:
    """Known rows: a queue in every state, dead letters, results, an empty declared queue."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO kojin.messages (queue, payload, visible_at, leased_by, enqueued_at)
            SELECT 'work', '{}'::jsonb, now(), NULL::text, now() - interval '90 seconds'
                FROM generate_series(1, 3)
            UNION ALL SELECT 'work', '{}', now() + interval '1 hour', NULL, now()
            UNION ALL SELECT 'work', '{}', now() + interval '1 hour', NULL, now()
            UNION ALL SELECT 'work', '{}', now() + interval '10 minutes', 'consumer-1', now()""")
        conn.execute("INSERT INTO kojin.dead_letters (id, queue, payload, delivery_count, "
                     "reason, enqueued_at) SELECT g, 'work', '{}', 10, 'max_deliveries', now() "
                     "FROM generate_series(1, 2) g")
        conn.execute("INSERT INTO kojin.bindings (exchange, routing_key, queue) "
                     "VALUES ('celery', 'idle', 'idle')")
        conn.execute("INSERT INTO kojin.results (task_id, status, date_done, expires_at) "
                     "SELECT g::text, 'SUCCESS', now(), CASE WHEN g <= 4 THEN "
                     "now() - interval '1 day' ELSE now() + interval '1 day' END "
                     "FROM generate_series(1, 10) g")
        conn.execute("SELECT pg_stat_force_next_flush()")  # table counters visible now
        conn.execute("SELECT 1")


def check(values: dict, pg_notify_usage: float) -> None:
    def v(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    assert v("kojin_up") == 1
    assert v("kojin_queue_messages", queue="work", state="ready") == 3
    assert v("kojin_queue_messages", queue="work", state="scheduled") == 2
    assert v("kojin_queue_messages", queue="work", state="leased") == 1
    assert v("kojin_queue_dead_letters", queue="work") == 2
    assert v("kojin_queue_oldest_ready_age_seconds", queue="work") >= 90
    assert v("kojin_queue_messages", queue="idle", state="ready") == 0  # declared, empty
    assert v("kojin_queue_bindings", queue="idle") == 1
    assert v("kojin_results_rows") == 10
    assert v("kojin_results_expired_rows") == 4
    assert v("kojin_results_finished_last_minute") == 10
    assert v("kojin_dead_letters_last_minute") == 2
    assert v("kojin_notify_queue_usage_ratio") == pg_notify_usage
    assert v("kojin_table_rows_inserted_total", table="messages") >= 6
    assert v("kojin_table_rows_inserted_total", table="dead_letters") >= 2
    assert ("kojin_table_dead_tuples", (("table", "results"),)) in values


def test_exporter_scraped_over_http(db_url, tmp_path):
    fill(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        usage = conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
    port = free_port()
    log = (tmp_path / "exporter.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kojin_pg.cli", "metrics", "--url", db_url,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    holder = psycopg.connect(db_url)  # an open transaction holding back vacuum
    try:
        holder.execute("SELECT txid_current()")
        deadline = time.monotonic() + 60
        while True:
            try:
                text = get(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "exporter.log").read_text()
                assert time.monotonic() < deadline, "exporter did not answer in 60 s"
                time.sleep(0.2)
        values = samples(text)
        check(values, usage)
        assert values[("kojin_oldest_transaction_age_seconds", ())] > 0
        holder.rollback()
        values = samples(get(f"http://127.0.0.1:{port}/metrics"))
        assert values[("kojin_oldest_transaction_age_seconds", ())] == 0
    finally:
        holder.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_collector_in_an_existing_registry_and_wsgi_app(db_url):
    fill(db_url)
    registry = CollectorRegistry()
    collector = metrics.register(registry, url=db_url)
    try:
        check(samples(generate_latest(registry).decode()), 0.0)
    finally:
        collector.close()

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    app = metrics.make_wsgi_app("kojin+" + db_url)
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check(samples(get(f"http://127.0.0.1:{server.server_port}/metrics")), 0.0)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def test_a_database_that_is_down_reads_as_kojin_up_0():
    registry = CollectorRegistry()
    collector = metrics.register(registry, url="postgresql://u:secret@127.0.0.1:1/db")
    try:
        values = samples(generate_latest(registry).decode())
    finally:
        collector.close()
    assert values == {("kojin_up", ()): 0.0}


def test_the_grafana_dashboard_uses_the_exported_names():
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json")
                           .read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in metrics._families()}
    used = set(re.findall(r"\bkojin_[a-z_]+", exprs))
    assert used <= exported, used - exported
    assert {"kojin_queue_messages", "kojin_queue_oldest_ready_age_seconds",
            "kojin_notify_queue_usage_ratio", "kojin_oldest_transaction_age_seconds",
            "kojin_table_dead_tuples", "kojin_table_rows_deleted_total",
            "kojin_dead_letters_last_minute"} <= used
