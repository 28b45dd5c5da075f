"""A minimal Django project for the admin tests and the README screenshot: Django's own tables
in one database, kojin_pg's schema in another (reached through the router)."""

from __future__ import annotations

from typing import Any

ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-password"
#: The schema of kojin_pg's tables in the tests' databases (not the default one).
SCHEMA = "jobs"


def configure(default_url: str, kojin_url: str, schema: str, debug: bool = False) -> None:
    """Configure and set up Django once per process."""
    import django
    from django.conf import settings

    from kojin_pg.contrib.django.conf import database_from_url

    settings.configure(
        DEBUG=debug,
        SECRET_KEY="kojin-pg-tests-only",
        ALLOWED_HOSTS=["localhost", "127.0.0.1", "testserver"],
        DATABASES={"default": database_from_url(default_url),
                   "kojin": database_from_url(kojin_url)},
        DATABASE_ROUTERS=["kojin_pg.contrib.django.routers.KojinPgRouter"],
        KOJIN_PG_DATABASE="kojin",
        KOJIN_PG_SCHEMA=schema,
        INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth",
                        "django.contrib.contenttypes", "django.contrib.sessions",
                        "django.contrib.messages", "django.contrib.staticfiles",
                        "kojin_pg.contrib.django"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.middleware.common.CommonMiddleware",
                    "django.middleware.csrf.CsrfViewMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware",
                    "django.contrib.messages.middleware.MessageMiddleware"],
        ROOT_URLCONF="django_urls",
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates",
                    "APP_DIRS": True,
                    "OPTIONS": {"context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages"]}}],
        STATIC_URL="/static/",
        USE_TZ=True,
        TIME_ZONE="UTC",
        # tests log in on every test: a fast hasher keeps that cheap
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    )
    django.setup()


def prepare_default_database() -> None:
    """Django's own tables and an admin user in the default database."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", database="default", verbosity=0, interactive=False)
    get_user_model().objects.create_superuser(ADMIN_USER, "admin@example.com", ADMIN_PASSWORD)


def point_kojin_alias_at(dbname: str) -> None:
    """Make the ``kojin`` alias use database ``dbname`` (closing its current connection)."""
    from django.db import connections

    conn = connections["kojin"]
    conn.close()
    conn.settings_dict["NAME"] = dbname


def database_name(url: str) -> Any:
    """The database name in a PostgreSQL URL."""
    from urllib.parse import urlsplit

    return urlsplit(url).path.lstrip("/")
