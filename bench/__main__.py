"""Run every workload against every system in one run and print ratios to kojin_pg.

usage: python -m bench [all|backend|transport|e2e|scale|cost] [--repeat N] [--quick] [--stock]
       python -m bench scheduling [--quick]   (bench/scheduling.py; not part of ``all``)
       python -m bench stages [--stock] [--quick]      (bench/stages.py; not part of ``all``)
       python -m bench listeners [--stock] [--quick]   (bench/listeners.py; not part of ``all``)
       python -m bench instances [--stock] [--quick]   (bench/instances.py; not part of ``all``)
       python -m bench callers [--stock] [--quick]     (bench/callers.py; not part of ``all``)
       python -m bench outbox [--stock] [--quick]      (bench/outbox.py; not part of ``all``)
       python -m bench processes [--stock] [--quick]   (bench/worker_processes.py; also in ``all``)

Servers: PostgreSQL from KOJIN_PG_URL, else a temporary embedded PostgreSQL 18, or with
``--stock`` a temporary cluster of the Debian apt PostgreSQL at its default settings
(bench/servers.py); ``cost`` (bench/server_cost.py) starts its own of the same kind; Redis from
``redis-server`` on PATH (installed with apt-get when missing and running as root), with AOF
``everysec`` (durability comparable to synchronous_commit=off). The workload scripts are the
shared reference ones (backend.py, transport.py, e2e.py), run as subprocesses with each URL.
Raw figures of ``all`` go to bench/results/latest.json (latest_stock.json with ``--stock``), with
the chart; a part of the bench, or ``--quick``, writes bench/results/last_<part>[_stock][_quick].json
(not kept in git) and leaves those alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import rivals

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(stock: bool = False) -> tuple[str, Any, str | None, subprocess.Popen | None]:
    """PostgreSQL (KOJIN_PG_URL, else a temporary embedded server, or with ``stock`` a
    temporary apt one, returned to destroy) and Redis: (admin URL, temporary server or None,
    Redis URL or None, Redis process or None)."""
    from bench.servers import start_postgres

    admin, server = start_postgres(stock=stock)
    redis_url, redis_proc = start_redis()
    return admin, server, redis_url, redis_proc


def stop_servers(server: Any, redis_proc: subprocess.Popen | None) -> None:
    """Stop what :func:`start_servers` started."""
    stop_redis(redis_proc)
    from bench.servers import destroy

    destroy(server)


def start_redis() -> tuple[str | None, subprocess.Popen | None]:
    exe = shutil.which("redis-server")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"],
                       capture_output=True, timeout=600)
        exe = shutil.which("redis-server")
    if exe is None:
        print("redis-server not available: Redis columns skipped")
        return None, None
    port = free_port()
    d = tempfile.mkdtemp(prefix="bench_redis_")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                             "--appendonly", "yes", "--appendfsync", "everysec",
                             "--save", ""], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


def stop_redis(proc: subprocess.Popen | None) -> None:
    """Stop a Redis from :func:`start_redis` and delete its data directory (its AOF grows with
    every run; left behind, a bench leaves megabytes in the temporary directory each time)."""
    if proc is None:
        return
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(proc.args[proc.args.index("--dir") + 1], ignore_errors=True)


def make_db(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def make_pgmq_db(admin_url: str) -> str | None:
    """A database with PGMQ's SQL installed (the pgmq package ships it; no C extension)."""
    try:
        from pgmq import get_embedded_install_sql, install_pgmq_sql
    except ImportError:
        print("pgmq not installed (pip install pgmq): pgmq columns skipped")
        return None
    db = make_db(admin_url, "bench_pgmq_" + uuid.uuid4().hex[:6])
    install_pgmq_sql(get_embedded_install_sql(), dsn=db)
    return db


def pgbench_insert_rate(url: str, clients: int, seconds: int = 10) -> float:
    """pgbench: committed single-row INSERTs per second, the physical limit of the server."""
    from bench.get_limit import pgbench_tps

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS pgbench_insert (id bigint, v text)")
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "insert.sql"
        script.write_text("\\set id random(1, 1000000000)\n"
                          "INSERT INTO pgbench_insert VALUES (:id, 'x');\n")
        return pgbench_tps(url, ["-f", str(script), "-c", str(clients),
                                 "-j", str(min(clients, 2))], seconds)


def draw_chart(results: dict, path: Path) -> None:
    """Bar chart of how many times better kojin_pg is than each competitor, per figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    bars: list[tuple[str, float]] = []
    for section, metrics in (("backend", [("store_per_s", True), ("get_per_s", True),
                                          ("get_many_per_s", True)]),
                             ("transport", [("publish_per_s", True),
                                            ("consume_ack_per_s", True)]),
                             ("e2e", [("throughput", True), ("p50_ms", False),
                                      ("chord100_s", False)]),
                             ("e2e_prefork", [("throughput", True), ("p50_ms", False),
                                              ("chord100_s", False)])):
        rows = results.get(section) or {}
        base = rows.get("kojin")
        if not base:
            continue
        for system, r in rows.items():
            if system.startswith("kojin"):
                continue
            for metric, higher in metrics:
                k, v = base.get(metric), r.get(metric)
                if k and v:
                    bars.append((f"{section} {metric.replace('_per_s', '/s')}\nvs {system}",
                                 k / v if higher else v / k))
    from bench.report_writers import chart_bars

    bars += chart_bars(results)  # concurrency sections: producers, writers, processes, get
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(bars) + 1.5))
    labels, values = zip(*bars, strict=True)
    colors = ["#2a7" if v >= 1 else "#c44" for v in values]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("times better than the competitor (log scale; right of 1 = kojin_pg better)")
    ax.set_title(f"kojin_pg vs competitors, {results['date']}, {results['machine']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def run_script(script: str, args: list[str], env: dict[str, str] | None = None,
               timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                         text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args[0].split(':')[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_results(stem: str, results: dict, quick: bool = False, stock: bool = False) -> Path:
    """Write a bench's own results as bench/results/<stem>.json (``stock``: <stem>_stock.json;
    ``quick``: last_<stem>_quick.json, which .gitignore keeps out of git); its path."""
    name = (f"last_{stem}_quick.json" if quick else f"{stem}_stock.json" if stock
            else f"{stem}.json")
    path = HERE / "results" / name
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def median_runs(repeat: int, fn) -> dict:
    try:
        runs = [fn() for _ in range(repeat)]
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        # one competitor failing must not lose the rest of the run
        print(f"  (skipped: {str(exc).splitlines()[0]})")
        return {"error": str(exc)[-500:]}
    merged = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            values = [r[key] for r in runs]
            merged[key] = statistics.median(values)
            merged[key + "_spread"] = [min(values), max(values)]
        else:
            merged[key] = value
    return merged


def table(title: str, rows: dict[str, dict], metrics: list[tuple[str, bool]]) -> None:
    """Print absolute figures and ratios to kojin (ratio > 1: kojin better)."""
    print(f"\n== {title}")
    base = rows.get("kojin")
    header = f"{'system':<18}" + "".join(f"{m:>22}" for m, _ in metrics)
    print(header)
    for system, r in rows.items():
        cells = []
        for metric, higher_is_better in metrics:
            v = r.get(metric)
            if v is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = ""
            if base and system != "kojin" and base.get(metric) and v:
                k = base[metric]
                ratio = f" ({(k / v if higher_is_better else v / k):.2f}x)"
            cells.append(f"{v:>12.1f}{ratio:>10}")
        print(f"{system:<18}" + "".join(cells))
    print("(in parentheses: how many times better kojin_pg is; < 1 means worse)")


#: The benches not part of ``all``, each with its own servers, table and JSON: their module, and
#: which of ``--stock`` and ``--repeat`` they take (all take ``--quick``).
OWN_MAINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "scheduling": ("bench.scheduling", ()),
    "stages": ("bench.stages", ("stock", "repeat")),
    "listeners": ("bench.listeners", ("stock",)),
    "instances": ("bench.instances", ("stock", "repeat")),
    "callers": ("bench.callers", ("stock", "repeat")),
    "outbox": ("bench.outbox", ("stock", "repeat")),
    "processes": ("bench.worker_processes", ("stock", "repeat")),
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", nargs="?", default="all",
                        choices=["all", "backend", "transport", "e2e", "scale", "cost",
                                 *OWN_MAINS])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller N, one repeat")
    parser.add_argument("--stock", action="store_true",
                        help="the Debian apt PostgreSQL at default settings (bench/servers.py)")
    args = parser.parse_args()
    if args.what in OWN_MAINS:  # its own servers, table and JSON (<what>.json)
        module, takes = OWN_MAINS[args.what]
        argv = ["--quick"] if args.quick else []
        if "stock" in takes and args.stock:
            argv.append("--stock")
        if "repeat" in takes:
            argv += ["--repeat", str(args.repeat)]
        return importlib.import_module(module).main(argv)
    repeat = 1 if args.quick else args.repeat
    admin, server, redis_url, redis_proc = start_servers(args.stock)
    from bench.servers import describe

    results: dict[str, dict] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                                "machine": f"{os.cpu_count()} cores, {sys.platform}",
                                "postgres": describe(admin, server)}
    kojin_env = {"BENCH_IMPORT": "import kojin_pg"}
    rival = rivals.Harness(admin, run_script, median_runs, make_db, make_pgmq_db)
    try:
        if args.what in ("all", "backend"):
            n = "500" if args.quick else "2000"
            rows = {}
            db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
            rows["kojin"] = median_runs(repeat, lambda: run_script(
                "backend.py", ["kojin+" + db, n, "import kojin_pg"]))
            db_off = db + "?synchronous_commit=off"
            rows["kojin sync=off"] = median_runs(repeat, lambda: run_script(
                "backend.py", ["kojin+" + db_off, n, "import kojin_pg"]))
            rows["celery db+"] = median_runs(repeat, lambda: run_script(
                "backend.py", ["db+" + db.replace("postgresql://", "postgresql+psycopg://"),
                               n]))
            if redis_url:
                rows["redis aof"] = median_runs(repeat, lambda: run_script(
                    "backend.py", [redis_url, n]))
            results["backend"] = rows
            table("result backend, no worker (ops/s)", rows,
                  [("store_per_s", True), ("get_per_s", True), ("get_many_per_s", True)])
            from bench.get_limit import get_limit
            from bench.writers import store_writers

            results["get_limit"] = get_limit(make_db(admin, "bench_pgb_" + uuid.uuid4().hex[:6]),
                                             rows, repeat, args.quick, median_runs)
            results["store_writers"] = store_writers(db, redis_url, repeat, args.quick,
                                                     run_script, median_runs)
        if args.what in ("all", "transport"):
            n = "1000" if args.quick else "5000"
            rows = {}
            db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
            rows["kojin"] = median_runs(repeat, lambda: run_script(
                "transport.py", ["kojin+" + db, n], env=kojin_env))
            rows["kombu sqla"] = median_runs(repeat, lambda: run_script(
                "transport.py", ["sqla+" + db.replace("postgresql://", "postgresql+psycopg://"),
                                 n]))
            rows["kojin sync=off"] = median_runs(repeat, lambda: run_script(
                "transport.py", ["kojin+" + db + "?synchronous_commit=off", n], env=kojin_env))
            if redis_url:
                rows["redis"] = median_runs(repeat, lambda: run_script(
                    "transport.py", [redis_url, n]))
            pgmq_db = make_pgmq_db(admin)
            pgmq_url = pgmq_db.replace("postgresql://", "pgmq://") if pgmq_db else None
            if pgmq_url:
                rows["kombu pgmq"] = median_runs(repeat, lambda: run_script(
                    "transport.py", [pgmq_url, n, '{"init_extension": false}']))
            rows.update(rivals.transport_rows(rival, n, repeat))
            results["transport"] = rows
            table("kombu transport, one process (msgs/s)", rows,
                  [("publish_per_s", True), ("consume_ack_per_s", True)])
            from bench.writers import publish_producers

            results["publish_producers"] = publish_producers(db, redis_url, repeat, args.quick,
                                                             run_script, median_runs)
        if args.what in ("all", "e2e"):
            rows = {}
            db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
            n_tp, n_lat = ("300", "50") if args.quick else ("2000", "200")
            big = {"BENCH_CHORD1000": "1"}
            rows["kojin/kojin"] = median_runs(repeat, lambda: run_script(
                "e2e.py", ["kojin+" + db, "kojin+" + db, n_tp, n_lat], env={**kojin_env, **big}))
            off = "kojin+" + db + "?synchronous_commit=off"  # beside: Redis AOF's durability
            rows["kojin sync=off"] = median_runs(repeat, lambda: run_script(
                "e2e.py", [off, off, n_tp, n_lat], env={**kojin_env, **big}))
            if redis_url:
                rows["redis/redis"] = median_runs(repeat, lambda: run_script(
                    "e2e.py", [redis_url, redis_url, n_tp, n_lat], env=big))
            psyco = db.replace("postgresql://", "postgresql+psycopg://")
            # the slow pairs: one run, fewer tasks
            rows["sqla/db+"] = median_runs(1, lambda: run_script(
                "e2e.py", ["sqla+" + psyco, "db+" + psyco, "200", "20"]))
            pgmq_db = make_pgmq_db(admin)
            if pgmq_db:
                rows["pgmq/db+"] = median_runs(1, lambda: run_script(
                    "e2e.py", [pgmq_db.replace("postgresql://", "pgmq://"),
                               "db+" + db.replace("postgresql://", "postgresql+psycopg://"),
                               "200", "20"],
                    env={"BENCH_BROKER_OPTIONS": '{"init_extension": false}'}))
            rows.update(rivals.e2e_rows(rival, db, "threads", n_tp, n_lat, repeat))
            rows = {("kojin" if k == "kojin/kojin" else k): v for k, v in rows.items()}
            results["e2e"] = rows
            table("Celery end to end, threads pool c=4", rows,
                  [("throughput", True), ("p50_ms", False), ("p95_ms", False),
                   ("p99_ms", False), ("chord100_s", False), ("chord1000_s", False)])
            prefork = {"BENCH_POOL": "prefork"}
            rows = {"kojin": median_runs(repeat, lambda: run_script(
                "e2e.py", ["kojin+" + db, "kojin+" + db, n_tp, n_lat],
                env={**kojin_env, **prefork}))}
            rows["kojin sync=off"] = median_runs(repeat, lambda: run_script(
                "e2e.py", [off, off, n_tp, n_lat], env={**kojin_env, **prefork}))
            if redis_url:
                rows["redis/redis"] = median_runs(repeat, lambda: run_script(
                    "e2e.py", [redis_url, redis_url, n_tp, n_lat], env=prefork))
            rows.update(rivals.e2e_rows(rival, db, "prefork", n_tp, n_lat, repeat))
            results["e2e_prefork"] = rows
            table("Celery end to end, prefork pool c=4", rows,
                  [("throughput", True), ("p50_ms", False), ("p95_ms", False),
                   ("p99_ms", False), ("chord100_s", False)])
            from bench.worker_processes import worker_processes

            results["worker_processes"] = worker_processes(db, redis_url, repeat, n_tp,
                                                           run_script, median_runs)
        if args.what in ("all", "scale"):
            size = "100000" if args.quick else "1000000"
            db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
            results["backlog"] = run_script("scale.py", ["backlog", db, size])
            results["cleanup"] = run_script("scale.py", ["cleanup", db, size])
            results["pgbench_insert_tps"] = {
                str(c): round(pgbench_insert_rate(db, c, 5 if args.quick else 10))
                for c in (1, 4)}
            print("\n== scale")
            print("claim+ack latency (ms) by backlog:",
                  {k: v for k, v in results["backlog"].items() if k != "workload"})
            print("cleanup:", {k: v for k, v in results["cleanup"].items() if k != "workload"})
            print("pgbench single-row INSERT commits/s by clients:",
                  results["pgbench_insert_tps"])
        if args.what in ("all", "cost"):
            from bench.server_cost import run as server_cost

            results["server_cost"] = server_cost(
                stock=args.stock, quick=args.quick,
                redis=(redis_url, redis_proc.pid) if redis_url and redis_proc else None)
    finally:
        stop_servers(server, redis_proc)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    # a stock run keeps its own files, and a part of the bench or a quick one leaves the
    # README's full run alone (and draws no chart)
    stock = "_stock" if args.stock else ""
    full = args.what == "all" and not args.quick
    name = f"latest{stock}" if full else f"last_{args.what}{stock}{'_quick' if args.quick else ''}"
    raw = out / f"{name}.json"
    raw.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nraw figures: {raw}")
    if full:
        draw_chart(results, out / f"chart{stock}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
