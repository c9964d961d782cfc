"""The seam between accepting a message and delivering it upstream.

Two ways in, one guarantee (SPEC §5: our client's 250 waits for the destination):

* ``IRelay.begin`` opens a transaction at the client's MAIL and asks the destination about
  each recipient as the client names it (``IRelayTransaction.addRecipient``), so every RCPT
  is answered with the destination's own verdict; ``send`` hands over the content once the
  client's final dot arrived.  The SMTP server uses this.
* ``IRelay.deliver`` takes a whole message with all its recipients, all or nothing (the
  HTTP API, which has no per-recipient answer to give).

Failures are ``RelayError``: what the client is told, whether it is permanent, which
command broke, and the destination's own reply line.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from esmtpfa.replies import Reply

# RelayError.reason values, used as metric labels (SPEC §8: relay failures by reason).
REJECTED = "rejected"        # the upstream answered 4xx/5xx to MAIL, RCPT or DATA
UNAVAILABLE = "unavailable"  # connect, TLS, timeout, upstream AUTH, protocol failure


class RelayError(Exception):
    """Why a message (or one recipient) was not accepted upstream.

    ``reply`` is what the SMTP client is told: the upstream's own code and enhanced code
    when it rejected the message, a ``451 4.x.x`` when it could not be reached.
    ``command`` is where it happened (``connect``, ``greeting``, ``STARTTLS``, ``AUTH``,
    ``MAIL``, ``RCPT``, ``DATA``, ``end of data``), ``upstream_reply`` the upstream's own
    reply when there was one, ``upstream`` the ``host:port`` it came from.
    """

    def __init__(self, reply: Reply, reason: str, command: str | None = None,
                 upstream_reply: Reply | None = None, detail: str = "",
                 upstream: str | None = None):
        super().__init__(f"{reason} at {command or 'connection'}: {detail or reply}")
        self.reply = reply
        self.reason = reason
        self.command = command
        self.upstream_reply = upstream_reply
        self.detail = detail
        self.upstream = upstream

    @property
    def transient(self) -> bool:
        return self.reply.is_transient

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent

    def describe(self) -> str:
        """One log-friendly line: permanence, upstream, command, the upstream's line."""
        kind = "permanent" if self.permanent else "transient"
        where = f" {self.upstream}" if self.upstream else ""
        line = f" upstream said: {self.upstream_reply}" if self.upstream_reply else ""
        return f"{kind} {self.reason}{where} at {self.command or 'connection'}: " \
               f"{self.detail or self.reply}{line}"


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

    def begin(envelope, message_id, connection_id) -> Deferred:
        """Open a transaction for ``envelope`` (its recipients are ignored): fires with an
        ``IRelayTransaction`` or fails with ``RelayError`` (the reply to MAIL)."""

    def deliver(message) -> Deferred:
        """Deliver an ``OutboundMessage``; fires with the upstream's final ``Reply``."""

    def close() -> Deferred:
        """Stop accepting work and close idle upstream connections."""


@implementer(IRelayTransaction)
class WholeMessageTransaction:
    """``IRelayTransaction`` for a relay that only takes whole messages (the Maildir).

    Every recipient is accepted at once; ``send`` calls ``relay.deliver``.
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
