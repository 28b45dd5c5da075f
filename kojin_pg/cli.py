"""``kojin-pg``: schema migration, cleanup, stats and a demo, for operators and cron.

Every command takes ``--url`` (default: ``KOJIN_PG_URL``, else the zero-setup embedded server)
and ``--schema``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import config
from .db import Database, Queries
from .db.schema import current_version, latest_version, migrate
from .errors import KojinError


def _settings(args: argparse.Namespace) -> config.Settings:
    from .embedded import resolve_url

    url = config.plain_url(resolve_url(args.url))
    return config.parse(url, {"schema": args.schema})


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    db = Database(settings, role="kojin_pg.cli")
    applied = db.run(lambda conn: migrate(conn, settings.schema), "migrate")
    if applied:
        print(f"schema {settings.schema}: applied {', '.join(map(str, applied))}; "
              f"now at version {latest_version()}")
    else:
        print(f"schema {settings.schema}: up to date (version {latest_version()})")
    db.close()
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from celery import Celery

    settings = _settings(args)
    app = Celery("kojin_pg_cli", set_as_current=False)
    app.conf.update(result_backend="kojin+" + settings.conninfo,
                    result_backend_transport_options={"schema": settings.schema,
                                                      "cleanup_batch_size": args.batch_size})
    counts = app.backend.cleanup()
    if args.json:
        print(json.dumps(counts))
    else:
        for table, n in counts.items():
            print(f"{table:<12} {n:>10} expired rows deleted")
    return 0


def collect_stats(settings: config.Settings) -> dict[str, Any]:
    """Health figures of one kojin_pg schema (used by ``kojin-pg stats``)."""
    db = Database(settings, role="kojin_pg.cli")
    q = Queries("admin", settings.schema)
    broker = Queries("broker", settings.schema)
    try:
        version = db.run(lambda conn: current_version(conn, settings.schema), "version")
        if version == 0:
            raise KojinError(f"schema {settings.schema!r} has no kojin_pg tables: "
                             "run kojin-pg migrate")
        rows, expired, size = db.fetchone(
            q.result_stats, {"table": f"{settings.schema}.results"}) or (0, 0, 0)
        tables = {name: {"live": live, "dead": dead, "last_vacuum": str(vac) if vac else None,
                         "bytes": nbytes}
                  for name, live, dead, vac, nbytes in db.fetchall(
                      q.table_health, {"schema": settings.schema})}
        oldest = db.fetchone(q.oldest_xmin)
        done_last_minute, dead_last_minute = db.fetchone(q.last_minute) or (0, 0)
        dead = dict(db.fetchall(broker.dead_letter_counts))
        queues = {name: {"ready": ready, "leased": leased, "delayed": delayed,
                         "dead": dead.pop(name, 0), "oldest_ready_age_s": age}
                  for name, ready, leased, delayed, age in db.fetchall(broker.queue_stats)}
        for name, n in dead.items():
            queues[name] = {"ready": 0, "leased": 0, "delayed": 0, "dead": n,
                            "oldest_ready_age_s": None}
    finally:
        db.close()
    return {
        "schema": settings.schema,
        "version": version,
        "queues": queues,
        "last_minute": {"results_finished": done_last_minute,
                        "dead_lettered": dead_last_minute},
        "results": {"rows": rows, "expired_not_cleaned": expired, "bytes": size},
        "tables": tables,
        "oldest_transaction": None if oldest is None else {
            "age_seconds": round(oldest[0], 1), "pid": oldest[1],
            "application_name": oldest[2], "state": oldest[3]},
    }


def cmd_stats(args: argparse.Namespace) -> int:
    stats = collect_stats(_settings(args))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    r = stats["results"]
    print(f"schema {stats['schema']} (version {stats['version']})")
    minute = stats["last_minute"]
    print(f"last minute: {minute['results_finished']} results finished, "
          f"{minute['dead_lettered']} messages dead-lettered")
    print(f"{'queue':<30} {'ready':>8} {'leased':>8} {'delayed':>8} {'dead':>6} {'oldest':>8}")
    for name, qs in sorted(stats["queues"].items()):
        age = qs["oldest_ready_age_s"]
        print(f"{name[:30]:<30} {qs['ready']:>8} {qs['leased']:>8} {qs['delayed']:>8} "
              f"{qs['dead']:>6} {'-' if age is None else f'{age:.1f}s':>8}")
    print(f"results: {r['rows']} rows, {r['expired_not_cleaned']} expired awaiting cleanup, "
          f"{r['bytes'] / 1e6:.1f} MB")
    print(f"{'table':<20} {'live':>10} {'dead':>10} {'MB':>8}  last vacuum")
    for name, t in stats["tables"].items():
        print(f"{name:<20} {t['live']:>10} {t['dead']:>10} {t['bytes'] / 1e6:>8.1f}  "
              f"{t['last_vacuum'] or '-'}")
    o = stats["oldest_transaction"]
    if o:
        print(f"oldest open transaction: {o['age_seconds']}s (pid {o['pid']}, "
              f"{o['application_name'] or '?'}, {o['state']}) - it holds back vacuum")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.url)


def _broker_queries(args: argparse.Namespace) -> tuple[Database, Queries, config.Settings]:

    settings = _settings(args)
    db = Database(settings, role="kojin_pg.cli")
    return db, Queries("broker", settings.schema), settings


def cmd_queues(args: argparse.Namespace) -> int:
    db, q, _ = _broker_queries(args)
    try:
        rows = db.fetchall(q.queue_stats)
        dead = dict(db.fetchall(q.dead_letter_counts))
    finally:
        db.close()
    if args.json:
        print(json.dumps([{"queue": name, "ready": r, "leased": le, "delayed": d,
                           "dead": dead.get(name, 0), "oldest_ready_age_s": age}
                          for name, r, le, d, age in rows]))
        return 0
    print(f"{'queue':<40} {'ready':>8} {'leased':>8} {'delayed':>8} {'dead':>6} {'oldest':>8}")
    names = sorted({r[0] for r in rows} | set(dead))
    by_name = {r[0]: r for r in rows}
    for name in names:
        _, ready, leased, delayed, age = by_name.get(name, (name, 0, 0, 0, None))
        oldest = "-" if age is None else f"{age:.1f}s"
        print(f"{name[:40]:<40} {ready:>8} {leased:>8} {delayed:>8} {dead.get(name, 0):>6} "
              f"{oldest:>8}")
    return 0


def _dlq_selection(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.ids or args.queue or args.all):
        raise KojinError("name the dead letters: message ids, --queue NAME or --all")
    return {"ids": list(args.ids or []), "queue": args.queue, "all": bool(args.all)}


def cmd_dlq(args: argparse.Namespace) -> int:
    from .transport import messages_channel

    db, q, settings = _broker_queries(args)
    try:
        if args.action == "list":
            rows = db.fetchall(q.dlq_list, {"queue": args.queue, "limit": args.limit})
            print(f"{'id':>10} {'queue':<24} {'count':>5} {'reason':<15} {'task':<30} dead at")
            for mid, queue, count, reason, _error, dead_at, task in rows:
                print(f"{mid:>10} {queue[:24]:<24} {count:>5} {reason:<15} "
                      f"{(task or '-')[:30]:<30} {dead_at:%Y-%m-%d %H:%M:%S}")
        elif args.action == "show":
            for mid in args.ids or []:
                row = db.fetchone(q.dlq_show, {"id": mid})
                if row is None:
                    raise KojinError(f"no dead letter with id {mid}")
                keys = ("id", "queue", "priority", "delivery_count", "reason", "error",
                        "enqueued_at", "dead_at", "payload")
                print(json.dumps(dict(zip(keys, row, strict=True)), indent=2, default=str))
        elif args.action == "requeue":
            row = db.fetchone(q.dlq_requeue, {**_dlq_selection(args),
                                              "channel": messages_channel(settings.schema)})
            print(f"requeued {row[0] if row else 0} messages")
        elif args.action == "purge":
            row = db.fetchone(q.dlq_purge, _dlq_selection(args))
            print(f"purged {row[0] if row else 0} dead letters")
    finally:
        db.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kojin-pg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--url", help="PostgreSQL URL (default: KOJIN_PG_URL, else embedded)")
        p.add_argument("--schema", default="kojin", help="schema name (default: kojin)")
        p.set_defaults(func=func)
        return p

    add("migrate", cmd_migrate, "create or upgrade the kojin_pg schema")
    p = add("cleanup", cmd_cleanup, "delete expired results, groups and chords (for cron)")
    p.add_argument("--batch-size", type=int, default=5000, help="rows per transaction")
    p.add_argument("--json", action="store_true", help="print counts as JSON")
    p = add("stats", cmd_stats, "table sizes, dead tuples, expired rows, vacuum blockers")
    p.add_argument("--json", action="store_true", help="print as JSON")
    add("demo", cmd_demo, "run a Celery worker on kojin_pg and send a task, a group, a chord")
    p = add("queues", cmd_queues, "per queue: ready, leased, delayed, dead, oldest ready age")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p = add("dlq", cmd_dlq, "dead letters: list, show, requeue or purge")
    p.add_argument("action", choices=["list", "show", "requeue", "purge"])
    p.add_argument("ids", nargs="*", type=int, help="dead letter (message) ids")
    p.add_argument("--queue", help="only this queue")
    p.add_argument("--all", action="store_true", help="every dead letter (requeue, purge)")
    p.add_argument("--limit", type=int, default=50, help="rows to list")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kojin-pg`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KojinError as exc:
        print(f"kojin-pg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
