"""Durable revoke: a revoked task that is queued or scheduled never runs, whoever restarts.

Celery's ``AsyncResult.revoke()`` broadcasts a ``revoke`` command to the workers, which keep
revoked ids in memory (lost when they restart). When that broadcast passes through this
transport, :func:`revoke_tasks` also deletes the task's queued and scheduled messages and
records ``REVOKED`` as its result (in kojin_pg's results table of the broker's schema, waking
whoever waits for it), and flags a message leased right now so that, if its worker dies, nobody
runs it later. A task already running is the workers' business, as before (``terminate=True``
keeps working). ``kojin-pg revoke TASK_ID`` does the same without a broadcast.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..db import Database, Queries
from ..db.channels import results_channel
from .scheduling import REVOKED_RESULT

#: Seconds a REVOKED result written by the broker is kept (Celery's default result_expires).
REVOKED_RESULT_EXPIRES = 86400.0
REVOKED_RESULT_JSON = codec.jsonb(codec.dumps(REVOKED_RESULT))


@dataclass(frozen=True)
class Revoked:
    """What a revoke did: messages deleted, leased messages flagged, REVOKED results stored."""

    deleted: int
    flagged: int
    recorded: int


def revoke_tasks(db: Database, queries: Queries, schema: str, task_ids: list[str]) -> Revoked:
    """Revoke ``task_ids`` in the broker (one statement; repeating it changes nothing more)."""
    row = db.fetchone(queries.revoke, {
        "task_ids": task_ids, "revoked_result": REVOKED_RESULT_JSON,
        "result_expires": REVOKED_RESULT_EXPIRES, "results_channel": results_channel(schema),
    }, "revoke")
    return Revoked(*(int(v) for v in row)) if row else Revoked(0, 0, 0)


def revoked_in_broadcast(message: dict[str, Any]) -> list[str]:
    """The task ids a Celery remote-control ``revoke`` command names, or [] for any other
    message (only JSON bodies are read, as Celery's control messages are)."""
    if message.get("content-type") != "application/json":
        return []
    body = message.get("body")
    if not body:
        return []
    try:
        raw = body.encode() if isinstance(body, str) else bytes(body)
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            raw = base64.b64decode(raw, validate=True)
        command = codec.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        return []
    if not isinstance(command, dict) or command.get("method") != "revoke":
        return []
    ids = (command.get("arguments") or {}).get("task_id")
    if isinstance(ids, str):
        return [ids]
    if isinstance(ids, list):
        return [i for i in ids if isinstance(i, str)]
    return []
