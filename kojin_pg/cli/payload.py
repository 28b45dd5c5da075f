"""Reads a stored kombu message for people: the Celery task's name, id, args and kwargs.

Only JSON bodies are decoded (base64 or plain, in their content encoding). Other serializers
(pickle above all, which runs code when loaded) are never loaded here: the body is reported by
its content type and size.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

#: Celery headers worth showing beside the task's name and arguments.
_HEADERS = ("retries", "eta", "expires", "root_id", "parent_id", "group", "origin",
            "timelimit", "ignore_result")


def _body_bytes(payload: dict[str, Any]) -> bytes | None:
    body = payload.get("body")
    props = payload.get("properties") or {}
    if body is None:
        return None
    if props.get("body_encoding") == "base64":
        try:
            return base64.b64decode(str(body), validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(body, str):
        return body.encode(payload.get("content-encoding") or "utf-8", "replace")
    return json.dumps(body).encode()


def decode_message(payload: dict[str, Any]) -> dict[str, Any]:
    """The task carried by a kombu message payload (as the broker stores it).

    Returns ``task``, ``id``, ``args``, ``kwargs``, ``embed`` (callbacks, errbacks, chain,
    chord) and selected ``headers`` for Celery's message protocol 2 (and 1) in JSON; for any
    other body, ``body`` says what it is instead of ``args``/``kwargs``.
    """
    headers = payload.get("headers") or {}
    content_type = payload.get("content-type") or "?"
    out: dict[str, Any] = {"task": headers.get("task"), "id": headers.get("id")}
    raw = _body_bytes(payload)
    data: Any = None
    decoded = False
    if raw is not None and content_type == "application/json":
        try:
            data = json.loads(raw.decode(payload.get("content-encoding") or "utf-8"))
            decoded = True
        except (UnicodeDecodeError, LookupError, ValueError):
            decoded = False
    if decoded and isinstance(data, list) and len(data) == 3:  # protocol 2
        out["args"], out["kwargs"], out["embed"] = data
    elif decoded and isinstance(data, dict) and "task" in data:  # protocol 1
        out.update(task=data.get("task"), id=data.get("id"), args=data.get("args"),
                   kwargs=data.get("kwargs"))
    elif decoded:
        out["body"] = data
    else:
        size = "?" if raw is None else len(raw)
        out["body"] = f"<{size} bytes of {content_type}, not decoded>"
    out["headers"] = {k: headers[k] for k in _HEADERS if headers.get(k) is not None}
    return out
