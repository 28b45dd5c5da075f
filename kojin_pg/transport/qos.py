"""Prefetch accounting, and what ack, reject and restore do to the database rows."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import virtual

log = logging.getLogger(__name__)


class QoS(virtual.QoS):
    """kombu's prefetch window over messages leased to this consumer."""

    def _closed(self, what: str, delivery_tag: int) -> bool:
        if self.channel.connection is not None:
            return False
        # The channel closed (e.g. kombu reconnected) and handed its messages back when it
        # did: this one is delivered again, which at-least-once delivery allows.
        log.info("kojin_pg: %s of message %s after its channel closed: it was handed back "
                 "and will be delivered again", what, delivery_tag)
        return True

    def ack(self, delivery_tag: int) -> None:
        """Done: the row is deleted with the consumer's next claim, or a few ms later."""
        if self._closed("ack", delivery_tag):
            return
        transport = self.channel.connection
        transport.acks.add((delivery_tag,))
        super().ack(delivery_tag)
        transport.wakeups.nudge()  # a prefetch slot is free

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        """Give the message back to its queue (the delivery counts), or bury it."""
        if self._closed("reject", delivery_tag):
            return
        if requeue:
            self.channel.requeue([delivery_tag])
        else:
            self.channel.dead_letter([delivery_tag], "rejected", "rejected by the consumer")
        self._quick_ack(delivery_tag)
        self.channel.connection.wakeups.nudge()

    def restore_unacked(self) -> list[Any]:
        """Give every unacked message back at once (channel close, worker shutdown)."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        if tags and self.channel.connection is not None:
            try:
                self.channel.hand_back(tags)
            except Exception as exc:
                # The leases run out by themselves: nothing is lost, only delayed.
                log.warning("kojin_pg: could not hand back %d messages (%r); they return "
                            "when their lease runs out", len(tags), exc)
        return []

    def held(self) -> list[int]:
        """Delivery tags (message ids) delivered and not yet acked or rejected."""
        while True:  # read from the lease thread while the consumer's thread acks
            try:
                dirty = set(self._dirty)
                return [tag for tag in list(self._delivered) if tag not in dirty]
            except RuntimeError:  # changed size during iteration: read again
                continue
