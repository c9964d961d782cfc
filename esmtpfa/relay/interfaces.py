"""The seam between accepting a message and delivering it upstream.

One way in, one guarantee (docs/design.md, "The relay and the delivery guarantee": our
client's 250 waits for the destination): ``IRelay.begin`` opens a transaction at the
client's MAIL and asks the destination about each recipient as the client names it
(``IRelayTransaction.addRecipient``), so every RCPT is answered with the destination's
own verdict; ``send`` hands over the content once the client's final dot arrived.  The
SMTP server and the HTTP API both use it (docs/delivery-guarantee.md, "One path").

Failures are one type, ``RelayError``: what the client is told, whether it is
permanent, which command broke, the destination's own reply line, and the kind and phase
of the failure that failover and retry decide from.  It is built where the failure is
seen (``relay/errors.py`` has the constructors), never translated afterwards, so its
kind and phase are stated once (docs/delivery-guarantee.md, "Failures are values: kind
and phase").
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from esmtpfa.common.replies import Reply

# RelayError.reason values, used as metric labels (docs/design.md, "Metrics": relay
# failures by reason).
REJECTED = "rejected"        # the upstream answered 4xx/5xx to MAIL, RCPT or DATA
UNAVAILABLE = "unavailable"  # connect, TLS, timeout, upstream AUTH, protocol failure


class Kind:
    """What happened, as failover and retry need to know it (never parsed from texts)."""

    #: The upstream answered with its own 4xx/5xx verdict: it is alive and in sync.
    REJECTED = "rejected"
    #: We refuse before sending: the upstream lacks what the message needs (SIZE,
    #: 8BITMIME, SMTPUTF8, REQUIRETLS) or an address cannot be written on the wire.
    POLICY = "policy"
    #: The connection could not be had or broke: connect, TLS, AUTH, timeout, loss, 421.
    UNAVAILABLE = "unavailable"
    #: The upstream sent something that is not SMTP, or not at this point.
    PROTOCOL = "protocol"
    #: No session could be had in time: the pool is busy, this client holds its share,
    #: or every upstream is skipped while its circuit breaker is open (none was tried).
    BUSY = "busy"
    #: The relay is shutting down.
    CLOSING = "closing"
    #: The message's own deadline passed (its reply must reach the client in time).
    EXPIRED = "expired"
    #: Our own credentials could not be had: the OAuth2 token endpoint is down or
    #: refuses us (docs/oauth2.md).  Says nothing about the upstream, which never saw us.
    CREDENTIALS = "credentials"

    #: The session is in an unknown state after these: it must not be reused.
    BROKEN = frozenset({UNAVAILABLE, PROTOCOL, EXPIRED})
    #: Nothing was learnt about the upstream's health.
    NEUTRAL = frozenset({BUSY, CLOSING, POLICY, CREDENTIALS})


class Phase:
    """Where the message was when it failed."""

    #: Nothing was accepted: another connection or upstream may take the message.
    BEFORE_DOT = "before-dot"
    #: The final dot had left: the upstream may have accepted the message.  It is never
    #: sent again by the relay; the client hears a 451 that says a duplicate is possible.
    OUTCOME_UNKNOWN = "outcome-unknown"


_REASONS = {Kind.REJECTED: REJECTED, Kind.POLICY: REJECTED}


class RelayError(Exception):
    """Why a message (or one recipient) was not accepted upstream.

    ``reply`` is what the SMTP client is told: the upstream's own code and enhanced code
    when it rejected the message, a ``451 4.x.x`` when it could not be reached.
    ``command`` is where it happened (``connect``, ``greeting``, ``STARTTLS``, ``AUTH``,
    ``MAIL``, ``RCPT``, ``DATA``, ``end of data``), ``upstream_reply`` the upstream's own
    reply when there was one, ``upstream`` the ``host:port`` it came from.  ``kind`` and
    ``phase`` (``Kind``, ``Phase``) are what failover and retry decide from; ``reason``
    is the coarse metric label derived from ``kind``.
    """

    def __init__(self, reply: Reply, reason_or_kind: str, command: str | None = None,
                 upstream_reply: Reply | None = None, detail: str = "",
                 upstream: str | None = None, *, kind: str | None = None,
                 phase: str = Phase.BEFORE_DOT):
        super().__init__(f"{reason_or_kind} at {command or 'connection'}: {detail or reply}")
        if kind is None:  # the coarse reason alone: the upstream's verdict or a failure
            kind = Kind.REJECTED if reason_or_kind == REJECTED else (
                reason_or_kind if reason_or_kind in _KINDS else Kind.UNAVAILABLE)
        self.reply = reply
        self.kind = kind
        self.phase = phase
        self.command = command
        self.upstream_reply = upstream_reply
        self.detail = detail
        self.upstream = upstream

    @property
    def reason(self) -> str:
        return _REASONS.get(self.kind, UNAVAILABLE)

    @property
    def transient(self) -> bool:
        return self.reply.is_transient

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent

    @property
    def outcome_unknown(self) -> bool:
        return self.phase == Phase.OUTCOME_UNKNOWN

    @property
    def upstream_verdict(self) -> bool:
        """The upstream's own final word (a 5xx it sent): no other upstream is asked."""
        return self.kind == Kind.REJECTED and self.permanent and self.upstream_reply is not None

    def describe(self) -> str:
        """One log-friendly line: permanence, kind, upstream, command, the upstream's line."""
        permanence = "permanent" if self.permanent else "transient"
        where = f" {self.upstream}" if self.upstream else ""
        line = f" upstream said: {self.upstream_reply}" if self.upstream_reply else ""
        phase = " (after the final dot: outcome unknown)" if self.outcome_unknown else ""
        return f"{permanence} {self.kind}{where} at {self.command or 'connection'}: " \
               f"{self.detail or self.reply}{line}{phase}"


#: Every ``Kind``, read from the class so that a kind added there is never mistaken for
#: a coarse reason (``RelayError(reply, "credentials")`` is a credentials failure).
_KINDS = frozenset(value for name, value in vars(Kind).items()
                   if name.isupper() and isinstance(value, str))


class IRelayTransaction(Interface):
    """One mail transaction opened at the client's MAIL (see ``IRelay.begin``)."""

    max_size = Attribute(
        "int | None: the largest message (octets, our trace header included) the "
        "destination takes; the caller refuses larger content before sending any of it")

    def addRecipient(address, data_follows=False) -> Deferred:
        """Ask the destination about one recipient: fires with its positive ``Reply``, or
        fails with ``RelayError`` whose ``reply`` answers the client's RCPT.

        ``data_follows`` is a hint: the client pipelined DATA right behind this RCPT
        (RFC 2920), so the destination may start its data phase in the same round trip.
        """

    def send(message) -> Deferred:
        """The content (``OutboundMessage`` whose recipients are the accepted ones): fires
        with the destination's final positive ``Reply`` or fails with ``RelayError``."""

    def abort() -> None:
        """The client gave up (RSET, refused content, disconnect): release everything."""


class IRelay(Interface):
    description = Attribute("str: where messages go, for the startup log")

    def begin(envelope, message_id, connection_id, client=(), paced=False) -> Deferred:
        """Open a transaction for ``envelope`` (its recipients are ignored): fires with an
        ``IRelayTransaction`` or fails with ``RelayError`` (the reply to MAIL).

        ``client`` holds keys naming who sends (its address, its identity) so that no one
        of them can take every upstream connection; ``paced`` says the relay itself
        paces the content (the queue runner's, from local storage), which may then use
        connections nobody else wants beyond its share."""

    def close() -> Deferred:
        """Stop accepting work and close idle upstream connections."""


@implementer(IRelayTransaction)
class WholeMessageTransaction:
    """``IRelayTransaction`` for a relay that only takes whole messages (the Maildir).

    Every recipient is accepted at once; ``send`` calls the relay's own ``deliver``.
    """

    max_size = None

    def __init__(self, relay: Any):
        self._relay = relay
        self._done = False

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        if self._done:
            return fail(RuntimeError("transaction already finished"))
        return succeed(Reply(250, "2.1.5", "OK"))

    def send(self, message: Any) -> Deferred[Reply]:
        self._done = True
        return maybeDeferred(self._relay.deliver, message)

    def abort(self) -> None:
        self._done = True
