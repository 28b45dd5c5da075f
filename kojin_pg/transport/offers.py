"""Hand-off at publish: an idle consumer offers a free slot, a publish fills it in its statement.

Woken by a NOTIFY, a consumer still had to claim what was announced: one more round trip
between a publish and the task's start, which Redis's blocked ``BRPOP`` does not pay. So a
consumer on Celery's event loop whose claim came back short (its queues are drained) and that
has a free prefetch slot offers it: a token on its channel's row of the ``offers`` table
(sql/0010_offers.sql), set on the claim thread. A publish to one of its queues takes the offer in
its own statement (``publish``: the token is cleared under ``FOR UPDATE SKIP LOCKED``), inserts
its message already leased to that consumer, and sends the message itself on the consumer's own
NOTIFY channel; the consumer delivers it as it arrives (:meth:`Offers.received`), with no claim,
and then only offers again. Messages too large for a NOTIFY payload, scheduled ones and ones
with a unique key take the ordinary path, and so does every publish while the consumer's offer
is taken: the consumer still waits on its queues, so such a publish announces its message
(see :mod:`.idle`), and no wake-up is lost.

Why nothing is lost or delivered twice:

* **A dead consumer takes nothing.** An offer is good only while its consumer's LISTEN session
  holds the exclusive advisory lock ``(offer space, live_key)``; a publish skips an offer whose
  lock a shared try obtains. The sweep deletes such rows.
* **The claim never overfills the prefetch window.** Before each claim the consumer withdraws
  its channel's offer (``withdraw_offer`` waits for a publish taking it to commit); one found gone
  was taken, and its message, leased to this consumer and on its way, counts against the claim's
  size until it arrives.
* **A handed-off message whose NOTIFY never arrives comes back.** NOTIFYs are lost only with the
  session that listens. Each new LISTEN session (or a paused one) starts a new *generation*:
  offers made before are forgotten, and the next claim round (:meth:`Offers.recover`) withdraws
  them all and hands back every lease this consumer holds but never received, as after a claim
  whose reply was lost. A hand-off that arrives for a forgotten offer is handed back, not
  delivered (its lease may be gone). Closing does the same.

Every handed-off message is leased from its insert, so a consumer that crashes with one loses
nothing: its lease runs out as a claimed message's does.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..db import Database, ProcessLocal, Queries

log = logging.getLogger(__name__)

#: The largest encoded message handed off. A NOTIFY payload must stay under 8,000 bytes, with the
#: offer's token, the message's id, queue and priority around the message; the publish checks the
#: message's exact size as PostgreSQL prints it (jsonb adds spaces), this only spares the check.
HANDOFF_MAX_BYTES = 7_600

#: Keys tried for the live lock on a new session before it makes no offers.
LIVE_KEY_TRIES = 8


def _random_key() -> int:
    return random.randrange(-2**31, 2**31)


def offer_space(schema: str) -> int:
    """The advisory-lock namespace of the schema's offers' live locks."""
    return zlib.crc32(f"kojin_pg.offers:{schema}".encode()) - 2**31


@dataclass
class Handoff:
    """One message handed off to this consumer, as its NOTIFY carried it."""

    token: str
    message_id: int
    queue: str
    priority: int
    payload: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> Handoff:
        """The NOTIFY's payload, as the ``publish`` statement builds it."""
        token, message_id, queue, priority, payload = json.loads(text)
        return cls(token, int(message_id), queue, int(priority or 0), payload)

    def as_claimed_row(self) -> tuple[Any, ...]:
        """The row a claim would have returned for this message (its first delivery)."""
        return (self.message_id, self.queue, self.payload, 1, False, self.priority, None)


@dataclass
class _State:
    """This process's offers: its live lock and channel, and what it has offered."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    live_key: int = field(default_factory=lambda: _random_key())
    notify_channel: str = field(default_factory=lambda: f"kojin_offer_{uuid.uuid4().hex}")
    #: Bumped by every new LISTEN session: offers of an older one are forgotten.
    generation: int = 0
    #: The live lock is held on the current session.
    live: bool = False
    #: Each consuming channel's row in the table: channel -> slot.
    slots: dict[Any, str] = field(default_factory=dict)
    #: Offers made in this generation and not known taken: token -> the channel.
    open: dict[str, Any] = field(default_factory=dict)
    #: Offers found taken by a publish whose message has not arrived yet: token -> channel.
    taken: dict[str, Any] = field(default_factory=dict)
    #: Offers were made in an older generation: withdraw them all and hand back what they may
    #: have leased to this consumer before the next claim.
    recover: bool = False
    #: Offers were ever made by this process (closing then hands back what may be on its way).
    ever: bool = False


class Offers:
    """This process's offers of free prefetch slots to the publishers of one transport."""

    def __init__(self, db: Database, queries: Queries, schema: str, consumer: Callable[[], str],
                 lease_seconds: float,
                 release_orphans: Callable[[psycopg.Connection[Any]], None]) -> None:
        self.db = db
        self.queries = queries
        self.space = offer_space(schema)
        self._consumer = consumer
        self.lease_seconds = lease_seconds
        #: Hands back what this consumer leases and does not know of (see :meth:`recover`).
        self._release_orphans = release_orphans
        self._state: ProcessLocal[_State] = ProcessLocal(_State)

    @property
    def notify_channel(self) -> str:
        """This process's own NOTIFY channel, on which hand-offs arrive."""
        return self._state.get().notify_channel

    def on_listen(self, conn: psycopg.Connection[Any]) -> None:
        """On a new LISTEN session (which listens on :attr:`notify_channel`): hold the live lock
        from now on; what was offered before is forgotten and recovered (module docstring)."""
        s = self._state.get()
        held = False
        for _ in range(LIVE_KEY_TRIES):
            row = conn.execute(self.queries.hold_live_lock,
                               {"offer_space": self.space, "live_key": s.live_key}).fetchone()
            held = bool(row and row[0])
            if held:
                break
            # another consumer's key, or this process's last session not gone yet: the rows
            # this process makes from now on carry the new key
            s.live_key = _random_key()
        with s.lock:
            if self._forget(s):
                s.recover = True
            s.live = held  # not held: no offers on this session (publishes announce instead)

    def on_pause(self) -> None:
        """The LISTEN session gave back its locks (it idled): its offers are dead."""
        s = self._state.get()
        with s.lock:
            if self._forget(s):
                s.recover = True
            s.live = False

    @staticmethod
    def _forget(s: _State) -> bool:
        """Start a new generation (under ``s.lock``): no offer made before counts as open or
        on its way from now on; whether there was any."""
        s.generation += 1
        had = bool(s.open or s.taken)
        s.open.clear()
        s.taken.clear()
        return had

    def recover(self) -> None:
        """On the claim thread, before a claim: if offers of an older session may have leased
        messages to this consumer that never arrived, withdraw them and hand those back."""
        s = self._state.get()
        with s.lock:
            if not s.recover:
                return
            s.recover = False
            self._forget(s)  # every offer is withdrawn below
            s.slots.clear()  # and their rows deleted

        def go(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(self.queries.withdraw_all_offers, {"consumer": self._consumer()})
            self._release_orphans(conn)
        try:
            # safe to repeat: withdrawing deletes what is still there, and release_orphans
            # hands back only what this consumer holds and does not know of
            self.db.run(go, "recover offers")
        except BaseException:
            with s.lock:
                s.recover = True
            raise

    def withdraw(self, channel: Any) -> int:
        """Take back ``channel``'s open offer before it claims; return how many of its
        hand-offs are on their way (taken, not arrived): they fill slots the claim must leave."""
        s = self._state.get()
        with s.lock:
            mine = [token for token, ch in s.open.items() if ch is channel]
            slot = s.slots.get(channel)
            generation = s.generation
        for token in mine:
            params = {"slot": slot, "token": token}
            try:
                # Not retried: after a first try that committed, a retry would find the offer
                # gone, as if a publish had taken it, and count a hand-off that never comes.
                still = self.db.run(lambda conn, p=params: conn.execute(
                    self.queries.withdraw_offer, p).fetchall(), "withdraw offer", retry=False)
            except Exception:
                # forget every offer instead: recover() withdraws them all (safe to repeat)
                # and hands back what they may have leased
                with s.lock:
                    s.recover = True
                self.recover()
                return 0
            with s.lock:
                # gone from open: its message arrived meanwhile; another generation: forgotten,
                # and recovered instead
                if (s.open.pop(token, None) is not None and not still
                        and s.generation == generation):
                    s.taken[token] = channel
        with s.lock:
            return sum(1 for ch in s.taken.values() if ch is channel)

    def make(self, channel: Any, queues: list[str]) -> None:
        """Offer one free slot of ``channel`` on ``queues`` (on the claim thread, after a short
        claim); nothing if the live lock is not held now."""
        s = self._state.get()
        with s.lock:
            if not s.live or any(ch is channel for ch in s.open.values()):
                return
            token = str(uuid.uuid4())
            slot = s.slots.setdefault(channel, str(uuid.uuid4()))
            s.open[token] = channel
            s.ever = True
        try:
            # retried: the same slot and token again is the same offer
            self.db.execute(self.queries.make_offer, {
                "slot": slot, "token": token, "consumer": self._consumer(), "queues": queues,
                "notify_channel": s.notify_channel, "lease": self.lease_seconds,
                "live_key": s.live_key}, "make offer")
        except Exception as exc:
            # an offer is only a shortcut: consuming goes on without it. It may have committed
            # with its reply lost: recover before the next claim
            with s.lock:
                s.recover = True
            log.warning("kojin_pg: could not offer a slot to publishers: %r", exc)

    def received(self, handoff: Handoff) -> Any | None:
        """The channel a hand-off is for (on the loop thread), or None if its offer is forgotten:
        then its message may have been handed back already, and is not to be delivered."""
        s = self._state.get()
        with s.lock:
            return s.open.pop(handoff.token, None) or s.taken.pop(handoff.token, None)

    def close(self) -> bool:
        """Withdraw every offer of this consumer (the claim thread has stopped); whether
        messages may have been handed off that nobody received (then the caller hands back
        what this consumer holds and does not know of)."""
        s = self._state.pop()
        if s is None or not s.ever:
            return False
        # not retried: closing should not wait out an outage for this; if it fails, the offers
        # die with the LISTEN session, closed next, and the sweep deletes their rows
        self.db.run(lambda conn: conn.execute(self.queries.withdraw_all_offers, {
            "consumer": self._consumer()}), "withdraw offers", retry=False)
        return True
