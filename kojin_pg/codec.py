"""JSON encoding with orjson, compatible with kombu's JSON serializer.

Values that orjson does not know natively (datetime, Decimal, bytes, ...) go through kombu's own
encoder, so they carry kombu's ``{"__type__": ..., "__value__": ...}`` tags and come back as the
same Python types Celery's default ``json`` serializer would give back.
"""

from __future__ import annotations

from typing import Any

import orjson
from kombu.utils import json as kombu_json
from psycopg.types.json import Jsonb

from .errors import PayloadError

_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
_kombu_default = kombu_json.JSONEncoder().default
_TAG = b'"__type__"'


def dumps(value: Any) -> bytes:
    """Encode ``value`` as JSON bytes; raise :class:`PayloadError` naming the problem."""
    try:
        return orjson.dumps(value, default=_kombu_default, option=_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        pass  # e.g. integers beyond 64 bits: kombu's encoder (stdlib json) handles those
    try:
        text = kombu_json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"value cannot be encoded as JSON: {exc}") from exc
    return text.encode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON produced by :func:`dumps` (or by kombu), restoring tagged types."""
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes):
        data = bytes(data)
    if _TAG in data:
        return kombu_json.loads(data)
    return orjson.loads(data)


def jsonb(encoded: bytes) -> Jsonb:
    """Bind JSON that :func:`dumps` already encoded as a jsonb query parameter."""
    return Jsonb(encoded, dumps=bytes)
