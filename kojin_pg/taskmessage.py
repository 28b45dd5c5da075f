"""Reads a stored kombu message (a row's ``payload``) back as the Celery task it carries.

For display only (admin pages, operator tools): the body is decoded when it is JSON, Celery's
default; any other serializer (pickle, msgpack, yaml) is never decoded here, and the task's
``argsrepr``/``kwargsrepr`` headers stand in for its arguments.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from . import codec

_JSON = "application/json"
#: Celery headers worth showing beside the task's name and arguments.
_HEADERS = ("retries", "eta", "expires", "root_id", "parent_id", "group", "origin",
            "timelimit", "ignore_result")


@dataclass(frozen=True)
class TaskMessage:
    """What a kombu message says about its task; ``problem`` says what could not be decoded."""

    name: str | None
    task_id: str | None
    args: Any = None
    kwargs: Any = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    eta: str | None = None
    retries: int | None = None
    #: Protocol 2's third body element: callbacks, errbacks, chain, chord.
    embed: Any = None
    #: Selected Celery headers (retries, eta, expires, root_id, ...), those that are set.
    headers: dict[str, Any] | None = None
    #: The decoded body, when it is JSON but not a Celery task message.
    body: Any = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` and text output: task, id, args/kwargs/embed (or why not), headers."""
        out: dict[str, Any] = {"task": self.name, "id": self.task_id}
        if self.problem is None:
            out.update(args=self.args, kwargs=self.kwargs, embed=self.embed)
        else:
            out["body"] = self.body if self.body is not None else f"<{self.problem}>"
        out["headers"] = self.headers or {}
        return out


def _body_bytes(payload: dict[str, Any]) -> bytes:
    body = payload.get("body")
    if body is None:
        return b""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if (payload.get("properties") or {}).get("body_encoding") == "base64":
        raw = base64.b64decode(raw, validate=True)
    return raw


def decode(payload: Any) -> TaskMessage:
    """The task in ``payload`` (Celery message protocol 2, or 1), as far as it can be read."""
    if not isinstance(payload, dict):
        return TaskMessage(None, None, problem=f"not a kombu message: a JSON {type(payload).__name__}")
    headers = payload.get("headers") or {}
    base = {"name": headers.get("task"), "task_id": headers.get("id"),
            "argsrepr": headers.get("argsrepr"), "kwargsrepr": headers.get("kwargsrepr"),
            "eta": headers.get("eta"), "retries": headers.get("retries"),
            "headers": {k: headers[k] for k in _HEADERS if headers.get(k) is not None}}
    content_type = payload.get("content-type")
    if content_type != _JSON:
        return TaskMessage(**base, problem=f"body is {content_type or 'of no content type'}, "
                                           "not decoded (only JSON is)")
    try:
        body = codec.loads(_body_bytes(payload))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        return TaskMessage(**base, problem=f"body cannot be decoded: {exc}")
    if isinstance(body, list) and len(body) >= 2:  # protocol 2: [args, kwargs, embed]
        return TaskMessage(**base, args=body[0], kwargs=body[1],
                           embed=body[2] if len(body) > 2 else None)
    if isinstance(body, dict) and "task" in body:  # protocol 1: everything in the body
        return TaskMessage(**{**base, "name": body.get("task"), "task_id": body.get("id"),
                              "eta": body.get("eta"), "retries": body.get("retries")},
                           args=body.get("args"), kwargs=body.get("kwargs"))
    return TaskMessage(**base, body=body, problem="body is not a Celery task message")
