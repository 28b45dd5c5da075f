"""What a stored message is: the NOTIFY channel that announces it and the shape it must have.

Rows of ``<schema>.messages`` hold kombu's message dict as JSONB (body, headers, properties).
"""

from __future__ import annotations

from typing import Any

from ..errors import PayloadError
from .scheduling import due_at, task_id, unique_key

#: Messages claimed at once when the channel has no prefetch limit.
DEFAULT_BATCH = 16


def why_malformed(payload: Any) -> str | None:
    """Why ``payload`` is not a kombu message we can deliver, or None if it is one."""
    if not isinstance(payload, dict):
        return f"not a kombu message: a JSON {type(payload).__name__}"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "not a kombu message: no 'properties' object"
    info = props.get("delivery_info", {})
    if not isinstance(info, dict):
        return "not a kombu message: 'delivery_info' is not an object"
    if not isinstance(payload.get("body", ""), str | bytes | type(None)):
        return "not a kombu message: 'body' is not a string"
    return None


def expiration_seconds(message: dict[str, Any]) -> float | None:
    """The message's own TTL in seconds (AMQP's ``expiration`` property: milliseconds, as text),
    or None."""
    raw = (message.get("properties") or {}).get("expiration")
    if raw is None or raw == "":
        return None
    try:
        ms = float(raw)
    except (TypeError, ValueError):
        raise PayloadError(f"invalid message expiration {raw!r}: milliseconds expected") from None
    if ms != ms or ms < 0:  # NaN or negative
        raise PayloadError(f"invalid message expiration {raw!r}: milliseconds expected")
    return ms / 1000.0


def queue_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The RabbitMQ queue arguments kombu passes to ``queue_declare``, as the parameters of the
    ``declare_queue`` query (seconds, or None)."""
    args = kwargs.get("arguments") or {}

    def seconds(key: str) -> float | None:
        value = args.get(key)
        if value is None:
            return None
        try:
            ms = float(value)
        except (TypeError, ValueError):
            raise PayloadError(f"invalid queue argument {key}={value!r}: milliseconds "
                               "expected") from None
        if ms != ms or ms < 0:
            raise PayloadError(f"invalid queue argument {key}={value!r}: milliseconds expected")
        return ms / 1000.0

    return {"message_ttl": seconds("x-message-ttl"), "expires": seconds("x-expires"),
            "auto_delete": bool(kwargs.get("auto_delete"))}


def publish_fields(message: dict[str, Any]) -> dict[str, Any]:
    """What the ``publish`` query stores beside the payload, read from the message itself: its
    expiration, due time, task id and unique key (see :mod:`.scheduling`)."""
    return {"expiration": expiration_seconds(message), "due_at": due_at(message),
            "task_id": task_id(message), "unique_key": unique_key(message)}
