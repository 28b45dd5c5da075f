"""``kojin-pg scheduled list|cancel`` and ``kojin-pg revoke``: tasks the broker holds for later,
and revoking tasks durably (see :mod:`kojin_pg.transport.revoke`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..db import Queries
from ..errors import KojinError
from ..transport.revoke import revoke_tasks
from ..transport.revoked_results import RevokedResults
from .common import EXIT_OK, database, print_json, print_table


def cmd_list(args: argparse.Namespace) -> int:
    """Scheduled messages, soonest first."""
    with database(args) as (db, settings):
        rows = db.fetchall(Queries("broker", settings.schema).scheduled_list,
                           {"queue": args.queue, "limit": args.limit}, "scheduled list")
    items = [{"id": i, "queue": q, "due_at": due, "task_id": tid, "task": name,
              "enqueued_at": enq} for i, q, due, tid, name, enq in rows]
    if args.json:
        print_json(items)
    elif not items:
        print("nothing scheduled")
    else:
        print_table(["id", "queue", "due at", "task", "task id"],
                    [[m["id"], m["queue"], m["due_at"].isoformat(timespec="seconds"),
                      m["task"] or "-", m["task_id"] or "-"] for m in items], right=(0,))
    return EXIT_OK


def _revoke(args: argparse.Namespace, task_ids: list[str]) -> int:
    with database(args) as (db, settings):
        results = RevokedResults(settings, [args.results_url] if args.results_url else None,
                                 strict=True)
        done = revoke_tasks(db, Queries("broker", settings.schema), settings.schema, task_ids,
                            results)
    if args.json:
        print_json(asdict(done))
    else:
        print(f"revoked: {done.deleted} queued or scheduled messages deleted, "
              f"{done.flagged} leased ones flagged, {done.recorded} results set to REVOKED")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel scheduled messages by message id: their tasks are revoked."""
    with database(args) as (db, settings):
        rows = db.fetchall(Queries("broker", settings.schema).scheduled_task_ids,
                           {"ids": args.ids}, "scheduled task ids")
    task_ids = [r[0] for r in rows if r[0]]
    if len(task_ids) < len(set(args.ids)):
        missing = len(set(args.ids)) - len(task_ids)
        raise KojinError(f"{missing} of the given ids are not scheduled Celery tasks "
                         "(see kojin-pg scheduled list)")
    return _revoke(args, task_ids)


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke tasks by task id: queued and scheduled ones never run; results read REVOKED."""
    return _revoke(args, list(args.task_ids))


RESULTS_URL_HELP = ("the result backend's URL, when it is not the broker's database and "
                    "schema: the REVOKED results are written there (default: the broker's)")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``scheduled`` (``list``, ``cancel``) and ``revoke``."""
    p = sub.add_parser("scheduled", parents=[parent], help="tasks scheduled for later",
                       description="Messages the broker holds until their ETA/countdown is "
                       "due. Without an action: list.")
    p.set_defaults(func=cmd_list, queue=None, limit=100)
    actions = p.add_subparsers(dest="action", metavar="{list,cancel}")
    a = actions.add_parser("list", parents=[parent], help="scheduled messages, soonest first")
    a.add_argument("--queue", help="only this queue")
    a.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    a.set_defaults(func=cmd_list)
    a = actions.add_parser("cancel", parents=[parent], help="cancel scheduled messages",
                           description="Cancel scheduled messages by id (from 'scheduled "
                           "list'): their tasks are revoked and their results read REVOKED.")
    a.add_argument("ids", nargs="+", type=int, metavar="ID", help="message id")
    a.add_argument("--results-url", help=RESULTS_URL_HELP)
    a.set_defaults(func=cmd_cancel)
    p = sub.add_parser("revoke", parents=[parent], help="revoke tasks durably",
                       description="Revoke tasks by id: queued and scheduled messages are "
                       "deleted and their results set to REVOKED; leased ones are flagged so "
                       "they are never delivered again. Running tasks are the workers' "
                       "business: use 'celery control revoke --terminate' for those.")
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.add_argument("--results-url", help=RESULTS_URL_HELP)
    p.set_defaults(func=cmd_revoke)
