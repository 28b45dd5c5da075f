"""Results announced with their value, so that a waiter needs no read to get them.

A stored result wakes its waiters with ``pg_notify(channel, payload)``. For a small result (the
JSON serializer, at most :data:`MAX_ANNOUNCED_BYTES` with its extended fields, if any) the
payload is the result's meta as a JSON object, and the waiter hands it on as a read would have;
otherwise the payload is the task id and the waiter reads the row. Payloads are told apart by their first
character: a task id never starts with ``{``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .. import codec
from ..errors import PayloadError

#: Largest announced payload in bytes (PostgreSQL allows 8,000; a listener that nobody reads
#: keeps up to its backlog's worth of them in memory).
MAX_ANNOUNCED_BYTES = 2000

#: The meta fields a waiter needs.
_FIELDS = ("task_id", "status", "result", "traceback", "children", "date_done", "group_id",
           "parent_id")
#: The fields result_extended adds (all of them, as a read gives them, when it has a name or a
#: worker).
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")


def _is_extended(meta: dict[str, Any]) -> bool:
    return meta.get("name") is not None or meta.get("worker") is not None


def announcement(task_id: str, meta: dict[str, Any]) -> str | None:
    """The NOTIFY payload carrying ``meta``, or None when the task id is announced instead."""
    fields = {k: meta.get(k) for k in _FIELDS + (_EXTENDED if _is_extended(meta) else ())}
    fields["task_id"] = task_id
    fields["children"] = fields["children"] or []
    date_done = fields["date_done"]
    if isinstance(date_done, datetime):
        fields["date_done"] = date_done.isoformat()
    try:
        text = codec.dumps(fields)
    except PayloadError:
        return None
    if len(text) > MAX_ANNOUNCED_BYTES or b"\\u0000" in text:
        return None
    return text.decode()


def is_announced_meta(payload: str) -> bool:
    """Whether a NOTIFY payload carries a result (else it is a task id)."""
    return payload.startswith("{")


def announced_meta(payload: dict[str, Any]) -> dict[str, Any]:
    """The meta fields of a decoded announcement, shaped as a read of the row gives them."""
    meta = {k: v for k, v in payload.items() if v is not None or k in ("result", "traceback")}
    if _is_extended(meta):
        meta.update({k: payload.get(k) for k in _EXTENDED})
    date_done = meta.get("date_done")
    if isinstance(date_done, str):
        meta["date_done"] = datetime.fromisoformat(date_done)
    meta["children"] = meta.get("children") or []
    return meta


def split_heard(heard: set[str]) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """Announcements as (task ids to read, decoded results by task id)."""
    ids: set[str] = set()
    results: dict[str, dict[str, Any]] = {}
    for payload in heard:
        if is_announced_meta(payload):
            try:
                decoded = codec.loads(payload)
                results[decoded["task_id"]] = decoded
            except (ValueError, KeyError, TypeError):
                continue  # not ours: nothing to deliver from it
        else:
            ids.add(payload)
    return ids, results
