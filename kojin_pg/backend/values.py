"""How the result backend stores values: real JSONB with the ``json`` serializer, else bytes.

With Celery's default ``json`` result serializer, results, children, args and kwargs become JSONB
(encoded by orjson, readable in SQL). Any other serializer (pickle, msgpack, yaml) keeps the
encoded value in a ``bytea`` column instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg.types.json import Jsonb

from .. import codec


class ValueCodec:
    """Encodes values for a ``jsonb``/``bytea`` column pair and decodes the ``bytea`` side."""

    def __init__(self, content_type: str, encode: Callable[[Any], Any],
                 decode: Callable[[bytes], Any]) -> None:
        self.json = content_type == "application/json"
        self._encode = encode
        self._decode = decode

    def encode(self, value: Any) -> tuple[Jsonb | None, bytes | None]:
        """``value`` as (jsonb, None) with the JSON serializer, else (None, serialized bytes)."""
        if self.json:
            encoded = codec.dumps(value)
            # jsonb cannot hold the NUL character: keep such values as JSON text in bytea.
            if b"\\u0000" not in encoded:
                return codec.jsonb(encoded), None
            return None, encoded
        payload = self._encode(value)
        return None, payload if isinstance(payload, bytes) else payload.encode()

    def jsonb(self, value: Any) -> Jsonb | None:
        """``value`` as a jsonb parameter (None stays NULL)."""
        return None if value is None else codec.jsonb(codec.dumps(value))

    def decode_bytes(self, payload: bytes) -> Any:
        """A value read back from the ``bytea`` column."""
        if self.json:
            return codec.loads(payload)
        return self._decode(bytes(payload))
