"""Where a task's round trip goes: e2e.py's sequential ``delay().get()`` loop, stage by stage,
for kojin_pg (``synchronous_commit`` on, and off beside it) and Redis in one run.

usage: python -m bench.stages [--pool prefork|threads] [--tasks N] [--repeat N] [--quick] [--stock]
       python -m bench stages [--stock] [--repeat N] [--quick]

Each system runs bench/e2e.py (a real ``celery worker``, c=4) with bench/stage_trace.py
imported in the caller and the worker, which stamps every task's stages; the repeats are taken
in turns (see bench/interleave.py) and their samples pooled, the first 20 of each run dropped as
warm-up. Printed per stage: p50 and p99 in ms, and kojin_pg's p50 against Redis's. The stages:

- ``delay()``: the caller's publish, and within it (kojin_pg) the publish statement's round trip;
- ``to the worker``: from ``delay()`` returning to the worker's main process receiving the task
  (negative when the worker hears of it before the caller's ``delay()`` returns);
- ``to the pool``: from there to a child (prefork) or thread starting it;
- ``run + store``: the task and the storing of its result;
- ``to the caller``: from the result stored to the caller's ``get()`` returning.

Writes bench/results/stages.json (``--quick``: last_stages_quick.json, not kept in git).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (label, from stage, to stage), as stage_trace.py stamps them.
INTERVALS = (
    ("delay()", "publish", "published"),
    ("publish statement", "statement", "statement_done"),
    ("to the worker", "published", "received"),
    ("to the pool", "received", "started"),
    ("run + store", "started", "stored"),
    ("to the caller", "stored", "got"),
    ("round trip", "publish", "got"),
)
#: Stages within the one above them (printed indented).
WITHIN = {"publish statement"}
WARM_UP = 20


def read_trace(directory: str) -> list[dict[str, float]]:
    """The stamps of each task that went the whole way, in the order they were published."""
    tasks: dict[str, dict[str, float]] = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as lines:
            for line in lines:
                stage, task_id, at = line.split()
                tasks.setdefault(task_id, {}).setdefault(stage, float(at))
    done = [t for t in tasks.values() if "publish" in t and "got" in t]
    return sorted(done, key=lambda t: t["publish"])


def intervals(tasks: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each interval's samples in ms."""
    out: dict[str, list[float]] = {}
    for label, start, end in INTERVALS:
        samples = [1000 * (t[end] - t[start]) for t in tasks if start in t and end in t]
        if samples:
            out[label] = samples
    return out


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_once(url: str, pool: str, tasks: int, kojin: bool) -> dict[str, list[float]]:
    """One e2e.py run's latency loop, traced."""
    from bench.__main__ import run_script

    trace_dir = tempfile.mkdtemp(prefix="bench_stages_")
    try:
        imports = "import kojin_pg; " if kojin else ""
        env = {"BENCH_POOL": pool, "BENCH_TRACE_DIR": trace_dir,
               "BENCH_IMPORT": f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); "
                               f"{imports}import bench.stage_trace"}
        run_script("e2e.py", [url, url, "20", str(tasks)], env=env)
        traced = read_trace(trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    # the warm-up task comes before the loop, the throughput part and the chord after it
    return intervals(traced[1 + WARM_UP:1 + tasks])


def main(argv: list[str] | None = None) -> int:
    from bench.servers import bench_parser, describe

    parser = bench_parser("python -m bench.stages", "100 tasks, one repeat")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads"])
    parser.add_argument("--tasks", type=int, default=400)
    args = parser.parse_args(argv)
    tasks, repeat = (100, 1) if args.quick else (args.tasks, args.repeat)
    from bench.__main__ import make_db, start_servers, stop_servers

    admin, server, redis_url, redis_proc = start_servers(args.stock)
    try:
        db = make_db(admin, "bench_" + uuid.uuid4().hex[:6])
        systems = {"kojin": ("kojin+" + db, True),
                   "kojin sync=off": ("kojin+" + db + "?synchronous_commit=off", True)}
        if redis_url:
            systems["redis"] = (redis_url, False)
        pooled: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
        for _ in range(repeat):
            for name, (url, kojin) in systems.items():
                for label, samples in run_once(url, args.pool, tasks, kojin).items():
                    pooled[name].setdefault(label, []).extend(samples)
        results = {"date": time.strftime("%Y-%m-%d %H:%M"),
                   "machine": f"{os.cpu_count()} cores, {sys.platform}",
                   "postgres": describe(admin, server), "pool": args.pool, "concurrency": 4,
                   "tasks_per_run": tasks - WARM_UP, "repeat": repeat,
                   "stages": {name: {label: {"p50_ms": round(statistics.median(s), 3),
                                             "p99_ms": round(percentile(s, 0.99), 3),
                                             "n": len(s)}
                                     for label, s in stages.items()}
                              for name, stages in pooled.items()}}
    finally:
        stop_servers(server, redis_proc)
    print_table(results)
    from bench.__main__ import save_results

    save_results("stages", results, quick=args.quick, stock=args.stock)
    return 0


def print_table(results: dict) -> None:
    stages = results["stages"]
    names = list(stages)
    print(f"\n== where a round trip goes: {results['pool']} c=4, sequential delay().get(), ms")
    print(f"{'stage':<22}" + "".join(f"{n + ' p50':>20}{n + ' p99':>20}" for n in names)
          + f"{'kojin/redis p50':>18}")
    for label, _, _ in INTERVALS:
        cells = []
        for name in names:
            row = stages[name].get(label)
            cells += [f"{row['p50_ms']:>20.3f}", f"{row['p99_ms']:>20.3f}"] if row else [
                f"{'-':>20}"] * 2
        kojin, redis = stages["kojin"].get(label), stages.get("redis", {}).get(label)
        ratio = (f"{kojin['p50_ms'] / redis['p50_ms']:>17.2f}x"
                 if kojin and redis and redis["p50_ms"] > 0 else f"{'-':>18}")
        shown = "  " + label if label in WITHIN else label
        print(f"{shown:<22}" + "".join(cells) + ratio)


if __name__ == "__main__":
    sys.exit(main())
