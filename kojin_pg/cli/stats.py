"""``kojin-pg stats``: the health of one schema at a glance (queues, results, tables, server)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import health
from ..db import Database
from ..db.schema import current_version
from .common import EXIT_OK, age, database, print_json, print_table
from .queues import print_queues


def collect_stats(db: Database, schema: str) -> dict[str, Any]:
    """Every figure ``stats`` shows, as JSON-ready data (the same ones the metrics export)."""
    snap = health.snapshot(db, schema)
    oldest = snap.server.oldest_transaction
    return {
        "schema": schema,
        "version": db.run(lambda conn: current_version(conn, schema), "version"),
        "queues": health.as_dict(snap.queues),
        "last_minute": health.as_dict(snap.last_minute),
        "results": health.as_dict(snap.results),
        "tables": health.as_dict(snap.tables),
        "notify_queue_usage": snap.server.notify_queue_usage,
        "oldest_transaction": None if oldest is None else health.as_dict(oldest),
    }


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the figures; warn about a filling NOTIFY queue and a vacuum blocker."""
    with database(args) as (db, settings):
        stats = collect_stats(db, settings.schema)
    if args.json:
        print_json(stats)
        return EXIT_OK
    print(f"schema {stats['schema']} (version {stats['version']})")
    minute = stats["last_minute"]
    print(f"last minute: {minute['results_finished']:,} results finished, "
          f"{minute['dead_lettered']:,} messages dead-lettered")
    print()
    print_queues(stats["queues"])
    print()
    r = stats["results"]
    print(f"results: {r['rows']:,} rows, {r['expired_not_cleaned']:,} expired awaiting cleanup, "
          f"{r['bytes'] / 1e6:.1f} MB")
    print()
    print_table(["table", "dead tuples", "MB", "last vacuum"],
                [[t["table"], f"{t['dead_tuples']:,}", f"{t['bytes'] / 1e6:.1f}",
                  t["last_vacuum"]] for t in stats["tables"]], right=(1, 2))
    print()
    usage = stats["notify_queue_usage"]
    print(f"NOTIFY queue usage: {usage:.1%}")
    if usage > health.NOTIFY_USAGE_WARNING:
        print(f"WARNING: the NOTIFY queue is over {health.NOTIFY_USAGE_WARNING:.0%} full: a "
              "session that LISTENs but never reads (or a long transaction) holds it; at 100% "
              "every NOTIFY, and so every publish, fails")
    o = stats["oldest_transaction"]
    if o:
        print(f"oldest open transaction: {age(o['age_seconds'])} (pid {o['pid']}, "
              f"{o['application_name'] or '?'}, {o['state']}) - it holds back vacuum")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``stats``."""
    p = sub.add_parser("stats", parents=[parent],
                       help="queues, results, dead tuples, NOTIFY queue, vacuum blockers",
                       description="The health of one kojin_pg schema: queues, results awaiting "
                       "cleanup, dead tuples, NOTIFY queue usage, the oldest open transaction.")
    p.set_defaults(func=cmd_stats)
