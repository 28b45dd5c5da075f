"""Render bench/results/latest.json as the README's reStructuredText tables.

usage: python -m bench.report [RESULTS.json]   (prints the tables; paste them under
"Benchmarks"; default bench/results/latest.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import report_writers

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

SECTIONS = [
    ("backend", "result backend, no worker", [("store_per_s", "store/s", True),
                                               ("get_per_s", "get/s", True),
                                               ("get_many_per_s", "get_many/s", True)]),
    ("transport", "kombu transport, 1 process", [("publish_per_s", "publish/s", True),
                                                  ("consume_ack_per_s", "consume+ack/s", True)]),
    ("e2e", "Celery e2e, threads c=4", [("throughput", "tasks/s", True),
                                        ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False),
                                        ("chord100_s", "chord-100 s", False),
                                        ("chord1000_s", "chord-1000 s", False)]),
    ("e2e_prefork", "Celery e2e, prefork c=4", [("throughput", "tasks/s", True),
                                                ("p50_ms", "p50 ms", False),
                                                ("p99_ms", "p99 ms", False),
                                                ("chord100_s", "chord-100 s", False)]),
]


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]))]
    sep = "".join(("=" * (w - 2)).ljust(w) for w in widths).rstrip()
    out = [sep]
    for k, row in enumerate(rows):
        out.append("".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            out.append(sep)
    out.append(sep)
    return "\n".join(out)


def main() -> None:
    data = json.loads((Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS).read_text())
    for key, title, metrics in SECTIONS:
        section = data.get(key) or {}
        base = section.get("kojin") or section.get("kojin/kojin")
        if not base:
            continue
        rows = [[title] + [label for _, label, _ in metrics]]
        for system, r in section.items():
            if "error" in r:
                continue
            cells = [system.replace("kojin", "kojin_pg", 1) if system.startswith("kojin")
                     else system]
            for metric, _, higher in metrics:
                v, k = r.get(metric), base.get(metric)
                if v is None:
                    cells.append("-")
                    continue
                spread = r.get(metric + "_spread")
                cell = fmt(v)
                if spread and spread[0] != spread[1]:  # repeated: show the range of the runs
                    cell += f" [{fmt(spread[0])}-{fmt(spread[1])}]"
                if not (system == "kojin" or system == "kojin/kojin" or not k):
                    cell += f" ({(k / v if higher else v / k):.2f})"
                cells.append(cell)
            rows.append(cells)
        print(table(rows) + "\n")
    for block in report_writers.render(data, table):  # concurrency sections
        print(block + "\n")
    backlog = data.get("backlog") or {}
    if backlog:
        levels = [k for k in backlog if k != "workload"]
        print(table([["messages queued"] + [f"{int(k):,}" for k in levels],
                     ["claim+ack ms"] + [f"{backlog[k]:.2f}" for k in levels]]) + "\n")
    cleanup = data.get("cleanup")
    if cleanup:
        print(f"Cleanup of {cleanup['expired']:,} expired results: {cleanup['seconds']} s "
              f"({cleanup['rows_per_s']:,} rows/s); store+get p50 meanwhile "
              f"{cleanup['store_get_ms_p50_during']} ms (before: "
              f"{cleanup['store_get_ms_p50_before']} ms), worst "
              f"{cleanup['store_get_ms_max_during']} ms.\n")
    pgb = data.get("pgbench_insert_tps")
    if pgb:
        print(f"pgbench single-row INSERT commits/s on the same server: {pgb['1']:,} with one "
              f"client, {pgb['4']:,} with four.\n")


if __name__ == "__main__":
    main()
