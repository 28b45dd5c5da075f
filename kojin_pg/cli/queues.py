"""``kojin-pg queues [list]`` and ``kojin-pg queues delete NAME``: the queues and their messages.

The queue table is printed here for ``queues`` and ``stats`` alike (one piece of code).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .. import health
from ..db import Queries
from ..errors import KojinError
from .common import EXIT_OK, age, database, print_json, print_table


def print_queues(queues: Sequence[dict[str, Any]]) -> None:
    """The queue table: full names, every state, oldest ready age, bindings."""
    if not queues:
        print("no queues")
        return
    print_table(["queue", "ready", "leased", "scheduled", "next due in", "dead", "oldest ready",
                 "bindings"],
                [[q["queue"], q["ready"], q["leased"], q["scheduled"], age(q.get("next_due_s")),
                  q["dead"], age(q["oldest_ready_age_s"]), q["bindings"]] for q in queues],
                right=(1, 2, 3, 4, 5, 6, 7))


def cmd_list(args: argparse.Namespace) -> int:
    """Every queue: with messages, dead letters, or only declared (bound) and empty."""
    with database(args) as (db, settings):
        queues = health.as_dict(health.queues(db, settings.schema))
    if args.json:
        print_json(queues)
    else:
        print_queues(queues)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete queues: their messages (ready, leased and scheduled) and their bindings."""
    deleted = []
    with database(args) as (db, settings):
        figures = {q.queue: q for q in health.queues(db, settings.schema)}
        broker = Queries("broker", settings.schema)
        for name in args.names:
            q = figures.get(name)
            if q is None:
                raise KojinError(f"no queue named {name!r}")
            if q.ready + q.leased + q.scheduled + q.bindings == 0:
                raise KojinError(f"queue {name!r} only has dead letters: "
                                 f"kojin-pg dlq purge --queue {name}")
            messages = q.ready + q.leased + q.scheduled
            if args.if_empty and messages:
                raise KojinError(f"queue {name!r} holds {messages} messages (--if-empty)")
            db.execute(broker.delete_queue, {"queue": name}, "delete queue")
            deleted.append({"queue": name, "messages": messages, "bindings": q.bindings})
            if not args.json:
                print(f"deleted queue {name}: {messages:,} messages, {q.bindings} bindings")
    if args.json:
        print_json(deleted)
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``queues`` (default action ``list``) with ``list`` and ``delete``."""
    p = sub.add_parser("queues", parents=[parent], help="list or delete queues",
                       description="Per queue: ready, leased, scheduled and dead messages, the "
                       "age of the oldest ready one, and its bindings. Without an action: list.")
    p.set_defaults(func=cmd_list)
    actions = p.add_subparsers(dest="action", metavar="{list,delete}")
    a = actions.add_parser("list", parents=[parent], help="every queue (default)")
    a.set_defaults(func=cmd_list)
    a = actions.add_parser("delete", parents=[parent],
                           help="delete queues with their messages and bindings",
                           description="Delete queues: their messages (ready, leased and "
                           "scheduled) and their bindings. Dead letters stay.")
    a.add_argument("names", nargs="+", metavar="NAME", help="full queue name")
    a.add_argument("--if-empty", action="store_true",
                   help="refuse (exit 1) if the queue holds messages")
    a.set_defaults(func=cmd_delete)
