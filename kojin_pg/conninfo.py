"""libpq connection strings as users write them: split, masked, rebuilt from kombu's parts.

Two forms are accepted, both handed to libpq untouched apart from kojin_pg's own options:

* URLs, ``postgresql://[user[:password]@][host[:port][,host[:port]...]][/dbname][?key=value&...]``,
  including multi-host lists with ports, ``target_session_attrs``, ``service=`` and unix-socket
  hosts (``postgresql:///db?host=/run/postgresql`` or ``postgresql://%2Frun%2Fpostgresql/db``).
  Python's ``urlsplit`` cannot read most of these (a multi-host port list is "not an integer"),
  so nothing here uses it: the text is cut exactly where libpq cuts it.
* keyword/value strings, ``host=db1,db2 port=5432,5433 dbname=app target_session_attrs=read-write``.

Masking follows libpq's own reading of the string, so the password libpq would send is the one
hidden: in a URL the text between the first ``:`` and the first ``@`` of the part before the
first ``/``, and any ``password`` parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from .errors import ConfigurationError

#: URL schemes libpq itself accepts.
LIBPQ_SCHEMES = ("postgresql", "postgres")

MASK = "****"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_KEYWORD = re.compile(r"\s*([^\s=]+)\s*=\s*")


class Param(NamedTuple):
    """One ``key=value`` of a connection string: its text as written and its decoded parts."""

    raw: str
    key: str
    value: str


class Parsed(NamedTuple):
    """A connection string cut into its pieces; ``base`` is the URL without its query."""

    scheme: str | None
    base: str
    params: list[Param]

    @property
    def is_url(self) -> bool:
        return self.scheme is not None


def plain(url: str) -> str:
    """``url`` without the ``kojin+`` prefix Celery/kombu use to pick us (``kojin://`` too)."""
    if url.startswith("kojin://"):
        return "postgresql://" + url[len("kojin://"):]
    return url.removeprefix("kojin+")


def split(text: str) -> Parsed:
    """Cut a URL or keyword/value string into its pieces, keeping each parameter's text.

    Raises :class:`ConfigurationError` (which never quotes the string) for text that is
    neither form.
    """
    match = _SCHEME.match(text)
    if match:
        base, _, query = text.partition("?")
        params = [_query_param(item) for item in query.split("&") if item]
        return Parsed(match.group(1), base, params)
    if "=" in text:
        return Parsed(None, "", list(_keyword_params(text)))
    raise ConfigurationError("not a PostgreSQL URL or key=value connection string")


def _query_param(item: str) -> Param:
    key, _, value = item.partition("=")
    # libpq decodes %XX only; a '+' stays a '+'
    return Param(item, unquote(key), unquote(value))


def _keyword_params(text: str) -> Iterable[Param]:
    """The pairs of a keyword/value string, read with libpq's rules (quotes, backslashes)."""
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return
        match = _KEYWORD.match(text, pos)
        if not match:
            raise ConfigurationError("malformed key=value connection string: expected key=value")
        value, end = _keyword_value(text, match.end())
        yield Param(text[pos:end], match.group(1), value)
        pos = end


def _keyword_value(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    quoted = pos < len(text) and text[pos] == "'"
    if quoted:
        pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
            continue
        if quoted and char == "'":
            return "".join(out), pos + 1
        if not quoted and char.isspace():
            break
        out.append(char)
        pos += 1
    if quoted:
        raise ConfigurationError("malformed key=value connection string: unterminated quote")
    return "".join(out), pos


def join(parsed: Parsed, params: Iterable[Param]) -> str:
    """The connection string of ``parsed`` with ``params`` instead of its own."""
    raws = [p.raw for p in params]
    if parsed.is_url:
        return parsed.base + ("?" + "&".join(raws) if raws else "")
    return " ".join(raws)


def make_param(parsed: Parsed, key: str, value: str) -> Param:
    """A new ``key=value`` written the way ``parsed``'s form needs it."""
    if parsed.is_url:
        return Param(f"{quote(key, safe='')}={quote(value, safe='')}", key, value)
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return Param(f"{key}='{escaped}'", key, value)


def _userinfo_span(base: str) -> tuple[int, int] | None:
    """Where the password of a URL's ``user:password@`` sits in ``base``, as libpq reads it."""
    start = base.index("://") + 3
    slash = base.find("/", start)
    authority_end = len(base) if slash < 0 else slash
    at = base.find("@", start, authority_end)
    if at < 0:
        return None
    colon = base.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def mask(text: str) -> str:
    """``text`` (either form, any ``kojin+`` prefix kept) with every password replaced by ``****``.

    Text that is neither form is returned as a placeholder, never echoed.
    """
    prefix = ""
    if text.startswith("kojin+"):
        prefix, text = "kojin+", text[len("kojin+"):]
    try:
        parsed = split(text)
    except ConfigurationError:
        return "<unparseable connection string>"
    base = parsed.base
    if parsed.is_url:
        span = _userinfo_span(base)
        if span is not None:
            base = base[:span[0]] + MASK + base[span[1]:]
    params = [_masked(parsed, p) if p.key == "password" else p for p in parsed.params]
    return prefix + join(parsed._replace(base=base), params)


def _masked(parsed: Parsed, param: Param) -> Param:
    if parsed.is_url:  # written as is: "****" percent-encoded would be unreadable
        return Param(param.raw.partition("=")[0] + "=" + MASK, param.key, MASK)
    return make_param(parsed, param.key, MASK)


def passwords(text: str) -> list[str]:
    """Every spelling of every password in ``text``, longest first (for scrubbing messages)."""
    try:
        parsed = split(plain(text))
    except ConfigurationError:
        return []
    found: set[str] = set()
    if parsed.is_url:
        span = _userinfo_span(parsed.base)
        if span is not None:
            raw = parsed.base[span[0]:span[1]]
            found.update((raw, unquote(raw)))
    for p in parsed.params:
        if p.key == "password":
            found.update((p.value, p.raw.partition("=")[2]))
    found.discard("")
    return sorted(found, key=len, reverse=True)


def scrub(message: str, text: str) -> str:
    """``message`` with every password of connection string ``text`` masked."""
    for secret in passwords(text):
        message = message.replace(secret, MASK).replace(quote(secret, safe=""), MASK)
    return message


def build_url(host: str | None = None, port: int | str | None = None, user: str | None = None,
              dbname: str | None = None, password: str | None = None) -> str:
    """Compose a ``postgresql://`` URL, quoting each part; a part left out is libpq's default.

    ``host`` may be a comma-separated list or a unix-socket directory.
    """
    auth = ""
    if user or password:
        auth = quote(user or "", safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    hosts = ",".join(_host(h) for h in (host or "").split(",")) if host else ""
    if port:
        hosts += f":{port}"
    path = "/" + quote(dbname, safe="") if dbname else "/"
    return f"postgresql://{auth}{hosts}{path}"


def _host(host: str) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]"  # IPv6 literal
    return quote(host, safe="[]:")


def url_from_kombu(client: Any) -> str:
    """The connection string of a kombu ``Connection`` (``client`` of a transport).

    kombu hands a transport that parses its own URLs the whole URL as ``client.hostname``; after
    ``Connection.switch()`` to the next URL of a failover list (``url1;url2``), or when the
    connection was built from keyword arguments, it has only the parts kombu's URL parser
    found, and the URL is composed from them.
    """
    check_failover_list(getattr(client, "alt", None) or ())
    hostname = client.hostname or ""
    if "://" in hostname or "=" in hostname:
        return plain(hostname)
    password = client.password() if callable(client.password) else client.password
    return build_url(hostname or None, client.port, client.userid,
                     (client.virtual_host or "").strip("/") or None, password)


def check_failover_list(alternates: Iterable[Any]) -> None:
    """Refuse failover URLs kombu's ``Connection.switch()`` would mangle, before it does.

    ``switch()`` re-reads each URL with kombu's own parser, which fails on a multi-host port
    list and turns every query parameter into a keyword argument kombu does not know. Options
    then belong in ``broker_transport_options`` (kojin_pg's and libpq's alike).
    """
    from kombu.utils.url import url_to_parts

    urls = [u for u in alternates if isinstance(u, str) and "://" in u]
    if len(urls) < 2:
        return
    for url in urls:
        try:
            parts = url_to_parts(url)
        except ValueError:
            parts = None
        if parts is None or parts.query:
            raise ConfigurationError(
                f"failover URL {mask(url)!r}: kombu re-parses each URL of a ';' list when it "
                "switches, and cannot keep a host list with ports or '?' options. Use one libpq "
                "multi-host URL (postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write), "
                "or put the options in broker_transport_options"
            )
