"""A real PgBouncer (Debian's ``pgbouncer`` package) in transaction pooling mode, for tests.

It listens on a free port of 127.0.0.1 and forwards every database name to one PostgreSQL
server with ``auth_type = trust``. PgBouncer refuses to run as root, so as root it runs as the
embedded server's system user (:data:`kojin_pg.dev.embedded.SYSTEM_USER`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kojin_pg.dev.embedded import SYSTEM_USER

BINARY = "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version() -> str:
    """``pgbouncer --version``'s first line (e.g. ``PgBouncer 1.18.0``)."""
    out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0].strip()


class PgBouncer:
    """One PgBouncer process in front of the server of ``server_url``."""

    def __init__(self, server_url: str, pool_size: int = 20) -> None:
        if not os.path.exists(BINARY):
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer; "
                               ".ci/run does it)")
        target = urlsplit(server_url)
        self.server_host = target.hostname or "127.0.0.1"
        self.server_port = target.port or 5432
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kojin_pgbouncer_"))
        self.run_as = SYSTEM_USER if os.geteuid() == 0 else None
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={self.server_host} port={self.server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
max_db_connections = {pool_size}
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {self.root}/pgbouncer.log
pidfile = {self.root}/pgbouncer.pid
""")
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [BINARY, str(self.root / "pgbouncer.ini")], user=self.run_as, cwd="/",
            stdout=subprocess.DEVNULL, stderr=(self.root / "stderr.log").open("w"),
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def url(self, server_url: str) -> str:
        """``server_url`` (same user and database) through this PgBouncer."""
        parts = urlsplit(server_url)
        netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("stderr.log", "pgbouncer.log"):
            path = self.root / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
