"""kombu's own integration scenarios, bound to kojin_pg the way kombu binds its transports.

The scenario classes are kombu's ``t/integration/common.py``, vendored unchanged as
``kombu_common.py``. The fixtures mirror kombu's ``test_py_amqp.py`` (which has failover) and
``test_redis.py``: ``connection`` is a plain ``Connection`` on the broker URL, with no transport
options; ``invalid_connection`` points at a closed local port; ``failover_connection`` lists a
dead server first and the real one second, separated by ``;``.

kombu runs these with no time limit. A transport that needs two minutes to report a refused
connection still "passes" them, so the scenarios that touch a dead server here carry a bound of
three times kombu's own cadence: ``Connection.connect()`` and ``.connection`` make two attempts
2 s apart (``max_retries=1``, ``interval_start=2``), so a transport that reports a refusal at
once (as Redis's does) fails them in about 2 s; kojin_pg itself does, in 2.0 s, when its own
retry is switched off with ``transport_options={"retry_timeout": 0}`` (which shows the fixtures
are not at fault; the binding keeps kombu's plain URL, as kombu's own bindings do).

All 40 pass. Before issue 10 was fixed, 15 failed: the eight ``test_failed_*`` (a refused
connection took ~122 s: the schema check retried for ``retry_timeout`` inside each of kombu's
attempts), the four failover scenarios (the same retries, then ``Connection.switch()`` found no
transport named ``kojin+postgresql``) and the three TTL ones (message expiration ignored).
"""

from __future__ import annotations

import errno
import socket

import kombu
import pytest
from kombu_common import (
    BaseExchangeTypes,
    BaseFailover,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)

import kojin_pg  # noqa: F401  (registers the kojin+ URL scheme)

#: Nothing listens here (checked by the fixture): connecting is refused at once.
DEAD_HOST, DEAD_PORT = "127.0.0.1", 1
DEAD_URL = f"kojin+postgresql://{DEAD_HOST}:{DEAD_PORT}/x"

#: kombu's interval_start for Connection.connect()/.connection/.default_channel: the one sleep
#: between its two attempts. Three times that bounds every scenario that meets the dead server.
KOMBU_RETRY_INTERVAL = 2.0
DEAD_SERVER_BOUND = 3 * KOMBU_RETRY_INTERVAL



def dead_server_bound(fn):
    """The time bound of a scenario that meets the dead server."""
    return pytest.mark.timeout(DEAD_SERVER_BOUND)(fn)


def _assert_port_closed() -> None:
    """The failed-connection fixtures are only fair if the port really refuses at once."""
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((DEAD_HOST, DEAD_PORT)) == errno.ECONNREFUSED


@pytest.fixture
def connection(db_url):
    conn = kombu.Connection("kojin+" + db_url)
    yield conn
    conn.release()


@pytest.fixture
def invalid_connection():
    _assert_port_closed()
    conn = kombu.Connection(DEAD_URL)
    yield conn
    conn.release()


@pytest.fixture
def failover_connection(db_url):
    _assert_port_closed()
    conn = kombu.Connection(f"{DEAD_URL};kojin+{db_url}")
    yield conn
    conn.release()


class FailedConnectionBound:
    """The four ``test_failed_*`` scenarios, bound in time (kombu's bodies, re-declared only to
    carry the mark; ``BaseFailover`` inherits them too, with the same fixture)."""

    @dead_server_bound
    def test_failed_connect(self, invalid_connection):
        super().test_failed_connect(invalid_connection)

    @dead_server_bound
    def test_failed_connection(self, invalid_connection):
        super().test_failed_connection(invalid_connection)

    @dead_server_bound
    def test_failed_channel(self, invalid_connection):
        super().test_failed_channel(invalid_connection)

    @dead_server_bound
    def test_failed_default_channel(self, invalid_connection):
        super().test_failed_default_channel(invalid_connection)


class TestKojinBasicFunctionality(FailedConnectionBound, BasicFunctionality):
    pass


class TestKojinBaseExchangeTypes(BaseExchangeTypes):
    pass


class TestKojinTimeToLive(BaseTimeToLive):
    pass


class TestKojinPriority(BasePriority):
    # like py-amqp (and unlike Redis): a higher number is a higher priority
    PRIORITY_ORDER = "asc"


class TestKojinFailover(FailedConnectionBound, BaseFailover):
    @dead_server_bound
    def test_connect(self, failover_connection):
        super().test_connect(failover_connection)

    @dead_server_bound
    def test_publish_consume(self, failover_connection):
        super().test_publish_consume(failover_connection)

    @dead_server_bound
    def test_consume_empty_queue(self, failover_connection):
        super().test_consume_empty_queue(failover_connection)

    @dead_server_bound
    def test_simple_buffer_publish_consume(self, failover_connection):
        super().test_simple_buffer_publish_consume(failover_connection)


class TestKojinMessage(BaseMessage):
    pass
