"""Hand-off at publish: idle consumers offer free slots, publishes fill them in their statement.

Woken by a NOTIFY, a consumer still had to claim what was announced: one more round trip
between a publish and the task's start, which Redis's blocked ``BRPOP`` does not pay. So a
consumer on Celery's event loop whose claim came back short (its queues are drained) offers its
free prefetch slots: a token and a count of open slots on each of its channel's rows of the
``offers`` table (sql/0010_offers.sql, sql/0011_offer_slots.sql), the slots spread over
:data:`OFFER_ROWS` rows, set on the claim thread. A publish to one of its queues fills a slot in
its own statement (``publish``: a row's count goes down under ``FOR UPDATE SKIP LOCKED``),
inserts its message already leased to that consumer, and sends the message itself on the
consumer's own NOTIFY channel; the consumer delivers it as it arrives (:meth:`Offers.received`),
with no claim. When a quarter of its slots are left, it adds those freed since (acks) to the
offer (:meth:`Offers.top_up`), and it offers again once every slot is filled. So a consumer that
keeps its queues drained pays one offer statement per window of messages, not per message, and
its offer does not run out while it has room. The row a publish fills stays locked until it
commits, and publishes in flight meanwhile fill the other rows (on one row, they skipped the
offer). Publishes fill the live offer served longest ago first: idle consumers are served in
turn, as Redis serves blocked ``BRPOP`` calls (an offer's spare rows queue behind every row
served so far: see ``make_offer``).

Messages too large for a NOTIFY payload, scheduled ones and ones with a unique key take the
ordinary path, and so does every publish that finds no open offer (or only ones that another
publish has locked): the consumer still waits on its queues, so such a publish announces its
message (see :mod:`.idle`), and no wake-up is lost.

Why nothing is lost, delivered twice or delivered past the prefetch window:

* **A dead consumer takes nothing.** An offer is good only while its consumer's LISTEN session
  holds the exclusive advisory lock ``(offer space, live_key)``; a publish skips an offer whose
  lock a shared try obtains. The sweep deletes such rows.
* **The window is never overfilled.** An offer has at most the slots its claim left free. A
  claim takes only the slots that its offer's unfilled ones leave, beside the open offer
  (:meth:`Offers.room_beside`: acks freed them since the offer was made); with none left, the
  consumer withdraws the offer first (``withdraw_offer`` waits for a publish filling a slot to
  commit, and says how many were left open). The messages of the filled slots that have not
  arrived, and those delivered since the claim was planned (:meth:`Offers.planned`), fill
  slots the claim must leave; a claim left with none is owed, and made once they have arrived
  (``Channel.claim_owed``). An offer stays open through the claims beside it: withdrawn, its
  publishes in the meantime would miss it and be announced, and each announcement would cause
  the next such claim.
* **A handed-off message whose NOTIFY never arrives comes back.** A publish sends it in the
  transaction that commits it (sql/0013); migration 12's procedure sent it after the commit, and
  lost it if the publisher's session ended in between. So every polling round counts the
  filled slots of the open offer, which stays open (:meth:`Offers.check`), and a hand-off
  that has not arrived :data:`HANDOFF_LATE_SECONDS` after its slot was seen filled, or after
  its offer was withdrawn (:meth:`Offers.check_late`), is taken for lost and recovered as
  below. Otherwise NOTIFYs are lost only with the session that listens. Each new
  LISTEN session (or a paused one) starts a new *generation*: offers made before are forgotten,
  and the next claim round (:meth:`Offers.recover`) withdraws them all and hands back every
  lease this consumer holds but never received, as after a claim whose reply was lost. A
  hand-off that arrives for a forgotten offer is not delivered: its lease may have been handed
  back already (and the message claimed again, even by this consumer), so only a recovery, which
  knows what this consumer holds, hands it back. Closing does the same.

Every handed-off message is leased from its insert, so a consumer that crashes with one loses
nothing: its lease runs out as a claimed message's does.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
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

#: Seconds a hand-off may be on its way (its slot filled, its NOTIFY not arrived) before the
#: consumer takes it for lost and hands back what it holds and never received. Migration 12's
#: procedure announced after its commit: a session that ended between the two left a message
#: leased to this consumer that no NOTIFY brings.
HANDOFF_LATE_SECONDS = 5.0

#: Rows an offer is spread over (at most one slot each when it has fewer): a publish filling a
#: slot locks its row until it commits, and the publishes in flight meanwhile skip that row, so
#: with one row most publishes of a process whose threads send at once took the ordinary path.
OFFER_ROWS = 8


def spread(slots: int, rows: int = OFFER_ROWS) -> list[int]:
    """``slots`` open slots over ``rows`` rows, as evenly as they go (the first ones get more)."""
    return [slots // rows + (1 if i < slots % rows else 0) for i in range(rows)]


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
class _Offer:
    """One offer this process made: whose, of how many slots, and what came of them."""

    channel: Any
    slots: int
    #: The queues it offers slots on, sorted.
    queues: list[str] = field(default_factory=list)
    #: Hand-offs that arrived with its token.
    received: int = 0
    #: Open slots left (``slots - received``) at which it asks for more (see :meth:`Offers.top_up`).
    low_water: int = 0
    #: Slots a polling round saw filled (see :meth:`Offers.check`), and time.monotonic() then.
    seen_filled: int = 0
    seen_at: float = 0.0
    #: Slots publishes filled, known once it is withdrawn (None: still open).
    filled: int | None = None
    #: time.monotonic() when it was withdrawn.
    withdrawn_at: float | None = None

    def done(self) -> bool:
        """Every message handed off with it has arrived: nothing more can come."""
        return self.received >= (self.slots if self.filled is None else self.filled)

    def on_its_way(self) -> int:
        """Withdrawn: messages handed off with it that have not arrived yet."""
        return 0 if self.filled is None else max(self.filled - self.received, 0)


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
    #: Each consuming channel's rows in the table (their ``slot`` keys): channel -> rows.
    slots: dict[Any, list[str]] = field(default_factory=dict)
    #: Offers of this generation still open, or withdrawn with messages on their way: token ->
    #: the offer. At most one per channel is open.
    offers: dict[str, _Offer] = field(default_factory=dict)
    #: Hand-offs each channel received (ever), and that count when its claim was planned.
    arrived: dict[Any, int] = field(default_factory=dict)
    planned: dict[Any, int] = field(default_factory=dict)
    #: Offers were made in an older generation: withdraw them all and hand back what they may
    #: have leased to this consumer before the next claim.
    recover: bool = False
    #: Offers were ever made by this process (closing then hands back what may be on its way).
    ever: bool = False

    def open_tokens(self, channel: Any) -> list[str]:
        """``channel``'s open offers (under ``lock``): at most one."""
        return [token for token, o in self.offers.items()
                if o.channel is channel and o.filled is None]

    def on_its_way(self, channel: Any) -> int:
        """Messages handed off to ``channel``'s withdrawn offers, not arrived (under ``lock``)."""
        return sum(o.on_its_way() for o in self.offers.values() if o.channel is channel)

    def filled_since_plan(self, channel: Any) -> int:
        """Slots of ``channel``'s planned claim that hand-offs fill (under ``lock``): those
        delivered since the claim was planned (see :meth:`Offers.planned`) and those on their
        way."""
        arrived = self.arrived.get(channel, 0)
        return arrived - self.planned.get(channel, arrived) + self.on_its_way(channel)


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
        had = bool(s.offers)
        s.offers.clear()
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

    def planned(self, channel: Any) -> None:
        """On the loop thread, as it plans a claim for ``channel`` from its free slots: hand-offs
        delivered from now on fill slots that the plan counted free (see :meth:`withdraw`)."""
        s = self._state.get()
        with s.lock:
            s.planned[channel] = s.arrived.get(channel, 0)

    def is_open(self, channel: Any) -> bool:
        """``channel`` has an offer with slots publishes may still fill."""
        s = self._state.get()
        with s.lock:
            return bool(s.open_tokens(channel))

    def on_its_way(self, channel: Any) -> int:
        """How many messages handed off to ``channel``'s withdrawn offers have not arrived."""
        s = self._state.get()
        with s.lock:
            return s.on_its_way(channel)

    def room_beside(self, channel: Any, n: int) -> int:
        """How many of the ``n`` slots a claim was planned with it may take while ``channel``'s
        offer stays open: those left once the offer's unfilled slots, the hand-offs on their
        way and those delivered since the plan are counted (see :meth:`withdraw`). 0 (no open
        offer, or no room beside it): withdraw the offer first."""
        s = self._state.get()
        with s.lock:
            mine = s.open_tokens(channel)
            if not mine:
                return 0
            offer = s.offers[mine[0]]
            room = n - s.filled_since_plan(channel) - (offer.slots - offer.received)
            if room <= 0:
                return 0
            s.planned.pop(channel, None)
            return room

    def withdraw(self, channel: Any) -> int:
        """Take back ``channel``'s open offer before it claims; return how many of the slots
        its claim was planned with hand-offs fill: those on their way (handed off, not arrived)
        and those delivered since the plan (see :meth:`planned`)."""
        s = self._state.get()
        with s.lock:
            mine = s.open_tokens(channel)
            rows = s.slots.get(channel, [])
            generation = s.generation
        for token in mine:
            params = {"rows": rows, "token": token}
            try:
                # Not retried: after a first try that committed, a retry would find the offer
                # withdrawn, and could not tell how many of its slots publishes had filled.
                left = self.db.run(lambda conn, p=params: conn.execute(
                    self.queries.withdraw_offer, p).fetchone(), "withdraw offer", retry=False)
            except Exception:
                left = None
            with s.lock:
                if s.generation != generation:
                    break  # forgotten meanwhile, and recovered instead
                offer = s.offers.get(token)
                if left is not None and left[1] == len(rows):
                    if offer is not None:
                        offer.filled = offer.slots - int(left[0])
                        offer.withdrawn_at = time.monotonic()
                        if offer.done():
                            del s.offers[token]
                    continue
                # failed, or a row is gone: forget every offer instead; recover() withdraws
                # them all (safe to repeat) and hands back what they may have leased
                self._forget(s)
                s.recover = True
            self.recover()
            break
        with s.lock:
            filled = s.filled_since_plan(channel)
            s.planned.pop(channel, None)
            return filled

    def check(self, channel: Any, queues: list[str]) -> bool:
        """On the claim thread, in a polling round: look for hand-offs of ``channel``'s open
        offer lost on their way, and leave the offer open. The slots found filled were filled by
        committed publishes, whose NOTIFYs were sent with their commits: once they are seen,
        each must arrive within :data:`HANDOFF_LATE_SECONDS`, or it is lost, and the consumer
        recovers (:meth:`recover`). Withdrawing the offer to count them made every publish in
        the meantime miss it. Returns False if the offer is to be withdrawn instead: it offers
        other ``queues`` than the channel consumes now (a consumer added or cancelled)."""
        s = self._state.get()
        with s.lock:
            mine = s.open_tokens(channel)
            if not mine:
                return True
            token, rows, generation = mine[0], s.slots.get(channel, []), s.generation
            if s.offers[token].queues != sorted(queues):
                return False
        try:
            # a read, safe to repeat
            row = self.db.run(lambda conn: conn.execute(self.queries.count_open_slots, {
                "rows": rows, "token": token}).fetchone(), "count open slots")
        except Exception:
            row = None
        now = time.monotonic()
        with s.lock:
            offer = s.offers.get(token)
            if s.generation != generation or offer is None or offer.filled is not None:
                return True  # forgotten, used up or withdrawn meanwhile
            if row is not None and row[1] == len(rows):
                if offer.received >= offer.seen_filled:  # all seen before has arrived
                    offer.seen_filled, offer.seen_at = offer.slots - int(row[0]), now
                    return True
                if now - offer.seen_at <= HANDOFF_LATE_SECONDS:
                    return True
                log.warning("kojin_pg: %d handed-off messages never arrived within %gs: taking "
                            "back what this consumer holds and never received",
                            offer.seen_filled - offer.received, HANDOFF_LATE_SECONDS)
            # late, failed, or a row is gone: recover() withdraws every offer (safe to repeat)
            # and hands back what they may have leased
            s.recover = True
        self.recover()
        return True

    def check_late(self) -> bool:
        """On the loop thread (the polling safety net): whether a hand-off is lost, that is
        on its way for longer than :data:`HANDOFF_LATE_SECONDS` after its offer was withdrawn;
        then the next claim round recovers (:meth:`recover`: what this consumer holds and
        never received goes back to its queue). Those of an open offer are found by
        :meth:`check`."""
        s = self._state.get()
        now = time.monotonic()
        with s.lock:
            late = [o for o in s.offers.values()
                    if o.on_its_way() > 0 and o.withdrawn_at is not None
                    and now - o.withdrawn_at > HANDOFF_LATE_SECONDS]
            if not late:
                return False
            s.recover = True
            for o in late:  # told once; the recovery forgets them
                o.withdrawn_at = None
        log.warning("kojin_pg: %d handed-off messages never arrived within %gs: taking back "
                    "what this consumer holds and never received",
                    sum(o.on_its_way() for o in late), HANDOFF_LATE_SECONDS)
        return True

    def make(self, channel: Any, queues: list[str], slots: int) -> None:
        """Offer ``slots`` free slots of ``channel`` on ``queues`` (on the claim thread, after a
        short claim); nothing if the live lock is not held now, or ``channel`` has an open
        offer."""
        s = self._state.get()
        with s.lock:
            if slots <= 0 or not s.live or s.open_tokens(channel):
                return
            token = str(uuid.uuid4())
            rows = s.slots.setdefault(channel, [str(uuid.uuid4()) for _ in range(OFFER_ROWS)])
            s.offers[token] = _Offer(channel, slots, sorted(queues), low_water=slots // 4)
            s.ever = True
        params = {"rows": rows, "open": spread(slots, len(rows)), "token": token,
                  "consumer": self._consumer(),
                  "queues": queues, "notify_channel": s.notify_channel,
                  "lease": self.lease_seconds, "live_key": s.live_key}
        try:
            # Not retried: after a first try that committed, publishes may have filled slots,
            # which a retry would open again.
            self.db.run(lambda conn: conn.execute(self.queries.make_offer, params),
                        "make offer", retry=False)
        except Exception as exc:
            # an offer is only a shortcut: consuming goes on without it. It may have committed
            # with its reply lost: recover before the next claim
            with s.lock:
                s.recover = True
            log.warning("kojin_pg: could not offer slots to publishers: %r", exc)

    def top_up(self, channel: Any, slots: int) -> None:
        """On the claim thread: add ``slots`` free slots (those freed since it was made: see
        :meth:`room_beside`) to ``channel``'s open offer as it runs low, so that it does not run
        out while the consumer has room. A consumer that kept up with one publisher used its
        offer up every window's worth of messages, and a publish before the new offer was
        committed missed it. The slots go to the offer's rows used up, which no publish is
        filling (see ``top_up_offer``). The offer counts them before the statement runs, so
        that a hand-off of them arriving first does not find it used up; if none were added (no
        row used up yet) and that leaves the offer used up, it is forgotten as such (the next
        claim round offers again)."""
        s = self._state.get()
        with s.lock:
            mine = s.open_tokens(channel)
            if slots <= 0 or not mine:
                return
            token, rows = mine[0], s.slots.get(channel, [])
            s.offers[token].slots += slots
        try:
            # Not retried: after a first try that committed, a retry would add the slots twice.
            added = self.db.run(lambda conn: conn.execute(self.queries.top_up_offer, {
                "rows": rows, "token": token, "add": slots}).fetchone()[0],
                "top up offer", retry=False)
        except Exception as exc:
            # it may have committed with its reply lost: recover before the next claim
            with s.lock:
                s.recover = True
            log.warning("kojin_pg: could not add slots to an offer: %r", exc)
            return
        with s.lock:
            offer = s.offers.get(token)
            if offer is not None:
                offer.slots -= slots - int(added)
                if offer.done():
                    del s.offers[token]

    def received(self, handoff: Handoff) -> tuple[Any | None, bool]:
        """On the loop thread: the channel a hand-off is for, and whether that channel's offer
        is used up by it (offer again) or runs low (a quarter of its slots left: top it up). No
        channel if its offer is forgotten: the message may have been handed back already and is
        not to be delivered; the next round's :meth:`recover` hands it back if it is still
        leased here."""
        s = self._state.get()
        with s.lock:
            offer = s.offers.get(handoff.token)
            if offer is None:
                s.recover = True  # recovering is safe to repeat, and covers this lease
                return None, False
            offer.received += 1
            s.arrived[offer.channel] = s.arrived.get(offer.channel, 0) + 1
            if offer.done():
                del s.offers[handoff.token]
            return offer.channel, offer.filled is None and (
                offer.done() or offer.slots - offer.received == offer.low_water)

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
