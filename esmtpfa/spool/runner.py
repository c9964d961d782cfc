"""The queue runner: delivers what the spool holds, through the same upstream relay.

Each attempt goes through ``IRelay`` exactly as a live client's message does (the same
pool, failover, breakers and OAuth2 broker), as one transaction for the recipients still
pending: MAIL, a RCPT each, then, for those the upstream took, the content.  What the
upstream answered is recorded per recipient, so a recipient it accepted is never sent
again (docs/spool.md, "States").

The guarantee, in order: before the upstream is asked (and so before the final dot can
leave) the spool records the pending recipients as started, durably.  A crash from then
until their verdict is recorded leaves them in an unknown state, held for an operator:
the relay never sends a message again by its own hand once its dot may have left
(docs/delivery-guarantee.md; docs/spool.md, "The duplicate window").

Retries back off as Postfix's queue manager does by default: the first after
``RetryPolicy.minimum`` (300 s), doubling up to ``maximum`` (4,000 s), for at most
``lifetime`` (5 days).  A permanent refusal, or the end of the lifetime, ends a
recipient: its message is bounced to the envelope sender (RFC 3464, ``esmtpfa.spool.dsn``)
or held, as the identity's policy chose when the message was accepted.  A message with
the null sender is never bounced (RFC 5321 §4.5.5): it is held.

Fairness: at most ``concurrency`` attempts run at once in this process, and an identity
already at ``per_identity`` of them gets more only when no other identity has a due
message, so one identity's backlog cannot take every attempt from the others, and a
backlog of one identity alone still uses them all; the runner's attempts also count as
one client toward the upstream pool's share (``--relay-pool-client-share``), so the
backlog never starves live clients.

Claiming ahead: besides the messages it is delivering, the runner holds up to
``prefetch`` more claimed and waiting, so that when an attempt ends the next one starts
at once, and the claim that makes up for it commits while attempts run (a backlog
drains at the rate of the attempts, not of the claims in between).  They count toward
their identity's share like attempts.  The claim also records their start
(``ISpool.claim``'s ``start``), in its one commit: an attempt taken from what was
claimed ahead goes to the upstream without waiting for the disk, which on a disk whose
fsync takes milliseconds is what bounds a drain.  A stop leaves them due again; a crash
leaves them held, as it leaves every attempt in flight (docs/spool.md, "The duplicate
window").

Hand-over: a message stored by this process while the runner has a free attempt and
the queue has nothing due waiting for it is stored already claimed (``ISpool.store``'s
``claim``) and started at once, as Postfix's queue manager takes a message from its
incoming queue: no poll, no search of the queue, no claim of its own.  The attempt is
reserved before the store (``reserve``), so the hand-over never runs more than
``concurrency`` attempts; and once the queue may hold due messages (a poll found work,
or a message was stored without a reservation), free attempts go to the queue first
until a claim comes back short, so fresh mail never overtakes what waits.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import PLAIN_RECIPIENTS, RecipientLog, logger
from esmtpfa.common.message import Envelope, OutboundMessage
from esmtpfa.common.observers import notify
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import IRelay, Kind, RelayError
from esmtpfa.spool.interfaces import (
    Ending,
    ISpool,
    QueuedMessage,
    Recipient,
    Settlement,
    SpoolEntry,
    SpoolStats,
)
from esmtpfa.spool.interfaces import RecipientState as R

log = logger("esmtpfa.spool.runner")

#: The fair-use key the runner's attempts share toward the upstream pool.
RUNNER_CLIENT = "spool runner"
#: Seconds before a message is tried again after an attempt that learnt nothing.
NEUTRAL_RETRY = 15.0
#: How often the spool's counts are read for the metrics.
STATS_INTERVAL = 5.0


class Reservation:
    """One attempt of the runner set aside for a message being stored: ``use`` starts
    the stored message in it, ``release`` gives it back; whichever comes first, once."""

    def __init__(self, runner: "QueueRunner", identity: str):
        self._runner: QueueRunner | None = runner
        self.identity = identity

    def use(self, message: QueuedMessage | None) -> None:
        """The store fired: start ``message`` (None: the spool did not claim it, so the
        runner looks for it in the queue)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner._reservation_ended(self, message)

    def release(self) -> None:
        """The store failed: the attempt is free again."""
        self.use(None)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and for how long (Postfix's ``minimal_backoff_time``,
    ``maximal_backoff_time`` and ``maximal_queue_lifetime`` defaults)."""

    minimum: float = 300.0
    maximum: float = 4000.0
    lifetime: float = 5 * 86400.0

    def delay(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt (1 for the first)."""
        return min(self.minimum * 2 ** max(attempts - 1, 0), self.maximum)


class RunnerObserver(Protocol):
    """Told what the runner does (the metrics plug in here)."""

    def spool_attempt(self, result: str) -> None:
        """One attempt ended: delivered, deferred, failed, unknown or error."""

    def spool_ended(self, how: str) -> None:
        """A message (or some of its recipients) ended: bounced, held."""

    def spool_stats(self, stats: SpoolStats) -> None:
        """The spool's counts, read every few seconds."""


class _NoObserver:
    def spool_attempt(self, result: str) -> None:
        pass

    def spool_ended(self, how: str) -> None:
        pass

    def spool_stats(self, stats: SpoolStats) -> None:
        pass


#: Results of one attempt, as counted (``spool_delivery_attempts_total{result}``).
DELIVERED, DEFERRED, FAILED, UNKNOWN, ERROR = (
    "delivered", "deferred", "failed", "unknown", "error")


class Attempt:
    """One delivery attempt of one claimed message: what happened to each recipient."""

    def __init__(self, message: QueuedMessage):
        self.message = message
        self.changes: dict[str, Recipient] = {}
        self.remote: str | None = None
        #: The attempt learnt nothing about the message (the pool was busy, the relay
        #: is closing): it is tried again soon, without backing off.
        self.neutral = False
        #: The content was handed to the upstream transaction: from here its dot may
        #: leave, so a failure we cannot explain leaves the outcome unknown.
        self.sending = False

    def mark(self, address: str, state: str, reply: Reply | str) -> None:
        self.changes[address] = Recipient(address, state, str(reply))

    def all(self, addresses: tuple[str, ...] | list[str], state: str,
            reply: Reply | str) -> None:
        for address in addresses:
            self.mark(address, state, reply)

    def states(self) -> dict[str, Recipient]:
        """Every recipient with this attempt's changes applied."""
        current = {r.address: r for r in self.message.recipients}
        current.update(self.changes)
        return current

    @property
    def result(self) -> str:
        states = {r.state for r in self.changes.values()}
        for state, result in ((R.UNKNOWN, UNKNOWN), (R.FAILED, FAILED),
                              (R.DELIVERED, DELIVERED)):
            if state in states:
                return result
        return DEFERRED


class QueueRunner(Service):
    """Claims due messages and delivers them (a child service of the relay).

    ``relay`` is the upstream relay (never a spooling mode), ``hostname`` names us in
    bounces, ``threads`` is the pool for reading stored content, ``clock`` the reactor
    (``callLater``, ``seconds``) and ``now`` wall-clock time for the stored timestamps.
    """

    name = "spool-runner"

    def __init__(self, spool: ISpool, relay: IRelay, *, clock: Any, threads: Any,
                 hostname: str, retry: RetryPolicy = RetryPolicy(),
                 concurrency: int = 10, per_identity: int | None = None,
                 prefetch: int | None = None,
                 poll_interval: float = 1.0, observer: RunnerObserver | None = None,
                 now: Callable[[], float] = time.time,
                 log_recipients: RecipientLog = PLAIN_RECIPIENTS):
        self.spool = spool
        self.relay = relay
        self._clock = clock
        self._threads = threads
        self.hostname = hostname
        self.retry = retry
        self.concurrency = concurrency
        self.per_identity = per_identity or max(1, concurrency // 2)
        #: Messages claimed ahead, waiting for an attempt to end (``_ready``): the next
        #: attempt starts when one ends, not a claim's commit later.  Half the
        #: attempts: enough to cover the ends that come while a claim commits, few
        #: enough that a newly due identity waits behind no more than that.
        self.prefetch = max(1, concurrency // 2) if prefetch is None else prefetch
        self._ready: deque[QueuedMessage] = deque()
        self._poll_interval = poll_interval
        self._observer = observer or _NoObserver()
        self._now = now
        #: ``--log-recipients``: how the attempt line shows the recipients.
        self._log_recipients = log_recipients
        self._in_flight: dict[str, str] = {}  # message id -> identity
        self._claiming = False
        self._again = False
        self._loop: LoopingCall | None = None
        self._stats_loop: LoopingCall | None = None
        self._kicked: Any = None
        self._idle: list[defer.Deferred[None]] = []
        self._watching = False
        self._reserved: dict[str, int] = {}  # identity -> attempts reserved
        #: Settlements submitted and not yet recorded: their attempts are over (the
        #: upstream connection is free), so they hold no attempt of ``concurrency``.
        self._settling: set[defer.Deferred[None]] = set()
        #: Whether the last claim came back short (nothing more was due): only then are
        #: stored messages handed over directly, so that they never overtake the queue.
        self._queue_drained = False

    # -- the service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self._watching:  # a broker's deliveries are claimed as they arrive
            self._watching = True
            self.spool.watch(self.kick)
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        self._loop.start(self._poll_interval, now=True).addErrback(
            lambda f: log.failure("the queue runner stopped", f))
        self._stats_loop = LoopingCall(self._read_stats)
        self._stats_loop.clock = self._clock
        self._stats_loop.start(STATS_INTERVAL, now=True).addErrback(
            lambda f: log.failure("reading the spool's counts failed", f))

    def pause(self) -> None:
        """Start no new attempt (the relay drains); those in flight go on."""
        self.running = False
        for loop in (self._loop, self._stats_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self._kicked is not None and self._kicked.active():
            self._kicked.cancel()

    def stopService(self) -> defer.Deferred[None]:
        """No new attempts; fires once those in flight have ended (the relay's close
        bounds them: it answers every attempt before it closes)."""
        self.pause()
        super().stopService()
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle.append(waiter)
        self._maybe_idle()
        return waiter

    def kick(self) -> None:
        """A message was stored: look for due work now rather than at the next poll."""
        self._queue_drained = False
        self._schedule()

    def _schedule(self) -> None:
        if self.running and (self._kicked is None or not self._kicked.active()):
            self._kicked = self._clock.callLater(0, self.run)

    def _poll(self) -> defer.Deferred[None] | None:
        """Retries come due with time: the queue goes first until a claim is short."""
        self._queue_drained = False
        return self.run()

    # -- the hand-over ----------------------------------------------------------------

    def reserve(self, identity: str) -> Reservation | None:
        """An attempt for a message of ``identity`` about to be stored, or None when it
        should wait in the queue: no attempt free, the identity at its share, or the
        queue may hold due messages that came first."""
        if not (self.running and self._queue_drained) or self._claiming or self._ready:
            return None
        if self._free() <= 0 or self._held()[identity] >= self.per_identity:
            return None
        self._reserved[identity] = self._reserved.get(identity, 0) + 1
        return Reservation(self, identity)

    def _reservation_ended(self, reservation: Reservation,
                           message: QueuedMessage | None) -> None:
        identity = reservation.identity
        left = self._reserved[identity] - 1
        if left:
            self._reserved[identity] = left
        else:
            del self._reserved[identity]
        if message is None:
            self.kick()
        elif self.running:
            self._start(message)
        # Paused meanwhile: the message stays claimed by us until the spool's close
        # releases our claims (it is due again then, nothing having been sent).
        self._maybe_idle()

    def _free(self) -> int:
        return self.concurrency - len(self._in_flight) - sum(self._reserved.values())

    def _held(self) -> Counter[str]:
        """Attempts per identity: running, reserved for a store, and claimed ahead (the
        per-identity share counts all three)."""
        held = Counter(self._in_flight.values())
        held.update(self._reserved)
        held.update(message.entry.identity for message in self._ready)
        return held

    def _start_ready(self) -> None:
        """Start what was claimed ahead, as far as attempts are free."""
        while self._ready and self.running and self._free() > 0:
            self._start(self._ready.popleft())

    # -- claiming ---------------------------------------------------------------------

    def run(self) -> defer.Deferred[None] | None:
        """Start what was claimed ahead, then claim as many due messages as there is
        room for (free attempts, and ``prefetch`` ahead), and start them."""
        if not self.running:
            return None
        self._start_ready()
        if self._claiming:
            self._again = True
            return None
        wanted = self._free() + self.prefetch - len(self._ready)
        if wanted <= 0:
            return None
        self._claiming = True
        d = defer.ensureDeferred(self._claim(wanted))

        def claimed(messages: list[QueuedMessage]) -> None:
            self._queue_drained = len(messages) < wanted
            # Paused meanwhile: they stay claimed, and the spool's close releases them.
            self._ready.extend(messages)
            self._start_ready()

        def done(_: Any) -> None:
            self._claiming = False
            if self._again:  # asked again while this claim ran
                self._again = False
                self._schedule()
            self._maybe_idle()
        return (d.addCallback(claimed)
                .addErrback(lambda f: log.failure("claiming queued messages failed", f))
                .addBoth(done))

    async def _claim(self, free: int) -> list[QueuedMessage]:
        """Up to ``free`` due messages, fairly: first of the identities below their
        share; the slots nobody else wants then go to those at it (the share makes
        room for others, it never leaves attempts unused while one identity waits)."""
        return await self.spool.claim(free, self._busy(), fill=True, start=True)

    def _busy(self) -> frozenset[str]:
        return frozenset(i for i, n in self._held().items() if n >= self.per_identity)

    def _start(self, message: QueuedMessage) -> None:
        entry = message.entry
        self._in_flight[entry.id] = entry.identity
        d = defer.ensureDeferred(self._attempt(message))
        d.addErrback(lambda f: log.failure("{message_id}: a delivery attempt failed",
                                           f, message_id=entry.id))

        def finished(_: Any) -> None:
            del self._in_flight[entry.id]
            self._start_ready()  # what was claimed ahead takes the attempt at once
            if self.running and not self._queue_drained:
                self._schedule()  # the queue may hold more: claim it ahead
            self._maybe_idle()
        d.addBoth(finished)

    def _maybe_idle(self) -> None:
        """Tell ``stopService``'s waiters once no attempt and no claim is in progress."""
        if not self._in_flight and not self._claiming and not self._reserved \
                and not self._settling and self._idle:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    # -- one attempt ------------------------------------------------------------------

    async def _attempt(self, message: QueuedMessage) -> None:
        attempt = Attempt(message)
        try:
            await self._deliver(attempt)
        except Exception as error:  # a bug or a spool failure: said loudly
            log.failure("{message_id}: delivery attempt failed unexpectedly",
                        message_id=message.entry.id)
            why = f"local error: {error}"
            for address in message.pending:
                if address not in attempt.changes:
                    attempt.mark(address, R.PENDING, why)
            for address, recipient in list(attempt.changes.items()):
                if recipient.state == R.STARTED:  # its dot may have left only if sending
                    attempt.mark(address, R.UNKNOWN if attempt.sending else R.PENDING, why)
        await self._settle(attempt)

    async def _deliver(self, attempt: Attempt) -> None:
        message = attempt.message
        entry = message.entry
        pending = message.pending
        if not pending:
            return
        envelope = Envelope(entry.envelope.mail_from, pending, entry.envelope.body,
                            entry.envelope.smtputf8, entry.envelope.requiretls,
                            entry.size)
        # Recorded before the upstream is asked, so that no upstream session waits
        # idle for the disk: the commit's fsync is most of an attempt on a near
        # upstream, and while it ran between RCPT and DATA it held a pooled session.
        # A message claimed from the queue had it recorded by its claim already (then
        # this writes nothing); one handed over at its store records it here.  From
        # then a crash leaves them unknown (held) (docs/spool.md, "The duplicate
        # window").  Those the upstream then refuses, or never reaches, are settled
        # with what it said.
        await self.spool.started(message, pending)
        attempt.all(pending, R.STARTED, "")
        try:
            transaction = await self.relay.begin(
                envelope, entry.id, entry.connection_id or "spool",
                (RUNNER_CLIENT, f"identity {entry.identity}"), paced=True)
        except RelayError as error:
            self._whole(attempt, pending, error)
            return
        accepted: list[str] = []
        for index, address in enumerate(pending):
            try:
                await transaction.addRecipient(address, index == len(pending) - 1)
                accepted.append(address)
            except RelayError as error:
                if error.command == "RCPT" and error.kind in (Kind.REJECTED, Kind.POLICY):
                    # That recipient's own answer (the upstream's, or its RCPTMAX):
                    # the others go on in this transaction.
                    attempt.mark(address, R.FAILED if error.permanent else R.PENDING,
                                 error.upstream_reply or error.reply)
                    continue
                transaction.abort()  # the transaction itself failed: nobody was sent
                self._whole(attempt, pending[index:] + tuple(accepted), error)
                return
        if not accepted:
            transaction.abort()
            return
        try:
            content = await self.spool.content(message)
        except Exception:
            transaction.abort()  # nothing was sent: they go back to pending
            raise
        outbound = OutboundMessage(
            Envelope(entry.envelope.mail_from, tuple(accepted), entry.envelope.body,
                     entry.envelope.smtputf8, entry.envelope.requiretls, entry.size),
            content, id=entry.id, connection_id=entry.connection_id,
            identity=entry.identity)
        attempt.sending = True
        try:
            reply = await transaction.send(outbound)
        except RelayError as error:
            attempt.remote = error.upstream
            if error.outcome_unknown:
                attempt.all(accepted, R.UNKNOWN, error.describe())
            else:
                attempt.all(accepted, R.FAILED if error.permanent else R.PENDING,
                            error.upstream_reply or error.reply)
            return
        finally:
            content.close()
        attempt.remote = getattr(transaction, "upstream", None)
        attempt.all(accepted, R.DELIVERED, reply)

    def _whole(self, attempt: Attempt, addresses: tuple[str, ...], error: RelayError
               ) -> None:
        """The transaction failed before any content: every one of ``addresses`` shares
        the verdict (permanent: failed; else pending)."""
        attempt.remote = error.upstream
        attempt.neutral = error.kind in (Kind.BUSY, Kind.CLOSING)
        attempt.all(addresses, R.FAILED if error.permanent else R.PENDING,
                    error.upstream_reply or error.reply)

    # -- recording the outcome --------------------------------------------------------

    async def _settle(self, attempt: Attempt) -> None:
        message = attempt.message
        now = self._now()
        for address, recipient in list(attempt.changes.items()):
            if recipient.state == R.STARTED:  # no verdict came: never sent again by us
                attempt.mark(address, R.UNKNOWN, recipient.reply or "no verdict recorded")
        states = attempt.states()
        pending = [r for r in states.values() if r.state == R.PENDING]
        expired = bool(pending) and now - message.lifetime_start >= self.retry.lifetime
        if expired:
            for r in pending:
                attempt.mark(r.address, R.FAILED, f"delivery time expired (last reply: "
                                                  f"{r.reply or 'none'})")
            states, pending = attempt.states(), []
        newly_failed = [r for r in attempt.changes.values() if r.state == R.FAILED]
        unknown = [r for r in states.values() if r.state == R.UNKNOWN]
        hold = None
        if unknown:
            hold = (f"outcome unknown for {len(unknown)} recipient(s): the connection "
                    f"failed after the message was sent ({unknown[0].reply})")
        if newly_failed:
            hold = await self._end_failed(attempt, newly_failed, expired) or hold
        retry_at = None
        if hold is None and pending:
            retry_at = now + (min(self.retry.minimum, NEUTRAL_RETRY) if attempt.neutral
                              else self.retry.delay(message.attempts + 1))
        settlement = Settlement(tuple(attempt.changes.values()), retry_at=retry_at,
                                hold=hold)
        # The attempt ends here, before its settlement is recorded: the upstream is done
        # with it, and the claim that fills its place then goes into the same commit
        # as the settlement (the committer keeps their order, so that claim never sees
        # the message as it was).  Until recorded the message stays claimed by us: a
        # crash meanwhile leaves it as a crash during the attempt would.
        d = self.spool.settle(message, settlement)
        self._settling.add(d)

        def recorded(_: Any) -> None:
            self._log(attempt, settlement, now)

        def done(_: Any) -> None:
            self._settling.discard(d)
            self._maybe_idle()
        d.addCallbacks(recorded, lambda f: log.failure(
            "{message_id}: recording a delivery attempt failed", f,
            message_id=message.entry.id))
        d.addBoth(done)

    async def _end_failed(self, attempt: Attempt, failed: list[Recipient],
                          expired: bool) -> str | None:
        """Bounce the failed recipients, or the reason to hold the message."""
        entry = attempt.message.entry
        if entry.ending == Ending.HOLD or entry.is_bounce:
            why = "expired" if expired else f"refused: {failed[0].reply}"
            self._ended("held")
            return (f"{len(failed)} recipient(s) undeliverable ({why}); "
                    + ("a bounce is never bounced" if entry.is_bounce else
                       "the policy holds undeliverable mail"))
        try:
            await self._bounce(attempt, failed, expired)
        except Exception:
            log.failure("{message_id}: the bounce could not be queued; holding the "
                        "message", message_id=entry.id)
            self._ended("held")
            return "undeliverable, and its bounce could not be queued"
        self._ended("bounced")
        return None

    async def _bounce(self, attempt: Attempt, failed: list[Recipient], expired: bool
                      ) -> None:
        from esmtpfa.spool.dsn import build_bounce, original_headers
        message = attempt.message
        entry = message.entry
        content = await self.spool.content(message)
        try:
            headers = await deferToThreadPool(
                self._clock, self._threads, original_headers, content.read_from(0))
        finally:
            content.close()
        now = self._now()
        body = build_bounce(entry, failed, headers, reporting_mta=self.hostname, now=now,
                            expired=expired, remote_mta=attempt.remote)
        sender = entry.envelope.mail_from
        bounce = SpoolEntry(
            # 7-bit, but for a non-ASCII sender's own address (dsn: RFC 6532).
            id=new_id(), envelope=Envelope("", (sender,), smtputf8=not sender.isascii()),
            identity=entry.identity, ending=Ending.HOLD, received=now, size=len(body),
            connection_id=entry.connection_id)
        await self.spool.store(bounce, iter((body,)))
        log.info("{message_id}: bounce {bounce_id} queued to <{sender}> for {count} "
                 "recipient(s)", message_id=entry.id, bounce_id=bounce.id, sender=sender,
                 count=len(failed))

    def _ended(self, how: str) -> None:
        notify(self._observer.spool_ended, how)

    def _log(self, attempt: Attempt, settlement: Settlement, now: float) -> None:
        """One line per attempt, which says what follows it: the next attempt, or the
        final outcome (docs/spool.md, "Logs").  An attempt that ends the message is
        its final line too, so a message delivered at once costs one line here, not
        two; a hold adds a warning of its own, for the operator who must act on it."""
        entry = attempt.message.entry
        result = attempt.result
        notify(self._observer.spool_attempt, result)
        replies = sorted({r.reply for r in attempt.changes.values() if r.reply})
        number = attempt.message.attempts + 1
        if settlement.hold is not None:
            then = "held"
        elif settlement.retry_at is not None:
            then = f"deferred: next attempt in {settlement.retry_at - now:.0f} s"
        else:
            states = attempt.states().values()
            then = (f"finished: {sum(r.state == R.DELIVERED for r in states)} delivered, "
                    f"{sum(r.state == R.FAILED for r in states)} failed, after "
                    f"{number} attempt(s)")
        log.info("{message_id} delivery attempt {attempt} for {identity}: {result}"
                 " {recipients} {upstream_reply}; {then}",
                 message_id=entry.id, identity=entry.identity, attempt=number,
                 result=result, upstream=attempt.remote,
                 upstream_reply="; ".join(replies) or None,
                 recipients=self._log_recipients.states(
                     {r.address: r.state for r in attempt.changes.values()}),
                 then=then)
        if settlement.hold is not None:
            log.warn("{message_id} held: {reason}", message_id=entry.id,
                     reason=settlement.hold, identity=entry.identity)

    def _read_stats(self) -> defer.Deferred[None]:
        d = self.spool.stats()
        d.addCallback(lambda stats: notify(self._observer.spool_stats, stats))
        d.addErrback(lambda f: log.debug("reading the spool's counts failed: {error}",
                                         error=f.getErrorMessage()))
        return d


__all__ = ["QueueRunner", "RetryPolicy", "RUNNER_CLIENT"]
