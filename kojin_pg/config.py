"""One frozen settings object from a URL plus options.

Options come from three places, later ones winning: the defaults below, the URL query string
(``postgresql://host/db?schema=jobs&pool_max_size=4``) and the mapping given by Celery
(``result_backend_transport_options`` / ``broker_transport_options``). Keys that are libpq
connection parameters (``sslmode``, ``target_session_attrs``, ``service``, ``host``, ...) are
passed to libpq, from the URL unchanged; any other unknown key is an error that names it.
Every libpq URL form works (multi-host lists with ports, unix-socket hosts, ``service=``), and
so do libpq key=value strings; :mod:`kojin_pg.conninfo` reads and masks them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import conninfo
from .errors import ConfigurationError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Everything kojin_pg needs to know about one database. Build it with :func:`parse`."""

    conninfo: str = field(repr=False)
    #: The URL with the password masked: safe for logs, reprs and errors.
    safe_url: str = "postgresql://"
    schema: str = "kojin"
    pool_min_size: int = 1
    pool_max_size: int = 10
    #: Seconds a caller waits for a free pooled connection before a clear error.
    pool_timeout: float = 30.0
    #: Apply missing migrations on first use (off for least-privilege runtime roles).
    auto_migrate: bool = True
    #: Wake waiters with LISTEN/NOTIFY; turn off behind PgBouncer transaction pooling.
    use_notify: bool = True
    #: Seconds between polls when notifications are off or as a safety net.
    polling_interval: float = 1.0
    #: Total seconds an operation keeps retrying after connection errors.
    retry_timeout: float = 60.0
    #: ``off`` trades the last few hundred ms of results on a crash for speed (Redis AOF-like).
    synchronous_commit: str | None = None
    cleanup_batch_size: int = 5000
    #: Seconds an unfinished chord is kept after its last activity, at least (like the chord
    #: keys of Celery's Redis backend); never less than ``result_expires``.
    chord_expires: float = 86400.0
    #: Broker: seconds a claimed, unacked message stays invisible before redelivery.
    visibility_timeout: float = 1800.0
    #: Broker: deliveries after which a message goes to the dead-letter table.
    max_deliveries: int = 10
    #: Broker: largest message body accepted, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Broker: seconds between the rounds in which live consumers say so and a sweep removes
    #: expired messages and queues that expired or lost their last consumer.
    sweep_interval: float = 2.0
    #: Broker: seconds between lease extensions of held messages (default: a third of the vt).
    lease_renew_interval: float | None = None
    #: Executions of a statement after which psycopg prepares it on the server; ``none`` or 0
    #: never prepares. Ignored behind a transaction pooler, where nothing is prepared.
    prepare_threshold: int | None = 5
    #: ``auto`` (find out on connecting), ``none`` (a direct server or a session pooler) or
    #: ``transaction`` (alias ``pgbouncer``): a pooler that hands each transaction to any server
    #: connection. Behind one: no prepared statements, no session settings, no LISTEN through it.
    pooler: str = "auto"
    #: A direct URL to the server, used only for LISTEN (wake-ups behind a transaction pooler).
    listen_url: str | None = field(default=None, repr=False)

    @property
    def prepare_after(self) -> int | None:
        """psycopg's ``prepare_threshold`` for our connections (None: never prepare)."""
        return self.prepare_threshold or None

    @property
    def renew_interval(self) -> float:
        """Seconds between lease extensions."""
        if self.lease_renew_interval is not None:
            return self.lease_renew_interval
        return max(0.05, self.visibility_timeout / 3.0)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name not in ("conninfo", "safe_url")}

#: Values of the ``pooler`` option, and what each means.
POOLERS = {"auto": "auto", "none": "none", "transaction": "transaction",
           "pgbouncer": "transaction"}


def plain_url(url: str) -> str:
    """``url`` without the ``kojin+`` prefix Celery/kombu use to pick us (``kojin://`` too)."""
    return conninfo.plain(url)


def validate_identifier(name: str, what: str = "schema name") -> str:
    """Return ``name`` if it is a safe lower-case SQL identifier, else raise ConfigurationError."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigurationError(
            f"invalid {what} {name!r}: use 1-40 characters from a-z, 0-9 and _, "
            "not starting with a digit"
        )
    return name


def check_queue_name(name: str) -> str:
    """Return ``name`` if it can name a queue or exchange, else raise ConfigurationError.

    Names are stored as data, never spliced into SQL: any text of 1-255 characters without NUL.
    """
    if not isinstance(name, str) or not 0 < len(name) <= 255 or "\x00" in name:
        raise ConfigurationError(
            f"invalid queue or exchange name {name!r}: 1-255 characters, no NUL")
    return name


def _coerce(name: str, raw: Any) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if raw is None or ("None" in kind and str(raw).strip().lower() in ("none", "")):
            if "None" in kind:
                return None
            raise ValueError("a value is required")
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _BOOL_TRUE:
                return True
            if text in _BOOL_FALSE:
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError("expected a whole number")
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"invalid value {raw!r} for option {name!r}: {exc}") from None


def _check(s: Settings) -> None:
    validate_identifier(s.schema)
    positive = ("pool_timeout", "polling_interval", "visibility_timeout", "cleanup_batch_size",
                "chord_expires", "sweep_interval",
                "max_message_bytes", "pool_max_size", "max_deliveries")
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigurationError(f"option {name!r} must be greater than 0, got {getattr(s, name)!r}")
    if s.pool_min_size < 0 or s.pool_min_size > s.pool_max_size:
        raise ConfigurationError("option 'pool_min_size' must be between 0 and pool_max_size")
    if s.retry_timeout < 0:
        raise ConfigurationError("option 'retry_timeout' must not be negative")
    if s.lease_renew_interval is not None and not 0 < s.lease_renew_interval < s.visibility_timeout:
        raise ConfigurationError(
            "option 'lease_renew_interval' must be greater than 0 and less than visibility_timeout"
        )
    if s.prepare_threshold is not None and s.prepare_threshold < 0:
        raise ConfigurationError("option 'prepare_threshold' must be 0 or more, or none")
    if s.pooler not in POOLERS:
        raise ConfigurationError(
            f"invalid pooler {s.pooler!r}: use one of {', '.join(sorted(POOLERS))}")
    if s.synchronous_commit not in (None, "on", "off", "local", "remote_write", "remote_apply"):
        raise ConfigurationError(f"invalid synchronous_commit {s.synchronous_commit!r}")


def _libpq_keywords() -> frozenset[str]:
    from psycopg import pq

    return frozenset(opt.keyword.decode() for opt in pq.Conninfo.get_defaults())


def mask_url(url: str) -> str:
    """Return ``url`` (a URL or key=value string) with any password replaced by ``****``."""
    return conninfo.mask(url)


def scrub(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) masked: for messages from libpq."""
    return conninfo.scrub(text, url)


def url_from_kombu(client: Any) -> str:
    """The connection string a kombu transport's ``client`` (a ``Connection``) stands for.

    Raises :class:`ConfigurationError` for a failover list (``url1;url2``) that kombu's
    ``Connection.switch()`` could not switch through intact.
    """
    return conninfo.url_from_kombu(client)


def _check_conninfo(text: str, shown: str) -> None:
    """Let libpq's own parser judge the string; ports are checked here (libpq does it late)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(text)
    except ProgrammingError as exc:
        reason = scrub(str(exc).strip(), text)
        raise ConfigurationError(f"malformed URL {shown!r}: {reason}") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(f"malformed URL {shown!r}: invalid port {port!r}")


def parse(url: str, options: Mapping[str, Any] | None = None) -> Settings:
    """Build :class:`Settings` from a ``postgresql://`` URL (or key=value string) and options.

    The connection string reaches libpq as written, minus kojin_pg's options; libpq parameters
    given in ``options`` are added to it (and win). Raises :class:`ConfigurationError` naming the
    problem for a malformed URL, an unknown option or an out-of-range value. The password is
    never part of the message.
    """
    if not isinstance(url, str):
        raise ConfigurationError("not a PostgreSQL URL: expected a string")
    shown = mask_url(url)
    text = plain_url(url.strip())
    try:
        parsed = conninfo.split(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"not a PostgreSQL URL: {shown!r} ({exc})") from None
    if parsed.is_url and parsed.scheme not in conninfo.LIBPQ_SCHEMES:
        raise ConfigurationError(
            f"unsupported URL scheme {parsed.scheme!r} in {shown!r}: "
            "use postgresql:// or kojin+postgresql://"
        )
    libpq = _libpq_keywords()
    values: dict[str, Any] = {}
    kept: list[conninfo.Param] = []
    for param in parsed.params:
        if param.key in _FIELDS:
            values[param.key] = param.value
        elif param.key in libpq:
            kept.append(param)
        else:
            raise ConfigurationError(f"unknown option {param.key!r} in URL {shown!r}")
    for key, value in (options or {}).items():
        if key in _FIELDS:
            values[key] = value
        elif key in libpq:
            kept.append(conninfo.make_param(parsed, key, str(value)))
        else:
            raise ConfigurationError(
                f"unknown option {key!r}; known options: {', '.join(sorted(_FIELDS))} "
                "and libpq's connection parameters"
            )
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    if parsed.is_url:  # libpq takes postgres:// too; one spelling keeps logs comparable
        parsed = parsed._replace(base="postgresql" + parsed.base[len(parsed.scheme or ""):])
    conn = conninfo.join(parsed, kept)
    _check_conninfo(conn, shown)
    if coerced.get("listen_url") is not None:
        listen = plain_url(coerced["listen_url"].strip())
        _check_conninfo(listen, mask_url(listen))
        coerced["listen_url"] = listen
    if isinstance(coerced.get("pooler"), str):
        coerced["pooler"] = POOLERS.get(coerced["pooler"].strip().lower(), coerced["pooler"])
    settings = Settings(conninfo=conn, safe_url=mask_url(conn), **coerced)
    _check(settings)
    return settings


def build_url(host: str, port: int, user: str, dbname: str, password: str | None = None) -> str:
    """Compose a ``postgresql://`` URL, quoting each part."""
    return conninfo.build_url(host, port, user, dbname, password)
