"""Prometheus metrics of one kojin_pg schema: a collector, an exporter, a WSGI app.

Needs the ``metrics`` extra (``prometheus_client``). Each scrape reads every figure in one
read-only transaction (:func:`kojin_pg.health.snapshot`, a handful of queries); nothing is
cached between scrapes. ``kojin-pg metrics --port P`` serves them; :func:`register` mounts the
same collector in an application's registry, :func:`make_wsgi_app` gives a WSGI app to mount.

What the database can tell and what it cannot: kojin_pg keeps no delivery counter (a claim
updates a row, an ack deletes it). ``kojin_table_rows_deleted_total{table="messages"}`` (from
``pg_stat_user_tables``, reset with the server's statistics) counts messages finished: acked,
dead-lettered or purged; ``kojin_table_rows_inserted_total`` counts messages published and dead
letters made. ``rate()`` of those is the throughput; ``kojin_dead_letters_last_minute`` and
``kojin_results_finished_last_minute`` are read from the rows' own timestamps.

The role needs ``pg_monitor`` (or ``pg_read_all_stats``) to see other users' transactions.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import make_wsgi_app as _prometheus_wsgi_app
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from . import config, health
from .db import Database

log = logging.getLogger(__name__)

#: Seconds one scrape may take in the database before it is cancelled.
SCRAPE_TIMEOUT = 10.0
#: A scrape needs one connection and should fail fast (``kojin_up 0``) rather than retry long.
SCRAPE_POOL = {"pool_min_size": 1, "pool_max_size": 2, "retry_timeout": 2.0}


class KojinCollector(Collector):
    """Collects the figures of one schema at every scrape (``kojin_up`` 0 when it cannot)."""

    def __init__(self, url: str | None = None, schema: str = "kojin", *,
                 settings: config.Settings | None = None) -> None:
        if settings is None:
            if url is None:
                raise ValueError("KojinCollector needs a url or settings")
            settings = config.parse(config.plain_url(url), {"schema": schema, **SCRAPE_POOL})
        self.settings = settings
        self.db = Database(settings, role="kojin_pg.metrics")

    def describe(self) -> Iterable[Metric]:
        """The metric families, without reading the database (for registry checks)."""
        return _families()

    def collect(self) -> Iterator[Metric]:
        """Read a snapshot and yield every family (only ``kojin_up`` 0 on failure)."""
        started = time.monotonic()
        try:
            snap = health.snapshot(self.db, self.settings.schema, SCRAPE_TIMEOUT)
        except Exception as exc:  # a scrape must answer: say the database is down
            log.warning("kojin_pg metrics: scrape failed: %s",
                        config.scrub(str(exc), self.settings.conninfo))
            up = GaugeMetricFamily("kojin_up", _HELP["kojin_up"], value=0)
            yield up
            return
        families = {f.name: f for f in _families()}
        _fill(families, snap)
        families["kojin_up"].add_metric([], 1)
        families["kojin_scrape_duration_seconds"].add_metric([], time.monotonic() - started)
        yield from families.values()

    def close(self) -> None:
        """Close the collector's connections."""
        self.db.close()


_HELP = {
    "kojin_up": "1 if the last scrape read the database, else 0",
    "kojin_scrape_duration_seconds": "seconds the scrape's queries took",
    "kojin_queue_messages": "messages per queue and state: ready (visible now), leased (held "
                            "by a consumer), scheduled (not visible yet, not leased)",
    "kojin_queue_dead_letters": "dead letters per queue",
    "kojin_queue_oldest_ready_age_seconds": "age of the oldest ready message (0 when none)",
    "kojin_queue_bindings": "exchange bindings per queue",
    "kojin_results_rows": "rows of the results table",
    "kojin_results_expired_rows": "results past expires_at awaiting cleanup",
    "kojin_results_bytes": "size of the results table with indexes and TOAST",
    "kojin_results_finished_last_minute": "results stored with date_done in the last minute",
    "kojin_dead_letters_last_minute": "messages dead-lettered in the last minute",
    "kojin_table_dead_tuples": "dead tuples per kojin table (pg_stat_user_tables estimate)",
    "kojin_table_live_tuples": "live tuples per kojin table (pg_stat_user_tables estimate)",
    "kojin_table_bytes": "size per kojin table with indexes and TOAST",
    "kojin_table_last_vacuum_timestamp_seconds": "last (auto)vacuum per kojin table (0: never)",
    "kojin_table_rows_inserted": "rows inserted per kojin table since the statistics reset",
    "kojin_table_rows_deleted": "rows deleted per kojin table since the statistics reset "
                                "(messages: acked, dead-lettered or purged)",
    "kojin_oldest_transaction_age_seconds": "age of the oldest open transaction of the "
                                            "database holding back vacuum (0 when none)",
    "kojin_notify_queue_usage_ratio": "share of the server's NOTIFY queue in use "
                                      "(pg_notification_queue_usage; at 1 NOTIFY fails)",
}

_LABELS = {
    "kojin_queue_messages": ["queue", "state"],
    "kojin_queue_dead_letters": ["queue"],
    "kojin_queue_oldest_ready_age_seconds": ["queue"],
    "kojin_queue_bindings": ["queue"],
    "kojin_table_dead_tuples": ["table"],
    "kojin_table_live_tuples": ["table"],
    "kojin_table_bytes": ["table"],
    "kojin_table_last_vacuum_timestamp_seconds": ["table"],
    "kojin_table_rows_inserted": ["table"],
    "kojin_table_rows_deleted": ["table"],
}

_COUNTERS = {"kojin_table_rows_inserted", "kojin_table_rows_deleted"}


def _families() -> list[Metric]:
    """Every metric family, empty."""
    out: list[Metric] = []
    for name, text in _HELP.items():
        kind = CounterMetricFamily if name in _COUNTERS else GaugeMetricFamily
        out.append(kind(name, text, labels=_LABELS.get(name, [])))
    return out


def _fill(f: dict[str, Any], snap: health.Snapshot) -> None:
    for q in snap.queues:
        for state in ("ready", "leased", "scheduled"):
            f["kojin_queue_messages"].add_metric([q.queue, state], getattr(q, state))
        f["kojin_queue_dead_letters"].add_metric([q.queue], q.dead)
        f["kojin_queue_oldest_ready_age_seconds"].add_metric([q.queue],
                                                             q.oldest_ready_age_s or 0.0)
        f["kojin_queue_bindings"].add_metric([q.queue], q.bindings)
    f["kojin_results_rows"].add_metric([], snap.results.rows)
    f["kojin_results_expired_rows"].add_metric([], snap.results.expired_not_cleaned)
    f["kojin_results_bytes"].add_metric([], snap.results.bytes or 0)
    f["kojin_results_finished_last_minute"].add_metric([], snap.last_minute.results_finished)
    f["kojin_dead_letters_last_minute"].add_metric([], snap.last_minute.dead_lettered)
    for t in snap.tables:
        f["kojin_table_dead_tuples"].add_metric([t.table], t.dead_tuples)
        f["kojin_table_live_tuples"].add_metric([t.table], t.live_estimate)
        f["kojin_table_bytes"].add_metric([t.table], t.bytes)
        f["kojin_table_last_vacuum_timestamp_seconds"].add_metric(
            [t.table], t.last_vacuum.timestamp() if t.last_vacuum else 0.0)
        f["kojin_table_rows_inserted"].add_metric([t.table], t.rows_inserted)
        f["kojin_table_rows_deleted"].add_metric([t.table], t.rows_deleted)
    oldest = snap.server.oldest_transaction
    f["kojin_oldest_transaction_age_seconds"].add_metric([], oldest.age_seconds if oldest else 0)
    f["kojin_notify_queue_usage_ratio"].add_metric([], snap.server.notify_queue_usage)


def register(registry: CollectorRegistry = REGISTRY, url: str | None = None,
             schema: str = "kojin", *, settings: config.Settings | None = None
             ) -> KojinCollector:
    """Add a collector of ``url``'s schema to ``registry`` (the global one by default).

    For an application that already exposes ``/metrics`` (Django with django-prometheus, a
    Flask app, ...): its metrics and kojin_pg's are then served together.
    """
    collector = KojinCollector(url, schema, settings=settings)
    registry.register(collector)
    return collector


def make_wsgi_app(url: str | None = None, schema: str = "kojin", *,
                  settings: config.Settings | None = None) -> Any:
    """A WSGI app serving only kojin_pg's metrics (its own registry), to mount anywhere."""
    registry = CollectorRegistry(auto_describe=True)
    register(registry, url, schema, settings=settings)
    return _prometheus_wsgi_app(registry)


def serve(settings: config.Settings, port: int, addr: str = "127.0.0.1") -> None:
    """Serve the metrics over HTTP until SIGINT or SIGTERM (``kojin-pg metrics``)."""
    registry = CollectorRegistry(auto_describe=True)
    collector = register(registry, settings=settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server, thread = start_http_server(port, addr=addr, registry=registry)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        thread.join(5)
        collector.close()
