"""Where a revoke records REVOKED: the database and schema the callers read results from.

A revoke (:mod:`.revoke`) deletes the task's messages in the broker's database. Its ``REVOKED``
result must land where the callers read results: in the broker's own statement when the results
live in the broker's database and schema (the usual setup: one URL for both), else by a
statement of its own in the result backend's database (``store_revoked`` in backend.sql). Who
says where: the Celery apps of this process whose broker is this one (the revoking caller's,
a worker's), by their ``result_backend``; ``kojin-pg revoke --results-url`` on the command line.
An app whose results are not kojin_pg's gets none here: Celery's workers record the revoke in
their backend themselves, from Celery 5.5 on. Without any such app (a bare kombu user), the
broker's own table, as before.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .. import codec, config, conninfo
from ..db import Database, Queries
from ..db.channels import results_channel
from ..db.schema import ensure_schema
from .options import broker_settings
from .scheduling import REVOKED_RESULT

log = logging.getLogger(__name__)

#: Seconds a REVOKED result written by the broker is kept (Celery's default result_expires).
REVOKED_RESULT_EXPIRES = 86400.0
REVOKED_RESULT_JSON = codec.jsonb(codec.dumps(REVOKED_RESULT))


def database_of(settings: config.Settings) -> tuple[object, ...]:
    """What tells two kojin_pg settings apart as places for rows: every connection parameter
    but the password, and the schema. Two spellings of one database differ here (then a result
    is written by one more statement than needed); two databases never compare equal, not even
    through a service file, defaults or environment variables, since the spellings differ."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(settings.conninfo)
    params.pop("password", None)
    return (tuple(sorted((k, str(v)) for k, v in params.items())), settings.schema)


class RevokedResults:
    """Where the REVOKED results of one broker's revokes go. A write outside the broker's
    database connects, writes and disconnects: revokes are rare, and a pool kept for them
    would hold a connection to the results database for the life of every process that
    ever revoked."""

    def __init__(self, broker: config.Settings, results_urls: list[str] | None = None,
                 *, strict: bool = False) -> None:
        self.broker = broker
        #: Given (``kojin-pg revoke --results-url``): these, in the broker's schema unless the
        #: URL says otherwise, and not the broker's own table; never migrated here.
        self.results_urls = results_urls
        #: Raise when a results database cannot be written to (the CLI), instead of logging.
        self.strict = strict

    def places(self) -> tuple[bool, list[config.Settings]]:
        """Whether the broker's own results table is read, and the other kojin_pg results
        databases to write to. Without a Celery app of this process on this broker (a bare
        kombu user, the CLI), the broker's own table."""
        if self.results_urls is not None:
            return False, [_given_results(url, self.broker.schema) for url in self.results_urls]
        here = database_of(self.broker)
        apps = [app for app in _celery_apps() if _uses_broker(app, here)]
        if not apps:
            return True, []
        from ..backend.results import results_settings

        in_broker, elsewhere = False, {}
        for app in apps:
            url = app.conf.get("result_backend")
            if not isinstance(url, str) or not url.startswith("kojin"):
                continue  # not kojin_pg's results: Celery's workers record the revoke there
            try:
                settings = results_settings(app, url)
            except config.ConfigurationError as exc:  # its backend fails the same way
                log.warning("kojin_pg: the result backend of app %r is misconfigured, and a "
                            "revoke cannot record REVOKED there: %s", app.main, exc)
                continue
            place = database_of(settings)
            if place == here:
                in_broker = True
            else:
                elsewhere[place] = settings
        return in_broker, list(elsewhere.values())

    def store(self, places: list[config.Settings], task_ids: list[str]) -> int:
        """Record ``task_ids`` as REVOKED in the results databases ``places``; how many
        results became REVOKED. Safe to repeat (a finished or revoked result is left alone),
        so the retries after a lost connection may run it again. The revoke itself has
        committed by now (its messages are gone, or flagged for the claim that meets them): a
        results database that stays out of reach is logged, and the broadcast still goes to
        the workers (which record the revoke themselves from Celery 5.5 on)."""
        stored = 0
        for settings in places:
            try:
                with _connected(settings) as db:
                    row = db.fetchone(Queries("backend", settings.schema).store_revoked, {
                        "task_ids": task_ids, "revoked_result": REVOKED_RESULT_JSON,
                        "result_expires": REVOKED_RESULT_EXPIRES,
                        "results_channel": results_channel(settings.schema)}, "store_revoked")
            except Exception as exc:
                if self.strict:
                    raise
                log.warning("kojin_pg: revoked %d tasks, but could not record them as REVOKED "
                            "in the results at %s (%s): their results do not say so",
                            len(task_ids), settings.safe_url, type(exc).__name__)
                continue
            stored += int(row[0]) if row else 0
        return stored

    def check(self, places: list[config.Settings]) -> None:
        """Connect to the results databases ``places`` now and check their schema, raising
        what fails."""
        for settings in places:
            with _connected(settings):
                pass


@contextmanager
def _connected(settings: config.Settings) -> Iterator[Database]:
    """One connection to a results database, its schema checked, closed afterwards."""
    db = Database(dataclasses.replace(settings, pool_min_size=1, pool_max_size=1),
                  role="kojin_pg.revoke")
    try:
        ensure_schema(db, retry=False)
        yield db
    finally:
        db.close()


def _given_results(url: str, schema: str) -> config.Settings:
    """The settings of a results database named on the command line: the broker's schema
    unless the URL names one; never migrated from here (a wrong URL is an error, not a new
    schema)."""
    text = config.plain_url(url.strip())
    options: dict[str, Any] = {"auto_migrate": False}
    if "schema" not in {param.key for param in conninfo.split(text).params}:
        options["schema"] = schema
    return config.parse(text, options)


def _celery_apps() -> list[Any]:
    """The configured Celery apps of this process."""
    try:
        from celery._state import _get_active_apps
    except ImportError:  # pragma: no cover - every supported Celery has it
        return []
    return [app for app in list(_get_active_apps()) if getattr(app, "configured", False)]


def _uses_broker(app: Any, here: tuple[object, ...]) -> bool:
    """Whether ``app``'s broker (any URL of a failover list) is the broker at ``here``."""
    urls = app.conf.get("broker_url")
    if isinstance(urls, str):
        urls = urls.split(";")
    if not isinstance(urls, (list, tuple)):
        return False
    options = app.conf.get("broker_transport_options") or {}
    for url in urls:
        if isinstance(url, str) and url.strip().startswith("kojin"):
            try:
                if database_of(broker_settings(url.strip(), options)) == here:
                    return True
            except (config.ConfigurationError, ValueError) as exc:
                log.debug("kojin_pg: broker URL of app %r not understood: %r", app.main, exc)
    return False
