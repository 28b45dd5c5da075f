"""Single ``get`` against the server's own limit: ``pgbench -S -c1 -M prepared``.

Issue 12's target: the result backend's one-by-one ``get`` (``get_per_s`` of bench/backend.py)
reaches >= 0.95x of what the same server does for a one-row primary-key read from one client
with prepared statements, in the same run; Redis's ``get`` is reported beside it. pgbench runs
in its own database (``pgbench -i`` at scale 1), ``--repeat`` times, median with spread.

pgbench is a C client. Beside it runs the same read from Python twice, one read at a time on one
connection, prepared: through a psycopg cursor (:func:`psycopg_select`, as most psycopg code
reads), and on psycopg's libpq layer (:func:`libpq_select`: the connection's ``pgconn`` and a
``Transformer``, the way kojin_pg's get reads, see ``kojin_pg/db/lean.py``). The second is the
fastest Python read measured here, so it says how much of the gap is the language and how much
is kojin_pg's (and Celery's) work on top: fifteen columns decoded into Celery's meta where
pgbench's read returns one integer.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
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


def pgbench_tps(db: str, args: list[str], seconds: int,
                env: dict[str, str] | None = None) -> float:
    """Transactions per second of one ``pgbench -n ARGS -T seconds`` run on ``db``."""
    out = subprocess.run([pgbench_exe(), "-n", *args, "-T", str(seconds), db],
                         capture_output=True, text=True, timeout=seconds + 120, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench {' '.join(args)} failed: {out.stderr[-1000:]}")


def pgbench_select(db: str, seconds: int) -> dict[str, float]:
    """One ``pgbench -S -c1 -M prepared -T seconds`` run: ``{"tps": ...}``."""
    return {"tps": pgbench_tps(db, ["-S", "-c", "1", "-M", "prepared"], seconds)}


def _reads_per_second(db: str, seconds: int, what: str,
                      reader: Callable[[Any], Callable[[int], Any]]) -> dict[str, float]:
    """One psycopg connection, autocommit: ``reader(conn)`` gives the read of one account,
    which runs on a random account each time for ``seconds``: ``{"tps": ...}``."""
    import psycopg

    try:
        with psycopg.connect(db, autocommit=True) as conn:
            accounts = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()[0]
            read = reader(conn)
            done, started = 0, time.perf_counter()
            deadline = started + seconds
            while time.perf_counter() < deadline:
                for _ in range(100):
                    read(random.randint(1, accounts))
                done += 100
            return {"tps": done / (time.perf_counter() - started)}
    except psycopg.Error as exc:
        raise RuntimeError(f"the {what} failed: {exc}") from exc


def psycopg_select(db: str, seconds: int) -> dict[str, float]:
    """pgbench -S's statement from Python through a psycopg cursor, prepared, one by one for
    ``seconds``: ``{"tps": ...}``."""
    def reader(conn: Any) -> Callable[[int], Any]:
        return lambda aid: conn.execute("SELECT abalance FROM pgbench_accounts WHERE aid = %s",
                                        (aid,), prepare=True).fetchone()

    return _reads_per_second(db, seconds, "psycopg read", reader)


def libpq_select(db: str, seconds: int) -> dict[str, float]:
    """pgbench -S's statement on psycopg's libpq layer: prepared once on the connection's
    ``pgconn``, sent with a text parameter, waited for as a cursor waits and its row loaded by a
    ``Transformer``, one by one for ``seconds``: ``{"tps": ...}``."""
    import psycopg
    from psycopg import generators, pq
    from psycopg.adapt import Transformer

    def reader(conn: Any) -> Callable[[int], Any]:
        def result() -> pq.abc.PGresult:
            res = conn.wait(generators.execute(conn.pgconn))[-1]
            if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                raise psycopg.errors.error_from_result(res)
            return res

        def read(aid: int) -> Any:
            conn.pgconn.send_query_prepared(b"bench_s", [str(aid).encode()])
            res = result()
            rows = Transformer(conn)
            rows.set_pgresult(res)
            return rows.load_rows(0, res.ntuples, tuple)

        conn.pgconn.send_prepare(b"bench_s", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        result()
        return read

    return _reads_per_second(db, seconds, "libpq-level read", reader)


def get_limit(db: str, backend_rows: dict[str, Any], repeat: int, quick: bool,
              median_runs: MedianRuns) -> dict[str, Any]:
    """pgbench -S in ``db`` (a fresh database), compared with the backend section's gets."""
    seconds = 5 if quick else 10
    try:
        pgbench_init(db)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\n(pgbench -S skipped: {str(exc).splitlines()[0]})")
        return {"error": str(exc)[-500:]}
    # each repeat runs the three, one after the other, so a slow stretch of the machine hits all
    reads = median_runs(repeat, lambda: {"tps": pgbench_select(db, seconds)["tps"],
                                        "py_tps": psycopg_select(db, seconds)["tps"],
                                        "libpq_tps": libpq_select(db, seconds)["tps"]})
    kojin, redis = backend_rows.get("kojin"), backend_rows.get("redis aof")
    # the reads as rows of gets, to compare with the backend's by ratio()
    pgbench = {"get_per_s": reads.get("tps"), "get_per_s_spread": reads.get("tps_spread")}
    python = {"get_per_s": reads.get("py_tps"), "get_per_s_spread": reads.get("py_tps_spread")}
    libpq = {"get_per_s": reads.get("libpq_tps"), "get_per_s_spread": reads.get("libpq_tps_spread")}
    out: dict[str, Any] = {
        "command": f"pgbench -S -c1 -M prepared -T {seconds}",
        "pgbench_S_tps": reads.get("tps"), "pgbench_S_tps_spread": reads.get("tps_spread"),
        "psycopg_S_tps": reads.get("py_tps"), "psycopg_S_tps_spread": reads.get("py_tps_spread"),
        "psycopg_vs_pgbench": _round(ratio(python, pgbench, "get_per_s")),
        "libpq_S_tps": reads.get("libpq_tps"), "libpq_S_tps_spread": reads.get("libpq_tps_spread"),
        "libpq_vs_pgbench": _round(ratio(libpq, pgbench, "get_per_s")),
        "kojin_get_per_s": value(kojin, "get_per_s"),
        "kojin_get_per_s_spread": (kojin or {}).get("get_per_s_spread"),
        "redis_get_per_s": value(redis, "get_per_s"),
        "redis_get_per_s_spread": (redis or {}).get("get_per_s_spread"),
        "kojin_vs_pgbench": _round(ratio(kojin, pgbench, "get_per_s")),
        "redis_vs_pgbench": _round(ratio(redis, pgbench, "get_per_s")),
        "kojin_vs_psycopg": _round(ratio(kojin, python, "get_per_s")),
        "kojin_vs_libpq": _round(ratio(kojin, libpq, "get_per_s")),
        "kojin_vs_redis": _round(ratio(kojin, redis, "get_per_s")),
    }
    if "error" in reads:
        out["error"] = reads["error"]
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
    py = r.get("psycopg_S_tps")
    if py is not None:
        print(f"psycopg, same read{py:>10,.0f} /s      "
              f"{fmt_spread({'p': py, 'p_spread': r['psycopg_S_tps_spread']}, 'p'):<18}"
              f" {r['psycopg_vs_pgbench']:.2f}x of pgbench -S (through a cursor)")
    lp = r.get("libpq_S_tps")
    if lp is not None:
        print(f"psycopg's libpq   {lp:>10,.0f} /s      "
              f"{fmt_spread({'p': lp, 'p_spread': r['libpq_S_tps_spread']}, 'p'):<18}"
              f" {r['libpq_vs_pgbench']:.2f}x of pgbench -S (the fastest Python read here)")
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
    if r.get("kojin_vs_psycopg") is not None:
        print(f"kojin get is {r['kojin_vs_psycopg']:.2f}x the psycopg read")
    if r.get("kojin_vs_libpq") is not None:
        print(f"kojin get is {r['kojin_vs_libpq']:.2f}x the libpq-level read")
    if r.get("kojin_vs_redis") is not None:
        print(f"kojin get is {r['kojin_vs_redis']:.2f}x Redis get")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)

