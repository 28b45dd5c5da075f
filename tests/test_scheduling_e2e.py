"""Broker-side scheduling with real ``celery worker`` processes (issue 11): countdown tasks run
once and not before they are due, across a kill -9 and a warm restart; workers hold none of
them meanwhile; a revoked scheduled task never runs, even after every worker restarted; a
unique key sent from 8 processes at once runs once; retries with a countdown are scheduled.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from workers import wait_ready

pytestmark = pytest.mark.e2e


def stamps(path: Path) -> dict[str, list[float]]:
    """label -> the times it ran."""
    runs: dict[str, list[float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            label, at = line.split()
            runs.setdefault(label, []).append(float(at))
    return runs


def leased_and_scheduled(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT count(*) FILTER (WHERE leased_by IS NOT NULL AND visible_at > now()), "
            "count(*) FILTER (WHERE due_at IS NOT NULL) FROM kojin.messages").fetchone()


def wait_for(predicate, timeout: float, tick: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(tick)
    return predicate()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_countdown_tasks_run_once_not_early_across_kill_and_restart(e2e_app, workers, db_url,
                                                                   tmp_path):
    log = tmp_path / "runs.log"
    first = workers(pool="threads", concurrency=4)
    wait_ready(e2e_app, first)
    stamp = e2e_app.tasks["e2e.stamp"]
    countdown = 8.0
    sent_at = time.time()
    results = [stamp.apply_async((str(log), f"t{i}"), countdown=countdown) for i in range(30)]
    # the broker holds them: no worker leases a task that is not due
    assert wait_for(lambda: leased_and_scheduled(db_url) == (0, 30), 5), \
        leased_and_scheduled(db_url)
    first.kill()  # kill -9 while they are scheduled
    second = workers(pool="threads", concurrency=4)
    wait_ready(e2e_app, second)
    second.stop()  # a warm shutdown before they are due
    third = workers(pool="prefork", concurrency=2)
    wait_ready(e2e_app, third)
    for r in results:
        r.get(timeout=60)
    runs = stamps(log)
    assert sorted(runs) == sorted(f"t{i}" for i in range(30))
    assert all(len(times) == 1 for times in runs.values()), runs
    earliest = min(t for times in runs.values() for t in times)
    assert earliest >= sent_at + countdown - 0.5, "a countdown task ran before it was due"


@pytest.mark.timeout(120)
def test_workers_do_not_hoard_scheduled_tasks(e2e_app, workers, db_url):
    w = workers(pool="threads", concurrency=2)
    wait_ready(e2e_app, w)
    add = e2e_app.tasks["e2e.add"]
    for i in range(300):
        add.apply_async((i, 0), countdown=600)
    assert leased_and_scheduled(db_url) == (0, 300)
    # a task sent now is not stuck behind them
    assert add.delay(2, 2).get(timeout=20) == 4
    # the task that ran is acked a few ms after its result is stored
    assert wait_for(lambda: leased_and_scheduled(db_url) == (0, 300), timeout=5), \
        leased_and_scheduled(db_url)


@pytest.mark.timeout(150)
def test_revoked_scheduled_task_never_runs_after_all_workers_restart(e2e_app, workers, db_url,
                                                                    tmp_path):
    log = tmp_path / "runs.log"
    w = workers(pool="threads", concurrency=2)
    wait_ready(e2e_app, w)
    stamp = e2e_app.tasks["e2e.stamp"]
    doomed = stamp.apply_async((str(log), "doomed"), countdown=5)
    kept = stamp.apply_async((str(log), "kept"), countdown=5)
    doomed.revoke()
    w.stop()  # every worker restarts: none remembers the revoke in memory
    w2 = workers(pool="threads", concurrency=2)
    wait_ready(e2e_app, w2)
    assert kept.get(timeout=60) == "kept"
    time.sleep(1.0)
    assert "doomed" not in stamps(log)
    assert e2e_app.AsyncResult(doomed.id).state == "REVOKED"


SEND_UNIQUE = textwrap.dedent("""
    import sys
    from e2e_app import make_app
    import kojin_pg.unique
    app = make_app(sys.argv[1])
    result, created = kojin_pg.unique.send_unique(
        app, "e2e.stamp", args=(sys.argv[2], "unique"), key="the-one", countdown=3)
    print(result.id, created, flush=True)
""")


@pytest.mark.timeout(150)
def test_unique_key_from_8_processes_runs_once(e2e_app, workers, db_url, tmp_path):
    log = tmp_path / "runs.log"
    here = Path(__file__).resolve().parent
    procs = [subprocess.Popen([sys.executable, "-c", SEND_UNIQUE, db_url, str(log)],
                              cwd=str(here), stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    answers = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(created == "True" for _, created in answers) == 1
    assert len({task_id for task_id, _ in answers}) == 1  # every caller learns the same task
    w = workers(pool="threads", concurrency=2)
    wait_ready(e2e_app, w)
    assert e2e_app.AsyncResult(answers[0][0]).get(timeout=30) == "unique"
    time.sleep(1.0)
    assert len(stamps(log).get("unique", [])) == 1


@pytest.mark.timeout(120)
def test_retry_with_countdown_is_scheduled_and_runs_once_more(e2e_app, workers, db_url,
                                                              tmp_path):
    log = tmp_path / "runs.log"
    w = workers(pool="threads", concurrency=2)
    wait_ready(e2e_app, w)
    result = e2e_app.tasks["e2e.retry_later"].delay(str(log), 4)
    assert wait_for(lambda: leased_and_scheduled(db_url)[1] == 1, 15), \
        "the retry was not scheduled in the broker"
    assert result.get(timeout=60) == 1
    runs = stamps(log)
    assert len(runs["attempt0"]) == 1 and len(runs["attempt1"]) == 1
    assert runs["attempt1"][0] - runs["attempt0"][0] >= 4 - 0.5
