"""Native chords at the backend level: exactly-once counting under concurrency and duplicates.

The body is a real task run eagerly (``task_always_eager``) when the chord fires; it records
each firing in a table, so the tests count firings in the database.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import uuid

import psycopg
import pytest
from celery import states
from celery.app.task import Context
from celery.exceptions import ChordError


@pytest.fixture
def chord_app(make_app, db_url):
    app = make_app(task_always_eager=True, task_store_eager_result=True)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE fired (group_id text, value jsonb)")

    app.conf.kojin_test_db_url = db_url

    @app.task(name="record", bind=True, shared=False)
    def record(self, values, group_id):
        from psycopg.types.json import Jsonb

        with psycopg.connect(self.app.conf.kojin_test_db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO fired VALUES (%s, %s)", (group_id, Jsonb(values)))
        return values

    return app


def start_chord(app, size):
    gid = str(uuid.uuid4())
    body = app.tasks["record"].s(group_id=gid)
    body.freeze()
    app.backend.apply_chord((gid, []), body)
    app.backend.set_chord_size(gid, size)
    return gid, body


def part(app, gid, body, index, value, state=states.SUCCESS, task_id=None):
    req = Context(id=task_id or f"{gid}-{index}", group=gid, group_index=index, chord=dict(body))
    app.backend.on_chord_part_return(req, state, value)


def fired(db_url, gid):
    with psycopg.connect(db_url) as conn:
        return [r[0] for r in conn.execute("SELECT value FROM fired WHERE group_id = %s", (gid,))]


def test_body_gets_header_results_in_header_order(chord_app, db_url):
    gid, body = start_chord(chord_app, 10)
    order = list(range(10))
    random.shuffle(order)
    for i in order:
        part(chord_app, gid, body, i, i * 10)
    assert fired(db_url, gid) == [[i * 10 for i in range(10)]]


def test_duplicate_part_reports_count_once(chord_app, db_url):
    gid, body = start_chord(chord_app, 5)
    for i in range(4):
        part(chord_app, gid, body, i, i)
        part(chord_app, gid, body, i, i)  # a redelivered header task reports again
    assert fired(db_url, gid) == []
    part(chord_app, gid, body, 4, 4)
    for i in range(5):
        part(chord_app, gid, body, i, i)  # late duplicates after the body fired
    assert fired(db_url, gid) == [[0, 1, 2, 3, 4]]


def test_concurrent_threads_fire_body_exactly_once(chord_app, db_url):
    gid, body = start_chord(chord_app, 200)
    indexes = list(range(200)) * 2  # every part reported twice, concurrently
    random.shuffle(indexes)
    chunks = [indexes[i::16] for i in range(16)]
    barrier = threading.Barrier(16)

    def report(chunk):
        barrier.wait()
        for i in chunk:
            part(chord_app, gid, body, i, i)

    threads = [threading.Thread(target=report, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert fired(db_url, gid) == [list(range(200))]


def _report_in_child(app, gid, body, indexes):
    for i in indexes:
        part(app, gid, body, i, i)


def test_concurrent_processes_fire_body_exactly_once(chord_app, db_url):
    gid, body = start_chord(chord_app, 120)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_report_in_child,
                         args=(chord_app, gid, body, list(range(k, 120, 4)) * 2))
             for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert fired(db_url, gid) == [list(range(120))]


def test_failed_part_fails_the_body_with_chord_error(chord_app, db_url):
    gid, body = start_chord(chord_app, 3)
    part(chord_app, gid, body, 0, 0)
    part(chord_app, gid, body, 1, KeyError("nope"), state=states.FAILURE)
    part(chord_app, gid, body, 2, 2)
    assert fired(db_url, gid) == []
    meta = chord_app.backend.get_task_meta(body.id, cache=False)
    assert meta["status"] == states.FAILURE
    assert isinstance(meta["result"], ChordError)
    assert "nope" in str(meta["result"])


def test_add_to_chord_waits_for_one_more(chord_app, db_url):
    gid, body = start_chord(chord_app, 2)
    chord_app.backend.add_to_chord(gid, None)
    part(chord_app, gid, body, 0, "a")
    part(chord_app, gid, body, 1, "b")
    assert fired(db_url, gid) == []
    part(chord_app, gid, body, 2, "c")
    assert fired(db_url, gid) == [["a", "b", "c"]]


def test_add_to_chord_counts_the_same_task_once(chord_app, db_url):
    """A retried add_to_chord (same replacing task) must not make the chord wait for ever."""
    gid, body = start_chord(chord_app, 2)
    added = chord_app.AsyncResult(str(uuid.uuid4()))
    chord_app.backend.add_to_chord(gid, added)
    chord_app.backend.add_to_chord(gid, added)
    part(chord_app, gid, body, 0, "a")
    part(chord_app, gid, body, 1, "b")
    assert fired(db_url, gid) == []
    part(chord_app, gid, body, 2, "c")
    assert fired(db_url, gid) == [["a", "b", "c"]]


def test_parts_before_chord_size_is_known(chord_app, db_url):
    gid = str(uuid.uuid4())
    body = chord_app.tasks["record"].s(group_id=gid)
    body.freeze()
    chord_app.backend.apply_chord((gid, []), body)
    part(chord_app, gid, body, 0, 0)
    part(chord_app, gid, body, 1, 1)
    chord_app.backend.set_chord_size(gid, 3)
    part(chord_app, gid, body, 2, 2)
    assert fired(db_url, gid) == [[0, 1, 2]]


def test_reapplied_chord_starts_from_zero(chord_app, db_url):
    gid, body = start_chord(chord_app, 2)
    part(chord_app, gid, body, 0, 1)
    part(chord_app, gid, body, 1, 2)
    chord_app.backend.apply_chord((gid, []), body)
    chord_app.backend.set_chord_size(gid, 2)
    part(chord_app, gid, body, 0, 3)
    part(chord_app, gid, body, 1, 4)
    assert fired(db_url, gid) == [[1, 2], [3, 4]]


def test_lapsed_claim_is_taken_over(chord_app, db_url):
    """The claimant died before firing: a redelivered header task fires the body."""
    gid, body = start_chord(chord_app, 2)
    part(chord_app, gid, body, 0, "x")
    with psycopg.connect(db_url, autocommit=True) as conn:
        # what a worker killed between its claim and the publish leaves behind
        conn.execute("UPDATE kojin.chords SET completed = 2, claim_token = 'dead', "
                     "claim_until = now() - interval '1 second' WHERE group_id = %s", (gid,))
        conn.execute("INSERT INTO kojin.chord_parts (group_id, task_id, idx, status, result) "
                     "VALUES (%s, %s, 1, 'SUCCESS', '\"y\"')", (gid, f"{gid}-1"))
    part(chord_app, gid, body, 1, "y")  # the redelivered task reports again
    assert fired(db_url, gid) == [["x", "y"]]
