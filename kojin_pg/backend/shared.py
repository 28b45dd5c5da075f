"""One set of connections and waiters per process, app and database, however many backend
instances Celery builds.

Celery builds a result backend per thread unless the backend says it is thread-safe, and even
then threads that first ask for ``app.backend`` at the same moment each build one (the property
takes no lock). Each instance would hold a pool and, while waiting, a LISTEN session of its own
(woken by every notifying commit of the database) for the life of the process: 8 waiting
threads held 16 connections. So the instances of one app and one set of settings in a process
share what holds connections and what is waited for: the pool, the result consumer (its
listening session and wait slots, :mod:`.waiting`) and Celery's pending results and message
buffer. The first instance's are kept on the app, for as long as it lives; later ones adopt
them. A forked child inherits them with the app, as it inherits the app's backend: each of them
keeps what it holds per process (:class:`~kojin_pg.db.ProcessLocal`), so the child opens its
own connections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..db import Database, ProcessLocal


@dataclass(frozen=True)
class Shared:
    """What the backend instances of one app and one set of settings share in a process."""

    db: Database
    result_consumer: Any
    pending_results: Any
    pending_messages: Any


#: Serializes registration; a forked child makes its own (a lock copied held stays held).
_lock: ProcessLocal[threading.Lock] = ProcessLocal(threading.Lock)

#: The attribute of the app that holds its shared state: {settings: Shared}.
_ATTRIBUTE = "_kojin_pg_backend_shared"


def shared_state(app: Any, settings: Settings, build: Callable[[], Shared]) -> Shared:
    """The :class:`Shared` of ``app`` and ``settings``: the one registered on the app, else
    ``build()``'s, registered now (called under a lock, at most once)."""
    with _lock.get():
        per_settings: dict[Settings, Shared] = app.__dict__.setdefault(_ATTRIBUTE, {})
        found = per_settings.get(settings)
        if found is None:
            found = per_settings[settings] = build()
        return found
