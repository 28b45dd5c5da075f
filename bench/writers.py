"""Concurrent writers: publishes from 1-64 producer processes, result stores from 16 writers.

Issue 12's target: with notifications on, kojin_pg reaches >= 0.95x of the same run with
``use_notify=false`` (a NOTIFY takes a database-wide lock at commit) and >= 1.0x Redis, at every
count. Each count runs kojin_pg (notify on), kojin_pg ``?use_notify=false``, kojin_pg
``?synchronous_commit=off`` (beside, for comparison with Redis AOF everysec) and Redis, side by
side in the same run. The total work per run stays the same at every count (split across the
processes), so a run with 64 producers is not 64 times longer than one with 1.

Called from ``bench/__main__.py``, which passes its ``run_script`` and ``median_runs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.interleave import interleaved_runs
from bench.spread import print_ratio_table

RunScript = Callable[..., dict]
MedianRuns = Callable[[int, Callable[[], dict]], dict]

PRODUCER_COUNTS = (1, 4, 16, 64)
STORE_WRITERS = 16
#: Targets for kojin_pg (notify on) against each other row.
TARGETS = {"kojin no notify": 0.95, "redis": 1.0, "redis aof": 1.0}
KOJIN_ENV = {"BENCH_IMPORT": "import kojin_pg"}


def total_messages(quick: bool) -> int:
    """Messages (or stores) per run, split across the processes."""
    return 2000 if quick else 8000


def kojin_variants(db: str) -> dict[str, str]:
    """The kojin_pg rows and their URLs (``db`` is a plain ``postgresql://`` URL)."""
    sep = "&" if "?" in db else "?"
    return {"kojin": "kojin+" + db,
            "kojin no notify": f"kojin+{db}{sep}use_notify=false",
            "kojin sync=off": f"kojin+{db}{sep}synchronous_commit=off"}


def publish_producers(db: str, redis_url: str | None, repeat: int, quick: bool,
                      run_script: RunScript, median_runs: MedianRuns) -> dict[str, dict]:
    """Publish rate from 1, 4, 16 and 64 producers: ``{count: {system: row}}``, printed."""
    out: dict[str, dict] = {}
    total = total_messages(quick)
    for count in PRODUCER_COUNTS:
        per = str(max(1, total // count))
        urls: dict[str, tuple[str, dict[str, str] | None]] = {
            name: (url, KOJIN_ENV) for name, url in kojin_variants(db).items()}
        if redis_url:
            urls["redis"] = (redis_url, None)
        rows = interleaved_runs(repeat, {
            name: (lambda args=[url, per, str(count)], env=env: run_script(
                "concurrent_publish.py", args, env=env, timeout=1800))
            for name, (url, env) in urls.items()}, median_runs)
        out[str(count)] = rows
        print_ratio_table(f"publish from {count} producer process{'es' if count > 1 else ''}"
                          f" ({per} messages each; msgs/s, median of {repeat})",
                          rows, "publish_per_s", "msgs/s", TARGETS)
    return out


def store_writers(db: str, redis_url: str | None, repeat: int, quick: bool,
                  run_script: RunScript, median_runs: MedianRuns,
                  writers: int = STORE_WRITERS) -> dict[str, Any]:
    """Result stores from ``writers`` processes: ``{system: row}``, printed."""
    per = str(max(1, total_messages(quick) // writers))
    urls: dict[str, tuple[str, dict[str, str] | None]] = {
        name: (url, KOJIN_ENV) for name, url in kojin_variants(db).items()}
    if redis_url:
        urls["redis aof"] = (redis_url, None)
    rows = interleaved_runs(repeat, {
        name: (lambda args=[url, per, str(writers)], env=env: run_script(
            "concurrent_store.py", args, env=env, timeout=1800))
        for name, (url, env) in urls.items()}, median_runs)
    print_ratio_table(f"result stores from {writers} writer processes ({per} each; stores/s,"
                      f" median of {repeat})", rows, "store_per_s", "stores/s", TARGETS)
    return rows
