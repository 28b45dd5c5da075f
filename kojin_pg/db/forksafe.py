"""Per-process resources: one mechanism that keeps a forked child off its parent's resources.

Celery's prefork pool forks worker children from a process that may already hold pools, LISTEN
connections, pipes, locks and threads. A child must never use or close its parent's sockets
(that would end the parent's sessions), and a lock copied while another thread held it would
stay locked forever. :class:`ProcessLocal` holds a value for the process that created it; in
any other process it builds a fresh one, and the parent's copy is simply forgotten.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Serializes first-time creation in a process; replaced in every child (never inherited held).
_creation_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _creation_lock
    _creation_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


class ProcessLocal(Generic[T]):
    """A value owned by one process, made on first use by ``factory`` in each process.

    ``factory`` may raise: nothing is stored, and the next :meth:`get` tries again.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._pid: int | None = None
        self._value: T | None = None

    def get(self) -> T:
        """This process's value, made now if this process has none yet."""
        if self._pid == os.getpid():
            return self._value  # type: ignore[return-value]
        with _creation_lock:
            if self._pid != os.getpid():
                value = self._factory()
                self._value, self._pid = value, os.getpid()
        return self._value  # type: ignore[return-value]

    def peek(self) -> T | None:
        """This process's value if it has one already, else None (never the parent's)."""
        return self._value if self._pid == os.getpid() else None

    def pop(self) -> T | None:
        """Forget this process's value and return it (for the caller to close), if any."""
        value = self.peek()
        self._value, self._pid = None, None
        return value
