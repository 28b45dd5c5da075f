"""What ends a consumer's sleep: a NOTIFY for one of its queues, or a local nudge.

Publishes announce their queue on the schema's messages channel; a consumer sleeps on its
:class:`~kojin_pg.db.Listener` for that channel. A nudge (an ack freed a prefetch slot, from any
thread) goes through a pipe that is watched beside the listening socket, by the blocking wait
below or by Celery's event loop.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg

from ..db import Database, Listener, ProcessLocal

#: Seconds a waiter whose LISTEN session is lost sleeps before it looks and tries again.
RELISTEN_SECONDS = 0.25


class _Pipe:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Wakeups:
    """The announcements and nudges of one transport, per process."""

    def __init__(self, db: Database, channel: str, *, enabled: bool,
                 on_connect: Callable[[psycopg.Connection[Any]], None] | None = None,
                 on_pause: Callable[[], None] | None = None,
                 private_channel: Callable[[], str] | None = None) -> None:
        self.listener = Listener(db, channel, role="broker", enabled=enabled,
                                 on_connect=on_connect, on_pause=on_pause,
                                 private_channel=private_channel)
        self._pipe: ProcessLocal[_Pipe] = ProcessLocal(_Pipe)

    def nudge(self) -> None:
        """Interrupt a wait (from any thread)."""
        pipe = self._pipe.peek()
        if pipe is not None:
            try:
                os.write(pipe.write_fd, b"!")
            except OSError:
                pass  # the pipe is full (a nudge is pending anyway) or closed

    def nudge_fd(self) -> int:
        """The descriptor that becomes readable on a nudge (for an event loop)."""
        return self._pipe.get().read_fd

    def clear_nudges(self) -> bool:
        """Empty the nudge pipe; whether there was a nudge."""
        pipe = self._pipe.peek()
        nudged = False
        if pipe is not None:
            try:
                while os.read(pipe.read_fd, 4096):
                    nudged = True
            except (BlockingIOError, OSError):
                pass
        return nudged

    def wait(self, timeout: float, queues: set[str]) -> None:
        """Block up to ``timeout`` seconds; return early on a nudge or news for ``queues``."""
        nudge_fd = self.nudge_fd()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            heard = self.listener.wait(left, wake_fd=nudge_fd)
            if heard is None:
                if self.listener.ensure():
                    return  # listening again: announcements were missed, look now
                # no announcements to wait for: poll, and while notifications are on, try
                # listening again soon (a lost session must not cost the whole interval)
                self._sleep(min(left, RELISTEN_SECONDS) if self.listener.enabled else left,
                            nudge_fd)
                return
            if self.clear_nudges() or (heard and (not queues or heard & queues)):
                return

    def _sleep(self, seconds: float, nudge_fd: int) -> None:
        poller = select.poll()
        poller.register(nudge_fd, select.POLLIN)
        poller.poll(seconds * 1000.0)
        self.clear_nudges()

    def close(self) -> None:
        """Close this process's listening connection and pipe."""
        self.listener.close()
        pipe = self._pipe.pop()
        if pipe is not None:
            pipe.close()
