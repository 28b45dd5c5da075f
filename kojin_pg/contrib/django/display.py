"""How the admin shows kojin_pg's values: JSON indented, tracebacks as preformatted text, a
status in its colour, a kombu payload as its task."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timezone import localtime

from kojin_pg.taskmessage import TaskMessage, decode

_STATUS_COLOURS = {"SUCCESS": "#1a7f37", "FAILURE": "#cf222e", "REVOKED": "#8250df",
                   "RETRY": "#bf8700", "STARTED": "#0969da"}
_PRE = "white-space: pre-wrap; margin: 0; font-size: 12px"


def pre(text: str | None) -> SafeString | str:
    """Text kept as it is (line breaks, indentation), escaped."""
    if text is None:
        return "-"
    return format_html('<pre style="{}">{}</pre>', _PRE, text)


def pretty_json(value: Any) -> SafeString | str:
    """A JSON value indented on several lines."""
    if value is None:
        return "-"
    return pre(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str))


def timestamp(value: datetime | None) -> str:
    """A time to the second, in the current time zone (task times differ by seconds)."""
    if value is None:
        return "-"
    return date_format(localtime(value), "Y-m-d H:i:s")


def status(value: str) -> SafeString:
    """A Celery state name in the colour of its outcome."""
    return format_html('<b style="color: {}">{}</b>', _STATUS_COLOURS.get(value, "inherit"), value)


def task_of(payload: Any) -> TaskMessage:
    """The Celery task carried by a stored kombu message."""
    return decode(payload)


def arguments(task: TaskMessage, which: str) -> SafeString | str:
    """A task's ``args`` or ``kwargs``: decoded when the body is JSON, else its ``*repr`` header."""
    if task.problem is None:
        return pretty_json(getattr(task, which))
    return pre(getattr(task, which + "repr"))
