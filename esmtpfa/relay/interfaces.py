"""The seam between accepting a message and delivering it upstream.

``IRelay.deliver`` fires with the upstream's positive final reply only once the upstream
has accepted the message (SPEC §5: our client's 250 waits for it), or fails with a
``RelayError`` that says what the client must be told and whether to retry.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esmtpfa.replies import Reply

# RelayError.reason values, used as metric labels (SPEC §8: relay failures by reason).
REJECTED = "rejected"        # the upstream answered 4xx/5xx to MAIL, RCPT or DATA
UNAVAILABLE = "unavailable"  # connect, TLS, timeout, upstream AUTH, protocol failure


class RelayError(Exception):
    """Why a message was not accepted upstream.

    ``reply`` is what the SMTP client is told: the upstream's own code and enhanced code
    when it rejected the message, a ``451 4.x.x`` when it could not be reached.
    """

    def __init__(self, reply: Reply, reason: str, command: str | None = None,
                 upstream_reply: Reply | None = None, detail: str = ""):
        super().__init__(f"{reason} at {command or 'connection'}: {detail or reply}")
        self.reply = reply
        self.reason = reason
        self.command = command
        self.upstream_reply = upstream_reply
        self.detail = detail

    @property
    def transient(self) -> bool:
        return self.reply.is_transient


class IRelay(Interface):
    description = Attribute("str: where messages go, for the startup log")

    def deliver(message) -> Deferred:
        """Deliver an ``OutboundMessage``; fires with the upstream's final ``Reply``."""

    def close() -> Deferred:
        """Stop accepting work and close idle upstream connections."""
