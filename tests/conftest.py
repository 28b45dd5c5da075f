"""Test fixtures: a real PostgreSQL, and a fresh database per test cloned from a template.

The server is ``KOJIN_PG_TEST_URL`` when set, else an embedded PostgreSQL 18 started for the
session in a temporary directory and deleted afterwards. The template database has the kojin_pg
schema migrated once; each test gets ``CREATE DATABASE ... TEMPLATE`` (fast, fully isolated)
and the database is dropped after the test.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from kojin_pg.db import schema as kschema
from kojin_pg.dev.embedded import EmbeddedServer, temporary_server

# tests/faults imports the helpers that live beside this file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TEMPLATE = "kojin_test_template"

# fsync off: the tests check behaviour, not durability on power loss, and run much faster.
TEST_SERVER_SETTINGS = (("fsync", "off"), ("full_page_writes", "off"),
                        ("synchronous_commit", "off"))


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


class Server:
    """The server under test: its admin URL and, when embedded, the handle to restart it."""

    def __init__(self, url: str, embedded: EmbeddedServer | None) -> None:
        self.url = url
        self.embedded = embedded

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("KOJIN_PG_TEST_URL")
    embedded = None
    if not url:
        embedded = temporary_server(settings=TEST_SERVER_SETTINGS)
        url = embedded.url
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.exit(f"cannot reach the test PostgreSQL server: {exc}", returncode=3)
    server = Server(url, embedded)
    with server.admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(with_database(url, TEMPLATE), autocommit=True) as conn:
        kschema.migrate(conn, "kojin")
    try:
        yield server
    finally:
        with server.admin() as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'kojin_test_%'").fetchall()
            for (name,) in rows:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        if embedded is not None:
            embedded.destroy()


@contextmanager
def fresh_database(server: Server, template: str | None) -> Iterator[str]:
    """A new database (a clone of ``template``, or empty), dropped afterwards; yields its URL."""
    name = "kojin_test_" + uuid.uuid4().hex[:12]
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with server.admin() as conn:
        conn.execute(create)
    try:
        yield with_database(server.url, name)
    finally:
        with server.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture
def db_url(pg_server: Server) -> Iterator[str]:
    """URL of a fresh database holding a migrated ``kojin`` schema, dropped after the test."""
    with fresh_database(pg_server, TEMPLATE) as url:
        yield url


@pytest.fixture
def empty_db_url(pg_server: Server) -> Iterator[str]:
    """URL of a fresh, empty database (no kojin schema), dropped after the test."""
    with fresh_database(pg_server, None) as url:
        yield url


@pytest.fixture
def make_app(db_url: str) -> Iterator:
    """Factory of Celery apps whose result backend is kojin_pg on the test database."""
    from celery import Celery

    apps = []

    def factory(**conf) -> Celery:
        backend_options = conf.pop("result_backend_transport_options", {})
        app = Celery("kojin_test", backend="kojin+" + db_url, broker="memory://",
                     set_as_current=False)
        app.conf.update(result_backend_transport_options=backend_options,
                        **{"result_extended": True, **conf})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        backend = app.backend
        backend.result_consumer.stop()
        backend.db.close()


@pytest.fixture
def app(make_app):
    """A Celery app with the kojin_pg result backend (broker: memory)."""
    return make_app()


@pytest.fixture
def backend(app):
    return app.backend


@pytest.fixture
def workers(db_url, tmp_path):
    """Factory of real ``celery worker`` processes on the test database; all stopped after."""
    from workers import workers_fixture

    yield from workers_fixture(db_url, tmp_path)


@pytest.fixture
def e2e_app(db_url):
    """The end-to-end Celery app (broker and backend on kojin_pg) for sending and waiting."""
    from e2e_app import make_app

    app = make_app(db_url)
    yield app
    app.backend.result_consumer.stop()


# -- Django (tests/test_django_*.py) ---------------------------------------------------------


@pytest.fixture(scope="session")
def django_site(pg_server: Server) -> Iterator[None]:
    """Django configured once for the session (tests/django_site.py): its own tables in a
    database made for it, with an admin user; kojin_pg's tables behind the ``kojin`` alias."""
    import django_site as site
    from django.conf import settings

    assert not settings.configured, "Django was configured outside this fixture"
    with fresh_database(pg_server, None) as default_url:
        site.configure(default_url, default_url, site.SCHEMA)
        from django.db import connections
        from django.test.utils import setup_test_environment, teardown_test_environment

        setup_test_environment()  # responses carry their template context
        site.prepare_default_database()
        yield
        teardown_test_environment()
        connections.close_all()


@pytest.fixture
def kojin_url(django_site: None, db_url: str) -> str:
    """The test database, with kojin_pg migrated into schema ``jobs``, behind the kojin alias."""
    import django_site as site

    with psycopg.connect(db_url, autocommit=True) as conn:
        kschema.migrate(conn, site.SCHEMA)
    site.point_kojin_alias_at(site.database_name(db_url))
    return db_url + "?schema=" + site.SCHEMA


@pytest.fixture
def celery_app(kojin_url: str) -> Iterator[Any]:
    """A Celery app whose broker and backend are kojin_pg in ``kojin_url``."""
    from celery import Celery

    app = Celery("proj", broker="kojin+" + kojin_url, backend="kojin+" + kojin_url,
                 set_as_current=False)
    app.conf.update(result_extended=True, task_default_queue="celery")
    yield app
    app.backend.result_consumer.stop()
    app.backend.db.close()
