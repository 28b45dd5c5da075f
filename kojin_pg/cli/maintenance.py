"""``kojin-pg migrate`` and ``kojin-pg cleanup``: schema upgrades and expiry, for deploys and cron."""

from __future__ import annotations

import argparse

from ..backend.results import EXPIRING_TABLES
from ..db import Queries
from ..db.schema import latest_version, migrate
from .common import EXIT_OK, Progress, database, print_json


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the schema (safe from many processes at once)."""
    with database(args, need_schema=False) as (db, settings):
        applied = db.run(lambda conn: migrate(conn, settings.schema), "migrate")
    if args.json:
        print_json({"schema": settings.schema, "applied": applied, "version": latest_version()})
    elif applied:
        print(f"schema {settings.schema}: applied {', '.join(map(str, applied))}; "
              f"now at version {latest_version()}")
    else:
        print(f"schema {settings.schema}: up to date (version {latest_version()})")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Delete expired results, groups and chord rows in batches, each its own short transaction.

    The same batched ``delete_expired`` query as the result backend's ``cleanup()`` (which
    Celery's ``backend_cleanup`` calls), with a progress line on a terminal.
    """
    counts: dict[str, int] = {}
    progress = Progress("deleting expired rows")
    with database(args) as (db, settings):
        queries = Queries("backend", settings.schema)
        for table in EXPIRING_TABLES:
            query = queries.get("delete_expired", table=table)
            total = 0
            while True:
                row = db.fetchone(query, {"batch": args.batch_size}, f"cleanup {table}")
                deleted = int(row[0]) if row else 0
                total += deleted
                progress.update(sum(counts.values()) + total, f"({table})")
                if deleted < args.batch_size:
                    break
            counts[table] = total
    progress.finish()
    if args.json:
        print_json(counts)
    else:
        detail = ", ".join(f"{table} {n:,}" for table, n in counts.items())
        print(f"deleted {sum(counts.values()):,} expired rows ({detail})")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``migrate`` and ``cleanup``."""
    p = sub.add_parser("migrate", parents=[parent], help="create or upgrade the kojin_pg schema",
                       description="Create or upgrade the kojin_pg schema (plain SQL files, "
                       "applied in order under an advisory lock).")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("cleanup", parents=[parent],
                       help="delete expired results, groups and chords (for cron)",
                       description="Delete expired results, groups and chord rows in batches.")
    p.add_argument("--batch-size", type=int, default=5000, help="rows per transaction")
    p.set_defaults(func=cmd_cleanup)
