"""Single ``get`` against the server's own limit: ``pgbench -S -c1 -M prepared``.

Issue 12's target: the result backend's one-by-one ``get`` (``get_per_s`` of bench/backend.py)
reaches >= 0.95x of what the same server does for a one-row primary-key read from one client
with prepared statements, in the same run; Redis's ``get`` is reported beside it. pgbench runs
in its own database (``pgbench -i`` at scale 1), ``--repeat`` times, median with spread.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from bench.spread import fmt_spread, ratio, value

MedianRuns = Callable[[int, Callable[[], dict]], dict]

TARGET = 0.95


def pgbench_exe() -> str:
    """pgbench of the embedded server's binaries, else the one on PATH."""
    try:
        from kojin_pg.dev.embedded import _bin_dir

        exe = _bin_dir() / "pgbench"
        if exe.exists():
            return str(exe)
    except Exception:  # the embedded server's package is optional
        pass
    found = shutil.which("pgbench")
    if not found:
        raise RuntimeError("pgbench not found (embedded server binaries or PATH)")
    return found


def pgbench_init(db: str, scale: int = 1) -> None:
    """``pgbench -i`` at ``scale`` (100,000 accounts per unit) in ``db``."""
    out = subprocess.run([pgbench_exe(), "-i", "-q", "-s", str(scale), db],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {out.stderr[-1000:]}")


def pgbench_select(db: str, seconds: int) -> dict[str, float]:
    """One ``pgbench -S -c1 -M prepared -T seconds`` run: ``{"tps": ...}``."""
    out = subprocess.run([pgbench_exe(), "-n", "-S", "-c", "1", "-M", "prepared", "-T",
                          str(seconds), db], capture_output=True, text=True,
                         timeout=seconds + 120)
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            return {"tps": float(line.split()[2])}
    raise RuntimeError(f"pgbench -S failed: {out.stderr[-1000:]}")


def get_limit(db: str, backend_rows: dict[str, Any], repeat: int, quick: bool,
              median_runs: MedianRuns) -> dict[str, Any]:
    """pgbench -S in ``db`` (a fresh database), compared with the backend section's gets."""
    seconds = 5 if quick else 10
    try:
        pgbench_init(db)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\n(pgbench -S skipped: {str(exc).splitlines()[0]})")
        return {"error": str(exc)[-500:]}
    limit = median_runs(repeat, lambda: pgbench_select(db, seconds))
    kojin, redis = backend_rows.get("kojin"), backend_rows.get("redis aof")
    as_get = {"get_per_s": limit.get("tps"), "get_per_s_spread": limit.get("tps_spread")}
    out: dict[str, Any] = {
        "command": f"pgbench -S -c1 -M prepared -T {seconds}",
        "pgbench_S_tps": limit.get("tps"), "pgbench_S_tps_spread": limit.get("tps_spread"),
        "kojin_get_per_s": value(kojin, "get_per_s"),
        "kojin_get_per_s_spread": (kojin or {}).get("get_per_s_spread"),
        "redis_get_per_s": value(redis, "get_per_s"),
        "redis_get_per_s_spread": (redis or {}).get("get_per_s_spread"),
        "kojin_vs_pgbench": _round(ratio(kojin, as_get, "get_per_s")),
        "redis_vs_pgbench": _round(ratio(redis, as_get, "get_per_s")),
        "kojin_vs_redis": _round(ratio(kojin, redis, "get_per_s")),
    }
    if "error" in limit:
        out["error"] = limit["error"]
    print_limit(out, repeat)
    return out


def print_limit(r: dict[str, Any], repeat: int) -> None:
    """The figures and ratios, one line each."""
    print(f"\n== single get against the server's own limit ({r['command']}, median of {repeat})")
    tps = r.get("pgbench_S_tps")
    if tps is None:
        print("pgbench -S failed")
        return
    print(f"pgbench -S        {tps:>10,.0f} tps     "
          f"{fmt_spread({'t': tps, 't_spread': r['pgbench_S_tps_spread']}, 't')}")
    for name, key in (("kojin get", "kojin"), ("redis get", "redis")):
        v = r.get(f"{key}_get_per_s")
        if v is None:
            continue
        line = (f"{name:<18}{v:>10,.0f} /s      "
                f"{fmt_spread({'g': v, 'g_spread': r[f'{key}_get_per_s_spread']}, 'g'):<18}"
                f" {r[f'{key}_vs_pgbench']:.2f}x of pgbench -S")
        if key == "kojin":
            line += f" (target >= {TARGET:.2f}x: {'met' if r['kojin_vs_pgbench'] >= TARGET else 'NOT met'})"
        print(line)
    if r.get("kojin_vs_redis") is not None:
        print(f"kojin get is {r['kojin_vs_redis']:.2f}x Redis get")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

