"""The broker's settings: kojin_pg's options out of kombu's transport options and URL.

``broker_transport_options`` mixes kombu's own options (retry policy, body encoding, ...), which
kombu reads itself, with kojin_pg's; only the latter reach :func:`kojin_pg.config.parse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import config

#: kombu's own transport options, accepted and left to kombu.
KOMBU_OPTIONS = frozenset({
    "body_encoding", "deadletter_queue", "max_retries", "interval_start", "interval_step",
    "interval_max", "connect_timeout", "confirm_publish", "client_properties",
})


def broker_settings(url: str, transport_options: Mapping[str, Any] | None) -> config.Settings:
    """Settings of a kojin_pg broker at ``url`` (``kojin+`` prefix allowed)."""
    options = {k: v for k, v in (transport_options or {}).items() if k not in KOMBU_OPTIONS}
    return config.parse(config.plain_url(url), options)
