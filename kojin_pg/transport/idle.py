"""Which queues have a consumer waiting, told to the publishers so that they NOTIFY only then.

A NOTIFY takes a lock at commit that serializes every notifying commit in the database (a
publish therefore announces with a commit that does not wait for its flush, and waits for the
flush in a second transaction: sql/0013); a publish that wakes nobody (the consumers are busy,
or there are none) should not pay it, nor make every other writer pay it. So a consumer that
finds its queues drained and has room for more says so with advisory locks on its LISTEN
session, and a publish announces its message only when it sees one:

* **publish** (one statement, see ``publish`` in broker.sql): a *shared* lock on the queue's
  publishing key, held until the message's commit, then a probe of the queue's idle key (an
  exclusive try, given back at once): if it fails, a consumer is idle, and the publish NOTIFYs.
  The outbox's ``transaction()`` probes only after its commit (``announce_sent``): its
  messages are committed by then, so it needs no publishing lock.
* **going idle** (:meth:`IdleQueues.enter`, ``go_idle``): a *shared* lock on each queue's idle
  key, held while the consumer waits, then the exclusive publishing lock taken and given back
  at once, which waits for every publish in flight to commit; then the consumer claims once more.

No wake-up is lost: a publish whose probe came before the consumer's idle lock held its
publishing lock from before that probe until its commit, so the consumer's barrier waited for
that commit and its claim after the barrier sees the message; a publish whose probe came after
fails it and NOTIFYs. Keys are hashes of the queue names: a collision only wakes more consumers.
The locks go with the session; after a reconnect the consumer looks again anyway (a possible
miss) and goes idle anew. A consumer whose claim comes back full has a backlog and gives its
idle locks back (:meth:`IdleQueues.leave`), so a saturated system publishes without NOTIFY.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable
from typing import Any

import psycopg

from ..db import Listener, ProcessLocal, Queries


def idle_space(schema: str) -> int:
    """The advisory-lock namespace of the schema's idle keys."""
    return zlib.crc32(f"kojin_pg.idle:{schema}".encode()) - 2**31


def publishing_space(schema: str) -> int:
    """The advisory-lock namespace of the schema's publishing keys."""
    return zlib.crc32(f"kojin_pg.publishing:{schema}".encode()) - 2**31


def queue_key(queue: str) -> int:
    """A queue's key in both namespaces."""
    return zlib.crc32(queue.encode()) - 2**31


def publish_params(idle: int, publishing: int, queue: str | None, *, handoff: bool = False,
                   offer_space: int = 0) -> dict[str, Any]:
    """The parameters of the ``publish`` statement's probe (and of the outbox's
    ``wake_at_commit``), and whether it may hand its message off (see :mod:`.offers`)."""
    return {"idle_space": idle, "publishing_space": publishing,
            "queue_key": queue_key(queue or ""), "handoff": handoff, "offer_space": offer_space}


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Serializes enter and leave (two threads entering one queue would lock it twice).
        self.changing = threading.Lock()
        self.idle: set[str] = set()


class IdleQueues:
    """The queues this process's consumers wait on, as locks on its LISTEN session."""

    def __init__(self, listener: Listener, queries: Queries, schema: str) -> None:
        self.listener = listener
        self.queries = queries
        self.idle_space = idle_space(schema)
        self.publishing_space = publishing_space(schema)
        self._state: ProcessLocal[_State] = ProcessLocal(_State)

    def publish_params(self, queue: str) -> dict[str, Any]:
        """The parameters a publish to ``queue`` needs for its probe (no hand-off)."""
        return publish_params(self.idle_space, self.publishing_space, queue)

    def enter(self, queues: Iterable[str]) -> list[str]:
        """Say that a consumer waits on ``queues`` (blocking until the publishes in flight
        commit); returns the queues newly entered, which the caller claims once more (empty
        if all were idle already, or if not listening: then publishes always NOTIFY)."""
        s = self._state.get()
        with s.changing:
            with s.lock:
                new = sorted(set(queues) - s.idle)
            if not new or not self.listener.enabled:
                return []
            keys = [queue_key(q) for q in new]

            def go(conn: psycopg.Connection[Any]) -> None:
                conn.execute(self.queries.go_idle, {"idle_space": self.idle_space,
                                                    "publishing_space": self.publishing_space,
                                                    "keys": keys}, prepare=False)
            if not self.listener.run(go):
                return []
            with s.lock:
                s.idle.update(new)
            return new

    def leave(self, queues: Iterable[str]) -> None:
        """A consumer of ``queues`` has a backlog: publishes to them need not NOTIFY."""
        s = self._state.get()
        with s.changing:
            with s.lock:
                gone = sorted(set(queues) & s.idle)
                s.idle.difference_update(gone)
            if not gone:
                return
            keys = [queue_key(q) for q in gone]
            self.listener.run(lambda conn: conn.execute(
                self.queries.leave_idle, {"idle_space": self.idle_space, "keys": keys},
                prepare=False))

    def forget(self, conn: psycopg.Connection[Any] | None = None) -> None:
        """A new LISTEN session holds no locks (the consumer looks again, then goes idle)."""
        s = self._state.get()
        with s.lock:
            s.idle.clear()
