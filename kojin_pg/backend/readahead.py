"""Reading ahead: the finished results of tasks this process sent, read with the one asked for.

A caller that sends many tasks and then gets their results one by one (``[r.get() for r in
results]``) would otherwise pay a statement per result, although most are stored by the time it
asks. Redis's backend has no such cost: the caller subscribes to each task it sends, and the
results reach it with no request. Here the read of one result also reads the finished, small
results of other tasks this process sent and has not read yet, and keeps them for the gets that
follow (:meth:`ReadAhead.take`).

Results announced with their value (see :mod:`.announce`) for tasks sent here and not asked for
yet are kept the same way, as they are heard (:meth:`ReadAhead.heard`): a get that needs no read
(see :mod:`.waiters`, senders) may come after its result's announcement.

How far ahead it reads adapts: twice as many as the last read found finished (at least one, at
most :data:`WINDOW_MAX`), so a caller whose tasks are still running pays for one extra id per
read, and one collecting finished work reads them dozens at a time.

Everything here is per process (a forked child starts empty) and bounded: at most
:data:`SENT_MAX` sent task ids (the oldest are forgotten first) and :data:`KEPT_MAX` results read
ahead and not yet asked for (likewise). A result is kept only if it is final (a final state is
never overwritten) and small (:data:`KEPT_BYTES_MAX` bytes stored); ``forget()`` drops it.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from celery import states

from ..db import ProcessLocal
from .waiters import Sending

#: Task ids sent by this process and not read yet that are remembered for reading ahead: about
#: 2 MB at most. (Redis's backend subscribes to every task sent, without a bound.)
SENT_MAX = 10_000
#: Results read ahead and not asked for yet that are kept.
KEPT_MAX = 1000
#: The most task ids read ahead with one read.
WINDOW_MAX = 64
#: The largest result that is read ahead: every column a read returns, as stored, uncompressed.
KEPT_BYTES_MAX = 2000


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: task id -> how it was sent (None: no sender key)
        self.sent: OrderedDict[str, Sending | None] = OrderedDict()
        self.kept: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.window = 1


class ReadAhead:
    """The task ids this process sent, and the results read ahead for them."""

    def __init__(self) -> None:
        self._state: ProcessLocal[_State] = ProcessLocal(_State)

    def sent(self, task_id: str, sending: Sending | None = None) -> None:
        """Remember that this process sent ``task_id`` (and may ask for its result), and how
        (see :mod:`.waiters`)."""
        s = self._state.get()
        with s.lock:
            s.sent[task_id] = sending
            if len(s.sent) > SENT_MAX:
                s.sent.popitem(last=False)

    def sender_of(self, task_id: str) -> Sending | None:
        """How ``task_id`` was sent; None if it was not sent here with a sender key, or its
        result was read or announced since."""
        s = self._state.peek()
        if s is None:
            return None
        with s.lock:
            return s.sent.get(task_id)

    def heard(self, announced: dict[str, dict[str, Any]], ids: Iterable[str],
              to_meta: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Results were announced: those with their value (``announced``, decoded, made metas
        by ``to_meta``) are kept if final and sent from here; those announced by id (``ids``)
        are no longer awaited by announcement: their gets read."""
        s = self._state.peek()
        if s is None or not s.sent:
            return
        with s.lock:
            for task_id, payload in announced.items():
                if task_id in s.sent and payload.get("status") in states.READY_STATES:
                    del s.sent[task_id]
                    s.kept[task_id] = to_meta(payload)
            for task_id in ids:
                s.sent.pop(task_id, None)
            while len(s.kept) > KEPT_MAX:
                s.kept.popitem(last=False)

    def ahead_of(self, task_id: str) -> list[str]:
        """The task ids to read with ``task_id``: the oldest sent ones, as many as the window.

        For a task not remembered (sent elsewhere, or forgotten: a caller that sent more than
        :data:`SENT_MAX` and gets them in order asks for those first), no more than the kept
        results have room for: what is read ahead then is asked for only later, and would
        push out of :data:`KEPT_MAX` what was read ahead before it was asked for, to be read
        again. A get of a task remembered reads ahead the whole window: the caller is at the
        oldest it sent."""
        s = self._state.peek()
        if s is None:
            return []
        with s.lock:
            if not s.sent:
                return []
            window = s.window if task_id in s.sent else min(s.window, KEPT_MAX - len(s.kept))
            candidates = (t for t in s.sent if t != task_id)
            return list(itertools.islice(candidates, max(0, window)))

    def read(self, task_id: str, ahead: list[str], metas: list[dict[str, Any]]) -> None:
        """``task_id`` was read with ``ahead``, which gave ``metas`` (final ones only): keep
        those for later, and size the next window by how many were found."""
        s = self._state.peek()
        if s is None:
            return
        with s.lock:
            s.sent.pop(task_id, None)
            for meta in metas:
                found = meta["task_id"]
                s.sent.pop(found, None)
                s.kept[found] = meta
            while len(s.kept) > KEPT_MAX:
                s.kept.popitem(last=False)
            if ahead:
                s.window = max(1, min(WINDOW_MAX, 2 * len(metas)))

    def take(self, task_id: str) -> dict[str, Any] | None:
        """The result of ``task_id`` if it was read ahead (it is then given out only once)."""
        s = self._state.peek()
        if s is None:
            return None
        with s.lock:
            s.sent.pop(task_id, None)
            return s.kept.pop(task_id, None)

    def read_elsewhere(self, task_ids: Iterable[str]) -> None:
        """The final results of ``task_ids`` were read some other way (a group's join, a
        state check): nothing need be read ahead for them."""
        s = self._state.peek()
        if s is None:
            return
        with s.lock:
            for task_id in task_ids:
                s.sent.pop(task_id, None)
                s.kept.pop(task_id, None)

    def forget(self, task_id: str) -> None:
        """Drop anything remembered for ``task_id`` (its result was forgotten)."""
        self.take(task_id)
