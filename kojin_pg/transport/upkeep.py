"""Upkeep of queues across processes: live consumers say so, and a sweep removes what nobody
will use again.

RabbitMQ deletes a queue that went unused for its ``x-expires``, an ``auto_delete`` queue when
its last consumer leaves, and messages older than their TTL; Celery relies on all three for its
event, reply and remote-control queues. Here every process that consumes runs one upkeep thread
per database: every ``sweep_interval`` (with jitter) it refreshes the consumers rows of this
process's consumers, and then, if no other process holds the sweep's advisory lock, forgets
consumers that stopped refreshing (crashed), deletes expired and auto-deleted queues and the
messages nobody will get. The thread ends when the process's last consuming transport closes.

A process that only publishes (a web server calling ``delay()``) takes no part: its rounds
would only contend for the sweep's lock, and a round meeting a publish made its pool grow to a
second connection, held for the pool's max_idle. Deployments with producers and no worker
sweep nothing until a worker (or ``celery events``, Flower, ``celery inspect``) runs; an
expired message is never delivered meanwhile, it only waits for removal.
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from typing import TYPE_CHECKING, Any

import psycopg

from ..db import ProcessLocal

if TYPE_CHECKING:
    from .transport import Transport

log = logging.getLogger(__name__)

#: Rows deleted per statement by a sweep.
SWEEP_BATCH = 5000
#: Seconds a deleted queue is remembered, so cached routes do not refill it.
TOMBSTONE_SECONDS = 3600.0


def consumer_grace(sweep_interval: float) -> float:
    """Seconds after its last refresh that a consumer counts as gone."""
    return max(10 * sweep_interval, 20.0)


class Upkeep:
    """This process's upkeep thread for one database and schema."""

    def __init__(self, sweep_interval: float) -> None:
        self.interval = sweep_interval
        self.transports: weakref.WeakSet[Transport] = weakref.WeakSet()
        #: Held while a round uses a transport's pool, so closing it waits for the round.
        self.busy = threading.Lock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, transport: Transport) -> None:
        """Keep ``transport``'s consumers alive and sweep through its pool, from now on."""
        with self._lock:
            self.transports.add(transport)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="kojin_pg-upkeep")
                self._thread.start()

    def detach(self, transport: Transport) -> None:
        """``transport`` is closing: the next rounds leave it alone (a round in progress gets a
        moment to finish); the last one to go stops the thread."""
        waited = self.busy.acquire(timeout=2.0)
        try:
            with self._lock:
                self.transports.discard(transport)
                if not self.transports:
                    self._stop.set()
        finally:
            if waited:
                self.busy.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval * random.uniform(0.75, 1.25)):
            with self.busy:
                transports = [t for t in list(self.transports) if not t.closing]
                if not transports:
                    continue
                try:
                    self.round(transports)
                except Exception as exc:  # the next round tries again
                    log.info("kojin_pg: queue upkeep failed, the next round tries again: %r",
                             exc)

    def round(self, transports: list[Transport]) -> None:
        """Refresh this process's consumers, then sweep if no other process is sweeping."""
        queues: list[str] = []
        consumers: list[str] = []
        for t in transports:
            for queue in t.consumed_queues():
                queues.append(queue)
                consumers.append(t.consumer_id)
        t = transports[0]
        db = t.consumer_db
        q = t.queries
        # No retries here: the next round does the same work anyway. closing is checked before
        # each use, so a round never reopens the pool of a transport being closed.
        if queues and not t.closing:
            db.run(lambda conn: conn.execute(q.consumers_alive, {
                "queues": queues, "consumers": consumers}, prepare=False), "consumers alive",
                retry=False)
        if not t.closing:
            db.run(lambda conn: sweep(conn, t), "sweep", retry=False)


def sweep(conn: psycopg.Connection[Any], transport: Transport) -> None:
    """One sweep in one transaction, if this process gets the lock (safe to repeat: it only
    deletes what is dead by then). Never prepared: the consumer pool plans prepared statements
    once, generically, and these joins must be planned for the rows they meet."""
    q = transport.queries
    s = transport.settings
    with conn.transaction():
        got = conn.execute(q.sweep_lock, {"lock": f"kojin_pg.sweep:{s.schema}"},
                           prepare=False).fetchone()
        if not got or not got[0]:
            return
        grace = consumer_grace(s.sweep_interval)
        conn.execute(q.sweep_consumers, {"grace": grace}, prepare=False)
        conn.execute(q.sweep_offers, {"offer_space": transport.offers.space}, prepare=False)
        conn.execute(q.sweep_queues, {"grace": grace}, prepare=False)
        for query in (q.sweep_expired_messages, q.sweep_orphan_messages):
            while True:
                row = conn.execute(query, {"batch": SWEEP_BATCH}, prepare=False).fetchone()
                if not row or row[0] < SWEEP_BATCH:
                    break
        conn.execute(q.sweep_tombstones, {"keep": TOMBSTONE_SECONDS}, prepare=False)


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.upkeeps: dict[tuple[str, str], Upkeep] = {}


_registry: ProcessLocal[_Registry] = ProcessLocal(_Registry)


def upkeep_for(transport: Transport) -> Upkeep:
    """This process's upkeep for ``transport``'s database and schema."""
    s = transport.settings
    key = (s.conninfo, s.schema)
    registry = _registry.get()
    with registry.lock:
        upkeep = registry.upkeeps.get(key)
        if upkeep is None:
            upkeep = registry.upkeeps[key] = Upkeep(s.sweep_interval)
        return upkeep
