"""Durable revoke: a revoked task that is queued or scheduled never runs, whoever restarts.

Celery's ``AsyncResult.revoke()`` broadcasts a ``revoke`` command to the workers, which keep
revoked ids in memory (lost when they restart). When that broadcast passes through this
transport, :func:`revoke_tasks` also deletes the task's queued and scheduled messages and
records ``REVOKED`` as its result (waking whoever waits for it), and flags a message leased
right now so that, if its worker dies, nobody runs it later. A task already running is the
workers' business, as before (``terminate=True`` keeps working). ``kojin-pg revoke TASK_ID``
does the same without a broadcast.

The result goes where the callers read results (:mod:`.revoked_results`): in the broker's own
statement when that is the broker's database and schema, else by a statement of its own in the
result backend's database.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..db import Database, Queries
from ..db.channels import results_channel
from .revoked_results import REVOKED_RESULT_EXPIRES, REVOKED_RESULT_JSON, RevokedResults


@dataclass(frozen=True)
class Revoked:
    """What a revoke did: messages deleted, leased messages flagged, REVOKED results stored."""

    deleted: int
    flagged: int
    recorded: int


def revoke_tasks(db: Database, queries: Queries, schema: str, task_ids: list[str],
                 results: RevokedResults | None = None) -> Revoked:
    """Revoke ``task_ids`` in the broker (one statement; repeating it changes nothing more),
    and record them as REVOKED where ``results`` says the results are read (by default, where
    this process's Celery apps on this broker read them)."""
    if results is None:
        results = RevokedResults(db.settings)
    in_broker, elsewhere = results.places()
    if results.strict:
        results.check(elsewhere)  # a results database out of reach fails before any delete
    # The statement is retried after a lost connection; a retry after a commit deletes nothing
    # more, so for results kept elsewhere it returns every task id asked for but the leased
    # ones it flags (see revoke in broker.sql): deleted now or before, or never queued.
    row = db.fetchone(queries.revoke, {
        "task_ids": task_ids, "revoked_result": REVOKED_RESULT_JSON,
        "result_expires": REVOKED_RESULT_EXPIRES, "results_channel": results_channel(schema),
        "store_results": in_broker,
    }, "revoke")
    if not row:
        return Revoked(0, 0, 0)
    deleted, flagged, recorded, gone = row
    if elsewhere and gone:
        recorded += results.store(elsewhere, list(gone))
    return Revoked(int(deleted), int(flagged), int(recorded))


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
