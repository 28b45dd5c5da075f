"""The Django app configuration of kojin_pg's admin pages."""

from __future__ import annotations

from django.apps import AppConfig


class KojinPgConfig(AppConfig):
    """kojin_pg's app: label ``kojin_pg``, shown as "Celery on PostgreSQL" in the admin."""

    name = "kojin_pg.contrib.django"
    label = "kojin_pg"
    verbose_name = "Celery on PostgreSQL (kojin_pg)"
    default_auto_field = "django.db.models.BigAutoField"
