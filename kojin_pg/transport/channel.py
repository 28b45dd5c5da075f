"""The kombu channel: publish, claim and deliver, hand back, and bind, on one messages table."""

from __future__ import annotations

import binascii
import logging
import time
import uuid
from queue import Empty
from typing import TYPE_CHECKING, Any

import psycopg
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from .. import codec
from ..config import check_queue_name
from ..db.channels import results_channel
from ..errors import PayloadError
from ..events import DEAD_LETTER, REDELIVERY, log_event
from .messages import (
    DEFAULT_BATCH,
    expiration_seconds,
    publish_fields,
    queue_arguments,
    why_malformed,
)
from .offers import HANDOFF_MAX_BYTES
from .qos import QoS
from .revoke import revoke_tasks, revoked_in_broadcast
from .revoked_results import REVOKED_RESULT_EXPIRES, REVOKED_RESULT_JSON
from .routing import Bindings

if TYPE_CHECKING:
    from .transport import Transport

log = logging.getLogger(__name__)

#: How many times one claim settles what it picked and could not deliver, and claims its
#: places again, before it returns a short batch (the rest waits for the next claim).
SETTLE_ROUNDS = 4


class Channel(virtual.Channel):
    """A kombu channel whose queues are rows of one PostgreSQL table."""

    QoS = QoS
    supports_fanout = True
    do_restore = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.bindings = Bindings(connection.queries, self._fetch)
        #: Queues consumed with no_ack (Celery's event receivers): delivered means done.
        self._no_ack_queues: set[str] = set()
        #: time.monotonic() when the earliest scheduled message of the queues of the last claim
        #: is due (None: nothing scheduled); the transport sets its timer by it.
        self.next_due: float | None = None
        #: Messages may be waiting that no announcement will tell of (the last claim came back
        #: full, or a wake-up found no free prefetch slot): a freed slot claims at once.
        self.more_ready = True
        #: A claim took nothing, its slots filled by hand-offs on their way (see .offers), and
        #: the wake-up that caused it is used up: claim once they have arrived. Set on the
        #: claim thread, read and cleared on the loop.
        self.claim_owed = False
        #: The polling round: the next claim first counts the open offer's filled slots, so
        #: that hand-offs lost on their way are found (see .offers.Offers.check). Set on the
        #: loop, read and cleared on the claim thread.
        self.recheck_offer = False

    def _fetch(self, query: Any, params: dict[str, Any], what: str) -> list[tuple[Any, ...]]:
        """Run one publishing-side statement on the durable pool."""
        self.connection.ensure_ready()
        return self.connection.db.fetchall(query, params, what)

    def _fetch_consumer(self, query: Any, params: dict[str, Any],
                        what: str) -> list[tuple[Any, ...]]:
        """Run one consuming-side statement (see :attr:`Transport.consumer_db`)."""
        self.connection.ensure_ready()
        return self.connection.consumer_db.fetchall(query, params, what)

    # -- publishing --------------------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> Any:
        encoded = codec.dumps(message)
        limit = self.connection.settings.max_message_bytes
        if len(encoded) > limit:
            raise PayloadError(
                f"message of {len(encoded)} bytes is larger than max_message_bytes ({limit})")
        return codec.jsonb(encoded)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        t = self.connection
        payload = self._encode(message)
        fields = publish_fields(message)
        notify = t.settings.use_notify
        # handed off whole in a NOTIFY (see .offers): a ready message that fits one; one with a
        # unique key is not, so that its key stays on the queued row
        handoff = (notify and fields["due_at"] is None and fields["unique_key"] is None
                   and len(payload.obj) <= HANDOFF_MAX_BYTES)
        # Announcing before the flush takes the procedure (sql/0013); otherwise the plain
        # statement does the same in one transaction, without the procedure's cost.
        commit_first = t.db.announces_before_the_flush()
        # publish_id: the statement is retried after a lost connection, and inserts once
        self._fetch(t.queries.publish_message if commit_first else t.queries.publish, {
            "queue": check_queue_name(queue), "priority": self._get_message_priority(message),
            "payload": payload, "publish_id": uuid.uuid4(), **fields,
            **t.idle.publish_params(queue), "handoff": handoff, "offer_space": t.offers.space,
            "channel": t.channel_name, "notify": notify, "commit_first": commit_first,
        }, "publish")

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        t = self.connection
        revoked = revoked_in_broadcast(message)
        if revoked:  # Celery's revoke command: make it durable first (see .revoke)
            t.ensure_ready()
            revoke_tasks(t.db, t.queries, t.settings.schema, revoked, t.revoked_results)
        self._fetch(t.queries.publish_fanout, {
            "exchange": check_queue_name(exchange),
            "priority": self._get_message_priority(message), "payload": self._encode(message),
            "publish_id": uuid.uuid4(), "expiration": expiration_seconds(message),
            "channel": t.channel_name, "notify": t.settings.use_notify,
        }, "publish_fanout")

    # -- queues and bindings -------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """kombu's ``Queue(message_ttl=..., expires=...)`` as RabbitMQ's ``x-`` arguments."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Record the queue with its arguments (message TTL, expiry, auto_delete)."""
        self._fetch(self.connection.queries.declare_queue,
                    {"queue": check_queue_name(queue), **queue_arguments(kwargs)},
                    "declare_queue")

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        rows = self._fetch(self.connection.queries.has_queue,
                           {"queue": check_queue_name(queue)}, "has_queue")
        return bool(rows and rows[0][0])

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self.bindings.bind(exchange, routing_key, pattern, queue)

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: Any = None, **kwargs: Any) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        if exchange:
            self.bindings.unbind(exchange, routing_key, queue)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """The bindings of ``exchange``, from the database (shared by every process)."""
        return self.bindings.table(exchange)

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        queues = super()._lookup(exchange, routing_key, default)
        if exchange and not queues and self.bindings.is_cached(exchange):
            # a queue bound by another process since we read the table: read it again
            self.bindings.forget(exchange)
            queues = super()._lookup(exchange, routing_key, default)
        return queues

    def _size(self, queue: str) -> int:
        rows = self._fetch(self.connection.queries.queue_size,
                           {"queue": check_queue_name(queue)}, "size")
        return int(rows[0][0])

    def _purge(self, queue: str) -> int:
        rows = self._fetch(self.connection.queries.purge, {"queue": check_queue_name(queue)},
                           "purge")
        return int(rows[0][0])

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._fetch(self.connection.queries.delete_queue, {"queue": check_queue_name(queue)},
                    "delete_queue")

    def active_queues(self) -> list[str]:
        """Queues this channel consumes from."""
        return list(self._active_queues)

    # -- consuming ---------------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        tag = super().basic_consume(queue, no_ack, *args, **kwargs)
        t = self.connection
        t.start_consuming()
        self._fetch_consumer(t.queries.consumer_start,
                             {"queue": queue, "consumer": t.consumer_id}, "consumer_start")
        return tag

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self.connection.consumer_stopped([queue])

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        with self.connection.settling_leases():
            message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.connection.acks.add((message.delivery_tag,))
        return message

    def _claim(self, queues: list[str], n: int) -> list[tuple[dict[str, Any], str]]:
        """Lease up to ``n`` messages of ``queues`` (applying recorded acks on the way);
        return the deliverable ones as ``(payload, queue)``.

        Messages the claim picked but must not deliver (dead or revoked) are settled by a
        statement of their own, and their places in the batch claimed again: a message buried
        on the way must not make the batch look short, as if the queue had ended."""
        t = self.connection
        acks = t.acks.take()
        t.ensure_ready()
        with t.settling_leases():
            try:
                rows = self._claim_once(t, queues, n, acks)
            except BaseException:
                t.acks.give_back(acks)
                raise
            delivered, unsettled = self._deliverable(t, rows)
            rounds = 0
            while unsettled:
                try:
                    self._settle(t, unsettled)
                    rounds += 1
                    if len(delivered) >= n or rounds > SETTLE_ROUNDS:
                        break
                    more, unsettled = self._deliverable(
                        t, self._claim_once(t, queues, n - len(delivered), []))
                except Exception:
                    if not delivered:
                        raise
                    # what is leased already is delivered; the next claim picks the rest again
                    log.warning("kojin_pg: settling dead or revoked messages failed; "
                                "the next claim settles them", exc_info=True)
                    break
                delivered += more
            return delivered

    def _claim_once(self, t: Transport, queues: list[str], n: int,
                    acks: list[int]) -> list[tuple[Any, ...]]:
        """One claim statement's rows (see the ``claim`` query); the time of the earliest
        scheduled message of ``queues`` that it reports is kept in :attr:`next_due`."""
        s = t.settings
        params = {"acks": acks, "queues": queues, "n": n,
                  "max_deliveries": s.max_deliveries, "visibility_timeout": s.visibility_timeout,
                  "consumer": t.consumer_id}
        attempts = 0

        def claim(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # the attempt whose connection was lost may have committed its leases
                t.release_orphans(conn, keep=acks)
            return conn.execute(t.queries.claim, params).fetchall()

        rows = t.consumer_db.run(claim, "claim")
        self.next_due = None
        for msg_id, *_, due_in in rows:
            if msg_id is None:  # when the earliest scheduled message of these queues is due
                self.next_due = time.monotonic() + max(0.0, due_in)
        return rows

    def waiting(self, queues: list[str]) -> bool:
        """Whether ``queues`` hold a message a claim would take now (a read: nothing is
        leased); the time of their earliest scheduled message is kept in :attr:`next_due`,
        as a claim keeps it."""
        t = self.connection
        t.ensure_ready()
        # a read, safe to repeat
        waits, due_in = t.consumer_db.fetchone(t.queries.waiting, {"queues": queues},
                                               "waiting") or (True, None)
        self.next_due = None if due_in is None else time.monotonic() + max(0.0, due_in)
        return bool(waits)

    def _settle(self, t: Transport, ids: list[int]) -> None:
        """Bury the dead and drop the revoked of the messages a claim left unsettled.

        Safe to retry after a lost connection: the statement takes each message again under
        its row lock and only while it is still to be settled, so a second run after a first
        that committed finds nothing, and the dead letter's insert ignores an id already
        there."""
        s = t.settings
        in_broker, elsewhere = t.revoked_results.places()
        if elsewhere:
            # before the statement that drops them (see revoked_task_ids); a read, safe to retry
            revoked = [task_id for (task_id,) in t.consumer_db.fetchall(
                t.queries.revoked_task_ids, {"ids": ids}, "revoked_task_ids")]
            if revoked:
                t.revoked_results.store(elsewhere, revoked)
        rows = t.consumer_db.fetchall(t.queries.settle, {
            "ids": ids, "max_deliveries": s.max_deliveries,
            "revoked_result": REVOKED_RESULT_JSON, "result_expires": REVOKED_RESULT_EXPIRES,
            "results_channel": results_channel(s.schema), "store_results": in_broker}, "settle")
        for msg_id, queue, count in rows:
            log_event(log, logging.WARNING, DEAD_LETTER, message_id=msg_id, queue=queue,
                      reason="max_deliveries", deliveries=count)

    def _deliverable(self, t: Transport, rows: list[tuple[Any, ...]]
                     ) -> tuple[list[tuple[dict[str, Any], str]], list[int]]:
        """A claim's rows (or a hand-off's) as ``(payload, queue)``, and the ids it left
        unsettled; undecodable ones buried, the row of the earliest scheduled message skipped
        (see :meth:`_claim_once`). ``t`` is the transport the claim ran on (the loop may close
        this channel meanwhile)."""
        delivered = []
        unsettled: list[int] = []
        undecodable: list[tuple[int, str]] = []
        for msg_id, queue, payload, count, unsettled_row, _priority, _due_in in rows:
            if msg_id is None:
                continue
            if unsettled_row:
                unsettled.append(msg_id)
                continue
            problem = why_malformed(payload) or self._decode_body(payload)
            if problem:
                # One bad row must not block the queue: bury it with the reason, go on.
                undecodable.append((msg_id, problem))
                continue
            if count > 1:
                log_event(log, logging.INFO, REDELIVERY, message_id=msg_id, queue=queue,
                          delivery=count, task=(payload.get("headers") or {}).get("task"))
            props = payload["properties"]
            props["delivery_tag"] = msg_id
            info = props.setdefault("delivery_info", {})
            info["redelivered"] = count > 1
            info["delivery_count"] = count
            delivered.append((payload, queue))
        for msg_id, problem in undecodable:
            self.dead_letter([msg_id], "undecodable", problem)
        if delivered:
            t.leases.start()
        return delivered, unsettled

    def _decode_body(self, payload: dict[str, Any]) -> str | None:
        """Decode the body here, as kombu's Message would (leaving it nothing to decode), so a
        body it cannot decode is found now, not while the rest of the batch waits; returns
        why it cannot be decoded, or None."""
        props = payload["properties"]
        encoding = props.get("body_encoding")
        body = payload.get("body")
        if not encoding or not body:
            return None
        if encoding.lower() != "utf-8" and self.codecs.get(encoding) is None:
            return f"body cannot be decoded: unknown body_encoding {encoding!r}"
        try:
            payload["body"] = self.decode_body(body, encoding)
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            return f"body cannot be decoded ({encoding}): {exc!r}"
        del props["body_encoding"]
        return None

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        claimed = self._claim([check_queue_name(queue)], 1)
        if not claimed:
            raise Empty()
        return claimed[0][0]

    def claim_size(self) -> int:
        """How many messages to claim for this channel now: its free prefetch slots."""
        return self.qos.can_consume_max_estimate() or DEFAULT_BATCH

    def deliver_ready(self, queues: list[str]) -> tuple[int, bool]:
        """Claim what fits the free prefetch slots from ``queues`` and hand it to the consumers;
        return how many were delivered and whether the batch was full (more may be ready)."""
        n = self.claim_size()
        claimed = self._claim(queues, n)
        if len(claimed) >= n:
            self.connection.idle.leave(queues)  # a backlog: publishes need not announce
        self.deliver(claimed)
        return len(claimed), len(claimed) >= n

    def deliver(self, claimed: list[tuple[dict[str, Any], str]]) -> None:
        """Hand claimed messages to their consumers; those of a queue no longer consumed here
        (cancelled while the claim ran on the claim thread) go back to their queue."""
        gone = [p["properties"]["delivery_tag"] for p, queue in claimed
                if queue not in self._active_queues]
        if gone:
            claimed = [(p, q) for p, q in claimed if q in self._active_queues]
            self.hand_back(gone)
        t = self.connection
        with t.settling_leases():  # a failed delivery whose hand-back fails too
            for i, (payload, queue) in enumerate(claimed):
                try:
                    if queue in self._no_ack_queues:
                        # nobody will ack it: the delivery itself is the ack
                        t.acks.add((payload["properties"]["delivery_tag"],))
                    t._deliver(payload, queue)
                except BaseException:
                    # the rest of the batch goes back now, not when its leases run out
                    rest = [p["properties"]["delivery_tag"] for p, _ in claimed[i + 1:]]
                    if rest:
                        self.hand_back(rest)
                    raise

    def _get_many(self, queues: list[str], timeout: float | None = None) -> None:
        delivered, _ = self.deliver_ready(list(queues))
        if not delivered:
            raise Empty()

    # -- handing back --------------------------------------------------------------------------

    def requeue(self, ids: list[int]) -> None:
        """Make messages this consumer leases visible again now (the delivery counts)."""
        self._give_back("requeue", ids)

    def hand_back(self, ids: list[int]) -> None:
        """Give back messages this consumer leases, cleanly: the delivery does not count."""
        self._give_back("hand_back", ids)

    def _give_back(self, query: str, ids: list[int]) -> None:
        t = self.connection
        with t.settling_leases():
            self._fetch_consumer(t.queries.get(query), {
                "ids": ids, "consumer": t.consumer_id, "channel": t.channel_name,
                "notify": t.settings.use_notify}, query)

    def dead_letter(self, ids: list[int], reason: str, error: str | None) -> None:
        """Move messages this consumer leases to the dead letters, with why."""
        t = self.connection
        with t.settling_leases():
            self._fetch_consumer(t.queries.dead_letter, {
                "ids": ids, "reason": reason, "error": error, "consumer": t.consumer_id},
                "dead_letter")
        for msg_id in ids:
            log_event(log, logging.WARNING, DEAD_LETTER, message_id=msg_id, reason=reason,
                      error=error)

    def _restore(self, message: Any) -> None:
        self.hand_back([message.delivery_tag])

    def _restore_at_beginning(self, message: Any) -> None:
        self.hand_back([message.delivery_tag])
