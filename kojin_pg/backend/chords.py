"""Native chords: an atomic counter per chord, no ``celery.chord_unlock`` polling task.

Each header task that finishes calls :meth:`Chords.part_returned`, which runs one
statement: insert the part (the primary key makes a second report of the same part a no-op),
add it to the chord's counter, and, when the counter reaches the chord size, put the caller's
token in ``claim_token``. Only the claimant fires the body, with the header results read in
header order in one query, then marks the chord fired. A claimant that dies before firing loses
its claim after ``claim_seconds``; a redelivered header task then takes it over. A failed
header part reaches the body's errbacks as a :class:`celery.exceptions.ChordError`, as with
Celery's Redis backend.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import states
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result
from celery.utils.functional import _regen

from ..db import Database, Queries
from .values import ValueCodec

log = logging.getLogger(__name__)

#: group_index stand-in for parts reported without one (they sort last, in arrival order).
_NO_INDEX = 2**31 - 1


def _create_chord_error_with_cause(message: str, original_exc: BaseException | None) -> ChordError:
    error = ChordError(message)
    if isinstance(original_exc, BaseException):
        error.__cause__ = original_exc
    return error


class Chords:
    """The chord counters of one result backend.

    ``backend`` is the :class:`~kojin_pg.backend.PostgresBackend` that owns it; from it this
    uses the Celery app and Celery's own error plumbing (``encode_result``,
    ``exception_to_python``, ``chord_error_from_stack``).
    """

    def __init__(self, backend: Any, db: Database, queries: Queries, values: ValueCodec) -> None:
        self.backend = backend
        self.app = backend.app
        self.db = db
        self.queries = queries
        self.values = values

    @property
    def _claim_seconds(self) -> float:
        join_timeout = self.app.conf.result_chord_join_timeout or 5.0
        return max(10.0, float(join_timeout) * 2)

    @property
    def _expires(self) -> float | None:
        """Seconds an unfinished chord is kept after its last activity (None: for ever)."""
        result_expires = self.backend.expires_seconds()
        if result_expires is None:
            return None
        return max(result_expires, self.backend.settings.chord_expires)

    def apply(self, header_result_args: Any) -> None:
        """A chord is starting: reset its counter; keep the header's shape if it nests groups."""
        group_id, results = header_result_args[0], header_result_args[1]
        header_ids = None
        # A lazy header (Celery's _regen, a list subclass) is unrolled while its tasks are sent:
        # reading it here would send nothing. Its parts are then ordered by group_index.
        if isinstance(results, list | tuple) and not isinstance(results, _regen):
            header_ids = [r.id for r in results]
        self.db.execute(self.queries.reset_chord, {
            "group_id": group_id, "header_ids": header_ids,
            "expires": self._expires}, "apply_chord")
        if header_ids is not None and any(isinstance(r, GroupResult) for r in results):
            self.backend.store_group(group_id, self.app.GroupResult(*header_result_args),
                                     self._expires)

    def set_size(self, group_id: str, chord_size: int) -> None:
        """Record how many header parts the chord waits for."""
        self.db.execute(self.queries.set_chord_size, {
            "group_id": group_id, "chord_size": chord_size,
            "expires": self._expires}, "set_chord_size")

    def add_part(self, group_id: str, task_id: str) -> None:
        """Wait for one more header part, task ``task_id`` (a header task replaced itself)."""
        self.db.execute(self.queries.add_to_chord, {
            "group_id": group_id, "task_id": task_id, "expires": self._expires}, "add_to_chord")

    def part_returned(self, request: Any, state: str, result: Any) -> None:
        """Count one finished header task; the part that completes the chord fires the body."""
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return
        index = request.group_index
        encoded, raw = self.values.encode(self.backend.encode_result(result, state))
        token = uuid.uuid4().hex
        row = self.db.fetchone(self.queries.chord_part_return, {
            "group_id": group_id, "task_id": task_id,
            "idx": _NO_INDEX if index is None else int(index),
            "status": state, "result": encoded, "result_bytes": raw,
            "expires": self._expires, "token": token,
            "claim_seconds": self._claim_seconds,
        }, "on_chord_part_return")
        if row is None or not row[3]:
            return  # not complete yet, already fired, or another part is firing it
        callback = maybe_signature(request.chord, app=self.app)
        try:
            self._fire_chord_body(group_id, callback)
        finally:
            self.db.execute(self.queries.chord_fired, {
                "group_id": group_id, "token": token,
                "expires": self.backend.expires_seconds()}, "chord_fired")

    def _fire_chord_body(self, group_id: str, callback: Any) -> None:
        app = self.app
        try:
            header = GroupResult.restore(group_id, app=app)
            if header is not None:
                # The header nests groups: join it to hand the body the nested structure.
                header.on_ready()
                join = header.join_native if header.supports_native_join else header.join
                with allow_join_result():
                    values = join(timeout=app.conf.result_chord_join_timeout, propagate=True)
            else:
                values = [self._unpack_part(*part) for part in self.db.fetchall(
                    self.queries.chord_parts, {"group_id": group_id}, "chord_parts")]
        except ChordError as exc:
            log.error("Chord %r raised: %r", group_id, exc)
            self.backend.chord_error_from_stack(callback, exc)
            return
        except Exception as exc:
            log.exception("Chord %r raised: %r", group_id, exc)
            self.backend.chord_error_from_stack(callback, _create_chord_error_with_cause(
                message=f"Join error: {exc!r}", original_exc=exc))
            return
        try:
            publish = getattr(app.amqp, "_retry_publish", None)  # Celery >= 5.6
            if publish is not None:
                publish(callback.delay, values)
            else:
                callback.delay(values)
        except Exception as exc:
            log.exception("Chord callback for %r raised: %r", group_id, exc)
            self.backend.chord_error_from_stack(callback, _create_chord_error_with_cause(
                message=f"Callback error: {exc!r}", original_exc=exc))

    def _unpack_part(self, task_id: str, status: str, result: Any, result_bytes: Any) -> Any:
        value = result if result_bytes is None else self.values.decode_bytes(result_bytes)
        if status in states.EXCEPTION_STATES:
            value = self.backend.exception_to_python(value)
        if status in states.PROPAGATE_STATES:
            raise _create_chord_error_with_cause(
                message=f"Dependency {task_id} raised {value!r}", original_exc=value)
        return value
