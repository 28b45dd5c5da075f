"""A TCP proxy in front of the test PostgreSQL that loses a connection at the worst moment.

Connections to :attr:`PgProxy.port` (127.0.0.1 only) are forwarded to the real server. One
*cut* can be armed at a time, on the first client request whose bytes contain a marker (the
statement's text, e.g. its leading ``--`` comment, matched within one read: psycopg writes a
request in one go, and over loopback a request of a few KB arrives in one piece; a statement
psycopg has prepared is sent without its text, so arm a cut before the statement has run five
times on one connection):

- ``cut_after_reply``: the request is forwarded, the server runs (and, in autocommit, commits)
  it, and its whole reply, up to and including ReadyForQuery, is read and thrown away; then both
  sockets are closed. The client sees a lost connection for a statement that took effect.
- ``cut_before_send``: the request is never forwarded; both sockets are closed.

Either way an optional ``before_close`` callable runs first, in the proxy thread, while the
client still waits for its answer: it is how a test makes something happen in exactly that gap.
:meth:`pause` holds every client request on every connection (a network partition) until
:meth:`resume`; :meth:`hold` holds only the requests that contain its markers (one statement
delayed in the network) until :meth:`release`.

The proxied URLs disable TLS and GSS encryption, so the server's side of every connection is a
plain stream of PostgreSQL protocol messages that the proxy can count (``type``, ``length``).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kojin_pg.db import Queries


def marker(group: str, name: str) -> bytes:
    """The first line of a kojin_pg query as the client sends it (its ``--`` comment)."""
    text = Queries(group, "kojin").get(name).as_string(None)
    return text.splitlines()[0].encode()


#: Bounds: connections accepted over the proxy's life, seconds a pump waits on a quiet socket.
MAX_CONNECTIONS = 200
IDLE_POLL = 0.2


@dataclass
class _Cut:
    markers: tuple[bytes, ...]
    after_reply: bool
    before_close: Callable[[], None] | None


class _Frames:
    """Follows the server->client stream message by message (type byte, int32 length)."""

    def __init__(self) -> None:
        self._header = b""
        self._left = 0  # bytes of the current message body still to come
        self._type = b""

    def completed(self, data: bytes) -> list[bytes]:
        """The types of the messages that end within ``data``, in order."""
        done = []
        i = 0
        while i < len(data):
            if self._left == 0 and len(self._header) < 5:
                take = min(5 - len(self._header), len(data) - i)
                self._header += data[i:i + take]
                i += take
                if len(self._header) == 5:
                    self._type = self._header[:1]
                    self._left = struct.unpack("!i", self._header[1:])[0] - 4
                    if self._left == 0:
                        done.append(self._type)
                        self._header = b""
                continue
            take = min(self._left, len(data) - i)
            self._left -= take
            i += take
            if self._left == 0:
                done.append(self._type)
                self._header = b""
        return done


class _Link:
    """One client connection and its server connection, pumped by two threads."""

    def __init__(self, proxy: PgProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self.cut: _Cut | None = None  # armed on this link: the reply to throw away
        self._threads = [
            threading.Thread(target=self._upstream, name="netproxy-up", daemon=True),
            threading.Thread(target=self._downstream, name="netproxy-down", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _recv(self, sock: socket.socket) -> bytes | None:
        """Bytes from ``sock``; b"" at its end; None if nothing came within IDLE_POLL."""
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _upstream(self) -> None:
        while not self.closed.is_set():
            data = self._recv(self.client)
            if data is None:
                continue
            if not data:
                break
            cut = self.proxy._take_cut(data)
            while not self.proxy._may_pass(data):
                if self.closed.is_set():
                    return
            if cut is not None and not cut.after_reply:
                self._finish(cut)
                return
            if cut is not None:
                self.cut = cut  # before forwarding: the reply cannot overtake it
            try:
                self.server.sendall(data)
            except OSError:
                break
        self.close()

    def _downstream(self) -> None:
        frames = _Frames()
        while not self.closed.is_set():
            data = self._recv(self.server)
            if data is None:
                continue
            if not data:
                break
            ended = frames.completed(data)
            cut = self.cut
            if cut is not None:
                if b"Z" in ended:  # ReadyForQuery: the statement is over (and committed)
                    self._finish(cut)
                    return
                continue  # part of the reply being thrown away
            try:
                self.client.sendall(data)
            except OSError:
                break
        self.close()

    def _finish(self, cut: _Cut) -> None:
        try:
            if cut.before_close is not None:
                cut.before_close()
        finally:
            self.close()
            self.proxy._cut_done.set()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class PgProxy:
    """A localhost proxy to ``target`` (host, port). Use as a context manager."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(IDLE_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut: _Cut | None = None
        self._cut_done = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._hold: tuple[bytes, ...] | None = None
        self._released = threading.Event()
        self._stop = threading.Event()
        self._links: list[_Link] = []
        self._thread = threading.Thread(target=self._accept, name="netproxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str) -> PgProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """``url`` (same user, database and options) through this proxy, without TLS/GSS."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("sslmode", "gssencmode")]
        query += [("sslmode", "disable"), ("gssencmode", "disable")]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))

    # -- faults ----------------------------------------------------------------------------

    def cut_after_reply(self, *markers: bytes,
                        before_close: Callable[[], None] | None = None) -> None:
        """Arm: the first request containing every marker runs; its reply is lost."""
        self._arm(_Cut(markers, True, before_close))

    def cut_before_send(self, *markers: bytes,
                        before_close: Callable[[], None] | None = None) -> None:
        """Arm: the first request containing every marker never reaches the server."""
        self._arm(_Cut(markers, False, before_close))

    def _arm(self, cut: _Cut) -> None:
        with self._lock:
            self._cut = cut
            self._cut_done.clear()

    def _take_cut(self, data: bytes) -> _Cut | None:
        with self._lock:
            cut = self._cut
            if cut is not None and all(m in data for m in cut.markers):
                self._cut = None
                return cut
        return None

    def wait_cut(self, timeout: float) -> bool:
        """Whether the armed cut has happened (waiting up to ``timeout`` seconds)."""
        return self._cut_done.wait(timeout)

    def pause(self) -> None:
        """Hold every client request on every connection until :meth:`resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def hold(self, *markers: bytes) -> None:
        """Hold the requests that contain every marker until :meth:`release`."""
        self._released.clear()
        self._hold = markers

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def _may_pass(self, data: bytes) -> bool:
        """Wait a little while ``data`` is paused or held; whether it may be forwarded now."""
        if not self._flowing.wait(IDLE_POLL):
            return False
        hold = self._hold
        if hold is not None and all(m in data for m in hold):
            return self._released.wait(IDLE_POLL)
        return True

    # -- plumbing --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set() and len(self._links) < MAX_CONNECTIONS:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(IDLE_POLL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.append(_Link(self, client, server))

    def close(self) -> None:
        self._stop.set()
        self._flowing.set()
        self.release()
        self._thread.join(5)
        self._listener.close()
        for link in self._links:
            link.close()
        for link in self._links:
            for t in link._threads:
                t.join(5)

    def __enter__(self) -> PgProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
