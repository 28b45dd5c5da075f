"""Scheduled tasks (ETA/countdown): kojin_pg against Redis in one run.

usage: python -m bench.scheduling [--tasks N] [--quick] [--skip-claim]
       python -m bench scheduling [--quick]

For each system (kojin_pg broker + backend; Celery's redis broker + redis backend), the same
Celery app and the same real ``celery worker -P threads -c 4 --prefetch-multiplier 4``:

1. N tasks (100,000; 10,000 with --quick) are queued with a ``countdown`` that makes them all
   due at the same instant T, chosen after a calibration publish so that queuing ends about
   20 s before T, while ONE worker runs. Until T the worker's RSS (psutil, process and
   children) is sampled each second, with the leased messages in the database (kojin_pg) or
   the size of the ``unacked`` hash (Redis: the messages the worker holds). A second worker
   starts 10 s before T; each task's run is stamped (worker, task id, start, end) by the
   worker's task_prerun/task_postrun signals into one file per worker.
2. From T: lateness = task start - T (p50, p99, max) and the throughput of the due burst
   (tasks/s from the first to the last completion), and how many tasks each worker ran.
3. kojin_pg only: the claim+ack latency of 300 ready messages in a queue that also holds
   1,000,000 messages scheduled an hour ahead, against the same with none.

Prints a table and writes bench/results/scheduling.json (a ``--quick``, ``--tasks``,
``--only`` or ``--skip-claim`` run: last_scheduling_quick.json, not kept in git).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg

from bench.__main__ import make_db, start_servers, stop_servers
from bench.processes import stop_group
from bench.scale import claim_ack_latencies

HERE = Path(__file__).resolve().parent

APP = textwrap.dedent("""
    import os, threading, time
    if os.environ["SCHED_BROKER"].startswith("kojin"):
        import kojin_pg  # noqa: F401  (registers the kojin+ transport)
    from celery import Celery, signals

    app = Celery("schedapp", broker=os.environ["SCHED_BROKER"],
                 backend=os.environ["SCHED_BACKEND"])
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=4, broker_connection_retry_on_startup=True,
                    result_expires=3600, worker_hijack_root_logger=False)

    @app.task(name="sched.stamp")
    def stamp(due):
        return None

    @app.task(name="sched.ping")
    def ping():
        return 1

    _lock = threading.Lock()
    _started = {}
    _files = {}

    @signals.task_prerun.connect
    def _pre(task_id=None, **_):
        _started[task_id] = time.time()

    @signals.task_postrun.connect
    def _post(task_id=None, task=None, args=None, **_):
        # after the result is stored: this is the task's completion
        end = time.time()
        start = _started.pop(task_id, end)
        if task is None or task.name != "sched.stamp":
            return
        host = task.request.hostname or "unknown"
        with _lock:
            f = _files.get(host)
            if f is None:
                f = _files[host] = open(os.path.join(os.environ["SCHED_STAMPS"], host + ".txt"),
                                        "a", buffering=1)
            f.write(f"{task_id} {args[0]} {start} {end}\\n")
""")


class Worker:
    """One real ``celery worker`` process in its own session."""

    def __init__(self, appdir: Path, env: dict[str, str], name: str) -> None:
        self.name = name
        self.log = appdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "schedapp", "worker", "-P", "threads",
             "-c", "4", "--prefetch-multiplier", "4", "-l", "warning", "-n", f"{name}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, cwd=str(appdir), stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def rss_mb(self) -> float:
        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
            return sum(x.memory_info().rss for x in procs) / 2**20
        except psutil.Error:
            return 0.0

    def stop(self) -> None:
        stop_group(self.proc, grace=60)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def read_stamps(stamps: Path) -> dict[str, list[tuple[str, float, float, float]]]:
    out: dict[str, list] = {}
    for f in stamps.glob("*.txt"):
        rows = []
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                rows.append((parts[0], float(parts[1]), float(parts[2]), float(parts[3])))
        out[f.stem.split("@")[0]] = rows
    return out


def count_stamps(stamps: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in stamps.glob("*.txt"))


def scheduled_run(system: str, broker: str, backend: str, n: int, db: str | None,
                  redis_url: str | None) -> dict:
    """Workload 1 and 2 for one system: queue n countdown tasks, watch, then the due burst."""
    appdir = Path(tempfile.mkdtemp(prefix=f"bench_sched_{system}_"))
    stamps = appdir / "stamps"
    stamps.mkdir()
    (appdir / "schedapp.py").write_text(APP)
    env = dict(os.environ, SCHED_BROKER=broker, SCHED_BACKEND=backend,
               SCHED_STAMPS=str(stamps),
               PYTHONPATH=str(appdir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.environ.update(SCHED_BROKER=broker, SCHED_BACKEND=backend, SCHED_STAMPS=str(stamps))
    sys.path.insert(0, str(appdir))
    sys.modules.pop("schedapp", None)
    import schedapp  # the producer side of the same app

    app = schedapp.app
    probe_conn = psycopg.connect(db, autocommit=True) if db else None
    rclient = None
    if redis_url:
        import redis

        rclient = redis.Redis.from_url(redis_url)
    workers = [Worker(appdir, env, "w1")]
    samples: list[dict] = []
    stop_sampling = threading.Event()

    def probe() -> dict:
        s = {"t": time.time(), "load1": os.getloadavg()[0],
             "rss_mb": {w.name: round(w.rss_mb(), 1) for w in workers}}
        if probe_conn is not None:
            s["leased"], s["scheduled_rows"] = probe_conn.execute(
                "SELECT count(*) FILTER (WHERE leased_by IS NOT NULL AND visible_at > now()),"
                " count(*) FILTER (WHERE due_at IS NOT NULL) FROM kojin.messages"
                " WHERE queue = 'celery'").fetchone()
        if rclient is not None:
            s["unacked"] = rclient.hlen("unacked")
        return s

    def sampler() -> None:
        while not stop_sampling.wait(1.0):
            samples.append(probe())

    try:
        assert schedapp.ping.delay().get(timeout=120) == 1
        idle = probe()
        # calibration: publish rate of countdown tasks, into a queue nobody consumes
        calib = min(2000, max(200, n // 20))
        t = time.perf_counter()
        for _ in range(calib):
            schedapp.stamp.apply_async((0.0,), countdown=3600, queue="sched_calib")
        rate = calib / (time.perf_counter() - t)
        with app.connection_for_write() as conn:
            try:
                conn.default_channel.queue_purge("sched_calib")
            except Exception as exc:  # noqa: BLE001 - a leftover queue only costs disk
                print(f"  (calibration queue not purged: {exc})")
        calib_left = None
        if probe_conn is not None:
            # queue_purge deletes ready messages only: count what it left scheduled
            calib_left = probe_conn.execute(
                "SELECT count(*) FROM kojin.messages WHERE queue = 'sched_calib'").fetchone()[0]
        due = time.time() + 1.25 * n / rate + 20
        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        t_enq = time.time()
        for _ in range(n):
            schedapp.stamp.apply_async((due,), countdown=due - time.time())
        enqueue_s = time.time() - t_enq
        margin = due - time.time()
        print(f"  {system}: queued {n} in {enqueue_s:.1f} s ({n / enqueue_s:.0f}/s), "
              f"due in {margin:.1f} s")
        if margin > 10:
            time.sleep(margin - 10)
        before_w2 = probe()
        workers.append(Worker(appdir, env, "w2"))
        time.sleep(max(0.0, due - time.time() - 1))
        at_due = probe()
        deadline = due + max(900, n / 50)
        done = 0
        while time.time() < deadline:
            done = count_stamps(stamps)
            if done >= n:
                break
            time.sleep(1.0)
        stop_sampling.set()
        sampling.join()
        after = probe()
    finally:
        stop_sampling.set()
        for w in workers:
            w.stop()
        if probe_conn is not None:
            probe_conn.close()
        sys.path.remove(str(appdir))

    runs = read_stamps(stamps)
    shutil.rmtree(appdir, ignore_errors=True)  # a failed run keeps it: the workers' logs
    rows = [r for rs in runs.values() for r in rs]
    ids = [r[0] for r in rows]
    late = [r[2] - due for r in rows]
    ends = sorted(r[3] for r in rows)
    waiting = [s for s in samples if s["t"] < due]
    rss_w1_wait = [s["rss_mb"].get("w1", 0.0) for s in waiting]
    out = {
        "system": system, "tasks": n, "ran": len(rows), "distinct": len(set(ids)),
        "early": sum(1 for x in late if x < -0.001),
        "publish_per_s_calibration": round(rate, 1),
        "enqueue_s": round(enqueue_s, 2), "enqueue_per_s": round(n / enqueue_s, 1),
        "margin_before_due_s": round(margin, 1),
        "calibration_tasks": calib, "calibration_left_after_purge": calib_left,
        "rss_mb_idle": idle["rss_mb"]["w1"],
        "rss_mb_waiting_max": round(max(rss_w1_wait), 1) if rss_w1_wait else None,
        "rss_mb_at_due": at_due["rss_mb"],
        "rss_mb_after": after["rss_mb"],
        "leased_waiting_max": max((s.get("leased", 0) for s in waiting), default=None)
        if db else None,
        "leased_before_w2": before_w2.get("leased"),
        "scheduled_rows_before_w2": before_w2.get("scheduled_rows"),
        "unacked_before_w2": before_w2.get("unacked"),
        "unacked_waiting_max": max((s.get("unacked", 0) for s in waiting), default=None)
        if redis_url else None,
        "held_before_w2": before_w2.get("leased", before_w2.get("unacked")),
        "per_worker": {k: len(v) for k, v in sorted(runs.items())},
        "load1_at_start": idle["load1"],
        "load1_max": max((s["load1"] for s in samples), default=None),
        "samples": samples,
    }
    if rows:
        out.update({
            "lateness_p50_s": round(statistics.median(late), 3),
            "lateness_p99_s": round(pct(late, 0.99), 3),
            "lateness_max_s": round(max(late), 3),
            "lateness_min_s": round(min(late), 3),
            "burst_per_s": round((len(ends) - 1) / (ends[-1] - ends[0]), 1)
            if len(ends) > 1 and ends[-1] > ends[0] else None,
            "burst_s": round(ends[-1] - ends[0], 2),
        })
    print(f"  {system}: ran {len(rows)}/{n}, per worker {out['per_worker']}")
    return out


def claim_latency(db: str, scheduled: int) -> dict:
    """Median claim+ack of one ready message with 0, then `scheduled`, scheduled messages."""
    from kombu import Connection, Exchange, Queue

    import kojin_pg  # noqa: F401

    qname = "sched_claim_" + uuid.uuid4().hex[:6]
    q = Queue(qname, Exchange(qname, type="direct"), routing_key=qname)
    payload = json.dumps({"body": "eyJ4IjogMX0=", "content-encoding": "utf-8",
                          "content-type": "application/json", "headers": {},
                          "properties": {"body_encoding": "base64", "delivery_info": {},
                                         "priority": 0, "delivery_tag": "x"}})
    out: dict = {}
    with Connection("kojin+" + db) as conn:
        ch = conn.channel()
        q(ch).declare()
        for label, count in (("0", 0), (str(scheduled), scheduled)):
            with psycopg.connect(db, autocommit=True) as pg:
                if count:
                    t = time.perf_counter()
                    pg.execute("INSERT INTO kojin.messages (queue, payload, visible_at, due_at) "
                               "SELECT %s, %s::jsonb, now() + interval '1 hour', "
                               "now() + interval '1 hour' FROM generate_series(1, %s)",
                               (qname, payload, count))
                    out["insert_scheduled_s"] = round(time.perf_counter() - t, 1)
                pg.execute("INSERT INTO kojin.messages (queue, payload) "
                           "SELECT %s, %s::jsonb FROM generate_series(1, 300)", (qname, payload))
                pg.execute("VACUUM ANALYZE kojin.messages")
                n_sched = pg.execute("SELECT count(*) FROM kojin.messages "
                                     "WHERE queue = %s AND due_at IS NOT NULL",
                                     (qname,)).fetchone()[0]
            lat = claim_ack_latencies(conn, ch, qname)
            out[label] = {"scheduled_rows": n_sched,
                          "p50_ms": round(1000 * statistics.median(lat), 3),
                          "p99_ms": round(1000 * pct(lat, 0.99), 3),
                          "mean_ms": round(1000 * statistics.fmean(lat), 3)}
        q(ch).purge()
    out["ratio_p50"] = round(out[str(scheduled)]["p50_ms"] / out["0"]["p50_ms"], 3)
    return out


def print_table(results: dict) -> None:
    k, r = results.get("kojin") or {}, results.get("redis") or {}

    def row(label: str, key: str, fmt: str = "{:.1f}", lower_better: bool = True) -> None:
        kv, rv = k.get(key), r.get(key)
        ks = fmt.format(kv) if isinstance(kv, int | float) else str(kv if kv is not None else "-")
        rs = fmt.format(rv) if isinstance(rv, int | float) else str(rv if rv is not None else "-")
        ratio = f"{kv / rv:.2f}" if isinstance(kv, int | float) and isinstance(rv, int | float) \
            and rv else "-"
        print(f"{label:<44}{ks:>14}{rs:>14}{ratio:>12}")

    print(f"\n== scheduled tasks: {results.get('tasks')} countdown tasks, threads c=4, "
          "prefetch multiplier 4")
    print(f"{'':<44}{'kojin_pg':>14}{'redis':>14}{'kojin/redis':>12}")
    row("enqueue, tasks/s", "enqueue_per_s")
    row("worker RSS idle, MB", "rss_mb_idle")
    row("worker RSS while waiting, max MB", "rss_mb_waiting_max")
    row("messages held by worker 1, 10 s before due", "held_before_w2", "{:.0f}")
    print("  (kojin_pg: leased rows; redis: size of the unacked hash)")
    row("lateness p50, s", "lateness_p50_s", "{:.3f}")
    row("lateness p99, s", "lateness_p99_s", "{:.3f}")
    row("lateness max, s", "lateness_max_s", "{:.3f}")
    row("first task's lateness, s", "lateness_min_s", "{:.3f}")
    row("due burst, tasks/s", "burst_per_s")
    for name, sysres in (("kojin_pg", k), ("redis", r)):
        if sysres:
            print(f"  {name}: ran {sysres.get('ran')} (distinct {sysres.get('distinct')}, "
                  f"early {sysres.get('early')}), per worker {sysres.get('per_worker')}")
    c = results.get("claim")
    if c:
        big = [key for key in c if key.isdigit() and key != "0"][0]
        print(f"\n== kojin_pg claim+ack of a ready message, {int(big):,} scheduled vs 0 "
              "in the same queue")
        print(f"{'':<20}{'0':>12}{big:>12}{'ratio':>10}")
        for m in ("p50_ms", "p99_ms", "mean_ms"):
            print(f"{m:<20}{c['0'][m]:>12.3f}{c[big][m]:>12.3f}"
                  f"{c[big][m] / c['0'][m]:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="10,000 tasks, 100,000 rows")
    parser.add_argument("--skip-claim", action="store_true")
    parser.add_argument("--only", choices=["kojin", "redis"], default=None)
    args = parser.parse_args(argv)
    n = args.tasks or (10_000 if args.quick else 100_000)
    rows = 100_000 if args.quick else 1_000_000
    admin, server, redis_url, redis_proc = start_servers()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{os.cpu_count()} cores, {sys.platform}",
                     "load_avg_at_start": os.getloadavg(), "tasks": n}
    try:
        if args.only in (None, "kojin"):
            db = make_db(admin, "bench_sched_" + uuid.uuid4().hex[:6])
            results["kojin"] = scheduled_run("kojin", "kojin+" + db, "kojin+" + db, n, db,
                                             None)
        if redis_url and args.only in (None, "redis"):
            base = redis_url.rsplit("/", 1)[0]
            results["redis"] = scheduled_run("redis", base + "/0", base + "/1", n, None,
                                             base + "/0")
        if not args.skip_claim:
            db = make_db(admin, "bench_sched_claim_" + uuid.uuid4().hex[:6])
            results["claim"] = claim_latency(db, rows)
    finally:
        results["load_avg_at_end"] = os.getloadavg()
        stop_servers(server, redis_proc)
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        # only the full run replaces the figures the README cites; a smaller or partial one
        # goes beside them, not kept in git (as bench/__main__.py does for its parts)
        full = not (args.quick or args.tasks or args.skip_claim or args.only)
        raw = out / ("scheduling.json" if full else "last_scheduling_quick.json")
        raw.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"\nload average at start {results['load_avg_at_start']}, "
          f"at end {results['load_avg_at_end']}")
    print(f"raw figures: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
