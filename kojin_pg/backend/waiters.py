"""Who waits for which results, told to the writers so that they NOTIFY only when someone may.

A NOTIFY takes a lock at commit that serializes every notifying commit in the database, so
announcing results nobody waits for costs every writer (and a store announces with a commit
that does not wait for its flush, and waits for the flush in a second transaction, so that the
lock is not held across a WAL flush: sql/0013).
Waiting processes therefore say what they wait for with advisory locks, as idle consumers do
for publishers (:mod:`kojin_pg.transport.idle`). Each task id maps to one of :data:`SLOTS` wait
slots, and each slot has two keys:

* **store** (one statement, ``store_result``): a *shared* lock on the slot's writing key, held
  until the result's commit, then a probe of its wait key (an exclusive try, given back at
  once): if the probe fails, someone waits, and the writer announces.
* **wait** (:meth:`WaitSlots.apply`, :meth:`WaitSlots.apply_and_read`): a *shared* session lock
  on the wait key of each task waited for, on the LISTEN session, then the exclusive writing
  lock taken and given back at once, which waits for every store in flight on the slot to
  commit; then the first read.

Why no wake-up is lost: a store whose probe came after the waiter's lock fails it and announces.
A store whose probe came before held its writing lock from before the probe until its commit,
so the waiter's barrier waited for that commit and its read sees the result. Writers hold only
shared locks past their probe, so concurrent writers of one slot never take each other for
waiters. A slot shared by other tasks only makes a writer announce more often than needed. The
locks go with the session: after a reconnect they are taken again (:meth:`WaitSlots.retake`)
before the waiter reads what it may have missed.

Per process: a count of waited-for tasks per slot; slots are taken and given back in one
statement, sent before the next read or wait (:meth:`WaitSlots.apply`).

**Senders.** Taking a task's slot costs its get a statement, and most gets wait for a task the
same thread has just sent. So a process also holds, in the same namespace, a *sender key* per
thread whose tasks it waits for (:func:`sender_key`, from the thread's ``reply_to``, which Celery
puts in every task message), and a store probes its task's sender key after its slot. A task
sent while its sender's key was held needs no slot and no first read: its store comes after the
publish, which came after the key was taken, so the store finds the key held and announces
(:meth:`WaitSlots.covers`). A thread's key is wanted from the first get of a task it sent
(taken with the next statement the session runs, that get's own) and held until the session
pauses (idle) or is lost, until :data:`SENDERS_MAX` other senders were waited for since, or
until the thread sends more than :data:`SENDS_AHEAD_MAX` tasks without a get of one. Such a
thread sends a batch, and announcing each of its results would cost a NOTIFY each where one read
gets dozens (see :mod:`.readahead`), so a get of one of its tasks wants the key again only once
fewer than that were sent after it. A task sent while its sender's key was not held (or not
wanted), or held since a later take, is waited for with its slot as before. Whatever goes wrong
(a writer that does not name the sender, a key given back early), the waiter's safety-net read
still finds the result: a lost key costs time, never a result.
"""

from __future__ import annotations

import threading
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import psycopg

from ..db import ProcessLocal, Queries

#: Wait slots per schema: a waiter holds at most this many locks.
SLOTS = 256
#: Sender keys a process holds at most (the senders waited for last): each is a lock on the
#: LISTEN session, and a process that starts a thread per request would otherwise gather them.
SENDERS_MAX = 64
#: A thread that sends more tasks than this without a get of one gives its sender key back at
#: once: it sends a batch, whose results are read ahead rather than each announced.
SENDS_AHEAD_MAX = 16
#: Senders whose count of tasks sent is kept (the last ones to send).
COUNTED_SENDERS_MAX = 4 * SENDERS_MAX


def wait_space(schema: str) -> int:
    """The advisory-lock namespace (first key) of a schema's wait slots."""
    return zlib.crc32(f"kojin_pg.waits:{schema}".encode()) - 2**31


def writing_space(schema: str) -> int:
    """The advisory-lock namespace of a schema's writing keys (one per wait slot)."""
    return zlib.crc32(f"kojin_pg.writing:{schema}".encode()) - 2**31


def wait_slot(task_id: str) -> int:
    """The wait slot (second key) of a task."""
    return zlib.crc32(task_id.encode()) % SLOTS


def sender_key(reply_to: str | None) -> int | None:
    """The sender key (second key, beside the wait slots: from :data:`SLOTS` up) of the thread
    whose task messages carry ``reply_to``; None without one."""
    if not reply_to:
        return None
    return SLOTS + zlib.crc32(reply_to.encode()) % (2**31 - 1 - SLOTS)


class Sending(NamedTuple):
    """How a task was sent, for its get (see :meth:`WaitSlots.sending`)."""

    #: its sender key
    key: int
    #: the take since which the key was held as the task was sent (None: it was not held)
    since: int | None
    #: how many tasks that sender had sent, this one included
    number: int


class _Held:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: set[str] = set()
        self.per_slot: Counter[int] = Counter()
        #: slots whose lock is held on the session now
        self.locked: set[int] = set()
        #: task ids no longer waited for, taken out of ``tasks`` at the next locked step
        #: (appending takes no lock: see :meth:`WaitSlots.discard`)
        self.discarded: deque[str] = deque()
        #: sender keys wanted, the one waited for last at the end, with how many tasks each
        #: sent since (see SENDS_AHEAD_MAX)
        self.senders: OrderedDict[int, int] = OrderedDict()
        #: sender keys held now, and which take of the session took each (see ``takes``)
        self.held_since: dict[int, int] = {}
        #: statements that took locks on the session so far (a sender key is held since one)
        self.takes = 0
        #: how many tasks each sender sent (the last COUNTED_SENDERS_MAX to send)
        self.sends: OrderedDict[int, int] = OrderedDict()

    def settle(self) -> None:
        """Take the discarded task ids out (under :attr:`lock`)."""
        while self.discarded:
            task_id = self.discarded.popleft()
            if task_id in self.tasks:
                self.tasks.discard(task_id)
                slot = wait_slot(task_id)
                self.per_slot[slot] -= 1
                if self.per_slot[slot] <= 0:
                    del self.per_slot[slot]


class WaitSlots:
    """The wait slots this process holds, for one schema."""

    def __init__(self, queries: Queries, schema: str) -> None:
        self.queries = queries
        self.space = wait_space(schema)
        self.writing_space = writing_space(schema)
        self._held: ProcessLocal[_Held] = ProcessLocal(_Held)

    def add(self, task_ids: Iterable[str]) -> list[str]:
        """Waiting for ``task_ids`` from now on (taken on the session by the next apply);
        returns those not waited for before."""
        h = self._held.get()
        added = []
        with h.lock:
            h.settle()
            for task_id in task_ids:
                if task_id not in h.tasks:
                    h.tasks.add(task_id)
                    h.per_slot[wait_slot(task_id)] += 1
                    added.append(task_id)
        return added

    def discard(self, task_ids: Iterable[str]) -> None:
        """No longer waiting for ``task_ids`` (given back by the next apply). Takes no lock:
        Celery before 5.5 calls it from ``AsyncResult.__del__``, which the garbage collector
        may run in a thread that holds this process's lock, in the middle of :meth:`add`."""
        h = self._held.peek()
        if h is not None:
            h.discarded.extend(task_ids)

    def pending(self) -> bool:
        """Whether the session's locks differ from what this process waits for."""
        h = self._held.get()
        with h.lock:
            h.settle()
            return h.locked != set(h.per_slot) | set(h.senders)

    # -- senders -----------------------------------------------------------------------------

    def want_sender(self, sent: Sending) -> None:
        """A task ``sent`` so is waited for here: hold its sender key from the next statement
        on (the :data:`SENDERS_MAX` waited for last are held), unless more than
        :data:`SENDS_AHEAD_MAX` tasks were sent with it since (a batch)."""
        h = self._held.get()
        with h.lock:
            if h.sends.get(sent.key, sent.number) - sent.number > SENDS_AHEAD_MAX:
                return
            h.senders[sent.key] = 0
            h.senders.move_to_end(sent.key)
            while len(h.senders) > SENDERS_MAX:
                h.senders.popitem(last=False)

    def sending(self, key: int | None) -> tuple[Sending | None, bool]:
        """A task is being sent with sender key ``key``: how (for :meth:`covers` when its
        result is waited for; None without a key), and whether the key is to be given back
        now (a batch, see :data:`SENDS_AHEAD_MAX`; then it is not held for this task)."""
        if key is None:
            return None, False
        h = self._held.get()
        with h.lock:
            number = h.sends.pop(key, 0) + 1
            h.sends[key] = number
            if len(h.sends) > COUNTED_SENDERS_MAX:
                h.sends.popitem(last=False)
            if key in h.senders:
                h.senders[key] += 1
                if h.senders[key] > SENDS_AHEAD_MAX:
                    del h.senders[key]
                    return Sending(key, None, number), key in h.locked
                return Sending(key, h.held_since.get(key), number), False
            return Sending(key, None, number), False  # not wanted: given back if held

    def covers(self, sent: Sending) -> bool:
        """Whether the store of a task ``sent`` so is announced: its sender key was held as it
        was sent, and has been since (a store probes it after the publish)."""
        if sent.since is None:
            return False
        h = self._held.peek()
        if h is None:
            return False
        with h.lock:
            return h.held_since.get(sent.key) == sent.since

    def apply(self, conn: psycopg.Connection[Any]) -> None:
        """Bring the session's locks in line with what this process waits for (one statement;
        ``conn`` is the LISTEN session, used under its lock)."""
        take, release = self._changes()
        if not take and not release:
            return
        conn.execute(self.queries.wait_slots, {
            "wait_space": self.space, "writing_space": self.writing_space, "take": take,
            "release": release}, prepare=False)
        self._changed(take, release)

    def apply_and_read(self, conn: psycopg.Connection[Any], task_id: str,
                       ahead: list[str], max_bytes: int) -> list[tuple[Any, ...]]:
        """:meth:`apply`, then read the result of ``task_id`` after the slots are taken, in
        one statement (the ``get_result`` columns; no row for it: not stored, or expired),
        with the final results of ``ahead`` stored in at most ``max_bytes`` (see
        :mod:`.readahead`)."""
        take, release = self._changes()
        rows = conn.execute(self.queries.wait_and_read,
                            self.read_params(task_id, ahead, max_bytes, take, release)).fetchall()
        self._changed(take, release)
        return rows

    def read_params(self, task_id: str, ahead: list[str], max_bytes: int,
                    take: list[int] | None = None,
                    release: list[int] | None = None) -> dict[str, Any]:
        """The parameters of ``wait_and_read``; with no slots to take or give back it is a
        plain read (and read ahead) that any session may run."""
        return {"wait_space": self.space, "writing_space": self.writing_space,
                "take": take or [], "release": release or [], "task_id": task_id,
                "ahead": ahead, "max_bytes": max_bytes}

    def _changes(self) -> tuple[list[int], list[int]]:
        """The slots and sender keys to take and to give back for the session to hold what is
        waited for."""
        h = self._held.get()
        with h.lock:
            h.settle()
            wanted = set(h.per_slot) | set(h.senders)
            return sorted(wanted - h.locked), sorted(h.locked - wanted)

    def _changed(self, take: list[int], release: list[int]) -> None:
        h = self._held.get()
        with h.lock:
            h.locked = (h.locked - set(release)) | set(take)
            for key in release:
                h.held_since.pop(key, None)
            if take:
                h.takes += 1
                for key in take:
                    if key >= SLOTS:
                        h.held_since[key] = h.takes

    def released(self) -> None:
        """The session gave back every lock (paused for idling, or lost): the next wait takes
        again the slots of whatever this process still waits for, and the sender keys; tasks
        sent meanwhile are waited for with their slots (see :meth:`covers`)."""
        h = self._held.get()
        with h.lock:
            h.locked = set()
            h.held_since.clear()

    def retake(self, conn: psycopg.Connection[Any]) -> None:
        """A new session holds nothing: take every slot again."""
        self.released()
        self.apply(conn)
