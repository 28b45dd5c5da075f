"""Claims for Celery's event loop, run on a thread of their own so the loop never waits.

A claim is a database round trip. Run on the event loop (the kombu hub), it stalls everything
else the loop does meanwhile: in a prefork worker the main process dispatches tasks to the
pool's children, reads their results and sends their acks on that loop, so each freed slot used
to cost the whole worker one round trip. Here the loop only asks (:meth:`Claimer.request`); this
process's claim thread runs the claim and posts what it leased back through a pipe that the loop
watches, and the loop delivers it (:meth:`Claimer.on_ready`). Requests that arrive while a
claim is under way are merged into the next one, so a burst of acks costs one claim, not one
each.

Lifecycle: the thread starts on the first request and is stopped and joined by
:meth:`Claimer.stop` when the transport closes, before it hands back leases: a claim committed
but not delivered by then is still leased by this consumer, and the transport's close hands it
back (see ``Transport._release_unknown_leases``). A claim that outlasts the close's wait (a
database that hangs, or a claim retried through an outage while Celery reconnects) is
abandoned: when it ends, the thread closes its own pipe (the process may have reused the
numbers of a pipe closed earlier) and calls ``abandoned`` to hand back what it leased. A forked
child starts with no thread and a pipe of its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from ..db import ProcessLocal

log = logging.getLogger(__name__)

#: What one claim asks: (channel, queues, how many).
Ask = tuple[Any, list[str], int]
#: What one claim returned: (channel, [(payload, queue), ...], how many it asked for: fewer
#: than the plan's when hand-offs or an open offer hold slots; a full batch means more may be
#: ready).
Got = tuple[Any, list[tuple[dict[str, Any], str]], int]


@dataclass
class _State:
    """This process's claim thread, its work and its pipe to the event loop."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Condition = field(init=False)
    asks: list[Ask] | None = None
    #: A request came while a claim was under way: claim again when it is delivered.
    again: bool = False
    again_announced: AbstractSet[str] | None = None
    busy: bool = False
    results: list[Got] = field(default_factory=list)
    error: BaseException | None = None
    stopping: bool = False
    #: stop() gave up waiting for the thread: the pipe is the thread's to close.
    abandoned: bool = False
    #: The thread has ended (set by the thread itself, under the lock).
    finished: bool = False
    thread: threading.Thread | None = None
    read_fd: int = -1
    write_fd: int = -1

    def __post_init__(self) -> None:
        self.wake = threading.Condition(self.lock)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def close_pipe(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Claimer:
    """Runs the event loop's claims on a thread and hands their messages back to the loop."""

    def __init__(self, plan: Callable[[AbstractSet[str] | None], list[Ask]],
                 claim: Callable[[Any, list[str], int],
                                 tuple[list[tuple[dict[str, Any], str]], int]],
                 abandoned: Callable[[], None] | None = None) -> None:
        #: What to claim now (on the loop thread): the channels with free prefetch slots and
        #: their queues (only the ``announced`` ones, if given).
        self._plan = plan
        #: Run one claim (on the claim thread): what it leased, and how many it asked for.
        self._claim = claim
        #: Called on the claim thread when a claim that :meth:`stop` gave up waiting for has
        #: ended: nobody receives what it leased.
        self._abandoned = abandoned
        self._state: ProcessLocal[_State] = ProcessLocal(_State)

    def ready_fd(self) -> int:
        """The descriptor that becomes readable when claimed messages wait for delivery."""
        return self._state.get().read_fd

    def request(self, announced: AbstractSet[str] | None = None) -> bool:
        """Ask for a claim (from the loop thread); False if there was nothing to ask for."""
        s = self._state.get()
        with s.lock:
            if s.busy or s.results or s.error is not None:
                # one claim at a time, and none before the last one's messages are delivered
                # (its batch counts against the prefetch slots): ask once more after that
                if not s.again:
                    s.again_announced = announced
                elif s.again_announced is not None:
                    s.again_announced = (None if announced is None
                                         else s.again_announced | announced)
                s.again = True
                return True
        asks = self._plan(announced)
        if not asks:
            return False
        with s.lock:
            if s.stopping:
                return False
            s.asks = asks
            s.busy = True
            if s.thread is None or not s.thread.is_alive():
                s.thread = threading.Thread(target=self._run, args=(s,), daemon=True,
                                            name="kojin_pg-claims")
                s.thread.start()
            s.wake.notify()
        return True

    def take(self) -> tuple[list[Got], BaseException | None, AbstractSet[str] | None, bool]:
        """On the loop thread, when :meth:`ready_fd` is readable: the claimed messages, the
        claim's error if it failed, and whether (and for which queues) to claim again."""
        s = self._state.get()
        try:
            while os.read(s.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with s.lock:
            results, s.results = s.results, []
            error, s.error = s.error, None
            if s.busy:  # woken early: the claim under way asks again when it is done
                return results, error, None, False
            again, announced = s.again, s.again_announced
            s.again, s.again_announced = False, None
        return results, error, announced, again

    def _run(self, s: _State) -> None:
        try:
            self._serve(s)
        finally:
            with s.lock:
                s.finished = True
                abandoned = s.abandoned
            if abandoned:
                s.close_pipe()
                if self._abandoned is not None:
                    try:
                        self._abandoned()
                    except Exception as exc:
                        log.warning("kojin_pg: after an abandoned claim: %r", exc)

    def _serve(self, s: _State) -> None:
        while True:
            with s.lock:
                while s.asks is None and not s.stopping:
                    s.wake.wait()
                if s.stopping:
                    s.busy = False
                    return
                asks, s.asks = s.asks, None
            results: list[Got] = []
            error: BaseException | None = None
            for channel, queues, n in asks:
                try:
                    results.append((channel, *self._claim(channel, queues, n)))
                except BaseException as exc:  # the loop raises it, as a claim on it would
                    error = exc
                    break
            with s.lock:
                s.results.extend(results)
                s.error = error
                s.busy = False
                if s.abandoned:
                    return  # nobody watches the pipe
            try:
                os.write(s.write_fd, b"!")
            except OSError:
                pass  # the pipe is full: the loop has a wake-up pending anyway

    def stop(self, timeout: float = 10.0) -> list[Got]:
        """Stop the thread after its claim under way (joining it); return what it claimed and
        nobody delivered, for the caller to hand back. After ``timeout`` seconds the claim is
        abandoned (see the module's docstring)."""
        s = self._state.pop()
        if s is None:
            return []
        with s.lock:
            s.stopping = True
            s.wake.notify()
            thread = s.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with s.lock:
            results, s.results = s.results, []
            if thread is not None and not s.finished:
                s.abandoned = True
        if s.abandoned:
            log.warning("kojin_pg: the claim thread did not stop within %gs; what its claim "
                        "leases goes back when the claim ends", timeout)
        else:
            s.close_pipe()
        return results
