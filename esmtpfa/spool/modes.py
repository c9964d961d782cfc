"""The delivery modes as relays: what a client's 250 means (docs/spool.md, "Modes").

Each mode is an ``IRelay`` over the same upstream relay, so the SMTP server and the HTTP
API need nothing new: ``RelayDelivery`` gets the relay of the identity's mode.

* ``passthrough`` is the upstream relay itself: the client's 250 is the upstream's.
* ``SpoolRelay`` (``spool``) accepts every recipient and answers the final dot once the
  spool holds the message on stable storage; the queue runner delivers it.
* ``FallbackRelay`` (``fallback``) talks to the upstream as passthrough does and spools
  the message only when the failure is known to come before the final dot left: the
  upstream could not be reached or logged in to, had no session free, its breaker was
  open, a deadline passed before the dot, no OAuth2 token could be had, or it answered
  the message itself (MAIL, DATA, the end of data) with a temporary refusal.  A failure
  after the dot left (the upstream may have the message) stays ``451`` "a duplicate is
  possible", a permanent refusal stays what it was, and a temporary refusal of one
  recipient is that recipient's answer: spooling any of them would send a message
  twice, or deliver what the upstream refused.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope, OutboundMessage
from esmtpfa.common.observers import notify
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import IRelay, IRelayTransaction, Kind, RelayError
from esmtpfa.spool.interfaces import (
    Ending,
    ISpool,
    Mode,
    QueuedMessage,
    QueuedReply,
    SpoolEntry,
    SpoolError,
    SpoolErrorKind,
)

log = logger("esmtpfa.spool")

RECIPIENT_QUEUED = Reply(250, "2.1.5", "OK")


class SpoolObserver(Protocol):
    """Told what the spool accepts (the metrics plug in here)."""

    def spool_accepted(self, mode: str) -> None:
        """A message was stored: ``mode`` is ``spool`` or ``fallback``."""


class Reserved(Protocol):
    """An attempt of the runner set aside for the message being stored."""

    def use(self, message: QueuedMessage | None) -> None: ...

    def release(self) -> None: ...


class Kicker(Protocol):
    """The queue runner: told that a message is waiting, or asked for an attempt to
    hand a message straight over to (the runner's "Hand-over")."""

    def kick(self) -> None: ...

    def reserve(self, identity: str) -> Reserved | None: ...


def fallback_applies(error: RelayError, *, at_recipient: bool) -> bool:
    """Whether ``fallback`` may spool after ``error``: the upstream is known not to have
    the message and did not refuse it (docs/spool.md, "Modes").

    ``at_recipient``: the error answered a RCPT; an upstream's own temporary refusal of
    that recipient (its words, at RCPT) is the recipient's answer, not an outage."""
    if error.outcome_unknown or error.permanent or error.kind == Kind.CLOSING:
        return False
    if at_recipient and error.command == "RCPT" and error.kind in (Kind.REJECTED,
                                                                    Kind.POLICY):
        return False  # the upstream's verdict on it, or its RCPTMAX: the client's answer
    return True


def _store_error(error: SpoolError) -> RelayError:
    kind = Kind.BUSY if error.kind == SpoolErrorKind.FULL else Kind.UNAVAILABLE
    return RelayError(error.reply, kind, "spool", None, error.detail, kind=kind)


class Spooler:
    """Stores accepted messages in the spool for one ending (bounce or hold); shared by
    the two spooling modes so a message is stored the same way whichever took it."""

    def __init__(self, spool: ISpool, runner: Kicker, ending: str,
                 observer: SpoolObserver, clock: Callable[[], float] = time.time):
        self.spool = spool
        self._runner = runner
        self._ending = ending
        self._observer = observer
        self._clock = clock

    def refusal(self) -> RelayError | None:
        """The reply to MAIL when the spool cannot take a message now (full, down)."""
        refused = self.spool.accepting()
        if refused is None:
            return None
        log.warn("spool refuses a message: {why}", why=refused.detail)
        return _store_error(refused)

    def store(self, message: OutboundMessage, mode: str, why: str = "") -> Deferred[Reply]:
        """Fires with the client's ``QueuedReply`` once the message is durable."""
        entry = SpoolEntry(
            id=message.id, envelope=message.envelope, identity=message.identity,
            ending=self._ending, received=self._clock(), size=message.size,
            connection_id=message.connection_id)
        text = f"Queued as {message.id}"
        if mode == Mode.FALLBACK:
            text += " (upstream unavailable, delivery will be retried)"

        reservation = self._runner.reserve(entry.identity)

        def stored(claimed: QueuedMessage | None) -> Reply:
            log.info("{connection_id} message {message_id} for {identity} queued "
                     "({mode}{why}), {count} recipient(s), {size} bytes",
                     connection_id=message.connection_id, message_id=message.id,
                     identity=message.identity, mode=mode,
                     why=f": {why}" if why else "", count=len(entry.envelope.recipients),
                     size=entry.size, recipients=list(entry.envelope.recipients))
            if reservation is not None:  # first: nothing below may keep it
                reservation.use(claimed)
            else:
                self._runner.kick()
            notify(self._observer.spool_accepted, mode)
            return QueuedReply(250, "2.0.0", text)

        def failed(failure: Failure) -> Failure:
            if reservation is not None:
                reservation.release()
            error = failure.value
            if isinstance(error, SpoolError):
                log.error("{connection_id} message {message_id} could not be queued: "
                          "{error}", connection_id=message.connection_id,
                          message_id=message.id, error=str(error))
                return Failure(_store_error(error))
            return failure
        try:
            d = self.spool.store(entry, message.chunks(), claim=reservation is not None)
        except Exception:
            d = fail()
        return d.addCallbacks(stored, failed)


@implementer(IRelayTransaction)
class SpoolTransaction:
    """Every recipient is taken; the message is stored at the final dot."""

    max_size = None  # the server's own --max-message-size bounds what is stored

    def __init__(self, spooler: Spooler, mode: str, why: str = ""):
        self._spooler = spooler
        self._mode = mode
        self._why = why
        self._done = False

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        if self._done:
            return fail(RuntimeError("transaction already finished"))
        return succeed(RECIPIENT_QUEUED)

    def send(self, message: OutboundMessage) -> Deferred[Reply]:
        self._done = True
        return self._spooler.store(message, self._mode, self._why)

    def abort(self) -> None:
        self._done = True


@implementer(IRelay)
class SpoolRelay:
    """``spool``: queue first, as Postfix does; the 250 means durably stored."""

    def __init__(self, spooler: Spooler):
        self._spooler = spooler

    @property
    def description(self) -> str:
        return f"spool {self._spooler.spool.description}, delivered in the background"

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred[IRelayTransaction]:
        refused = self._spooler.refusal()
        if refused is not None:
            return fail(refused)
        return succeed(SpoolTransaction(self._spooler, Mode.SPOOL))

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IRelayTransaction)
class FallbackTransaction:
    """The upstream's transaction until it fails before the dot; then the spool's.

    States: ``live`` (each call goes upstream), ``spooling`` (the upstream failed
    before the dot: every recipient so far and after is queued), ``done``."""

    LIVE, SPOOLING, DONE = "live", "spooling", "done"

    def __init__(self, spooler: Spooler, upstream: IRelayTransaction | None,
                 why: str = ""):
        self._spooler = spooler
        self._upstream = upstream
        self.state = self.LIVE if upstream is not None else self.SPOOLING
        self._why = why

    @property
    def max_size(self) -> int | None:
        return self._upstream.max_size if self.state == self.LIVE and self._upstream \
            else None

    @property
    def upstream(self) -> str | None:
        return getattr(self._upstream, "upstream", None) if self.state == self.LIVE \
            else "spool"

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        if self.state == self.DONE:
            return fail(RuntimeError("transaction already finished"))
        if self.state == self.SPOOLING:
            return succeed(RECIPIENT_QUEUED)
        assert self._upstream is not None

        def failed(failure: Failure) -> Reply | Failure:
            error = failure.value
            if isinstance(error, RelayError) and fallback_applies(error, at_recipient=True):
                refused = self._spooler.refusal()
                if refused is None:
                    self._to_spool(error)
                    return RECIPIENT_QUEUED
            return failure
        # Twisted's overloads take an errback returning a value or a Failure, not either.
        return self._upstream.addRecipient(address, data_follows).addErrback(failed)  # type: ignore[call-overload]

    def _to_spool(self, error: RelayError) -> None:
        """The upstream failed before the dot: let it go, queue the message instead."""
        self.state = self.SPOOLING
        self._why = error.describe()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()

    def send(self, message: OutboundMessage) -> Deferred[Reply]:
        if self.state == self.SPOOLING:
            self.state = self.DONE
            return self._spooler.store(message, Mode.FALLBACK, self._why)
        self.state = self.DONE
        assert self._upstream is not None

        def failed(failure: Failure) -> Deferred[Reply] | Failure:
            error = failure.value
            if isinstance(error, RelayError) and fallback_applies(error, at_recipient=False):
                if self._spooler.refusal() is None:
                    self._upstream = None
                    return self._spooler.store(message, Mode.FALLBACK, error.describe())
            return failure
        # Twisted's overloads take an errback returning a value or a Failure, not either.
        return self._upstream.send(message).addErrback(failed)  # type: ignore[call-overload]

    def abort(self) -> None:
        self.state = self.DONE
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()


@implementer(IRelay)
class FallbackRelay:
    """``fallback``: passthrough while the upstream works, the spool when it does not."""

    def __init__(self, inner: IRelay, spooler: Spooler):
        self.inner = inner
        self._spooler = spooler

    @property
    def description(self) -> str:
        return (f"{self.inner.description}; when it cannot take a message, the spool "
                f"{self._spooler.spool.description}")

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred[IRelayTransaction]:
        def opened(upstream: IRelayTransaction) -> IRelayTransaction:
            return FallbackTransaction(self._spooler, upstream)

        def failed(failure: Failure) -> IRelayTransaction | Failure:
            error = failure.value
            if isinstance(error, RelayError) and fallback_applies(error, at_recipient=False):
                if self._spooler.refusal() is None:
                    return FallbackTransaction(self._spooler, None, error.describe())
            return failure
        return self.inner.begin(envelope, message_id, connection_id, client, paced
                                ).addCallbacks(opened, failed)

    def close(self) -> Deferred[None]:
        return succeed(None)  # the inner relay is closed by its owner


class DeliveryModes:
    """The relay for each identity: its policy's mode and ending, else the relay's
    defaults (``--delivery-mode``, ``--spool-undeliverable``).

    Without a spool (passthrough everywhere) every identity gets the upstream relay; a
    policy that asks for a spooling mode then is passthrough, said once in the log."""

    def __init__(self, relay: IRelay, spool: ISpool | None = None,
                 runner: Kicker | None = None, *, mode: str = Mode.PASSTHROUGH,
                 ending: str = Ending.BOUNCE, observer: SpoolObserver | None = None,
                 clock: Callable[[], float] = time.time):
        if mode != Mode.PASSTHROUGH and spool is None:
            raise ValueError(f"delivery mode {mode!r} needs a spool")
        self.relay = relay
        self.spool = spool
        self._runner = runner
        self.mode = mode
        self.ending = ending
        self._observer = observer or _NoObserver()
        self._clock = clock
        self._relays: dict[tuple[str, str], IRelay] = {}
        self._warned: set[str] = set()

    def choice(self, identity: Any) -> tuple[str, str]:
        """``(mode, ending)`` for ``identity``: its attribute or claim, its provider's
        policy, the relay's default, in that order."""
        policy = getattr(identity, "policy", None)
        mode, ending = self.mode, self.ending
        if policy is not None:
            mode = policy.delivery_for(identity.values(policy.delivery_source), mode)
            ending = policy.undeliverable or ending
        return mode, ending

    def relay_for(self, identity: Any) -> IRelay:
        mode, ending = self.choice(identity)
        if mode == Mode.PASSTHROUGH:
            return self.relay
        if self.spool is None or self._runner is None:
            if mode not in self._warned:
                self._warned.add(mode)
                log.warn("a provider's policy asks for delivery mode {mode!r}, but no "
                         "spool is configured (--spool-url, --delivery-mode): passthrough",
                         mode=mode)
            return self.relay
        key = (mode, ending)
        relay = self._relays.get(key)
        if relay is None:
            spooler = Spooler(self.spool, self._runner, ending, self._observer, self._clock)
            relay = self._relays[key] = (SpoolRelay(spooler) if mode == Mode.SPOOL
                                         else FallbackRelay(self.relay, spooler))
        return relay


class _NoObserver:
    def spool_accepted(self, mode: str) -> None:
        pass


__all__ = ["DeliveryModes", "FallbackRelay", "SpoolRelay", "Spooler", "fallback_applies"]
