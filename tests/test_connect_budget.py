"""A connection to a server that never answers fails within kombu's ``connect_timeout`` and
``max_retries``, as kombu's own transports do (issue 10 item 9).

The "server" is a local socket that accepts TCP connections and never says a word (what a
blackholed address or a hung server looks like to libpq): only a connect timeout ends the wait.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kombu import Connection

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)

CONNECT_TIMEOUT = 1.0
MAX_RETRIES = 1
#: kombu's sleep between attempts (``interval_start``) when transport_options do not set one.
KOMBU_INTERVAL = 2.0
#: What the configuration allows: every attempt may use its connect timeout, plus kombu's
#: sleeps between them.
BUDGET = (MAX_RETRIES + 1) * CONNECT_TIMEOUT + MAX_RETRIES * KOMBU_INTERVAL
BOUND = 3 * BUDGET


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """(host, port) of a localhost listener that accepts and never replies; closed afterwards."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set() and len(accepted) < 200:
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(conn)

    thread = threading.Thread(target=serve, name="silent-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.timeout(BOUND + 1)
def test_silent_server_fails_within_connect_timeout_and_max_retries(silent_server):
    host, port = silent_server
    conn = Connection(f"kojin+postgresql://kojin@{host}:{port}/x", connect_timeout=CONNECT_TIMEOUT,
                      transport_options={"max_retries": MAX_RETRIES})
    started = time.monotonic()
    try:
        with pytest.raises(Exception):  # noqa: B017 - kombu's scenarios accept any transport error
            conn.default_channel  # noqa: B018 - the property connects (what a Producer does)
        elapsed = time.monotonic() - started
    finally:
        conn.release()
    assert elapsed <= BOUND, f"failed after {elapsed:.1f}s; the configuration allows {BUDGET:g}s"
