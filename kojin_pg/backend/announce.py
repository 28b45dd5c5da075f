"""Results announced with their value, so that a waiter needs no read to get them.

A stored result wakes its waiters with ``pg_notify(channel, payload)``. For a small result (the
JSON serializer, no extended fields, at most :data:`MAX_ANNOUNCED_BYTES`) the payload is the
result's meta as a JSON object, and the waiter hands it on as a read would have; otherwise the
payload is the task id and the waiter reads the row. Payloads are told apart by their first
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

#: The meta fields a waiter needs; results with more (result_extended) are read instead.
_FIELDS = ("task_id", "status", "result", "traceback", "children", "date_done", "group_id",
           "parent_id")


def announcement(task_id: str, meta: dict[str, Any]) -> str | None:
    """The NOTIFY payload carrying ``meta``, or None when the task id is announced instead."""
    if meta.get("name") is not None or meta.get("worker") is not None:
        return None  # result_extended: the announcement would not hold everything a read gives
    fields = {k: meta.get(k) for k in _FIELDS}
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
