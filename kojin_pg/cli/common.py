"""What every ``kojin-pg`` command shares: global options, the database, output and progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from .. import config
from ..db import Database
from ..db.schema import current_version
from ..errors import KojinError, SchemaError

EXIT_OK = 0
#: the command ran and failed: database unreachable, schema missing, nothing found, ...
EXIT_FAILURE = 1
#: the command line is wrong: bad arguments, no or an invalid URL or option
EXIT_USAGE = 2

NO_URL = "no database URL given: pass --url or set KOJIN_PG_URL"

#: Seconds a command keeps retrying a lost connection (the library's default, 60 s, is for
#: workers); a ``retry_timeout`` in the URL wins.
CLI_RETRY_TIMEOUT = 10.0


class UsageError(KojinError):
    """The command line is wrong (exit code 2)."""


def global_options(*, suppress: bool) -> argparse.ArgumentParser:
    """The options every command accepts, before or after the command's name.

    The main parser gets them with real defaults; each subparser with ``SUPPRESS`` defaults, so
    a subparser only sets what was written after the command and never clobbers a value given
    before it (``kojin-pg --url U dlq list`` and ``kojin-pg dlq list --url U`` both work).
    """
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("global options")
    group.add_argument("--url", default=default(None), metavar="URL",
                       help="PostgreSQL URL (default: KOJIN_PG_URL)")
    group.add_argument("--schema", default=default("kojin"),
                       help="kojin_pg schema (default: kojin)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print machine-readable JSON instead of tables")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="log at INFO level")
    return parser


def database_url(args: argparse.Namespace) -> str:
    """``--url``, else ``KOJIN_PG_URL``; never the embedded server (only ``demo`` starts it)."""
    url = args.url or os.environ.get("KOJIN_PG_URL")
    if not url:
        raise UsageError(NO_URL)
    return config.plain_url(url)


def settings_of(args: argparse.Namespace, **options: Any) -> config.Settings:
    """The settings of the database the command works on."""
    url = database_url(args)
    try:
        in_url = {k for k, _ in parse_qsl(urlsplit(url).query)}
    except ValueError:
        in_url = set()
    if "retry_timeout" not in in_url:
        options.setdefault("retry_timeout", CLI_RETRY_TIMEOUT)
    return config.parse(url, {"schema": args.schema, **options})


@contextmanager
def database(args: argparse.Namespace, *, need_schema: bool = True,
             **options: Any) -> Iterator[tuple[Database, config.Settings]]:
    """A pool on the command's database (closed afterwards); checks the schema is installed."""
    settings = settings_of(args, pool_min_size=1, pool_max_size=2, **options)
    db = Database(settings, role="kojin_pg.cli")
    try:
        if need_schema:
            version = db.run(lambda conn: current_version(conn, settings.schema), "version")
            if version == 0:
                raise SchemaError(f"schema {settings.schema!r} has no kojin_pg tables: "
                                  "run kojin-pg migrate")
        yield db, settings
    finally:
        db.close()


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    print(json.dumps(data, indent=2, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                right: Sequence[int] = ()) -> None:
    """A plain text table whose columns are as wide as their widest cell (nothing is cut)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(parts).rstrip())


def age(seconds: float | None) -> str:
    """Seconds as a short age (``-`` for none)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``7d`` as seconds (for ``--older-than``)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (e.g. 90s, 15m, 2h, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an age cannot be negative")
    return value


class Progress:
    """A progress line on a terminal (stderr), rewritten in place; silent when not a TTY."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()

    def update(self, done: int, detail: str = "") -> None:
        """Show ``done`` items so far."""
        if self.enabled:
            self.stream.write(f"\r\033[K{self.what}: {done:,}{' ' + detail if detail else ''}")
            self.stream.flush()

    def finish(self) -> None:
        """Clear the progress line (the command then prints its final count on stdout)."""
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
