"""Every libpq connection-string form passes through to libpq, and its password never shows.

The unit half checks what libpq reads from the string kojin_pg hands it (libpq's own parser,
not ours, is the judge); the other half connects for real: a multi-host list whose first host
is dead, unix-socket hosts, a service file, a key=value string, and kombu failover lists.
"""

from __future__ import annotations

import socket
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Producer
from psycopg.conninfo import conninfo_to_dict

import kojin_pg  # noqa: F401  (registers the kombu aliases)
from kojin_pg import config
from kojin_pg.db import Database
from kojin_pg.errors import ConfigurationError, DatabaseUnavailable

SECRET = "S3cr3t-Pw"

#: (connection string, what libpq must read from it), one per form.
FORMS = {
    "multi-host with ports": (
        f"postgresql://u:{SECRET}@db1:5432,db2:5433/app?target_session_attrs=read-write",
        {"user": "u", "password": SECRET, "host": "db1,db2", "port": "5432,5433",
         "dbname": "app", "target_session_attrs": "read-write"}),
    "multi-host without ports": (
        f"kojin+postgresql://u:{SECRET}@db1,db2/app",
        {"user": "u", "password": SECRET, "host": "db1,db2", "port": ",", "dbname": "app"}),
    "password in the query": (
        f"postgres://u@db1:5432,db2/app?password={SECRET}&target_session_attrs=primary",
        {"user": "u", "password": SECRET, "host": "db1,db2", "port": "5432,",
         "dbname": "app", "target_session_attrs": "primary"}),
    "service file": (
        f"postgresql:///?service=jobs&password={SECRET}",
        {"service": "jobs", "password": SECRET}),
    "unix socket in the query": (
        f"postgresql://u:{SECRET}@/app?host=/var/run/postgresql",
        {"user": "u", "password": SECRET, "host": "/var/run/postgresql", "dbname": "app"}),
    "unix socket in the host": (
        f"postgresql://u:{SECRET}@%2Fvar%2Frun%2Fpostgresql:5433/app",
        {"user": "u", "password": SECRET, "host": "/var/run/postgresql", "port": "5433",
         "dbname": "app"}),
    "IPv6 literal": (
        f"kojin://u:{SECRET}@[::1]:5433/app?sslmode=require",
        {"user": "u", "password": SECRET, "host": "::1", "port": "5433", "dbname": "app",
         "sslmode": "require"}),
    "encoded characters in the password": (
        f"postgresql://u:{quote(SECRET + '@/:?', safe='')}@db1/app",
        {"user": "u", "password": SECRET + "@/:?", "host": "db1", "dbname": "app"}),
    "key=value string": (
        f"host=db1,db2 port=5432,5433 dbname=app user=u password='{SECRET} x\\'y' "
        "target_session_attrs=read-write",
        {"user": "u", "password": SECRET + " x'y", "host": "db1,db2", "port": "5432,5433",
         "dbname": "app", "target_session_attrs": "read-write"}),
}


def _with_option(url: str, pair: str) -> str:
    if "://" not in url:
        return f"{url} {pair}"
    return url + ("&" if "?" in url else "?") + pair


@pytest.mark.parametrize("form", FORMS)
def test_libpq_reads_the_string_unchanged(form):
    url, expected = FORMS[form]
    settings = config.parse(_with_option(url, "schema=jobs"), {"pool_max_size": 3})
    assert settings.schema == "jobs" and settings.pool_max_size == 3
    assert conninfo_to_dict(settings.conninfo) == expected


@pytest.mark.parametrize("form", FORMS)
def test_the_password_never_shows(form):
    url, expected = FORMS[form]
    settings = config.parse(url)
    shown = [settings.safe_url, repr(settings), config.mask_url(url), repr(Database(settings))]
    for bad in ("bogus=1", "pool_max_size=many"):
        with pytest.raises(ConfigurationError) as info:
            config.parse(_with_option(url, bad))
        shown.append(str(info.value))
    with pytest.raises(ConfigurationError) as info:
        config.parse(url, {"bogus": 1})
    shown.append(str(info.value))
    password = expected["password"]
    shown.append(config.scrub(f"libpq said {password} and {quote(password, safe='')}", url))
    assert "****" in settings.safe_url
    assert not [text for text in shown if SECRET in text]


def test_libpq_options_from_the_mapping_are_added_and_win():
    url = f"postgresql://u:{SECRET}@db1:5432,db2:5432/app?sslmode=disable"
    settings = config.parse(url, {"sslmode": "require", "target_session_attrs": "read-write"})
    assert conninfo_to_dict(settings.conninfo)["sslmode"] == "require"
    assert conninfo_to_dict(settings.conninfo)["target_session_attrs"] == "read-write"
    kw = config.parse("host=db1 dbname=app", {"password": "it's"})
    assert conninfo_to_dict(kw.conninfo)["password"] == "it's"
    assert "it's" not in kw.safe_url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"postgresql://u:{SECRET}@db1:5432,db2:x/app", "invalid port 'x'"),
        (f"postgresql://u:{SECRET}@db1:99999/app", "invalid port '99999'"),
        (f"postgresql://u:{SECRET}@db1/app?sslmode=require&bogus=1", "unknown option 'bogus'"),
        (f"host=db1 password='{SECRET}", "unterminated quote"),
        (f"host=db1 password={SECRET} dbname", "expected key=value"),
        (f"postgresql://u:{SECRET}@db1/app?host=%zz", "malformed URL"),
        (f"mysql://u:{SECRET}@db1/app", "unsupported URL scheme 'mysql'"),
    ],
)
def test_malformed_strings_are_named_without_the_password(url, message):
    with pytest.raises(ConfigurationError) as info:
        config.parse(url)
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parts(db_url: str) -> tuple[str, int, str]:
    parts = urlsplit(db_url)
    return parts.hostname or "127.0.0.1", int(parts.port or 5432), parts.path.lstrip("/")


def _round_trip(url: str) -> None:
    """A result stored and read through the backend, a message through the broker."""
    app = Celery("forms", backend="kojin+" + url, broker="memory://", set_as_current=False)
    try:
        app.backend.mark_as_done("t1", 42)
        assert app.backend.get_task_meta("t1")["result"] == 42
    finally:
        app.backend.db.close()
    with Connection("kojin+" + url) as conn:
        ch = conn.channel()
        Producer(ch, routing_key="forms_q").publish({"x": 1})
        assert ch.basic_get("forms_q").payload == {"x": 1}


def test_multi_host_url_skips_a_dead_host(db_url):
    host, port, dbname = _parts(db_url)
    url = (f"postgresql://postgres:{SECRET}@{host}:{_dead_port()},{host}:{port}/{dbname}"
           "?target_session_attrs=read-write&connect_timeout=5")
    _round_trip(url)
    with Connection("kojin+" + url) as conn:  # the worker banner's URL: kombu cannot parse it
        assert conn.as_uri() == "kojin+" + config.mask_url(url)


def test_unix_socket_service_file_and_key_value_forms_connect(db_url, tmp_path, monkeypatch):
    host, port, dbname = _parts(db_url)
    with psycopg.connect(db_url) as conn:
        sockets = conn.execute("SHOW unix_socket_directories").fetchone()[0]
    sock = sockets.split(",")[0].strip()
    service = tmp_path / "pg_service.conf"
    service.write_text(f"[kojin_svc]\nhost={host}\nport={port}\ndbname={dbname}\nuser=postgres\n")
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    forms = [
        f"postgresql://postgres@/{dbname}?host={sock}&port={port}",
        f"postgresql://postgres@{quote(sock, safe='')}:{port}/{dbname}",
        "postgresql:///?service=kojin_svc",
        f"host={host} port={port} dbname={dbname} user=postgres",
    ]
    for url in forms[:3]:
        _round_trip(url)
    db = Database(config.parse(forms[3]))
    try:
        assert db.fetchone("SELECT current_database()") == (dbname,)
    finally:
        db.close()


def test_unreachable_server_error_hides_the_password():
    url = (f"postgresql://postgres:{SECRET}@127.0.0.1:{_dead_port()},127.0.0.1:{_dead_port()}"
           f"/db?password={SECRET}&retry_timeout=0.3")
    db = Database(config.parse(url))
    with pytest.raises(DatabaseUnavailable) as info:
        db.fetchone("SELECT 1")
    assert "127.0.0.1" in str(info.value) and SECRET not in str(info.value)


def test_kombu_failover_list_moves_to_the_live_url(db_url):
    """Issue 10 item 9: Connection.switch() re-parses the next URL as scheme kojin+postgresql."""
    host, port, dbname = _parts(db_url)
    dead = f"kojin+postgresql://postgres:{SECRET}@{host}:{_dead_port()}/{dbname}"
    live = f"kojin+postgresql://postgres:{SECRET}@{host}:{port}/{dbname}"
    errors: list[str] = []
    with Connection(f"{dead};{live}", transport_options={"retry_timeout": 0.3}) as conn:
        conn.ensure_connection(max_retries=4, interval_start=0, interval_step=0.1,
                               errback=lambda exc, interval: errors.append(str(exc)))
        ch = conn.channel()
        Producer(ch, routing_key="failover_q").publish({"via": "second"})
        assert ch.basic_get("failover_q").payload == {"via": "second"}
        assert f":{port}" in conn.as_uri() and SECRET not in conn.as_uri()
        assert errors and not [e for e in errors if SECRET in e]


def test_kombu_failover_list_with_options_is_refused_early(db_url):
    host, port, dbname = _parts(db_url)
    urls = [f"kojin+postgresql://postgres:{SECRET}@{host}:{p}/{dbname}?sslmode=disable"
            for p in (_dead_port(), port)]
    with Connection(";".join(urls)) as conn:
        with pytest.raises(ConfigurationError) as info:
            conn.ensure_connection(max_retries=1)
    assert "broker_transport_options" in str(info.value) and SECRET not in str(info.value)
