"""``kojin-pg bindings list|prune``: exchange bindings, and removing those of abandoned queues.

PostgreSQL cannot see consumers the way AMQP does (an idle consumer runs no query that names its
queue), so "unused" is judged from the evidence the tables hold. A queue is **unused** when
all of these hold:

- none of its messages is leased (a live consumer with work holds leases), and
- it holds a ready message that was never delivered and is older than ``--older-than``
  (a live consumer would have claimed it: claims take the oldest first), and
- every binding of it is older than ``--older-than``.

A queue without messages shows no evidence either way (an idle worker's queue looks exactly
like an abandoned one) and is never called unused. So is a backlog whose consumer holds
leases. A queue whose workers are all stopped does look unused: that is why ``prune`` only
touches Celery's per-process queues (``celeryev.*`` event receivers, ``*.celery.pidbox`` remote
control, ``*.reply.celery.pidbox`` replies), which AMQP would have deleted with their process,
unless ``--any-queue`` is given. Pruning deletes the queue's bindings and its messages.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..db import Queries
from .common import EXIT_OK, Progress, age, database, parse_age, print_json, print_table


def is_celery_process_queue(name: str) -> bool:
    """Whether ``name`` is one of Celery's per-process queues (events, pidbox, replies)."""
    return name.startswith("celeryev.") or name.endswith(".celery.pidbox")


def _status(leased: int, undelivered: int, oldest: float | None, binding_age: float,
            older_than: float) -> str:
    if leased:
        return "in use"
    if not undelivered:
        return "idle"
    if oldest is not None and oldest > older_than and binding_age > older_than:
        return "unused"
    return "waiting"


def _bindings(db: Any, schema: str, older_than: float) -> list[dict[str, Any]]:
    rows = db.fetchall(Queries("admin", schema).binding_list, what="bindings")
    out = []
    for exchange, key, queue, binding_age, leased, undelivered, oldest in rows:
        out.append({"exchange": exchange, "routing_key": key, "queue": queue,
                    "age_s": binding_age, "leased": leased, "undelivered": undelivered,
                    "oldest_undelivered_age_s": oldest,
                    "status": _status(leased, undelivered, oldest, binding_age, older_than)})
    return out


def _unused_queues(bindings: list[dict[str, Any]]) -> list[str]:
    """Queues all of whose bindings are unused (one binding in use keeps the queue)."""
    by_queue: dict[str, set[str]] = {}
    for b in bindings:
        by_queue.setdefault(b["queue"], set()).add(b["status"])
    return sorted(q for q, statuses in by_queue.items() if statuses == {"unused"})


def cmd_list(args: argparse.Namespace) -> int:
    """Every binding with its queue's evidence of a consumer, and a status."""
    with database(args) as (db, settings):
        bindings = _bindings(db, settings.schema, args.older_than)
    if args.unused:
        bindings = [b for b in bindings if b["status"] == "unused"]
    if args.json:
        print_json(bindings)
        return EXIT_OK
    if not bindings:
        print("no bindings" + (" of unused queues" if args.unused else ""))
        return EXIT_OK
    print_table(["queue", "exchange", "routing key", "bound for", "leased", "undelivered",
                 "oldest undelivered", "status"],
                [[b["queue"], b["exchange"], b["routing_key"] or "''", age(b["age_s"]),
                  b["leased"], b["undelivered"], age(b["oldest_undelivered_age_s"]),
                  b["status"]] for b in bindings], right=(3, 4, 5, 6))
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete the unused queues (bindings and messages); only Celery's per-process queues
    unless ``--any-queue``."""
    with database(args) as (db, settings):
        candidates = _unused_queues(_bindings(db, settings.schema, args.older_than))
        if not args.any_queue:
            candidates = [q for q in candidates if is_celery_process_queue(q)]
        pruned: list[str] = []
        if not args.dry_run:
            query = Queries("admin", settings.schema).prune_unused_queue
            progress = Progress("pruning unused queues")
            for queue in candidates:
                # the query checks again: a consumer may have appeared since the listing
                row = db.fetchone(query, {"queue": queue, "age": args.older_than}, "prune")
                if row and row[0]:
                    pruned.append(queue)
                progress.update(len(pruned))
            progress.finish()
    names = candidates if args.dry_run else pruned
    if args.json:
        print_json({"dry_run": args.dry_run, "queues": names})
    else:
        for name in names:
            print(("would prune " if args.dry_run else "pruned ") + name)
        print(f"{'would prune' if args.dry_run else 'pruned'} {len(names)} unused queues")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``bindings`` (default ``list``) with ``list`` and ``prune``."""
    p = sub.add_parser("bindings", parents=[parent], help="list bindings, prune unused queues",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_list, older_than=3600.0, unused=False)
    actions = p.add_subparsers(dest="action", metavar="{list,prune}")
    older = {"type": parse_age, "default": 3600.0, "metavar": "AGE",
             "help": "age after which a never-delivered message means nobody consumes the "
                     "queue, e.g. 30m, 2h, 1d (default 1h)"}
    a = actions.add_parser("list", parents=[parent], help="every binding with a status")
    a.add_argument("--older-than", **older)
    a.add_argument("--unused", action="store_true", help="only bindings of unused queues")
    a.set_defaults(func=cmd_list)
    a = actions.add_parser("prune", parents=[parent], help="delete unused queues",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--older-than", **older)
    a.add_argument("--any-queue", action="store_true",
                   help="not only Celery's per-process queues: any unused queue (its "
                        "messages are deleted too)")
    a.add_argument("--dry-run", action="store_true", help="only say what would be pruned")
    a.set_defaults(func=cmd_prune)
