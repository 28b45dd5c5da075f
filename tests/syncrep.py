"""A synchronous standby that never confirms: commits that wait to be durable wait for ever.

A commit with ``synchronous_commit = on`` waits, once its WAL is flushed, for the standbys that
``synchronous_standby_names`` names to confirm it; naming one that does not exist holds every
such commit until the name is taken back (commits at ``local`` or ``off`` do not wait). The
tests use it to hold one commit at the moment it waits to be durable, as a slow WAL flush
would, and to see what waits behind it. Needs a superuser (``ALTER SYSTEM``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from bounded import BOUND, until


def waiting_for_the_standby(admin: psycopg.Connection[Any]) -> int:
    """How many backends wait for a synchronous standby to confirm their commit."""
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                        ).fetchone()
    return int(row[0]) if row else 0


class HeldCommits:
    """Threads whose commits may wait on the standby: all joined when it is taken back."""

    def __init__(self, admin: psycopg.Connection[Any]) -> None:
        self.admin = admin
        self.threads: list[threading.Thread] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        """Run ``fn(*args)`` on a thread of its own."""
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def waiting(self) -> int:
        """How many commits wait for the standby now (the probe's included)."""
        return waiting_for_the_standby(self.admin)


@contextmanager
def standby_never_confirms(url: str) -> Iterator[HeldCommits]:
    """From now until the block ends, commits at ``synchronous_commit = on`` wait for a standby
    that never confirms. Once the server has taken the setting (a probe's commit waits, and
    goes on waiting: ``waiting()`` counts it), the block runs; at its end the setting is taken
    back, every held commit completes, and the threads started with ``start`` are joined."""
    with psycopg.connect(url, autocommit=True) as admin, \
            psycopg.connect(url, autocommit=True) as probe:
        probe.execute("CREATE TABLE IF NOT EXISTS kojin_test_probe (i int)")  # logged: its commit waits
        probe.execute("SET synchronous_commit = on")
        held = HeldCommits(admin)
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'kojin_test_nobody'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            def a_commit_waits() -> bool:  # the server takes the setting in a moment
                if not any(t.is_alive() for t in held.threads):
                    held.start(probe.execute, "INSERT INTO kojin_test_probe VALUES (1)").join(0.2)
                return held.waiting() == 1
            assert until(a_commit_waits), "no commit waited for the standby"
            yield held
        finally:
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")
            for thread in held.threads:
                thread.join(BOUND)
