"""``kojin-pg metrics`` (the Prometheus exporter) and ``kojin-pg demo`` (a development aid)."""

from __future__ import annotations

import argparse
import os

from .. import config
from ..errors import KojinError
from .common import EXIT_OK, database, settings_of

DEFAULT_METRICS_PORT = 9808


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve the metrics on ``--addr``:``--port`` until interrupted."""
    try:
        from ..metrics import SCRAPE_POOL, serve
    except ImportError as exc:
        raise KojinError(f"{exc}: pip install 'kojin-pg[metrics]'") from None

    settings = settings_of(args, **SCRAPE_POOL)
    with database(args):  # fail now, clearly, if the database or the schema is not there
        pass
    print(f"kojin_pg metrics of {settings.safe_url} schema {settings.schema} on "
          f"http://{args.addr}:{args.port}/metrics", flush=True)
    serve(settings, port=args.port, addr=args.addr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: the only command that may start the embedded server (without a URL)."""
    from ..dev.demo import run_demo

    url = args.url or os.environ.get("KOJIN_PG_URL")
    return run_demo(config.plain_url(url) if url else None)


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Register ``metrics`` and ``demo``."""
    p = sub.add_parser("metrics", parents=[parent], help="serve Prometheus metrics",
                       description="Serve Prometheus metrics of the schema on /metrics: queue "
                       "depths and ages, dead letters, results, dead tuples, the oldest "
                       "transaction, NOTIFY queue usage. Needs the 'metrics' extra.")
    p.add_argument("--port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"port to listen on (default {DEFAULT_METRICS_PORT})")
    p.add_argument("--addr", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("demo", parents=[parent],
                       help="run a Celery worker on kojin_pg and send a task, a group, a chord",
                       description="Run a real Celery worker on kojin_pg and send a task, a "
                       "group and a chord. Without --url or KOJIN_PG_URL it starts a local "
                       "embedded PostgreSQL for the demo (trust authentication on 127.0.0.1) "
                       "and stops it afterwards.")
    p.set_defaults(func=cmd_demo)
