"""Watching what a result backend reads, and what it hears, as it happens."""

from __future__ import annotations

import threading

import psycopg

from kojin_pg.backend.announce import split_heard
from kojin_pg.db.lean import LeanRead


def watch_reads(backend, monkeypatch, *, but_safety_net: bool = False) -> list[dict]:
    """The parameters of every statement of ``backend`` that reads results, from now on;
    ``but_safety_net``: not those of its safety-net reads (the reads every second of what it
    waits for, announced or not)."""
    names = ("wait_and_read", "get_results")
    reads_of = {id(backend.queries.get(name)) for name in names}
    reads: list[dict] = []
    in_safety_net = threading.local()
    real_execute = psycopg.Connection.execute
    real_lean_rows = LeanRead.rows

    def execute(conn, query, params=None, **kwargs):
        if id(query) in reads_of and not getattr(in_safety_net, "on", False):
            reads.append(params)
        return real_execute(conn, query, params, **kwargs)

    def lean_rows(read, conn, params):  # a single get's read (get_result)
        if read is backend.read_one and not getattr(in_safety_net, "on", False):
            reads.append(params)
        return real_lean_rows(read, conn, params)

    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    monkeypatch.setattr(LeanRead, "rows", lean_rows)
    if but_safety_net:
        consumer = backend.result_consumer
        real_read = consumer._safety_net_read

        def safety_net_read() -> None:
            in_safety_net.on = True
            try:
                real_read()
            finally:
                in_safety_net.on = False

        monkeypatch.setattr(consumer, "_safety_net_read", safety_net_read)
    return reads


def watch_heard(backend, monkeypatch) -> set[str]:
    """The task ids of every result announcement ``backend``'s process hears, from now on."""
    heard_ids: set[str] = set()
    consumer = backend.result_consumer
    real = consumer._deliver_heard

    def deliver_heard(heard, *args, **kwargs):
        ids, results = split_heard(heard)
        heard_ids.update(ids | results.keys())
        return real(heard, *args, **kwargs)

    monkeypatch.setattr(consumer, "_deliver_heard", deliver_heard)
    return heard_ids
