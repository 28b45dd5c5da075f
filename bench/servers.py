"""Which PostgreSQL the benchmarks run against: embedded, stock (Debian apt) or KOJIN_PG_URL.

``--stock`` runs the bench on the distribution's PostgreSQL with its default settings, as a
user's own server would be: the newest ``/usr/lib/postgresql/<version>/bin`` (``apt-get install
postgresql`` when none is there and running as root), a fresh cluster from its ``initdb`` in a
temporary directory, started by its ``pg_ctl``. Nothing is tuned: the only settings given are the
port, ``listen_addresses = 127.0.0.1`` and the socket directory (the cluster's own), plus what a
caller asks for (the server-cost bench preloads ``pg_stat_statements``, instrumentation only).
As root the cluster belongs to, and the server runs as, the Debian ``postgres`` user (PostgreSQL
refuses to run as root).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from kojin_pg.dev.embedded import EmbeddedServer, private_dir, start_owning

APT_ROOT = Path("/usr/lib/postgresql")
#: the system user Debian's package creates; the stock server runs as it when we are root
STOCK_USER = "postgres"


def stock_bin_dir() -> Path:
    """The newest apt PostgreSQL's ``bin`` directory, installing ``postgresql`` if needed."""
    found = sorted((p.parent for p in APT_ROOT.glob("*/bin/initdb")),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], capture_output=True,
                       timeout=900, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if any(APT_ROOT.glob("*/bin/initdb")):
            return stock_bin_dir()
    if not found:
        raise RuntimeError("no apt PostgreSQL in /usr/lib/postgresql (apt-get install postgresql)")
    return found[-1]


class StockServer(EmbeddedServer):
    """A cluster of the apt PostgreSQL with default settings, on a private data directory.

    Reuses :class:`~kojin_pg.dev.embedded.EmbeddedServer` for initdb/start/stop, without its
    tuned defaults (``max_connections``, ``shared_buffers``) and without touching the system
    binaries' permissions.
    """

    def __init__(self, data_dir: Path, settings: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(data_dir, bin_dir=stock_bin_dir())
        self.settings = (("listen_addresses", "127.0.0.1"), *settings)
        self._run_as = STOCK_USER if os.geteuid() == 0 else None

    def prepare_data_dir(self) -> None:
        """The data directory, private, owned by the server's user (as root: ``postgres``)."""
        if self._run_as is None:
            private_dir(self.data_dir)
            return
        entry = pwd.getpwnam(self._run_as)
        private_dir(self.data_dir, owner=(entry.pw_uid, entry.pw_gid), traversable=True)


def start_postgres(stock: bool = False, settings: Sequence[tuple[str, str]] = (),
                   use_env: bool = True) -> tuple[str, Any]:
    """(admin URL, server to ``destroy()`` or None): a temporary stock server with ``stock``,
    else KOJIN_PG_URL when set (and ``use_env``), else a temporary embedded server."""
    if stock:
        root = Path(tempfile.mkdtemp(prefix="bench_stock_"))
        server: Any = start_owning(StockServer(root / "data", settings), root)
        return server.url, server
    admin = os.environ.get("KOJIN_PG_URL") if use_env else None
    if admin:
        return admin, None
    from kojin_pg.dev.embedded import temporary_server

    server = temporary_server(settings=settings)
    return server.url, server


def bench_parser(prog: str, quick_help: str) -> argparse.ArgumentParser:
    """The options of a bench that starts its own servers: ``--stock`` (:func:`start_postgres`),
    ``--repeat`` (3) and ``--quick`` (what it makes smaller: ``quick_help``)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--stock", action="store_true",
                        help="the Debian apt PostgreSQL at default settings (bench/servers.py)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def destroy(server: Any) -> None:
    """Stop and delete a server from :func:`start_postgres` (None: nothing to do), with the
    temporary directory around its data directory."""
    if server is not None:
        server.destroy()


def describe(admin_url: str, server: Any) -> dict[str, str]:
    """What the bench ran against, for latest.json: kind (stock, embedded, external) and the
    server's version string."""
    kind = ("stock" if isinstance(server, StockServer)
            else "embedded" if server is not None else "external (KOJIN_PG_URL)")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT version()").fetchone()
    return {"kind": kind, "version": row[0] if row else "?"}
