"""Relay a whole message the way the SMTP server and the HTTP API do: one transaction.

``IRelay`` has one way in (``begin`` → ``addRecipient`` per recipient → ``send``); tests
that only care about the upstream's final verdict use this instead of spelling it out.
Like a pipelining client, it announces DATA with the last recipient.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from esmtpfa.common.message import Envelope, OutboundMessage
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import IRelay, RelayError, WholeMessageTransaction


async def send_whole(relay: Any, message: OutboundMessage, client: tuple[str, ...] = ()
                     ) -> Reply:
    """The final reply, all recipients or nothing.

    A refused MAIL or content raises its ``RelayError``; refused recipients abort the
    transaction and raise the most telling refusal (a transient one first: the client
    retries and learns the permanent ones then).
    """
    envelope = message.envelope
    transaction = await relay.begin(envelope, message.id, message.connection_id, client)
    refused: list[RelayError] = []
    try:
        last = len(envelope.recipients) - 1
        for index, recipient in enumerate(envelope.recipients):
            try:
                await transaction.addRecipient(recipient, data_follows=index == last)
            except RelayError as error:
                if error.command == "MAIL" or error.reply.enhanced.startswith("4.4."):
                    raise  # the transaction's own verdict, not this recipient's
                refused.append(error)
    except BaseException:
        transaction.abort()
        raise
    if refused:
        transaction.abort()
        raise next((e for e in refused if e.transient), refused[0])
    return await transaction.send(message)


@implementer(IRelay)
class CapturingRelay:
    """The relay behind a wrapper under test (the ``-relay-from`` rewriter): it accepts
    every message at once and keeps it, so a test reads what the wrapper handed on."""

    description = "capture"

    def __init__(self) -> None:
        self.messages: list[OutboundMessage] = []

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred[WholeMessageTransaction]:
        return succeed(WholeMessageTransaction(self))

    def deliver(self, message: OutboundMessage) -> Deferred[Reply]:
        self.messages.append(message)
        return succeed(Reply(250, "2.0.0", "captured"))

    def close(self) -> Deferred[None]:
        return succeed(None)
