"""Waiting for results without polling: LISTEN on one channel per schema.

Every stored result someone may wait for is announced with ``pg_notify`` by the statement that
writes it (with a commit that does not wait for the WAL flush, see sql/0013): a small one with
its value (see :mod:`.announce`), which a waiter here takes as it is, others by task id. Each
process listens on one connection (:class:`~kojin_pg.db.Listener`), and a wake-up reads the
announced-by-id results that someone here waits for, in one query. As a safety net (a dropped
listening connection, a result written by something that does not notify, such as an older
version during a rolling deploy, or an announcement lost with its writer's connection), the
awaited results are read at least every :data:`SAFETY_NET_SECONDS` while waiting, whether the
channel is quiet or busy with others' results. With ``use_notify`` off, or while the listening
connection is down, it polls every ``polling_interval`` instead.

A get of a task that a thread of this process sent while its sender key was held (see
:mod:`.waiters`, senders) runs no statement at all: its result is announced when stored, and
heard by whichever thread reads the connection then, before the get or during it (see
:mod:`.readahead`). Should such a result turn up in a safety-net read instead, and its
announcement not follow within :data:`SAFETY_NET_SECONDS` (a writer that does not name its
sender: an older version during a rolling deploy, workers with ``use_notify`` off), this process
waits with slots again for :data:`UNANNOUNCED_PAUSE_SECONDS`. (A read may see a commit a moment
before its notification arrives: one found so is not yet taken for unannounced.)
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import psycopg
from celery import states
from celery.backends import asynchronous
from celery.backends.asynchronous import BaseResultConsumer

from ..db import Listener, ProcessLocal
from .announce import split_heard
from .readahead import KEPT_BYTES_MAX, SENT_MAX, ReadAhead
from .waiters import Sending, WaitSlots

log = logging.getLogger(__name__)

#: A process waiting for results reads them at least this often, announced or not.
SAFETY_NET_SECONDS = 1.0

#: How long a process waits with slots only after a result it waited for by its sender key was
#: stored without being announced.
UNANNOUNCED_PAUSE_SECONDS = 60.0

#: Celery 5.7 keeps every result object that waits for a task id; before, only the first one.
CELERY_KEEPS_EVERY_WAITER = hasattr(asynchronous, "_waiting_on")


class _AlsoWaiting:
    """Result objects waiting for a task id beside the one Celery < 5.7 keeps (see
    :meth:`ResultConsumer.also_waits`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_task: dict[str, dict[int, Any]] = {}


class _Readers:
    """Who reads the listening connection in this process; the others wait for its news.

    A waiting thread is woken when the reader delivers the result it waits for, or when the
    reader lets go and it is the one to read next: not at every delivery. (Woken each time, 32
    waiting threads called ``drain_events`` 10 times per task between them.)"""

    def __init__(self) -> None:
        #: the reader's role
        self.lock = threading.Lock()
        #: guards ``waiting``
        self.guard = threading.Lock()
        #: the threads waiting for the reader's news, by thread: the result each waits for (a
        #: weak reference; None: several, or not known) and its event
        self.waiting: dict[int, tuple[weakref.ref[Any] | None, threading.Event]] = {}
        self._events = threading.local()
        #: when the awaited results were last read, announced or not
        self.read_at = time.monotonic()

    def wait_for_news(self, awaited: Any, timeout: float) -> None:
        """Wait up to ``timeout`` seconds while another thread reads, until it delivers
        ``awaited`` (a result object, or None) or lets go."""
        event = getattr(self._events, "event", None)
        if event is None:
            event = self._events.event = threading.Event()
        event.clear()
        me = threading.get_ident()
        with self.guard:
            self.waiting[me] = (None if awaited is None else weakref.ref(awaited), event)
        try:
            if self.lock.locked() and not _is_ready(awaited):
                event.wait(timeout)
        finally:
            with self.guard:
                self.waiting.pop(me, None)

    def delivered(self, task_id: str) -> None:
        """The result of ``task_id`` was handed on: wake the threads waiting for it."""
        with self.guard:
            for ref, event in self.waiting.values():
                awaited = ref() if ref is not None else None
                if awaited is not None and awaited.id == task_id:
                    event.set()

    def hand_on(self) -> None:
        """The reader let go: wake one waiting thread whose result is not in, to read next
        (and every thread waiting for several results, as they cannot tell)."""
        with self.guard:
            chosen = False
            for ref, event in self.waiting.values():
                if ref is None:
                    event.set()
                elif not chosen and not _is_ready(ref()):
                    event.set()
                    chosen = True


def _is_ready(result: Any) -> bool:
    """Whether a result object's wait is over (Celery fulfils its ``on_ready`` promise)."""
    return result is not None and bool(result.on_ready.ready)


class ResultConsumer(BaseResultConsumer):
    """Celery's async result consumer, fed by PostgreSQL notifications."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.backend.settings
        #: The wait slots of the tasks waited for here (see :mod:`.waiters`).
        self.slots = WaitSlots(self.backend.queries, settings.schema)
        self.listener = Listener(self.backend.db, self.backend.channel, role="results",
                                 enabled=settings.use_notify, on_connect=self.slots.retake,
                                 on_pause=self.slots.released)
        self._readers: ProcessLocal[_Readers] = ProcessLocal(_Readers)
        #: Per thread: on_wait_for_pending delivered what it waited for (see drain_events). The
        #: threads of a process share this consumer (see .shared), so another thread's drain
        #: must not take it.
        self._this_thread = threading.local()
        #: The tasks this process sent, and the results read ahead for them.
        self.readahead = ReadAhead()
        self._also: ProcessLocal[_AlsoWaiting] = ProcessLocal(_AlsoWaiting)
        #: Tasks waited for by their sender key (no slot), until delivered or given up.
        self._by_sender: ProcessLocal[set[str]] = ProcessLocal(set)
        #: Results waited for by their sender key that a safety-net read found before their
        #: announcement was heard, and until when it may still come (read under the reader role).
        self._unheard: ProcessLocal[dict[str, float]] = ProcessLocal(dict)
        #: Until when gets wait with slots only (see UNANNOUNCED_PAUSE_SECONDS).
        self._senders_off_until = 0.0

    # -- several result objects waiting for one task (Celery < 5.7) ------------------------

    def also_waits(self, task_id: str, result: Any) -> None:
        """``result`` waits for ``task_id`` too, beside the result object Celery keeps: the
        threads of a process share one backend (see .shared), so two of them may wait for one
        task, and Celery before 5.7 would leave the second waiting out its timeout. It gets the
        result with the first; until then its task id stays awaited (see :meth:`_awaited`),
        even if the first is read some other way (``ready()``), until the task is forgotten."""
        also = self._also.get()
        with also.lock:
            also.by_task.setdefault(task_id, {})[id(result)] = result

    def forget_also_waiting(self, task_id: str) -> None:
        """``task_id`` was forgotten: nobody waits for it any more."""
        also = self._also.peek()
        if also is not None:
            with also.lock:
                also.by_task.pop(task_id, None)

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        """Celery's delivery to the result object it keeps, and to those that also wait."""
        also = self._also.peek()
        others: list[Any] = []
        if also is not None and also.by_task and meta["status"] in states.READY_STATES:
            with also.lock:
                others = list(also.by_task.pop(meta["task_id"], {}).values())
        super().on_state_change(meta, message)
        for result in others:
            result._maybe_set_cache(meta)
        if meta["status"] in states.READY_STATES:
            self._by_sender.get().discard(meta["task_id"])
            readers = self._readers.peek()
            if readers is not None:
                readers.delivered(meta["task_id"])

    # -- BaseResultConsumer ------------------------------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        """Start listening (if not yet) for ``initial_task_id``."""
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Make sure results announced from now on reach this process."""
        self.backend.ensure_ready()
        self.listener.ensure()
        self.slots.add((task_id,))

    def cancel_for(self, task_id: str) -> None:
        """Waiting for ``task_id`` is over: its writer need not announce it any more."""
        self.slots.discard((task_id,))
        by_sender = self._by_sender.peek()
        if by_sender is not None:
            by_sender.discard(task_id)  # one step under the GIL: no lock (see WaitSlots.discard)

    def sent(self, task_id: str, sender: int | None) -> None:
        """This thread sends ``task_id`` with sender key ``sender`` (see :mod:`.waiters`)."""
        sending, give_back = self.slots.sending(sender)
        if give_back:
            self.sync_slots()  # a batch: its results are read ahead, not each announced
        self.readahead.sent(task_id, sending)

    def hold(self, task_ids: Iterable[str]) -> list[str]:
        """Wait for ``task_ids`` (before reading them); returns those to :meth:`let_go` after."""
        added = self.slots.add(task_ids)
        self.sync_slots()
        return added

    def let_go(self, task_ids: Iterable[str]) -> None:
        """Stop waiting for ``task_ids`` (from :meth:`hold`)."""
        self.slots.discard(task_ids)

    def sync_slots(self) -> None:
        """Tell the writers what this process waits for now: before any read of it. Always
        under the session's lock, even when nothing seems pending: another thread's apply may
        be in flight, and until it ends its slots are not what :meth:`WaitSlots.pending` says
        (one it gives back still looks held)."""
        if self.listener.enabled:
            self.listener.run(self.slots.apply)

    def stop(self) -> None:
        """Close the listening connection."""
        self.listener.close()

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # Listening is on already (consume_from ran). Whatever was stored before is read here
        # (or was read ahead, see .readahead); whatever is stored later is announced, once the
        # wait slot is taken (see .waiters). For one task, the slot and the read go in one
        # statement on the LISTEN session, always (under the session's lock: another thread's
        # slot change may be in flight).
        single = not hasattr(result, "results")
        self._this_thread.awaiting = weakref.ref(result) if single else None
        if single:
            sent = self.readahead.sender_of(result.id)  # (take forgets it)
            kept = self.readahead.take(result.id)
            if kept is not None:
                self._handle(kept)
                self._this_thread.delivered_on_wait = True
                return
            if self._by_sender_key(result.id, sent):
                self._this_thread.delivered_on_wait = False
                return
            ahead = self.readahead.ahead_of(result.id)
            if not self.listener.enabled:
                rows = self.backend.read_and_read_ahead(result.id, ahead, KEPT_BYTES_MAX)
                self._this_thread.delivered_on_wait = self._handle_read(result.id, ahead, rows)
                return
            rows: list[tuple[Any, ...]] = []

            def take_and_read(conn: psycopg.Connection[Any]) -> None:
                rows.extend(self.slots.apply_and_read(conn, result.id, ahead, KEPT_BYTES_MAX))

            if self.listener.run(take_and_read):
                self._this_thread.delivered_on_wait = self._handle_read(result.id, ahead, rows)
                return
        # Several tasks (a ResultSet), or the session down: read, and if not all are ready,
        # take the slots and read once more (even if they are held by now: another thread
        # may have taken them after our read).
        if self._read(result, **kwargs):
            self._this_thread.delivered_on_wait = True
            return
        if not self.listener.enabled:
            return
        self.sync_slots()
        self._read(result, **kwargs)

    def _by_sender_key(self, task_id: str, sent: Sending | None) -> bool:
        """Whether ``task_id`` (``sent`` so from here) is announced when stored because its
        sender key was held from before it was sent until now (see :mod:`.waiters`, senders):
        then it needs no slot and no read. Either way its sender's tasks are waited for from
        now on (unless it sends batches)."""
        if sent is None or not self.listener.enabled:
            return False
        self.slots.want_sender(sent)
        if time.monotonic() < self._senders_off_until or not self.slots.covers(sent):
            return False
        by_sender = self._by_sender.get()
        if len(by_sender) > SENT_MAX:
            by_sender.clear()  # only told apart for the check in _safety_net_read
        by_sender.add(task_id)
        self.slots.discard((task_id,))  # its slot (consume_from) is not needed: not taken
        return True

    def _handle_read(self, task_id: str, ahead: list[str], rows: list[tuple[Any, ...]]) -> bool:
        """Hand on the read of ``task_id`` and keep the results read ahead with it (the rows of
        other tasks); whether ``task_id`` is ready."""
        metas = [self.backend._row_to_meta(row) for row in rows]
        asked = [meta for meta in metas if meta["task_id"] == task_id]
        self.readahead.read(task_id, ahead, [meta for meta in metas if meta["task_id"] != task_id])
        for meta in asked:
            self._handle(meta)
        return any(meta["status"] in states.READY_STATES for meta in asked)

    def _handle(self, meta: dict[str, Any]) -> None:
        """Hand a meta read directly to its waiters."""
        self.on_state_change(meta, None)
        if meta["status"] in states.READY_STATES:
            # read directly, so nothing else takes it out of the buffer again
            buffered = self._pending_messages.pop(meta["task_id"], None)
            if buffered is not None:
                self._pending_messages.total -= len(buffered)

    def _read(self, result: Any, **kwargs: Any) -> bool:
        """Read the results ``result`` waits for; whether all of them are ready."""
        ready = True
        for meta in result._iter_meta(**kwargs):
            if meta is None or meta["status"] not in states.READY_STATES:
                ready = False
            if meta is not None:
                self._handle(meta)
        return ready

    def drain_events(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for announced results and hand them to their waiters."""
        if getattr(self._this_thread, "delivered_on_wait", False) and not self._awaited():
            # Celery < 5.5 drains once more after on_wait_for_pending has delivered the
            # result; with nothing else awaited, that wait would sit out its whole timeout.
            # (Only then: a green drainer calls this in a loop, and must keep waiting.)
            self._this_thread.delivered_on_wait = False
            return
        wait = 1.0 if timeout is None else max(timeout, 0.0)
        readers = self._readers.get()
        if not readers.lock.acquire(blocking=False):
            # Another thread reads the connection; whatever it reads for us, it delivers. It
            # wakes this thread then, or when it lets go and this one is to read next.
            awaiting = getattr(self._this_thread, "awaiting", None)
            awaited = awaiting() if awaiting is not None else None
            readers.wait_for_news(awaited, wait)
            if _is_ready(awaited):
                if not readers.lock.locked():
                    readers.hand_on()  # woken to read next, but done: another one reads
                return
            if not readers.lock.acquire(blocking=False):
                return
        try:
            self.sync_slots()
            heard = self.listener.wait(wait)
            if heard is None:
                if self.listener.ensure():
                    # listening again (after a pause or a reconnect), and some may have been
                    # missed: read them; from now on announcements wake the next wait
                    self._deliver(self._awaited())
                else:
                    self._poll(wait)  # not listening: read what we wait for, then nap
                return
            if heard:
                self._deliver_heard(heard)
            # heard nothing, or heard only others' results for a while: the safety-net read
            if not heard or time.monotonic() - readers.read_at >= SAFETY_NET_SECONDS:
                readers.read_at = time.monotonic()
                self._safety_net_read()
        finally:
            readers.lock.release()
            readers.hand_on()

    # -- helpers -----------------------------------------------------------------------------

    def _awaited(self) -> set[str]:
        while True:
            try:
                ids: set[str] = set()
                for mapping in self._pending_results:
                    ids.update(mapping.keys())
                break
            except RuntimeError:
                # another thread added a result object meanwhile (the backend is shared, see
                # .shared): a WeakValueDictionary's keys then fail to iterate; read them again
                continue
        also = self._also.peek()
        if also is not None and also.by_task:
            with also.lock:
                ids.update(also.by_task)
        return ids

    def _deliver_heard(self, heard: set[str], skip: set[str] | frozenset[str] = frozenset()
                       ) -> set[str]:
        """Hand announced results to their waiters here (but those of ``skip``): those
        announced with their value as they are, the others after one read. Final results of
        tasks sent from here and not waited for yet are kept for their gets (before the
        waiters are looked up: a get that starts meanwhile finds its result kept, or is
        among them). Returns the task ids announced."""
        ids, results = split_heard(heard)
        announced = ids | results.keys()
        self.readahead.heard(results, ids, self.backend.announced_meta)
        unheard = self._unheard.peek()
        if unheard:
            for task_id in announced:
                unheard.pop(task_id, None)
        awaited = self._awaited() - skip
        for task_id in results.keys() & awaited:
            # handed on here, not again to its get (kept above if it was sent from here)
            meta = self.readahead.take(task_id) or self.backend.announced_meta(results[task_id])
            self.on_state_change(meta, True)
        self._deliver(ids & awaited)
        return announced

    def _deliver(self, task_ids: Iterable[str]) -> set[str]:
        """Read ``task_ids`` and hand their results on; the ids of those that were final."""
        metas = self.backend.fetch_metas(task_ids)
        for meta in metas.values():
            self.on_state_change(meta, True)
        return {t for t, m in metas.items() if m["status"] in states.READY_STATES}

    def _safety_net_read(self) -> None:
        """Read everything waited for here. A final result among them that was waited for by
        its sender key, and whose announcement is not heard within SAFETY_NET_SECONDS, was
        stored without being announced to it: then wait with slots for a while."""
        by_sender = set(self._by_sender.get())
        found = self._deliver(self._awaited()) & by_sender
        unheard = self._unheard.get()
        now = time.monotonic()
        unannounced = [t for t, until in unheard.items() if until <= now]
        for task_id in found:
            unheard.setdefault(task_id, now + SAFETY_NET_SECONDS)
        if len(unheard) > SENT_MAX:
            unheard.clear()
        if unannounced:
            unheard.clear()
            self._senders_off_until = now + UNANNOUNCED_PAUSE_SECONDS
            log.info("kojin_pg: %d result(s) waited for by their sender were stored without "
                     "being announced (a writer of an older kojin_pg version, or with use_notify "
                     "off): waiting with wait slots for the next %.0f s", len(unannounced),
                     UNANNOUNCED_PAUSE_SECONDS)

    def _poll(self, wait: float) -> None:
        if not self._deliver(self._awaited()):
            time.sleep(min(wait, self.backend.settings.polling_interval))

    def wait_for_any(self, task_ids: set[str], timeout: float) -> None:
        """Sleep until one of ``task_ids`` may have changed, or ``timeout`` passes (get_many)."""
        if timeout <= 0:
            return
        readers = self._readers.get()
        if readers.lock.acquire(blocking=False):
            try:
                self.listener.ensure()
                self.sync_slots()
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    heard = self.listener.wait(left)
                    if heard is None:
                        if self.listener.ensure():
                            return  # listening again, some may have been missed: read now
                        break  # not listening: nap below, then the caller reads
                    # announcements for other waiters of this process reach them too
                    if self._deliver_heard(heard, skip=task_ids) & task_ids:
                        return
                else:
                    return
            finally:
                readers.lock.release()
                readers.hand_on()
        time.sleep(min(timeout, self.backend.settings.polling_interval))
