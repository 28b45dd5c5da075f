"""Acknowledgements: the one path from ``message.ack()`` to the DELETE of the message's row.

An ack must not make a task wait for a round trip. :meth:`AckBuffer.add` only records the
message id; the consumer's next claim takes the recorded ids and deletes them in the same
statement that leases new messages (:meth:`AckBuffer.take`), and whatever no claim took within
:data:`ACK_DELAY` seconds is deleted by the buffer's own flusher thread. An ack that cannot be
applied stays recorded and is tried again; until then its message is still leased by this
consumer, so it is not delivered to anyone else while this process lives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from ..db import ProcessLocal

log = logging.getLogger(__name__)

#: Seconds an ack may wait for the consumer's next claim before the flusher applies it.
ACK_DELAY = 0.005


class _Pending:
    """This process's recorded acks and the flusher thread that applies them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.waiting = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


class AckBuffer:
    """Acks recorded by this process and not yet applied in the database."""

    def __init__(self, apply: Callable[[list[int]], object]) -> None:
        #: Deletes the given message ids (one statement).
        self._apply = apply
        self._state: ProcessLocal[_Pending] = ProcessLocal(_Pending)

    def add(self, ids: Iterable[int]) -> None:
        """Record acks; they are applied with the next claim or within :data:`ACK_DELAY`."""
        p = self._state.get()
        with p.lock:
            p.ids.extend(ids)
            if p.thread is None or not p.thread.is_alive():
                p.stop.clear()
                p.thread = threading.Thread(target=self._run, args=(p,), daemon=True,
                                            name="kojin_pg-acks")
                p.thread.start()
        p.waiting.set()

    def take(self) -> list[int]:
        """Remove and return the recorded acks: the caller applies them (see :meth:`give_back`)."""
        p = self._state.get()
        with p.lock:
            ids, p.ids = p.ids, []
        return ids

    def give_back(self, ids: list[int]) -> None:
        """Record again acks that the caller took but could not apply."""
        if ids:
            p = self._state.get()
            with p.lock:
                p.ids[:0] = ids

    def pending(self) -> list[int]:
        """A copy of the recorded acks."""
        p = self._state.get()
        with p.lock:
            return list(p.ids)

    def flush(self) -> None:
        """Apply every recorded ack now (one DELETE)."""
        ids = self.take()
        if not ids:
            return
        try:
            self._apply(ids)
        except BaseException:
            self.give_back(ids)
            raise

    def _run(self, p: _Pending) -> None:
        while not p.stop.is_set():
            p.waiting.wait()
            p.waiting.clear()
            if p.stop.wait(ACK_DELAY):  # a claim may take them meanwhile
                return
            try:
                self.flush()
            except Exception as exc:  # kept: the next ack or claim tries again
                log.warning("kojin_pg: applying acks failed, will retry: %r", exc)

    def close(self) -> None:
        """Stop the flusher (joining it) and apply what is left; forget this process's state."""
        p = self._state.peek()
        if p is None:
            return
        p.stop.set()
        p.waiting.set()
        thread = p.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        try:
            self.flush()
        finally:
            self._state.pop()
