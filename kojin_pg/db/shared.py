"""One :class:`~kojin_pg.db.Database` per process and set of connection settings, shared by the
objects that ask for it, and closed with the last of them.

Celery's worker holds several kombu connections (consuming, remote control, publishing), and its
producer pool one for each thread that published; each built a transport with a pool of its
own, open for the life of the process, so a web process whose 8 threads had each sent a task
held 8 connections. Transports with equal settings share one Database instead: its pool grows
with the statements in flight and shrinks after ``max_idle``. :func:`acquire` counts the users
of each, :func:`release` closes it when the last one is gone. A forked child counts afresh (a
Database keeps its pool per process already): what it inherited is closed for it alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from .forksafe import ProcessLocal
from .pool import Database


class _Shared:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: key -> [database, users]
        self.by_key: dict[Hashable, list[Any]] = {}


_shared: ProcessLocal[_Shared] = ProcessLocal(_Shared)


def acquire(key: Hashable, build: Callable[[], Database]) -> Database:
    """This process's Database for ``key`` (``build()``'s if there is none), with one more
    user; give it back with :func:`release`."""
    shared = _shared.get()
    with shared.lock:
        entry = shared.by_key.get(key)
        if entry is None:
            entry = shared.by_key[key] = [build(), 0]
        entry[1] += 1
        return entry[0]


def release(db: Database) -> None:
    """One user of ``db`` is done with it: close its pool if that was the last user (or if it
    was never shared in this process)."""
    shared = _shared.get()
    with shared.lock:
        for key, entry in shared.by_key.items():
            if entry[0] is db:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del shared.by_key[key]
                break
    db.close()
