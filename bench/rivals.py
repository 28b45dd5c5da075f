"""The newest PostgreSQL rivals as extra rows of ``python -m bench`` (issue 12).

- ``kombu-pgmq`` 0.2.0 (github.com/ebertti/kombu-pgmq): a third-party kombu transport on PGMQ,
  in its two variants, ``TransportPGMQ`` (through the official ``pgmq`` client, what its
  ``pgmq://`` alias resolves to) and ``TransportPsycopg`` (its own SQL over psycopg 3). Rows
  ``kpgmq`` and ``kpgmq-psy``. It is not kombu's built-in ``kombu.transport.pgmq`` (kombu 5.7,
  the bench's older ``kombu pgmq`` / ``pgmq/db+`` rows): it joins those rows, it does not replace
  them. It has no result backend, so end to end it runs with kojin_pg's backend (the fair
  pairing), and once with Celery's ``db+`` backend.
- ``potatoq`` 26.1a8 (github.com/anze3db/potatoq): a Celery-compatible replacement with its own
  native PostgreSQL broker; it runs bench/potatoq_e2e.py (the e2e.py workload) through its own
  ``potatoq worker``. Row ``potatoq``.

Both run at their shipped defaults. The one option set is kombu-pgmq's ``check_extension:
false``: the bench installs PGMQ's SQL from the ``pgmq`` package (no C extension, so nothing in
``pg_extension``), and kombu-pgmq refuses to start without the extension unless told so. Every
row runs in its own subprocess (kombu-pgmq's import re-points kombu's ``pgmq://`` alias, so it
is only imported where it is measured) and is skipped with a printed reason when the package is
missing or the run fails.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

KOMBU_PGMQ = "kombu-pgmq 0.2.0"
POTATOQ = "potatoq 26.1a8"
#: kombu-pgmq's two transport classes, under aliases of our own (its ``pgmq://`` would shadow
#: kombu's built-in transport of that name)
VARIANTS = {"kpgmq": "kombu_pgmq.transport:TransportPGMQ",
            "kpgmq-psy": "kombu_pgmq.transport:TransportPsycopg"}
KOMBU_PGMQ_OPTIONS = {"check_extension": False}
LEGEND = ("kpgmq = kombu-pgmq 0.2.0 TransportPGMQ (pgmq client), kpgmq-psy = its "
          "TransportPsycopg (raw SQL); pgmq = kombu's built-in pgmq transport; potatoq = potatoq "
          "26.1a8 on its own Postgres broker and worker")


@dataclass
class Harness:
    """What the rows need from bench/__main__.py (passed in, so this module imports none of it)."""

    admin: str
    #: run_script(script, args, env=None) -> the script's JSON figures
    run: Callable[..., dict]
    #: median_runs(repeat, fn) -> merged figures, or {"error": ...} (it prints the skip)
    median: Callable[[int, Callable[[], dict]], dict]
    #: make_db(admin, name) -> URL of a fresh database
    make_db: Callable[[str, str], str]
    #: make_pgmq_db(admin) -> URL of a fresh database with PGMQ's SQL, or None
    make_pgmq_db: Callable[[str], str | None]


def installed(module: str, what: str) -> bool:
    """Whether ``module`` can be imported here; print why the rows are skipped if not."""
    if importlib.util.find_spec(module) is None:
        print(f"{what} not installed (pip install -e '.[bench]'): its rows skipped")
        return False
    return True


def alias_import(alias: str, kojin: bool = False) -> str:
    """BENCH_IMPORT text registering ``alias`` for one kombu-pgmq transport class (one line:
    e2e.py pastes it into its app module)."""
    prefix = "import kojin_pg; " if kojin else ""
    return (f"{prefix}import kombu_pgmq; from kombu.transport import TRANSPORT_ALIASES as _ta; "
            f"_ta[{alias!r}] = {VARIANTS[alias]!r}")


def kombu_pgmq_url(pgmq_db: str, alias: str) -> str:
    """The kombu URL of ``pgmq_db`` for the transport registered as ``alias``."""
    return alias + "://" + pgmq_db.split("://", 1)[1]


def transport_rows(h: Harness, n: str, repeat: int) -> dict[str, dict]:
    """Raw kombu publish and consume+ack (bench/transport.py), each kombu-pgmq variant."""
    rows: dict[str, dict] = {}
    if not installed("kombu_pgmq", KOMBU_PGMQ):
        return rows
    for alias in VARIANTS:
        db = h.make_pgmq_db(h.admin)
        if db is None:
            return rows
        url = kombu_pgmq_url(db, alias)
        rows[alias] = h.median(repeat, lambda url=url, alias=alias: h.run(
            "transport.py", [url, n, json.dumps(KOMBU_PGMQ_OPTIONS)],
            env={"BENCH_IMPORT": alias_import(alias)}))
    return rows


def kombu_pgmq_e2e_rows(h: Harness, kojin_db: str, pool: str, n_tp: str = "200",
                        n_lat: str = "20", with_db_backend: bool = False) -> dict[str, dict]:
    """Celery end to end (bench/e2e.py), each kombu-pgmq variant as broker and kojin_pg as
    backend (kojin_db), plus with ``with_db_backend`` TransportPGMQ with Celery's ``db+``.

    One run, few tasks, as for the bench's other slow pairs: kombu-pgmq sleeps its 1 s
    ``polling_interval`` whenever a queue is empty, so every sequential round trip waits ~1 s.
    """
    rows: dict[str, dict] = {}
    if not installed("kombu_pgmq", KOMBU_PGMQ):
        return rows
    env = {"BENCH_POOL": pool, "BENCH_BROKER_OPTIONS": json.dumps(KOMBU_PGMQ_OPTIONS)}
    pairs = [(alias, "kojin+" + kojin_db, f"{alias}/kojin") for alias in VARIANTS]
    if with_db_backend:
        pairs.append(("kpgmq", "db+" + kojin_db.replace("postgresql://", "postgresql+psycopg://"),
                      "kpgmq/db+"))
    for alias, backend, name in pairs:
        db = h.make_pgmq_db(h.admin)
        if db is None:
            return rows
        run_env = {**env, "BENCH_IMPORT": alias_import(alias, kojin=backend.startswith("kojin+"))}
        rows[name] = h.median(1, lambda db=db, alias=alias, backend=backend, run_env=run_env: h.run(
            "e2e.py", [kombu_pgmq_url(db, alias), backend, n_tp, n_lat], env=run_env))
    return rows


def potatoq_e2e_rows(h: Harness, pool: str, n_tp: str, n_lat: str, repeat: int,
                     chord1000: bool = False) -> dict[str, dict]:
    """potatoq on its native PostgreSQL broker through its own worker (bench/potatoq_e2e.py),
    4 task slots in ``pool`` (threads: one process with 4 threads; prefork: 4 processes)."""
    rows: dict[str, dict] = {}
    if not installed("potatoq", POTATOQ):
        return rows
    db = h.make_db(h.admin, "bench_potatoq_" + uuid.uuid4().hex[:6])
    env = {"BENCH_POOL": pool, **({"BENCH_CHORD1000": "1"} if chord1000 else {})}
    rows["potatoq"] = h.median(repeat, lambda: h.run("potatoq_e2e.py", [db, n_tp, n_lat], env=env))
    return rows


def e2e_rows(h: Harness, kojin_db: str, pool: str, n_tp: str, n_lat: str,
             repeat: int) -> dict[str, dict]:
    """Every rival's rows for one e2e table (``pool`` threads or prefork, 4 slots)."""
    threads = pool == "threads"
    print(f"  rivals ({pool}): {LEGEND}")
    rows = potatoq_e2e_rows(h, pool, n_tp, n_lat, repeat, chord1000=threads)
    rows.update(kombu_pgmq_e2e_rows(h, kojin_db, pool, with_db_backend=threads))
    return rows
