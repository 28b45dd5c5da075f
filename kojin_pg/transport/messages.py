"""What a stored message is: the NOTIFY channel that announces it and the shape it must have.

Rows of ``<schema>.messages`` hold kombu's message dict as JSONB (body, headers, properties).
"""

from __future__ import annotations

from typing import Any

#: Messages claimed at once when the channel has no prefetch limit.
DEFAULT_BATCH = 16


def messages_channel(schema: str) -> str:
    """The NOTIFY channel announcing new messages (payload: the queue name)."""
    return f"kojin_msgs_{schema}"


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
