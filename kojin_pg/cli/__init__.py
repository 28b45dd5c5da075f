"""``kojin-pg``: schema, cleanup, stats, queues, scheduled tasks, revoke, bindings, dead letters and
metrics, for operators.

Global options go before or after the command: ``--url`` (default ``KOJIN_PG_URL``),
``--schema`` (default ``kojin``), ``--json`` (JSON instead of tables, on every command) and
``-v``. Every command but ``demo`` needs a URL; only ``demo`` may start the embedded server.

Exit codes:
  0  success
  1  failure: the database could not be reached, the schema is missing, nothing matched
     (e.g. ``dlq show`` of an unknown id), or the operation failed
  2  usage: bad arguments, no URL given, an invalid URL or option, or a connection the server
     refuses for good (unknown database or role, failed authentication)
  130  interrupted (Ctrl-C)

One module per command group; none of them is imported by the broker or the result backend.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import psycopg

from ..errors import ConfigurationError, KojinError
from . import bindings, dlq, maintenance, queues, scheduling, serve, stats
from .common import EXIT_FAILURE, EXIT_USAGE, UsageError, global_options

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``kojin-pg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="kojin-pg", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options(suppress=False)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = global_options(suppress=True)
    for group in (maintenance, stats, queues, scheduling, bindings, dlq, serve):
        group.add_commands(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kojin-pg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (UsageError, ConfigurationError) as exc:
        print(f"kojin-pg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KojinError as exc:
        print(f"kojin-pg: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.Error as exc:
        # messages from the server never hold the URL; the class name says what kind it was
        print(f"kojin-pg: error: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("kojin-pg: interrupted", file=sys.stderr)
        return 130
