"""The kombu Transport: one per kombu connection; owns the pools, acks, leases and wake-ups,
and runs the consumers' claims on Celery's event loop or in a blocking wait."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from queue import Empty
from typing import Any

import psycopg
from kombu.transport import virtual
from kombu.utils.objects import cached_property

from .. import config
from ..db import Database, ProcessLocal, Queries
from ..db import shared as shared_database
from ..db.channels import messages_channel
from ..db.schema import ensure_schema
from ..errors import DatabaseUnavailable
from .acks import AckBuffer
from .channel import Channel
from .claimer import Ask, Claimer
from .idle import IdleQueues
from .leases import LeaseKeeper
from .offers import Handoff, Offers
from .options import broker_settings
from .revoked_results import RevokedResults
from .upkeep import upkeep_for
from .wakeups import Wakeups

log = logging.getLogger(__name__)

#: What a claim round is asked for after a hand-off: no queue to claim, only offer again (or
#: top up an offer running low).
OFFER_AGAIN: frozenset[str] = frozenset()


class Transport(virtual.Transport):
    """kombu transport storing queues in PostgreSQL. See :mod:`kojin_pg.transport`."""

    Channel = Channel

    can_parse_url = True
    default_port = 5432
    driver_type = "postgresql"
    driver_name = "psycopg"
    polling_interval = 1.0

    connection_errors = virtual.Transport.connection_errors + (
        psycopg.OperationalError, DatabaseUnavailable)
    channel_errors = virtual.Transport.channel_errors + (psycopg.DatabaseError,)

    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False)

    #: Seconds the close waits for a claim under way on the claim thread to end.
    CLAIMS_STOP_TIMEOUT = 10.0

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._consumer_id: ProcessLocal[str] = ProcessLocal(
            lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        self._ready = False
        #: Set when close starts: background rounds leave this transport alone from then on.
        self.closing = False
        #: Whether a channel of this transport ever consumed (then closing deregisters it).
        self.consumed = False
        #: Whether this consumer may hold leases no channel knows about: a claim, or a hand-back
        #: of claimed messages, failed or was interrupted partway (Ctrl-C between a claim's
        #: commit and its reply). Closing then hands back whatever it holds; otherwise every
        #: lease is known, and closing skips that statement (it reads the whole table).
        self.leases_unknown = False
        self._hub: Any = None
        self._listen_fd: int | None = None
        #: Which LISTEN connection the loop watches (see Listener.watched_session).
        self._listen_session = 0
        self._claims_fd: int | None = None
        #: The event loop's timer for the earliest scheduled message: (due, timer entry).
        self._due_timer: tuple[float, Any] | None = None

    # -- configuration and resources ---------------------------------------------------------

    @property
    def consumer_id(self) -> str:
        """Who holds a lease: this process's own name (a forked child gets its own)."""
        return self._consumer_id.get()

    @cached_property
    def settings(self) -> config.Settings:
        return broker_settings(self._url(), self.client.transport_options)

    def _url(self) -> str:
        return config.url_from_kombu(self.client)

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL for banners and logs (kombu's own parser fails on host lists)."""
        url = "kojin+" + self._url()
        return url if include_password else config.mask_url(url)

    @cached_property
    def db(self) -> Database:
        """Pool for publishing (durable commits unless ``synchronous_commit`` says otherwise),
        shared with the process's other transports of the same settings (see
        :mod:`kojin_pg.db.shared`) and given back on close."""
        settings, timeout = self.settings, self.client.connect_timeout
        return shared_database.acquire(
            ("kojin_pg.broker", settings, timeout),
            lambda: Database(settings, role="kojin_pg.broker", connect_timeout=timeout))

    @cached_property
    def consumer_db(self) -> Database:
        """Pool for claims, acks, requeues, dead-lettering and lease extensions.

        These commit with ``synchronous_commit = off``: a PostgreSQL crash can lose the last
        fraction of a second of them, and then a message is delivered once more, which
        at-least-once delivery allows. Publishes never go through here. Its statements are
        planned once per session (the claim would otherwise be planned on every call), and
        never as a scan of a whole table (see :class:`~kojin_pg.db.Database`).
        """
        return Database(self.settings, role="kojin_pg.consumer", synchronous_commit="off",
                        generic_plans=True,
                        connect_timeout=self.client.connect_timeout)

    @cached_property
    def queries(self) -> Queries:
        return Queries("broker", self.settings.schema)

    @cached_property
    def channel_name(self) -> str:
        return messages_channel(self.settings.schema)

    @cached_property
    def acks(self) -> AckBuffer:
        """Acks recorded and not yet applied (see :mod:`.acks`)."""
        return AckBuffer(lambda ids: self.consumer_db.execute(self.queries.ack, {"ids": ids},
                                                              "ack"))

    @cached_property
    def leases(self) -> LeaseKeeper:
        """Renews the leases of held messages (see :mod:`.leases`)."""
        s = self.settings
        return LeaseKeeper(self.consumer_db, self.queries, lambda: self.consumer_id,
                           self.held_ids, s.visibility_timeout, s.renew_interval)

    @cached_property
    def wakeups(self) -> Wakeups:
        """NOTIFY announcements and local nudges (see :mod:`.wakeups`)."""
        return Wakeups(self.db, self.channel_name, enabled=self.settings.use_notify,
                       on_connect=self._on_listen, on_pause=self._on_listen_paused,
                       private_channel=lambda: self.offers.notify_channel)

    def _on_listen(self, conn: psycopg.Connection[Any]) -> None:
        """A new LISTEN session: it holds no idle locks, and a new live lock for the offers; an
        event loop must watch its socket (opened on another thread: a nudge tells the loop)."""
        self.idle.forget()
        self.offers.on_listen(conn)
        self.wakeups.nudge()

    def _on_listen_paused(self) -> None:
        self.idle.forget()
        self.offers.on_pause()

    @cached_property
    def revoked_results(self) -> RevokedResults:
        """Where this broker's revokes record REVOKED results (see :mod:`.revoked_results`)."""
        return RevokedResults(self.settings)

    @cached_property
    def offers(self) -> Offers:
        """This process's offers of free slots to publishers (see :mod:`.offers`)."""
        return Offers(self.consumer_db, self.queries, self.settings.schema,
                      lambda: self.consumer_id, self.settings.visibility_timeout,
                      lambda conn: self.release_orphans(conn, keep=[]))

    @cached_property
    def idle(self) -> IdleQueues:
        """The queues this process's consumers wait on, for the publishers (see :mod:`.idle`)."""
        return IdleQueues(self.wakeups.listener, self.queries, self.settings.schema)

    @cached_property
    def claimer(self) -> Claimer:
        """Runs the event loop's claims on a thread (see :mod:`.claimer`)."""
        return Claimer(self._claim_plan, self._claim_on_thread,
                       abandoned=self._after_abandoned_claim)

    def ensure_ready(self, *, retry: bool = True) -> None:
        """Check (and with auto_migrate apply) the schema once per transport."""
        if not self._ready:
            ensure_schema(self.db, retry=retry)
            self._ready = True

    def start_consuming(self) -> None:
        """A channel of this transport consumes: deregister it on close, and join this
        process's queue upkeep (see :mod:`.upkeep`; a process that only publishes sweeps
        nothing, so its pool never needs a second connection for a round)."""
        if not self.consumed:
            self.consumed = True
            upkeep_for(self).attach(self)

    def establish_connection(self) -> Transport:
        # No retries of our own here: kombu retries connecting by its own policy
        # (Connection(connect_timeout=...), max_retries, failover to the next URL).
        self.ensure_ready(retry=False)
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        self.closing = True
        try:
            super().close_connection(connection)  # channels hand back what they hold
            if self.consumed:
                self.consumer_stopped(None)
        finally:
            try:
                self._stop_claims()
                self._withdraw_offers()
                if self.consumed:
                    upkeep_for(self).detach(self)
                self.acks.close()
                if self.leases_unknown:
                    self._release_unknown_leases()
            finally:
                self.leases.stop()
                self.wakeups.close()
                # forgotten, so that a transport kombu connects again acquires it again
                if (db := self.__dict__.pop("db", None)) is not None:
                    shared_database.release(db)
                self.consumer_db.close()

    def _stop_claims(self) -> None:
        """Stop the claim thread before the leases are handed back, so no claim commits after
        that; what it claimed and nobody delivered is handed back with them."""
        if self._hub is not None and self._claims_fd is not None:
            try:
                self._hub.remove_reader(self._claims_fd)
            except Exception:  # the loop may be gone already
                pass
            self._claims_fd = None
        if self.claimer.stop(self.CLAIMS_STOP_TIMEOUT):
            self.leases_unknown = True

    def _withdraw_offers(self) -> None:
        """Closing, with the claim thread stopped: no publish may hand this consumer anything
        from now on; what was handed off and not received is handed back with the rest."""
        try:
            if self.offers.close():
                self.leases_unknown = True
        except Exception as exc:  # they die with the LISTEN session; the sweep deletes them
            self.leases_unknown = True
            log.warning("kojin_pg: could not withdraw the offers of %s on close: %r",
                        self.consumer_id, exc)

    def _after_abandoned_claim(self) -> None:
        """On the claim thread, when a claim that the close stopped waiting for has ended:
        hand back what it leased, and close what it started again after the close (the lease
        renewal, a consumer pool opened by a retry)."""
        try:
            self._release_unknown_leases()
        finally:
            self.leases.stop()
            self.consumer_db.close()

    def _release_unknown_leases(self) -> None:
        """Closing: hand back whatever this consumer still leases. The channels have handed back
        what they held and the acks are applied, so this is only what a claim committed but never
        delivered (interrupted between its commit and its reply, e.g. by Ctrl-C)."""
        try:
            self.consumer_db.run(lambda conn: self.release_orphans(conn, keep=[]),
                                 "release leases", retry=False)
        except Exception as exc:  # they come back when their leases run out
            log.warning("kojin_pg: could not hand back leases of %s on close: %r",
                        self.consumer_id, exc)

    def consumer_stopped(self, queues: list[str] | None) -> None:
        """This transport consumes ``queues`` (None: any queue) no more; an auto_delete queue
        nobody else consumes is deleted now."""
        if queues is not None and self.settings.use_notify:
            self.idle.leave(queues)
        try:
            # not prepared: its join must be planned for the rows it meets (see sweep)
            self.consumer_db.run(lambda conn: conn.execute(self.queries.consumer_stop, {
                "queues": queues, "consumer": self.consumer_id}, prepare=False),
                "consumer_stop")
        except Exception as exc:  # the sweep forgets this consumer after its grace period
            log.warning("kojin_pg: could not deregister consumer %s: %r", self.consumer_id, exc)

    # -- what this consumer holds ---------------------------------------------------------------

    def held_ids(self) -> list[int]:
        """Ids of the messages delivered by this transport's channels and not yet acked."""
        ids: list[int] = []
        for channel in list(self.channels):
            if channel._qos is not None:
                ids.extend(channel._qos.held())
        return ids

    def release_orphans(self, conn: psycopg.Connection[Any], keep: list[int]) -> None:
        """Hand back messages leased to this consumer that it never received (see claim)."""
        # Held first, then recorded acks: an ack enters the buffer before it leaves the held
        # set, so reading in this order cannot miss a message that is being acked meanwhile.
        held = self.held_ids()
        keep = held + self.acks.pending() + list(keep)
        conn.execute(self.queries.release_orphans, {
            "consumer": self.consumer_id, "keep": keep,
            "channel": self.channel_name, "notify": self.settings.use_notify})

    @contextmanager
    def settling_leases(self) -> Iterator[None]:
        """Around work that takes leases or hands them back: if it fails partway, some leases
        may be known to nobody here (see :attr:`leases_unknown`)."""
        try:
            yield
        except BaseException:
            self.leases_unknown = True
            raise

    def consumed_queues(self) -> set[str]:
        """The queues this transport's channels consume."""
        queues: set[str] = set()
        for channel in list(self.channels):
            queues.update(channel._active_queues)
        return queues

    # -- Celery's event loop (kombu hub): used by the worker for every pool ------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Wake on NOTIFY and on acks through the loop's poller, and claim on the claim thread
        (see :mod:`.claimer`), so the loop never blocks on the database."""
        self._hub = loop
        loop.add_reader(self.wakeups.nudge_fd(), self._on_nudge)
        self._claims_fd = self.claimer.ready_fd()
        loop.add_reader(self._claims_fd, self._on_claimed)
        self._arm_listen()
        loop.call_repeatedly(self.settings.polling_interval, self._on_poll)
        loop.call_soon(self._drain_nowait)

    def _on_poll(self) -> None:
        """The polling safety net: look now (and for hand-offs lost on their way: see
        :meth:`.Offers.check` and :meth:`.Offers.check_late`), and watch the LISTEN session
        again if it was replaced or lost off the loop."""
        self._watch_again_if_replaced()
        self.offers.check_late()
        for channel in list(self.channels):
            channel.recheck_offer = True
        self._drain_nowait()

    def _watch_again_if_replaced(self) -> None:
        """The claim thread found the watched LISTEN session dead (a statement on it failed)
        and closed it, perhaps listening on a new one: the loop's poller hears nothing of the
        closed socket, nor of a new one (which may have the same number), while the new
        session holds the offers' live lock and takes the announcements. Watch it now."""
        if (self._listen_fd is None
                or self.wakeups.listener.watched_session == self._listen_session):
            return
        try:
            self._hub.remove_reader(self._listen_fd)
        except Exception:  # its socket is gone already
            pass
        self._listen_fd = None
        self._arm_listen()

    def _arm_listen(self) -> None:
        listener = self.wakeups.listener
        if not listener.enabled:
            return
        fd = listener.watch()
        if fd is None:  # down: the polling safety net covers the gap until it is back
            self._hub.call_later(1.0, self._arm_listen)
            return
        self._listen_fd = fd
        self._listen_session = listener.watched_session
        self._hub.add_reader(fd, self._on_notify)
        # a new session holds no idle locks: look now, and a short claim takes them again
        self._drain_nowait()

    def _on_notify(self) -> None:
        heard = self.wakeups.listener.take()
        self._receive_handoffs()
        if heard is None:  # lost, or announcements missed: watch the new socket, look now
            if self._listen_fd is not None:
                self._hub.remove_reader(self._listen_fd)
                self._listen_fd = None
            self._hub.call_later(0.5, self._arm_listen)
            self._drain_nowait()
            return
        announced = heard & self.consumed_queues()
        if announced:
            self._drain_nowait(announced)

    def _receive_handoffs(self) -> None:
        """Deliver the messages publishers handed to this consumer's offers (see :mod:`.offers`),
        then offer the slots that are still free again, or add them to an offer running low."""
        texts = self.wakeups.listener.take_private()
        if not texts:
            return
        back: list[int] = []
        again = False
        for text in texts:
            try:
                handoff = Handoff.parse(text)
            except (ValueError, TypeError) as exc:  # not from a publish: nothing to deliver
                log.warning("kojin_pg: ignored a malformed hand-off: %r", exc)
                continue
            channel, more = self.offers.received(handoff)
            again = again or more
            if channel is None:
                continue  # its offer is forgotten: recovered on the claim thread
            if self.closing or channel.closed or not channel._consumers:
                back.append(handoff.message_id)
                continue
            with self.settling_leases():
                delivered, _ = channel._deliverable(self, [handoff.as_claimed_row()])
            channel.deliver(delivered)
        if back:
            self._hand_back(back)
        if self._claims_owed():
            self._drain_nowait()
        elif again:
            self._drain_nowait(OFFER_AGAIN)

    def _claims_owed(self) -> bool:
        """Whether a channel owes a claim (see ``Channel.claim_owed``) whose hand-offs have all
        arrived now; its debt is paid by the claim the caller asks for."""
        owed = [channel for channel in list(self.channels)
                if channel.claim_owed and self.offers.on_its_way(channel) == 0]
        for channel in owed:
            channel.claim_owed = False
        return bool(owed)

    def _on_nudge(self) -> None:
        """A prefetch slot was freed (an ack): claim into it only if messages may be waiting
        unannounced; otherwise the next announcement claims, and the ack buffer's flusher
        applies the ack (a claim per ack costs the loop and the server for nothing)."""
        self.wakeups.clear_nudges()
        self._watch_again_if_replaced()
        if self._listen_fd is not None and self.wakeups.listener.has_backlog():
            self._on_notify()  # announcements a statement on the LISTEN session read for us
        if any(channel.more_ready for channel in list(self.channels)):
            self._drain_nowait()

    def _drain_nowait(self, announced: AbstractSet[str] | None = None) -> None:
        """Ask the claim thread for what is ready now (on the ``announced`` queues only, if
        given); acks no claim takes are applied by the ack buffer's flusher."""
        if not self.closing:
            self.claimer.request(announced)

    def _claim_plan(self, announced: AbstractSet[str] | None) -> list[Ask]:
        """The claims to make now: each consuming channel with free prefetch slots, for its
        queues (only the ``announced`` ones, if given)."""
        asks: list[Ask] = []
        for channel in list(self.channels):
            if not channel._consumers:
                continue
            if not channel.qos.can_consume():
                channel.more_ready = True  # this wake-up is lost on it: claim when a slot frees
                continue
            queues = list(channel._active_queues)
            if announced is not None and not channel.more_ready:
                queues = [q for q in queues if q in announced]
            if queues or announced == OFFER_AGAIN:  # no queues: only offer again
                self.offers.planned(channel)
                asks.append((channel, queues, channel.claim_size()))
        return asks

    def _claim_on_thread(self, channel: Channel, queues: list[str],
                         n: int) -> tuple[list[tuple[dict[str, Any], str]], int]:
        """One claim of a round, on the claim thread: what it leased, and how many it asked
        for (a full batch: more may be ready). Nothing for a channel that the loop closed
        since the round was planned: a closed channel has no connection to claim with.

        With an open offer that leaves room beside it, the claim takes that room and the offer
        stays open (see :meth:`.Offers.room_beside`); else the offer is withdrawn first.
        Short, with room left: the consumer is about to wait on ``queues``, so it says so (see
        :mod:`.idle`) and claims what was published before, then offers its free slots to the
        next publishes (see :mod:`.offers`); full: it has a backlog and says that instead. No
        ``queues``: after its offer's slots were all filled, only offer again (the consumer
        still waits: a publish that finds no offer announces its message), or add the slots
        freed since to its offer running low (:meth:`.Offers.top_up`)."""
        if channel.closed:
            return [], 0
        self.offers.recover()
        if not queues and self.offers.is_open(channel):
            # its offer runs low: add the slots freed since it was made
            self.offers.top_up(channel, self.offers.room_beside(channel, n))
            return [], 0
        recheck, channel.recheck_offer = channel.recheck_offer, False
        fits = self.offers.check(channel, list(channel._active_queues)) if recheck else True
        beside = self.offers.room_beside(channel, n) if queues and fits else 0
        if beside:
            n = beside
        elif queues and fits and self._nothing_waits_beside_offer(channel, queues):
            return [], 0
        else:
            n -= self.offers.withdraw(channel)  # hand-offs fill slots too
        if n <= 0:
            if queues:
                channel.claim_owed = True  # claimed when they have arrived
            return [], 0
        claimed: list[tuple[dict[str, Any], str]] = []
        if queues:
            claimed = channel._claim(queues, n)
            if len(claimed) >= n:
                self.idle.leave(queues)
                self._pass_on_backlog()
                return claimed, n
            due = channel.next_due
            entered = self.idle.enter(queues) if self.settings.use_notify else []
            self._pass_on_backlog()
            if entered and not channel.closed:
                claimed += channel._claim(entered, n - len(claimed))
                if due is not None and (channel.next_due is None or due < channel.next_due):
                    channel.next_due = due
        if (len(claimed) < n and self._listen_fd is not None and not self.closing
                and not channel.closed):
            # drained, with room: offer the free slots to the next publishes (the loop reads
            # the channel; nothing if its offer is open)
            self.offers.make(channel, sorted(channel._active_queues), n - len(claimed))
        return claimed, n if queues else 0

    def _nothing_waits_beside_offer(self, channel: Channel, queues: list[str]) -> bool:
        """With no room beside ``channel``'s open offer (an idle consumer's offer holds every
        free slot): whether nothing waits in ``queues``, so that the offer can stay open rather
        than be withdrawn for a claim. Withdrawn, every publish in the meantime missed it and
        was announced; an idle worker's polling round did that each second, and a round that
        only repeated a wake-up for a message claimed already. The consumer first says it
        waits on ``queues``, as a short claim would (a full claim beside the offer had given
        that up), so that what the look misses is announced."""
        if not self.offers.is_open(channel):
            return False
        if self.settings.use_notify:
            self.idle.enter(queues)
            self._pass_on_backlog()
        return not channel.waiting(queues)

    def _pass_on_backlog(self) -> None:
        """A statement on the LISTEN session (going idle, or not) reads the announcements that
        arrive meanwhile, and the loop's watched socket then stays quiet: nudge the loop to
        take them (see :meth:`_on_nudge`)."""
        if self.wakeups.listener.has_backlog():
            self.wakeups.nudge()

    def _on_claimed(self) -> None:
        """Deliver what the claim thread leased; claim again at once if a batch came back full
        (more may be ready) or wake-ups came meanwhile."""
        results, error, announced, again = self.claimer.take()
        full = False
        for channel, claimed, asked in results:
            if self.closing or channel.closed or not channel._consumers:
                if claimed:  # stopped consuming meanwhile: back to the queue
                    self._hand_back([p["properties"]["delivery_tag"] for p, _ in claimed])
                continue
            channel.deliver(claimed)
            # a short claim of all its queues: whatever comes next will be announced
            channel.more_ready = asked > 0 and len(claimed) >= asked
            full = full or channel.more_ready
        if error is not None:
            raise error
        owed = self._claims_owed()
        if full or owed:
            self._drain_nowait()
        elif again:
            self._drain_nowait(announced)
        self._arm_due_timer()

    def _hand_back(self, ids: list[int]) -> None:
        """Give back claimed messages nobody received (the delivery does not count). Not through
        their channel: one closed meanwhile has forgotten its connection."""
        with self.settling_leases():
            self.consumer_db.execute(self.queries.hand_back, {
                "ids": ids, "consumer": self.consumer_id, "channel": self.channel_name,
                "notify": self.settings.use_notify}, "hand_back")

    def next_due(self) -> float | None:
        """time.monotonic() when the earliest scheduled message of the consumed queues is due."""
        dues = [c.next_due for c in list(self.channels) if c.next_due is not None]
        return min(dues) if dues else None

    def _arm_due_timer(self) -> None:
        """Wake the loop when the earliest scheduled message is due, not a polling tick later."""
        due = self.next_due()
        current = self._due_timer
        if due is None or (current is not None and current[0] <= due):
            return
        if current is not None:
            current[1].cancel()
        entry = self._hub.call_later(max(0.0, due - time.monotonic()), self._on_due)
        self._due_timer = (due, entry)

    def _on_due(self) -> None:
        self._due_timer = None
        self._drain_nowait()

    # -- blocking consumers (no event loop) ----------------------------------------------------

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver ready messages; when there are none, sleep on LISTEN instead of polling."""
        started = time.monotonic()
        safety = self.settings.polling_interval
        self.wakeups.listener.ensure()  # listen before looking, so nothing falls in between
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            if self.settings.use_notify and self.idle.enter(self.consumed_queues()):
                continue  # waiting from now on: look once more for what came before
            wait = safety
            due = self.next_due()
            if due is not None:  # wake for the earliest scheduled message, not after it
                wait = min(wait, max(0.0, due - time.monotonic()))
            if timeout is not None:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError()
                wait = min(wait, left)
            self.wakeups.wait(wait, self.consumed_queues())
