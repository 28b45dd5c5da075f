"""What goes wrong as a deployment ages (issue 10), with real ``celery worker`` processes:
monitors that come and go, stale control commands, chords longer than ``result_expires``,
workers restarted cleanly while they hold a countdown task.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import psycopg
import pytest
from celery import chord
from test_lifecycle import queue_bindings, queue_rows, wait_until_gone
from workers import wait_ready

pytestmark = pytest.mark.e2e


def log_count(worker, pattern: str) -> int:
    return len(re.findall(pattern, worker.log.read_text(errors="replace")))


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- item 2: a monitor session that leaves leaves nothing behind ----------------------------

@pytest.mark.slow
def test_events_monitor_session_leaves_nothing_behind(e2e_app, workers, db_url):
    """``celery events`` / Flower: connect for a few seconds, then go. Celery declares the
    receiver's queue auto_delete with ``event_queue_expires`` and ``event_queue_ttl``."""
    e2e_app.conf.update(event_queue_expires=2.0, event_queue_ttl=1.0)
    w = workers(name="evw", extra_args=["-E"])
    wait_ready(e2e_app, w)
    add = e2e_app.tasks["e2e.add"]
    seen: list[str] = []
    queue_name: list[str] = []

    def monitor() -> None:
        with e2e_app.connection_for_read() as conn:
            receiver = e2e_app.events.Receiver(conn, handlers={
                "task-succeeded": lambda event: seen.append(event["uuid"])})
            queue_name.append(receiver.queue.name)
            try:
                receiver.capture(limit=None, timeout=2, wakeup=False)
            except TimeoutError:
                pass  # two seconds without an event: the session ends

    session = threading.Thread(target=monitor, daemon=True)
    session.start()
    assert wait_for(lambda: queue_name and queue_bindings(db_url, queue_name[0]), 20)
    watched = add.delay(1, 1)
    assert watched.get(timeout=30) == 2
    assert wait_for(lambda: watched.id in seen, 20), "the monitor never saw an event"
    session.join(30)
    assert not session.is_alive()
    # the worker goes on sending events; soon after event_queue_expires (2 s), the monitor's
    # queue, its binding and whatever landed in it are gone (and events older than
    # event_queue_ttl, 1 s, are dropped anyway)
    left = wait_until_gone(db_url, queue_name[0], timeout=12, tick=lambda: add.delay(2, 2))
    assert left == ([], 0), f"12 s after the monitor left, {queue_name[0]} still has bindings " \
        f"{left[0]} and {left[1]} events"


def test_shutdown_sent_while_a_worker_was_down_does_not_kill_it_later(e2e_app, workers,
                                                                       db_url):
    conf = {"control_queue_expires": 2.0}
    e2e_app.conf.update(conf)
    hostname = f"wx@{socket.gethostname()}"
    pidbox = f"{hostname}.celery.pidbox"
    first = workers(name="wx", conf=conf)
    wait_ready(e2e_app, first)
    assert queue_bindings(db_url, pidbox), "the worker's pidbox queue is not bound"
    first.stop()  # a clean (warm) shutdown: wx is down
    # RabbitMQ drops the auto_delete pidbox queue at once; give kojin_pg its x-expires too
    wait_for(lambda: not queue_bindings(db_url, pidbox), 6, interval=0.2)
    e2e_app.control.shutdown(destination=[hostname])  # the operator aims at a worker that is down
    second = workers(name="wx", conf=conf)
    probe = e2e_app.tasks["e2e.add"].delay(0, 0)
    assert wait_for(lambda: probe.ready() or second.proc.poll() is not None, 60), second.tail()
    time.sleep(2)  # a stale command would have arrived by now
    stale = queue_rows(db_url, pidbox)
    last_lines = "\n".join(second.tail().splitlines()[-3:])
    assert second.proc.poll() is None, \
        f"wx started later was shut down by the stale broadcast:\n{last_lines}"
    assert stale == 0


# -- item 3: a chord longer than result_expires ----------------------------------------------

@pytest.mark.slow
def test_chord_longer_than_result_expires_fires_once(e2e_app, workers, db_url):
    conf = {"result_expires": 2}
    e2e_app.conf.update(conf)  # before the backend is made: it reads result_expires once
    w = workers(conf=conf)
    wait_ready(e2e_app, w)
    stop = threading.Event()

    def cleanup_meanwhile() -> None:  # celery.backend_cleanup, run often
        while not stop.wait(0.5):
            e2e_app.backend.cleanup()

    cleaner = threading.Thread(target=cleanup_meanwhile, daemon=True)
    cleaner.start()
    sleep_then, tsum = e2e_app.tasks["e2e.sleep_then"], e2e_app.tasks["e2e.tsum"]
    try:
        result = chord(sleep_then.s(5, i) for i in range(3))(tsum.s())
        try:
            value = result.get(timeout=15)
        except Exception as exc:
            with psycopg.connect(db_url) as conn:
                chords = conn.execute("SELECT chord_size, completed, fired FROM kojin.chords"
                                      ).fetchall()
            raise AssertionError(f"the chord body never fired ({exc!r}); chord rows "
                                 f"(chord_size, completed, fired): {chords}") from None
        time.sleep(1)  # a second firing would be received by now
    finally:
        stop.set()
        cleaner.join(10)
    assert value == 0 + 1 + 2
    assert log_count(w, rf"e2e\.tsum\[{result.id}\] received") == 1


# -- item 4: clean restarts do not use up deliveries -----------------------------------------

@pytest.mark.slow
def test_warm_restarts_do_not_dead_letter_a_held_countdown_task(e2e_app, workers, db_url):
    """More warm restarts than max_deliveries while a countdown task waits: it runs once.

    Since the broker schedules ETA tasks (issue 11), the task waits in the database, not in a
    worker; before, each restart handed it back and the next claim counted a delivery."""
    opts = {"max_deliveries": 2}
    add = e2e_app.tasks["e2e.add"]
    held = add.apply_async((20, 22), countdown=15)

    def dead() -> list:
        with psycopg.connect(db_url) as conn:
            return conn.execute("SELECT reason, delivery_count FROM kojin.dead_letters "
                                "WHERE payload->'headers'->>'id' = %s", (held.id,)).fetchall()

    restarts = opts["max_deliveries"] + 1
    for n in range(restarts):
        w = workers(broker_options=opts, name=f"deploy{n}")
        wait_ready(e2e_app, w)
        assert not held.ready(), "the countdown ran out during the restarts: test too slow"
        w.stop()  # SIGTERM: warm shutdown
        assert w.proc.returncode == 0, w.tail()
    final = workers(broker_options=opts, name="final")
    assert held.get(timeout=60) == 42
    assert not dead(), f"dead-lettered after {restarts} clean restarts: {dead()}"
    assert log_count(final, rf"e2e\.add\[{held.id}\] succeeded") == 1
