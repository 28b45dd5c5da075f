"""The Django settings this app reads, with their defaults, validated once."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

from kojin_pg.config import parse, plain_url, validate_identifier

DEFAULT_SCHEMA = "kojin"
DEFAULT_DATABASE = "default"


def schema() -> str:
    """``KOJIN_PG_SCHEMA``: the schema holding kojin_pg's tables (its ``schema`` option)."""
    return validate_identifier(getattr(settings, "KOJIN_PG_SCHEMA", DEFAULT_SCHEMA),
                               "KOJIN_PG_SCHEMA")


def database() -> str:
    """``KOJIN_PG_DATABASE``: the alias in ``DATABASES`` of the database holding that schema."""
    return getattr(settings, "KOJIN_PG_DATABASE", DEFAULT_DATABASE)


def db_table(table: str) -> str:
    """``db_table`` for ``table`` in the schema: ``"schema"."table"``.

    Read when Django loads the app's models, so ``KOJIN_PG_SCHEMA`` is fixed from then on.

    Django's PostgreSQL backend leaves a name that is already wrapped in double quotes as it is,
    so this quoted, schema-qualified form reaches SQL unchanged. Both parts are plain lower-case
    identifiers (the schema is validated), so no quote inside needs escaping.
    """
    return f'"{schema()}"."{table}"'


def database_from_url(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry for the database of a kojin_pg URL (the one Celery is given).

    kojin_pg's own options in the URL (``schema``, ``pool_max_size``, ...) are dropped; libpq
    parameters (``sslmode``, ...) go to ``OPTIONS``.
    """
    params = conninfo_to_dict(parse(plain_url(url)).conninfo)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.pop("dbname", ""),
        "USER": params.pop("user", ""),
        "PASSWORD": params.pop("password", ""),
        "HOST": params.pop("host", ""),
        "PORT": params.pop("port", ""),
        "OPTIONS": params,
    }
