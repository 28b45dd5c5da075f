"""Soak: mixed load plus a real deployment's churn for a while; everything must stay bounded.

usage: python -m bench.soak [MINUTES] [URL] [--stock] [--json]   (default 30 minutes, embedded
server; ``--stock``: a stock apt PostgreSQL at its default settings, see bench/servers.py)

Load: a ``celery worker`` (threads, c=4, ``-E``) and a producer thread sending a task, a group
of 20 and a chord of 20 back to back and waiting for each (the single task by its sender key:
kojin_pg/backend/waiters.py), with ``result_expires`` 20 s and
``backend.cleanup()`` every 30 s. Churn, each a real process or a real restart:

- every minute a monitor, ``celery events --dump``, connects for 8 s and leaves, alternately by
  SIGINT (clean exit) and SIGKILL (its queue is left to ``x-expires``);
- every minute ``celery inspect ping`` (a broadcast; its reply queue comes and goes);
- a process that waited for one result (``AsyncResult.get()``) and then idles for the whole run,
  holding its LISTEN connection (which stops listening 2 s after the wait);
- every two minutes the worker is stopped with SIGTERM (warm shutdown) and started again under a
  new node name; the restart counts once the new node answers a ping;
- every three minutes (first at 110 s) a chord of three parts of 30 s each, longer than
  ``result_expires``, whose body appends its tag to a file: each must fire exactly once. Every
  other one is running when the worker gets SIGTERM, so the warm shutdown waits for its parts.

Every 30 s it samples row counts and total size of messages, results, groups, chords,
chord_parts, bindings, queues, consumers, dead_letters and offers (eight rows per consuming
channel: a worker's close deletes its own, the sweep those of a process that died), the
number of distinct queues in messages, live (not deleted) queues, messages left in deleted
queues, the database's connections and the advisory locks held in it (wait slots, sender keys,
idle consumers), ``pg_notification_queue_usage()`` and the dead tuples of messages and
results.
``queues.rows`` counts the tombstones of deleted queues too, which are kept for an hour
(``upkeep.TOMBSTONE_SECONDS``): in a shorter run it climbs by design, so it is shown and not
judged; ``queues.live`` is judged, and ``queues.overdue`` (tombstones older than an hour and a
minute: the sweep must have removed them) must stay 0. Messages a consumer claimed just before
it died stay leased until their visibility timeout.

At the end it prints a table with a verdict per quantity. The second-half growth factor is the
mean of the last quarter of the samples over the mean of the third quarter; a quantity is
*bounded* if that factor is at most 1.25 or if the last quarter's median does not exceed the
first half's maximum by more than a little noise (10 rows, 1 MiB): a swing, not a climb (a
climb lifts the median; one sample taken just after a worker restart does not).
``notify_usage`` is bounded if it never reaches :data:`NOTIFY_USAGE_IN_PASSING`: a listener a
few milliseconds behind holds a page of the queue for a moment, a session that stopped reading
pins it, and at this load it then passes that mark within seconds and never comes back.
Then: long chord bodies fired vs sent (each exactly once), worker restarts, monitors and pings
that succeeded, producer errors, the maximum NOTIFY queue usage, and how often autovacuum
visited messages and results during the run (not a verdict: dead tuples that vacuum does not
remove show in the ``.dead`` rows). ``--json`` prints each
sample and the summary as JSON lines instead. Worker logs stay in the printed work directory.
Not part of the test suite; exits 1 if any verdict fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psycopg

from bench.processes import stop_group
from bench.servers import destroy, start_postgres
from kojin_pg.transport.upkeep import TOMBSTONE_SECONDS

APP = textwrap.dedent("""
    import os
    import time
    import kojin_pg
    from celery import Celery
    url = os.environ["SOAK_URL"]
    app = Celery("soakapp", broker="kojin+" + url, backend="kojin+" + url)
    app.conf.update(result_expires=20, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def tsum(xs):
        return sum(xs)

    @app.task
    def slow(i, seconds):
        time.sleep(seconds)
        return i

    @app.task
    def record(results, tag):
        with open(os.environ["SOAK_FIRED"], "a") as f:
            f.write(tag + "\\n")
        return tag
""")

IDLER = ("import time, soakapp\n"
         "soakapp.add.delay(1, 1).get(timeout=300)\n"
         "print('waited once; idling', flush=True)\n"
         "time.sleep(10 ** 6)\n")

TABLES = ("messages", "results", "groups", "chords", "chord_parts", "bindings", "queues",
          "consumers", "dead_letters", "offers")
SAMPLE_EVERY, MONITOR_EVERY, PING_EVERY, RESTART_EVERY, CHORD_EVERY = 30, 60, 60, 120, 180
#: pg_notification_queue_usage() a listener that keeps up never reaches: about 100 of the
#: queue's 8 KB pages (tests/test_lifecycle.py's USAGE_IN_PASSING is the same order).
NOTIFY_USAGE_IN_PASSING = 1e-4
#: Quantities shown and not judged (see the module's docstring).
NOT_JUDGED = frozenset({"queues.rows"})
PART_SECONDS, PARTS = 30, 3
SHUTDOWN_SECONDS = 2 * PART_SECONDS  # a warm shutdown waits for running parts, no longer


def sample(url: str) -> dict[str, float]:
    """One reading of every watched quantity."""
    s: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for t in TABLES:
            s[f"{t}.rows"] = conn.execute(f"SELECT count(*) FROM kojin.{t}").fetchone()[0]
            s[f"{t}.bytes"] = conn.execute(
                "SELECT pg_total_relation_size(%s::regclass)", (f"kojin.{t}",)).fetchone()[0]
        for name, dead in conn.execute(
                "SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'kojin' "
                "AND relname IN ('messages', 'results')"):
            s[f"{name}.dead"] = dead
        s["messages.queues"] = conn.execute(
            "SELECT count(DISTINCT queue) FROM kojin.messages").fetchone()[0]
        # a deleted queue stays as a tombstone for an hour; its leftover messages (leased by a
        # consumer that died mid-claim) wait for their visibility timeout
        s["queues.live"] = conn.execute(
            "SELECT count(*) FROM kojin.queues WHERE deleted_at IS NULL").fetchone()[0]
        s["queues.overdue"] = conn.execute(
            "SELECT count(*) FROM kojin.queues WHERE deleted_at < now() - make_interval("
            "secs => %s)", (TOMBSTONE_SECONDS + 60,)).fetchone()[0]
        s["messages.in_deleted_queues"] = conn.execute(
            "SELECT count(*) FROM kojin.messages m JOIN kojin.queues q ON q.name = m.queue "
            "WHERE q.deleted_at IS NOT NULL").fetchone()[0]
        s["connections"] = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchone()[0]
        s["advisory_locks"] = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()").fetchone()[0]
        s["notify_usage"] = conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
    return s


def autovacuum_counts(url: str) -> dict[str, int]:
    """How many times autovacuum has visited messages and results so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        return dict(conn.execute(
            "SELECT relname, autovacuum_count FROM pg_stat_user_tables WHERE schemaname = "
            "'kojin' AND relname IN ('messages', 'results')").fetchall())


def verdicts(samples: list[dict[str, float]]) -> dict[str, dict]:
    """Per quantity: first-half max, second-half max, last, growth factor, bounded."""
    out = {}
    n = len(samples)
    for key in samples[0]:
        xs = [s[key] for s in samples]
        first, q3, q4 = xs[:n // 2], xs[n // 2:(3 * n) // 4], xs[(3 * n) // 4:]
        m3, m4 = sum(q3) / max(len(q3), 1), sum(q4) / len(q4)
        factor = m4 / m3 if m3 else (1.0 if m4 == 0 else None)  # None: from nothing
        slack = 1 << 20 if key.endswith(".bytes") else 10  # noise, not growth
        bounded = ((factor is not None and factor <= 1.25)
                   or statistics.median(q4) <= max(first) + slack)
        if key == "notify_usage":
            bounded = max(xs) < NOTIFY_USAGE_IN_PASSING
        elif key == "queues.overdue":
            bounded = max(xs) == 0
        elif key in NOT_JUDGED:
            bounded = None
        out[key] = {"first_half_max": max(first), "second_half_max": max(xs[n // 2:]),
                    "last": xs[-1], "growth": factor and round(factor, 2), "bounded": bounded}
    return out


class Soak:
    """The worker, the churn processes and the producer, and what they saw."""

    def __init__(self, url: str, minutes: float, as_json: bool) -> None:
        self.url, self.minutes, self.as_json = url, minutes, as_json
        self.dir = Path(tempfile.mkdtemp(prefix="soak_"))
        (self.dir / "soakapp.py").write_text(APP)
        self.fired = self.dir / "fired.txt"
        self.env = dict(os.environ, SOAK_URL=url, SOAK_FIRED=str(self.fired),
                        PYTHONPATH=str(self.dir))
        os.environ.update(SOAK_URL=url, SOAK_FIRED=str(self.fired))
        sys.path.insert(0, str(self.dir))
        import soakapp

        self.app = soakapp
        self.stop = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.chords_sent: list[str] = []
        self.restart_seconds: list[float] = []
        self.stop_seconds: list[float] = []
        self.errors: list[str] = []
        self.samples: list[dict[str, float]] = []
        self.worker: subprocess.Popen | None = None
        self.node = ""
        self.autovacuums_at_start: dict[str, int] = {}

    def say(self, what: str) -> None:
        if not self.as_json:
            print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)

    def error(self, what: str) -> None:
        self.errors.append(what)
        print(f"[{time.strftime('%H:%M:%S')}] ERROR {what}", file=sys.stderr, flush=True)

    def spawn(self, args: list[str], log: Path | None = None) -> subprocess.Popen:
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with child
        return subprocess.Popen([sys.executable, *args], env=self.env, cwd=self.dir,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self) -> None:
        n = self.counts["worker_starts"]
        self.counts["worker_starts"] += 1
        self.node = f"soak{n}@localhost"
        t0 = time.monotonic()
        self.worker = self.spawn(["-X", "faulthandler", "-m", "celery", "-A", "soakapp", "worker",
                                  "-P", "threads", "-c", "4", "-E", "-l", "warning",
                                  "-n", self.node],
                                 self.dir / f"worker{n}.log")
        while time.monotonic() - t0 < 120 and not self.app.app.control.ping(
                destination=[self.node], timeout=1.0):
            if self.worker.poll() is not None:
                break
        if self.app.app.control.ping(destination=[self.node], timeout=2.0):
            self.restart_seconds.append(time.monotonic() - t0)
        else:
            self.error(f"worker {self.node} did not answer a ping (exit {self.worker.poll()})")

    def stop_worker(self) -> None:
        assert self.worker is not None
        t0 = time.monotonic()
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            code = self.worker.wait(SHUTDOWN_SECONDS)
            self.stop_seconds.append(time.monotonic() - t0)
            self.say(f"worker {self.node} stopped by SIGTERM in {self.stop_seconds[-1]:.1f} s "
                     f"(exit {code})")
            if code != 0:
                self.error(f"worker {self.node} exited {code} on SIGTERM")
        except subprocess.TimeoutExpired:  # its threads' stacks go to its log
            self.error(f"worker {self.node} still running {SHUTDOWN_SECONDS} s after SIGTERM; "
                       f"stacks in {self.dir}/worker{self.counts['worker_starts'] - 1}.log")
            os.kill(self.worker.pid, signal.SIGABRT)
            self.worker.wait()

    def monitor(self) -> None:
        clean = self.counts["monitors"] % 2 == 0
        n = self.counts["monitors"]
        log = self.dir / f"monitor{n}.log"
        p = self.spawn(["-X", "faulthandler", "-m", "celery", "-A", "soakapp", "events",
                        "--dump"], log)
        time.sleep(8)
        os.killpg(p.pid, signal.SIGINT if clean else signal.SIGKILL)
        try:
            p.wait(20)
            hung = False
        except subprocess.TimeoutExpired:  # its threads' stacks go to its log, which is kept
            self.error(f"monitor {n} still running 20 s after SIGINT; see {log}")
            os.kill(p.pid, signal.SIGABRT)
            p.wait()
            hung = True
        events = sum(1 for line in log.open(errors="replace") if "@" in line and "] " in line)
        if not hung:
            log.unlink()
        self.counts["monitors"] += 1
        self.counts["monitor_events"] += events
        self.counts["monitors_receiving"] += events > 0
        self.say(f"monitor {'SIGINT' if clean else 'SIGKILL'}: {events} events")

    def ping(self) -> None:
        self.counts["pings"] += 1
        p = subprocess.run([sys.executable, "-m", "celery", "-A", "soakapp", "inspect", "ping",
                            "--timeout", "5"], env=self.env, cwd=self.dir,
                           capture_output=True, text=True, timeout=120)
        self.counts["pings_answered"] += p.returncode == 0 and "pong" in p.stdout

    def long_chord(self) -> None:
        from celery import chord

        tag = f"long{len(self.chords_sent)}"
        chord(self.app.slow.s(i, PART_SECONDS) for i in range(PARTS))(
            self.app.record.s(tag))
        self.chords_sent.append(tag)
        self.say(f"sent chord {tag} ({PARTS} parts of {PART_SECONDS} s)")

    def take_sample(self, t0: float) -> None:
        self.app.app.backend.cleanup()
        s = sample(self.url)
        self.samples.append(s)
        line = {"t_min": round((time.monotonic() - t0) / 60, 1), "tasks": self.counts["tasks"],
                **s}
        if self.as_json:
            print(json.dumps(line), flush=True)
        else:
            self.say(f"t={line['t_min']} min tasks={line['tasks']} " + " ".join(
                f"{k}={v}" for k, v in s.items() if k.endswith((".rows", "usage", ".queues"))))

    def produce(self) -> None:
        from celery import chord, group

        app = self.app
        while not self.stop.is_set():
            try:
                assert app.add.delay(1, 1).get(timeout=180) == 2
                group(app.add.s(i, i) for i in range(20))().get(timeout=180)
                chord(app.add.s(i, 1) for i in range(20))(app.tsum.s()).get(timeout=180)
                self.counts["tasks"] += 42
            except Exception as e:  # keep loading; the count is reported
                self.counts["producer_errors"] += 1
                self.error(f"producer: {type(e).__name__}: {e}")

    def churn(self) -> None:
        """Run each periodic action when due, one at a time, until the end."""
        t0 = time.monotonic()
        end = t0 + 60 * self.minutes
        due = {"sample": t0, "monitor": t0 + MONITOR_EVERY, "ping": t0 + PING_EVERY + 30,
               "restart": t0 + RESTART_EVERY, "chord": t0 + 110}
        every = {"sample": SAMPLE_EVERY, "monitor": MONITOR_EVERY, "ping": PING_EVERY,
                 "restart": RESTART_EVERY, "chord": CHORD_EVERY}
        while True:
            name = min(due, key=due.__getitem__)
            if due[name] > end:
                break
            time.sleep(max(0.0, due[name] - time.monotonic()))
            try:
                if name == "sample":
                    self.take_sample(t0)
                elif name == "monitor":
                    self.monitor()
                elif name == "ping":
                    self.ping()
                elif name == "restart":
                    self.stop_worker()
                    self.start_worker()
                    self.say(f"worker {self.node} answering after "
                             f"{self.restart_seconds[-1] if self.restart_seconds else -1:.1f} s")
                else:
                    self.long_chord()
            except Exception as e:
                self.error(f"{name}: {type(e).__name__}: {e}")
            due[name] += every[name]
        self.take_sample(t0)

    def fired_counts(self) -> collections.Counter[str]:
        text = self.fired.read_text() if self.fired.exists() else ""
        return collections.Counter(text.split())

    def run(self) -> dict:
        self.say(f"work directory {self.dir}")
        self.start_worker()
        self.autovacuums_at_start = autovacuum_counts(self.url)
        idler = self.spawn(["-c", IDLER], self.dir / "idler.log")
        producer = threading.Thread(target=self.produce, daemon=True)
        producer.start()
        try:
            self.churn()
            self.stop.set()
            producer.join(200)
            self.say("producer stopped; waiting for the long chords")
            deadline = time.monotonic() + PARTS * PART_SECONDS + 120
            while (time.monotonic() < deadline
                   and set(self.chords_sent) - set(self.fired_counts())):
                time.sleep(2)
            time.sleep(5)  # a duplicate firing would land now
            self.stop_worker()
        finally:
            for p in (idler, self.worker):
                if p is not None:
                    stop_group(p, grace=120)
        return self.summary(idler)

    def summary(self, idler: subprocess.Popen) -> dict:
        fired = self.fired_counts()
        once = [t for t in self.chords_sent if fired[t] == 1]
        table = verdicts(self.samples) if len(self.samples) >= 4 else {}
        idled = "waited once" in (self.dir / "idler.log").read_text()
        return {
            "minutes": self.minutes, "samples": len(self.samples), "tasks": self.counts["tasks"],
            "quantities": table,
            "long_chords": {"sent": len(self.chords_sent), "fired_once": len(once),
                            "never": [t for t in self.chords_sent if fired[t] == 0],
                            "more_than_once": {t: n for t, n in fired.items() if n > 1}},
            "worker_restarts": len(self.restart_seconds) - 1,
            "worker_starts": self.counts["worker_starts"],
            "restart_seconds_max": round(max(self.restart_seconds, default=0), 1),
            "stop_seconds_max": round(max(self.stop_seconds, default=0), 1),
            "monitors": self.counts["monitors"],
            "monitors_receiving": self.counts["monitors_receiving"],
            "pings": self.counts["pings"], "pings_answered": self.counts["pings_answered"],
            "idler_waited": idled, "producer_errors": self.counts["producer_errors"],
            "notify_usage_max": max((s["notify_usage"] for s in self.samples), default=0),
            "autovacuums": {t: n - self.autovacuums_at_start.get(t, 0)
                            for t, n in autovacuum_counts(self.url).items()},
            "errors": self.errors[:20],
        }


def ok(summary: dict) -> bool:
    """Whether every verdict holds."""
    chords = summary["long_chords"]
    return (all(q["bounded"] is not False for q in summary["quantities"].values())
            and chords["fired_once"] == chords["sent"]
            and summary["worker_restarts"] == summary["worker_starts"] - 1
            and summary["idler_waited"]
            and not summary["errors"])


VERDICT_WORDS = {True: "bounded", False: "NOT BOUNDED", None: "(not judged)"}


def report(summary: dict) -> None:
    """The human-readable table."""
    print(f"\n{summary['minutes']} min, {summary['tasks']} tasks, {summary['samples']} samples")
    print(f"{'quantity':<22}{'1st half max':>14}{'2nd half max':>14}{'last':>12}"
          f"{'growth':>8}  verdict")
    for key, q in summary["quantities"].items():
        growth = "-" if q["growth"] is None else q["growth"]
        print(f"{key:<22}{q['first_half_max']:>14g}{q['second_half_max']:>14g}{q['last']:>12g}"
              f"{growth:>8}  {VERDICT_WORDS[q['bounded']]}")
    c = summary["long_chords"]
    print(f"long chords: {c['sent']} sent, {c['fired_once']} fired exactly once, "
          f"never: {c['never']}, more than once: {c['more_than_once']}")
    print(f"worker: {summary['worker_restarts']} SIGTERM restarts of "
          f"{summary['worker_starts'] - 1}, slowest start to first pong "
          f"{summary['restart_seconds_max']} s, slowest warm shutdown "
          f"{summary['stop_seconds_max']} s")
    print(f"monitors: {summary['monitors']} ({summary['monitors_receiving']} received events); "
          f"pings: {summary['pings_answered']}/{summary['pings']} answered; idle waiter "
          f"{'waited once and idled' if summary['idler_waited'] else 'NEVER GOT ITS RESULT'}")
    print(f"producer errors: {summary['producer_errors']}; max NOTIFY queue usage: "
          f"{summary['notify_usage_max']}")
    print("autovacuum runs during the soak: " + ", ".join(
        f"{t} {n}" for t, n in sorted(summary["autovacuums"].items())))
    for e in summary["errors"]:
        print(f"error: {e}")
    print("verdict:", "everything bounded, every chord once" if ok(summary) else "FAILED")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split(
        "\n")[0])
    parser.add_argument("minutes", nargs="?", type=float, default=30)
    parser.add_argument("url", nargs="?", default=os.environ.get("KOJIN_PG_URL"))
    parser.add_argument("--stock", action="store_true",
                        help="on a temporary stock apt PostgreSQL at its default settings")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args()
    # started in the background by a shell, this process ignores SIGINT, and so would every
    # child: the monitors' clean exit by SIGINT needs Python's handler back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server, url = None, args.url
    if args.stock or not url:
        url, server = start_postgres(stock=args.stock, use_env=False)
    try:
        summary = Soak(url, args.minutes, args.json).run()
    finally:
        destroy(server)
    if args.json:
        print(json.dumps(summary))
    else:
        report(summary)
    return 0 if ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
