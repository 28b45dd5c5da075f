"""``kojin-pg migrate`` and ``kojin-pg cleanup``: schema upgrades and expiry, for deploys and cron."""

from __future__ import annotations

import argparse

from ..backend.expiry import delete_expired
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

    The same code as the result backend's ``cleanup()`` (which Celery's ``backend_cleanup``
    calls), with a progress line on a terminal.
    """
    progress = Progress("deleting expired rows")
    with database(args) as (db, settings):
        counts = delete_expired(db, Queries("backend", settings.schema), args.batch_size,
                                lambda done, table: progress.update(done, f"({table})"))
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
