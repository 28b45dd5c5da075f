"""What the broker reads from a Celery task message: when it is due, which task it is, and its
unique key.

- **Due time**: Celery's protocol 2 ``eta`` header (``countdown`` and ``retry(countdown=...)``
  set it too). A message due later than :data:`ETA_THRESHOLD` seconds from now is stored as
  scheduled and not delivered before; one due sooner is delivered at once and the worker waits
  the rest, as on any broker. An ``eta`` without a timezone, or one that cannot be parsed, is
  delivered at once: the worker reads it with the app's timezone, which the broker does not
  know, and a broker-side guess could only make the task late.
- **Task id**: the ``id`` header, so a queued or scheduled task can be revoked durably.
- **Unique key**: ``kojin_unique_key`` (any text, among the message's properties or headers),
  or ``kojin_unique=True`` for one made of the task's name, args and kwargs. Stored as a SHA-256
  digest, so a key of any size costs 64 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .. import codec
from ..errors import PayloadError

#: Seconds ahead of now below which an ETA is left to the worker (delivered at once).
ETA_THRESHOLD = 1.0

#: Celery's serialized TaskRevokedError, stored as the result of a task revoked in the broker.
REVOKED_RESULT = {"exc_type": "TaskRevokedError", "exc_message": ["revoked"],
                  "exc_module": "celery.exceptions"}


def due_at(message: dict[str, Any], now: datetime | None = None) -> datetime | None:
    """When the message is due, if that is later than :data:`ETA_THRESHOLD` from now."""
    headers = message.get("headers") or {}
    eta = headers.get("eta")
    if not eta or not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None  # the worker rejects it with its own error, as on any broker
    if when.tzinfo is None:
        return None
    now = now or datetime.now(UTC)
    if when <= now + timedelta(seconds=ETA_THRESHOLD):
        return None
    return when


def task_id(message: dict[str, Any]) -> str | None:
    """Celery's task id of the message (protocol 2), or None."""
    value = (message.get("headers") or {}).get("id")
    return value if isinstance(value, str) else None


def unique_key(message: dict[str, Any]) -> str | None:
    """The digest of the message's unique key, or None if it asks for no deduplication."""
    props = message.get("properties") or {}
    headers = message.get("headers") or {}
    key = props.get("kojin_unique_key", headers.get("kojin_unique_key"))
    if key is None and (props.get("kojin_unique") or headers.get("kojin_unique")):
        key = _task_identity(message)
    if key is None:
        return None
    if not isinstance(key, str | bytes):
        key = codec.dumps(key)
    raw = key.encode() if isinstance(key, str) else bytes(key)
    return hashlib.sha256(raw).hexdigest()


def _task_identity(message: dict[str, Any]) -> bytes:
    """The task's name, args and kwargs, canonically: what ``kojin_unique=True`` dedups on."""
    headers = message.get("headers") or {}
    name = headers.get("task")
    if message.get("content-type") != "application/json" or not name:
        raise PayloadError("kojin_unique=True needs a Celery task message with the json "
                           "serializer; give kojin_unique_key=... instead")
    body = message.get("body") or ""
    try:
        raw = body.encode() if isinstance(body, str) else bytes(body)
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            raw = base64.b64decode(raw, validate=True)
        args, kwargs = codec.loads(raw)[:2]
    except (ValueError, TypeError, binascii.Error) as exc:
        raise PayloadError(f"kojin_unique=True: the task's arguments cannot be read: {exc}") \
            from None
    return orjson.dumps([name, args, kwargs], option=orjson.OPT_SORT_KEYS,
                        default=lambda v: repr(v))
