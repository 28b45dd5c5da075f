"""``kojin-pg dlq list|show|requeue|purge``: the dead letters, read and handled.

``requeue`` and ``purge`` work in batches (each its own transaction), show progress on a
terminal, stop at the newest dead letter present when they started, and print one final count.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..db import Queries
from ..db.channels import messages_channel
from ..errors import KojinError
from ..taskmessage import decode
from .common import EXIT_OK, Progress, UsageError, database, print_json, print_table

BATCH = 5000


def _summary(error: str | None, width: int = 60) -> str | None:
    """One line of an error: a traceback's last line (the exception), else the first."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def cmd_list(args: argparse.Namespace) -> int:
    """Dead letters, newest first: queue, deliveries, reason, task, when, and the error."""
    with database(args) as (db, settings):
        rows = db.fetchall(Queries("broker", settings.schema).dlq_list,
                           {"queue": args.queue, "limit": args.limit}, "dlq list")
    if args.json:
        print_json([{"id": mid, "queue": queue, "delivery_count": count, "reason": reason,
                     "error": error, "dead_at": dead_at.isoformat(), "task": task}
                    for mid, queue, count, reason, error, dead_at, task in rows])
        return EXIT_OK
    if not rows:
        print("no dead letters")
        return EXIT_OK
    print_table(["id", "queue", "deliveries", "reason", "task", "dead at", "error"],
                [[mid, queue, count, reason, task, f"{dead_at:%Y-%m-%d %H:%M:%S}",
                  _summary(error)]
                 for mid, queue, count, reason, error, dead_at, task in rows], right=(0, 2))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """Dead letters in full, with the task's name, args and kwargs decoded from the body."""
    keys = ("id", "queue", "priority", "delivery_count", "reason", "error", "enqueued_at",
            "dead_at")
    shown = []
    with database(args) as (db, settings):
        query = Queries("broker", settings.schema).dlq_show
        for mid in args.ids:
            row = db.fetchone(query, {"id": mid}, "dlq show")
            if row is None:
                raise KojinError(f"no dead letter with id {mid}")
            item: dict[str, Any] = dict(zip(keys, row[:-1], strict=True))
            item["message"] = decode(row[-1]).as_dict()
            shown.append(item)
    if args.json:
        print_json(shown if len(shown) > 1 else shown[0])
        return EXIT_OK
    for item in shown:
        _print_dead_letter(item)
    return EXIT_OK


def _print_dead_letter(item: dict[str, Any]) -> None:
    msg = item["message"]
    print(f"dead letter {item['id']}")
    fields = [("queue", item["queue"]), ("reason", item["reason"]),
              ("deliveries", item["delivery_count"]), ("priority", item["priority"]),
              ("enqueued at", item["enqueued_at"]), ("dead at", item["dead_at"]),
              ("task", msg.get("task")), ("task id", msg.get("id"))]
    if "args" in msg:
        fields += [("args", json.dumps(msg["args"], ensure_ascii=False)),
                   ("kwargs", json.dumps(msg["kwargs"], ensure_ascii=False))]
    else:
        fields.append(("body", msg.get("body")))
    fields += [(name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
               for name, value in msg["headers"].items()]
    for name, value in fields:
        print(f"  {name + ':':<15} {value}")
    if item["error"]:
        print("  error:")
        for line in str(item["error"]).splitlines():
            print(f"    {line}")
    print()


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.ids or args.queue or args.all):
        raise UsageError("name the dead letters: message ids, --queue NAME or --all")
    return {"ids": list(args.ids or []), "queue": args.queue, "all": bool(args.all)}


def _take(args: argparse.Namespace, requeue: bool) -> int:
    selection = _selection(args)
    verb = "requeued" if requeue else "purged"
    progress = Progress(f"{verb} dead letters")
    total = 0
    with database(args) as (db, settings):
        q = Queries("admin", settings.schema)
        upto = (db.fetchone(q.dlq_max_id, what="dlq max id") or (0,))[0]
        params = {**selection, "upto": upto, "batch": BATCH, "requeue": requeue,
                  "channel": messages_channel(settings.schema)}
        while True:
            row = db.fetchone(q.dlq_take_batch, params, f"dlq {verb}")
            moved = int(row[0]) if row else 0
            total += moved
            progress.update(total)
            if moved < BATCH:
                break
    progress.finish()
    if args.json:
        print_json({verb: total})
    else:
        print(f"{verb} {total:,} dead letters")
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    """Move dead letters back to their queues with a fresh delivery count."""
    return _take(args, requeue=True)


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete dead letters for good."""
    return _take(args, requeue=False)


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``dlq`` with ``list``, ``show``, ``requeue`` and ``purge``."""
    p = sub.add_parser("dlq", parents=[parent], help="dead letters: list, show, requeue, purge",
                       description="Dead letters: messages delivered max_deliveries times "
                       "without an ack, rejected, or undecodable.")
    actions = p.add_subparsers(dest="action", metavar="{list,show,requeue,purge}", required=True)
    a = actions.add_parser("list", parents=[parent], help="newest first")
    a.add_argument("--queue", help="only this queue")
    a.add_argument("--limit", type=int, default=50, help="rows to list (default 50)")
    a.set_defaults(func=cmd_list)
    a = actions.add_parser("show", parents=[parent], help="in full, with the task decoded")
    a.add_argument("ids", nargs="+", type=int, metavar="ID", help="dead letter (message) id")
    a.set_defaults(func=cmd_show)
    for name, func, text in (("requeue", cmd_requeue, "back to their queues"),
                             ("purge", cmd_purge, "delete for good")):
        a = actions.add_parser(name, parents=[parent], help=text)
        a.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids")
        a.add_argument("--queue", help="every dead letter of this queue")
        a.add_argument("--all", action="store_true", help="every dead letter")
        a.set_defaults(func=func)
