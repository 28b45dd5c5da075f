"""Database router: kojin_pg's models live in the database named by ``KOJIN_PG_DATABASE``."""

from __future__ import annotations

from typing import Any

from . import conf

APP_LABEL = "kojin_pg"


class KojinPgRouter:
    """Reads and writes of kojin_pg's models go to ``KOJIN_PG_DATABASE``; Django never migrates
    them (``kojin-pg migrate`` owns those tables). Other apps are left to other routers."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return conf.database() if model._meta.app_label == APP_LABEL else None

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return conf.database() if model._meta.app_label == APP_LABEL else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None,
                      **hints: Any) -> bool | None:
        return False if app_label == APP_LABEL else None
