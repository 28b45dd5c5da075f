"""Structured log lines for the events an operator watches for.

Each event is one line ``kojin_pg event=<name> key=value ...`` and carries the same fields in
the record's ``extra`` (``record.kojin_event`` and ``record.kojin_fields``) for JSON log
formatters. kojin_pg never configures logging itself.
"""

from __future__ import annotations

import logging
from typing import Any

#: Event names: a message delivered again, buried in the dead letters, a lease that ran out
#: under a live consumer, an operation retried after a lost connection, LISTEN reconnected.
REDELIVERY = "redelivery"
DEAD_LETTER = "dead_letter"
LEASE_LOST = "lease_lost"
RETRY = "retry"
LISTEN_RECONNECT = "listen_reconnect"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields`` as ``key=value`` pairs (values repr'd when they have spaces)."""
    if not logger.isEnabledFor(level):
        return
    parts = []
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
    logger.log(level, "kojin_pg event=%s %s", event, " ".join(parts),
               extra={"kojin_event": event, "kojin_fields": fields})
