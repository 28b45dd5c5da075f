"""Celery result backend on PostgreSQL.

Configure it with ``result_backend = "kojin+postgresql://user:pass@host/db"``; options go in
the URL query or in ``result_backend_transport_options`` (see :mod:`kojin_pg.config`).

- Results are rows of ``<schema>.results``. With the ``json`` result serializer (Celery's
  default) the result, children, args and kwargs are real JSONB, queryable in SQL; with any other
  serializer they are kept encoded in ``result_bytes``. ``result_extended`` metadata (name,
  worker, retries, queue, ...) lands in columns.
- ``result_expires`` sets ``expires_at``; reads never return an expired row, and
  :meth:`PostgresBackend.cleanup` deletes them in bounded batches.
- ``get_many`` reads any number of results in one query per round; waiting for results uses
  LISTEN/NOTIFY (:mod:`.waiting`), with polling when ``use_notify`` is off.
- Chords are native: see :mod:`.chords`.
"""

from __future__ import annotations

from ..db.channels import results_channel
from .results import PostgresBackend

__all__ = ["PostgresBackend", "results_channel"]
