"""The Celery result backend: results and groups as rows, read one query per round, expired in
bounded batches. Chords are :mod:`.chords`, waiting is :mod:`.waiting`, value encoding
:mod:`.values`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import BaseBackend
from celery.exceptions import ImproperlyConfigured
from celery.result import result_from_tuple

from .. import config
from ..db import Database, Queries, is_transient
from ..db.channels import results_channel
from ..db.lean import LeanRead
from ..db.schema import ensure_schema
from ..errors import PayloadError
from .announce import announced_meta, announcement
from .chords import Chords
from .expiry import delete_expired
from .shared import Shared, shared_state
from .values import ValueCodec
from .waiters import sender_key, wait_slot, wait_space, writing_space
from .waiting import CELERY_KEEPS_EVERY_WAITER, ResultConsumer
from .warmup import open_results_connection  # noqa: F401  (connects Celery's signal)

log = logging.getLogger(__name__)

_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")


def results_settings(app: Any, url: str) -> config.Settings:
    """The settings of ``app``'s kojin_pg result backend at ``url`` (with its transport
    options)."""
    options = dict(app.conf.get("result_backend_transport_options") or {})
    options.pop("result_chord_ordered", None)  # a Redis option; ours always keeps order
    return config.parse(config.plain_url(url), options)


class PostgresBackend(AsyncBackendMixin, BaseBackend):
    """Celery result backend storing results, groups and chord counters in PostgreSQL."""

    supports_native_join = True
    supports_autoexpire = False
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # One instance for all the threads of a process (Celery's result_backend_thread_safe,
        # whatever it says): everything here is safe to share (see .shared).
        self.thread_safe = True
        url = url or app.conf.get("result_backend") or os.environ.get("KOJIN_PG_URL")
        if not url or "://" not in url:
            raise ImproperlyConfigured(
                "kojin_pg result backend needs a URL: result_backend = "
                "'kojin+postgresql://user:password@host/dbname' (or set KOJIN_PG_URL)"
            )
        self.url = url = config.plain_url(url)
        self.settings = results_settings(app, url)
        self.queries = Queries("backend", self.settings.schema)
        #: A single get's read (the hottest of them), sent without psycopg's cursor.
        self.read_one = LeanRead("get_result", self.queries.get_result)
        self.channel = results_channel(self.settings.schema)
        #: The advisory-lock namespace of this schema's wait slots (see :mod:`.waiters`).
        self.wait_space = wait_space(self.settings.schema)
        self.writing_space = writing_space(self.settings.schema)
        self.values = ValueCodec(self.content_type, self.encode, self.decode)
        self._schema_ready = False
        shared = shared_state(app, self.settings, self._own_shared)
        self.db = shared.db
        self.result_consumer = shared.result_consumer
        self._pending_results = shared.pending_results
        self._pending_messages = shared.pending_messages
        self.chords = Chords(self, self.db, self.queries, self.values)

    def _own_shared(self) -> Shared:
        """The pool, result consumer and pending results of the first instance of this app and
        these settings in the process (see .shared)."""
        self.db = Database(self.settings, role="kojin_pg.backend")  # ResultConsumer reads it
        return Shared(
            db=self.db,
            result_consumer=ResultConsumer(self, self.app, self.accept, self._pending_results,
                                           self._pending_messages),
            pending_results=self._pending_results, pending_messages=self._pending_messages)

    def __repr__(self) -> str:
        return f"<PostgresBackend {self.settings.safe_url} schema={self.settings.schema}>"

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.url, expires=self.expires))

    def as_uri(self, include_password: bool = False) -> str:
        """The backend URL; the password is masked unless asked for."""
        return "kojin+" + (self.url if include_password else self.settings.safe_url)

    # -- plumbing --------------------------------------------------------------------------

    def ensure_ready(self, *, retry: bool = True) -> None:
        """Check (and, with auto_migrate, apply) the schema once per backend (``retry=False``:
        fail at once when the server cannot be reached)."""
        if not self._schema_ready:
            ensure_schema(self.db, retry=retry)
            self._schema_ready = True

    def open_connections(self) -> None:
        """Check the schema and open this process's pool now, without retrying (see
        :mod:`.warmup`)."""
        self.ensure_ready(retry=False)
        self.db.pool()

    def _fetchall(self, query: Any, params: dict[str, Any], what: str) -> list[tuple[Any, ...]]:
        self.ensure_ready()
        return self.db.fetchall(query, params, what)

    def _fetchone(self, query: Any, params: dict[str, Any], what: str) -> tuple[Any, ...] | None:
        self.ensure_ready()
        return self.db.fetchone(query, params, what)

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Connection errors are safe to retry (``result_backend_always_retry``)."""
        return is_transient(exc)

    def expires_seconds(self) -> float | None:
        """``result_expires`` in seconds, None for results that never expire."""
        return None if self.expires is None else float(self.expires)

    # -- results ---------------------------------------------------------------------------

    def _store_result(self, task_id: str, result: Any, state: str, traceback: str | None = None,
                      request: Any = None, **kwargs: Any) -> Any:
        # safe to retry: a store retried after its commit stores the same row again (nothing
        # over a SUCCESS) and announces only what it stored; its first announcement committed
        # with the row (sql/0013), so the retry loses none
        self._fetchall(self.queries.store_result,
                       self.store_params(task_id, result, state, traceback, request,
                                         commit_first=self.db.announces_before_the_flush()),
                       "store_result")
        return result

    def store_params(self, task_id: str, result: Any, state: str, traceback: str | None = None,
                     request: Any = None, *, commit_first: bool = False) -> dict[str, Any]:
        """The ``store_result`` statement's parameters for one result (the tests run the
        statement themselves to hold a store's transaction open: without ``commit_first``,
        which they cannot have there)."""
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request, format_date=False)
        extended = {k: meta.get(k) for k in _EXTENDED}
        blob = {"result": meta["result"], "children": meta["children"],
                "args": extended["args"], "kwargs": extended["kwargs"]}
        params: dict[str, Any] = {
            "task_id": task_id, "status": state, "traceback": traceback,
            "group_id": meta.get("group_id"), "parent_id": meta.get("parent_id"),
            "name": extended["name"], "worker": extended["worker"],
            "retries": extended["retries"], "queue": extended["queue"],
            "date_done": meta["date_done"], "expires": self.expires_seconds(),
            "channel": self.channel, "notify": self.settings.use_notify,
            "commit_first": commit_first,
            "result": None, "children": None, "args": None, "kwargs": None, "result_bytes": None,
        }
        encoded, raw = self.values.encode(blob)
        if encoded is not None:
            for key in ("result", "children", "args", "kwargs"):
                params[key] = self.values.jsonb(blob[key])
        else:
            params["result_bytes"] = raw
        params["announce"] = announcement(task_id, meta) if encoded is not None else None
        params.update(wait_space=self.wait_space, writing_space=self.writing_space,
                      wait_slot=wait_slot(task_id),
                      sender_key=sender_key(getattr(request, "reply_to", None)))
        return params

    def _row_to_meta(self, row: tuple[Any, ...]) -> dict[str, Any]:
        (task_id, status, result, result_bytes, traceback, children, group_id, parent_id,
         name, args, kwargs, worker, retries, queue, date_done) = row
        meta: dict[str, Any] = {
            "task_id": task_id, "status": status, "result": result, "traceback": traceback,
            "children": children or [], "date_done": date_done,
        }
        if result_bytes is not None:
            try:
                meta.update(self.values.decode_bytes(result_bytes))
            except Exception as exc:
                # A corrupted row must not break reads of the others (a whole group's join):
                # it reads as a failure that names the task and the cause.
                log.error("kojin_pg: stored result of task %s cannot be decoded: %r", task_id, exc)
                meta.update(status=states.FAILURE, result=PayloadError(
                    f"stored result of task {task_id} cannot be decoded: {exc!r}"))
            args, kwargs = meta.pop("args", None), meta.pop("kwargs", None)
            meta["children"] = meta["children"] or []
        if group_id is not None:
            meta["group_id"] = group_id
        if parent_id is not None:
            meta["parent_id"] = parent_id
        if name is not None or worker is not None:
            meta.update(name=name, args=args, kwargs=kwargs, worker=worker,
                        retries=retries, queue=queue)
        return self.meta_from_decoded(meta)

    def announced_meta(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The meta a waiter gets from a result announced with its value (see
        :func:`~kojin_pg.backend.announce.announcement`), as a read would give it."""
        return self.meta_from_decoded(announced_meta(payload))

    def fetch_metas(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored, unexpired metas of ``task_ids`` (one query), by task id."""
        ids = list(dict.fromkeys(task_ids))  # one lookup per id (see get_results)
        if not ids:
            return {}
        rows = self._fetchall(self.queries.get_results, {"task_ids": ids}, "get_results")
        return {row[0]: self._row_to_meta(row) for row in rows}

    def read_and_read_ahead(self, task_id: str, ahead: list[str],
                            max_bytes: int) -> list[tuple[Any, ...]]:
        """The row of ``task_id`` (none: not stored, or expired) and those of the final results
        of ``ahead`` stored in at most ``max_bytes`` (see :mod:`.readahead`): the read of a
        wait that takes and gives back no wait slot, so any session may run it."""
        return self._fetchall(self.queries.wait_and_read,
                              self.result_consumer.slots.read_params(task_id, ahead, max_bytes),
                              "read_and_read_ahead")

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        self.ensure_ready()
        rows = self.db.fetch_lean(self.read_one, {"task_id": task_id}, "get_result")
        if not rows:
            return {"status": states.PENDING, "result": None}
        meta = self._row_to_meta(rows[0])
        if meta["status"] in states.READY_STATES:
            self.result_consumer.readahead.read_elsewhere((task_id,))
        return meta

    def task_result_exists(self, task_id: str) -> bool:
        """Whether any (unexpired) result row exists for ``task_id``."""
        row = self._fetchone(self.queries.result_exists, {"task_id": task_id}, "result_exists")
        return bool(row and row[0])

    def _forget(self, task_id: str) -> None:
        self.ensure_ready()
        self.db.execute(self.queries.forget_result, {"task_id": task_id}, "forget")

    def forget(self, task_id: str) -> None:
        """Delete the result of ``task_id`` and stop waiting for it."""
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)
        self.result_consumer.forget_also_waiting(task_id)
        self.result_consumer.readahead.forget(task_id)

    def _add_pending_result(self, task_id: str, result: Any, weak: bool = False) -> None:
        """Celery's registration of a waiting result object; one that Celery < 5.7 does not
        keep because another object waits for the task already is kept by the consumer."""
        super()._add_pending_result(task_id, result, weak=weak)
        if CELERY_KEEPS_EVERY_WAITER:
            return
        concrete, weak_ = self._pending_results
        kept = concrete.get(task_id)
        if kept is None:
            kept = weak_.get(task_id)
        if kept is not None and kept is not result:
            self.result_consumer.also_waits(task_id, result)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Celery sends ``task_id`` from this thread (its message's ``reply_to`` is the thread's
        oid): its result may be read ahead with the next read of another (see
        :mod:`.readahead`), and needs no slot if this thread's sender key is held (see
        :mod:`.waiters`)."""
        self.result_consumer.sent(task_id, sender_key(self.app.thread_oid))

    def get_many(self, task_ids: Iterable[str], timeout: float | None = None,
                 interval: float | None = 0.5, no_ack: bool = True, on_message: Any = None,
                 on_interval: Any = None, max_iterations: int | None = None,
                 READY_STATES: frozenset[str] = states.READY_STATES,
                 **kwargs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` for each task as it becomes ready; one query per round."""
        interval = 0.5 if interval is None else interval
        ids = set(task_ids)
        cache = self._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        held = self.result_consumer.hold(ids) if ids else []
        try:
            yield from self._get_many_rounds(ids, timeout, interval, on_message, on_interval,
                                             max_iterations, READY_STATES)
        finally:
            self.result_consumer.let_go(held)

    def _get_many_rounds(self, ids: set[str], timeout: float | None, interval: float,
                         on_message: Any, on_interval: Any, max_iterations: int | None,
                         READY_STATES: frozenset[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        cache = self._cache
        iterations = 0
        started = time.monotonic()
        while ids:
            ready = {tid: meta for tid, meta in self.fetch_metas(ids).items()
                     if meta["status"] in READY_STATES}
            cache.update(ready)
            self.result_consumer.readahead.read_elsewhere(ready)
            ids.difference_update(ready)
            for task_id, meta in ready.items():
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta
            iterations += 1
            if not ids or (max_iterations and iterations >= max_iterations):
                break
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            nap = interval if timeout is None else min(interval, timeout - elapsed)
            self.result_consumer.wait_for_any(ids, max(nap, 0.0))

    # -- groups ----------------------------------------------------------------------------

    def _save_group(self, group_id: str, result: Any) -> Any:
        self.store_group(group_id, result, self.expires_seconds())
        return result

    def store_group(self, group_id: str, result: Any, expires: float | None) -> None:
        """Store (or replace) a GroupResult's members, kept ``expires`` seconds (None: always)."""
        encoded, raw = self.values.encode({"result": result.as_tuple()})
        self.ensure_ready()
        self.db.execute(self.queries.save_group, {
            "group_id": group_id, "result": encoded, "result_bytes": raw,
            "expires": expires}, "save_group")

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        row = self._fetchone(self.queries.get_group, {"group_id": group_id}, "restore_group")
        if row is None:
            return None
        result, result_bytes, date_done = row
        meta = result if result_bytes is None else self.values.decode_bytes(result_bytes)
        return {"result": result_from_tuple(meta["result"], self.app), "date_done": date_done}

    def _delete_group(self, group_id: str) -> None:
        self.ensure_ready()
        self.db.execute(self.queries.delete_group, {"group_id": group_id}, "delete_group")

    # -- chords (see .chords) ----------------------------------------------------------------

    def ensure_chords_allowed(self) -> None:
        """Chords are always supported."""

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """A chord is starting: record it before any header task can report."""
        self.ensure_ready()
        self.chords.apply(header_result_args)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        """Record how many header parts the chord waits for."""
        self.ensure_ready()
        self.chords.set_size(group_id, chord_size)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        """Wait for one more header part (a header task replaced itself)."""
        self.ensure_ready()
        # Keyed by the added task, so a retry counts once; without an id, count it as new.
        self.chords.add_part(group_id, getattr(result, "id", None) or uuid.uuid4().hex)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """Count one finished header task; the part that completes the chord fires the body."""
        self.ensure_ready()
        self.chords.part_returned(request, state, result)

    # -- expiry ----------------------------------------------------------------------------

    def cleanup(self) -> dict[str, int]:
        """Delete expired results, groups and chord rows in bounded batches.

        Each batch is its own short transaction that skips locked rows, so readers and writers
        are never blocked for long. Returns the number of rows deleted per table. This is what
        Celery's ``celery.backend_cleanup`` periodic task and ``kojin-pg cleanup`` call.
        """
        self.ensure_ready()
        counts = delete_expired(self.db, self.queries, self.settings.cleanup_batch_size)
        log.info("kojin_pg cleanup deleted expired rows: %s", counts)
        return counts
