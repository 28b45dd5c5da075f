"""README tables and chart bars for the concurrency sections of bench/results/latest.json.

The sections: ``publish_producers`` (1-64 producers), ``store_writers`` (16 result writers),
``worker_processes`` (1-8 prefork processes) and ``get_limit`` (single get against
``pgbench -S``). Each cell shows the median and the repeats' ``[min-max]``; ratio columns say how
many times better kojin_pg is (< 1: worse). Used by ``bench/report.py`` and ``draw_chart``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bench.spread import ratio, spread, value

Table = Callable[[list[list[str]]], str]

PRODUCER_COUNTS = ("1", "4", "16", "64")
WORKER_COUNTS = ("1", "2", "4", "8")
NAMES = {"kojin": "kojin_pg", "kojin no notify": "kojin_pg use_notify=false",
         "kojin sync=off": "kojin_pg sync=off"}


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def cell(row: Mapping[str, Any] | None, metric: str) -> str:
    """``median [min-max]`` ('-' when missing or failed)."""
    v, s = value(row, metric), spread(row, metric)
    if v is None or s is None:
        return "-"
    if s[0] == s[1]:
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(s[0])}-{_fmt(s[1])}]"


def ratio_cell(base: Mapping[str, Any] | None, other: Mapping[str, Any] | None,
               metric: str) -> str:
    """kojin_pg's ratio to ``other`` (higher is better), two decimals."""
    r = ratio(base, other, metric)
    return "-" if r is None else f"{r:.2f}"


def publish_producers(data: Mapping[str, Any], table: Table) -> str | None:
    """Publish msgs/s by producer processes: notify on, off, sync=off, Redis, and ratios."""
    section = data.get("publish_producers") or {}
    if not section:
        return None
    rows = [["producers", "kojin_pg msgs/s", "use_notify=false", "kojin_pg ÷ no notify",
             "sync=off", "Redis", "kojin_pg ÷ Redis"]]
    for count in PRODUCER_COUNTS:
        r = section.get(count)
        if not r:
            continue
        k = r.get("kojin")
        rows.append([count, cell(k, "publish_per_s"),
                     cell(r.get("kojin no notify"), "publish_per_s"),
                     ratio_cell(k, r.get("kojin no notify"), "publish_per_s"),
                     cell(r.get("kojin sync=off"), "publish_per_s"),
                     cell(r.get("redis"), "publish_per_s"),
                     ratio_cell(k, r.get("redis"), "publish_per_s")])
    return table(rows)


def store_writers(data: Mapping[str, Any], table: Table) -> str | None:
    """Result stores/s from the writer processes, each system with kojin_pg's ratio to it."""
    section = data.get("store_writers") or {}
    base = section.get("kojin")
    if not base or "error" in base:
        return None
    writers = int(base.get("writers", 16))
    rows = [[f"result stores, {writers} writers", "stores/s", "kojin_pg ÷ row"]]
    for system, r in section.items():
        name = NAMES.get(system, system)
        rows.append([name, cell(r, "store_per_s"),
                     "" if system == "kojin" else ratio_cell(base, r, "store_per_s")])
    return table(rows)


def worker_processes(data: Mapping[str, Any], table: Table) -> str | None:
    """Tasks/s by prefork worker processes, kojin_pg and Redis, with the ratio."""
    section = data.get("worker_processes") or {}
    if not section:
        return None
    with_off = any(f"kojin sync=off x{count}" in section for count in WORKER_COUNTS)
    rows = [["prefork worker processes", "kojin_pg tasks/s", "Redis tasks/s",
             "kojin_pg ÷ Redis"]]
    if with_off:
        rows[0] += ["kojin_pg at ``off``", "``off`` ÷ Redis"]
    for count in WORKER_COUNTS:
        k, r = section.get(f"kojin x{count}"), section.get(f"redis x{count}")
        if k is None and r is None:
            continue
        rows.append([count, cell(k, "throughput"), cell(r, "throughput"),
                     ratio_cell(k, r, "throughput")])
        if with_off:
            off = section.get(f"kojin sync=off x{count}")
            rows[-1] += [cell(off, "throughput"), ratio_cell(off, r, "throughput")]
    return table(rows)


def get_limit(data: Mapping[str, Any], table: Table) -> str | None:
    """Single get per second against ``pgbench -S -c1 -M prepared`` on the same server."""
    g = data.get("get_limit") or {}
    if g.get("pgbench_S_tps") is None:
        return None
    limit = {"v": g["pgbench_S_tps"], "v_spread": g.get("pgbench_S_tps_spread")}
    rows = [["single get, one client", "per s", "÷ pgbench -S"],
            [g.get("command", "pgbench -S"), cell(limit, "v"), "1.00"]]
    if g.get("psycopg_S_tps") is not None:
        py = {"v": g["psycopg_S_tps"], "v_spread": g.get("psycopg_S_tps_spread")}
        rows.append(["the same read, psycopg cursor", cell(py, "v"), ratio_cell(py, limit, "v")])
    if g.get("libpq_S_tps") is not None:
        lp = {"v": g["libpq_S_tps"], "v_spread": g.get("libpq_S_tps_spread")}
        rows.append(["the same read, psycopg's libpq", cell(lp, "v"), ratio_cell(lp, limit, "v")])
    for name, key in (("kojin_pg get", "kojin"), ("Redis get", "redis")):
        v = g.get(f"{key}_get_per_s")
        if v is None:
            continue
        r = {"v": v, "v_spread": g.get(f"{key}_get_per_s_spread")}
        rows.append([name, cell(r, "v"), ratio_cell(r, limit, "v")])
    text = table(rows)
    if g.get("kojin_vs_libpq") is not None:
        text += (f"\n\nkojin_pg's get is {g['kojin_vs_libpq']:.2f}x the same read on psycopg's "
                 f"libpq layer (one connection, prepared), the fastest Python read measured, "
                 f"and {g['kojin_vs_psycopg']:.2f}x that read through a psycopg cursor.")
    elif g.get("kojin_vs_psycopg") is not None:
        text += (f"\n\nkojin_pg's get is {g['kojin_vs_psycopg']:.2f}x the same read from "
                 "psycopg (one connection, prepared).")
    if g.get("kojin_vs_redis") is not None:
        text += f"\n\nkojin_pg's get is {g['kojin_vs_redis']:.2f}x Redis's in the same run."
    return text


def render(data: Mapping[str, Any], table: Table) -> list[str]:
    """Every concurrency section present in ``data``, as reStructuredText blocks."""
    blocks = [get_limit(data, table), store_writers(data, table),
              publish_producers(data, table), worker_processes(data, table)]
    return [b for b in blocks if b]


def chart_bars(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``(label, times better)`` bars for ``draw_chart``: each count against Redis and against
    kojin_pg without notifications, and the single get against ``pgbench -S``."""
    bars: list[tuple[str, float]] = []
    for count, rows in (results.get("publish_producers") or {}).items():
        k = rows.get("kojin")
        for other, label in (("kojin no notify", "kojin use_notify=false"), ("redis", "redis")):
            r = ratio(k, rows.get(other), "publish_per_s")
            if r:
                bars.append((f"publish/s {count} producers\nvs {label}", r))
    stores = results.get("store_writers") or {}
    writers = int((stores.get("kojin") or {}).get("writers", 16))
    for other, label in (("kojin no notify", "kojin use_notify=false"), ("redis aof", "redis aof")):
        r = ratio(stores.get("kojin"), stores.get(other), "store_per_s")
        if r:
            bars.append((f"stores/s {writers} writers\nvs {label}", r))
    procs = results.get("worker_processes") or {}
    for count in WORKER_COUNTS:
        r = ratio(procs.get(f"kojin x{count}"), procs.get(f"redis x{count}"), "throughput")
        if r:
            bars.append((f"prefork x{count} tasks/s\nvs redis", r))
    g = results.get("get_limit") or {}
    if g.get("kojin_vs_pgbench"):
        bars.append(("single get/s vs pgbench -S\n(server limit, target 0.95)", float(g["kojin_vs_pgbench"])))
    return bars
