"""The avatar of a logged-in client: turns an SMTP transaction into a relayed message.

The transaction spools the content (bounded memory), adds the Received header and hands
the message to the relay; the client's final reply is the relay's verdict, so a ``250``
always means the upstream accepted the message (SPEC §5).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.logs import logger
from esmtpfa.auth.selection import Identity
from esmtpfa.context import ConnectionContext
from esmtpfa.ids import new_id
from esmtpfa.message import Envelope, MessageSpool, OutboundMessage, SPOOL_MEMORY_LIMIT
from esmtpfa.relay.interfaces import IRelay, RelayError
from esmtpfa.replies import Reply, SMTPReplyError
from esmtpfa.smtp.interfaces import IMessageDelivery, ITransaction
from esmtpfa.trace import received_header

log = logger("esmtpfa.delivery")

RELAY_ERROR = Reply(451, "4.3.0", "Local error while relaying, try again later")


@dataclass(frozen=True)
class DeliveryPolicy:
    hostname: str
    hide_client: bool = False
    spool_memory_limit: int = SPOOL_MEMORY_LIMIT


def envelope_from_params(mail_from: str, recipients, params: dict) -> Envelope:
    size = params.get("SIZE")
    body = params.get("BODY")
    return Envelope(
        mail_from=mail_from, recipients=tuple(recipients),
        body=body.upper() if body else None,
        smtputf8="SMTPUTF8" in params, requiretls="REQUIRETLS" in params,
        declared_size=int(size) if size and size.isdigit() else None)


def relay_message(relay: IRelay, message: OutboundMessage) -> defer.Deferred:
    """Deliver through ``relay``; fires with the reply for the client, or fails with
    ``SMTPReplyError``.  Logs the outcome and always releases the spool."""

    def accepted(upstream: Reply) -> Reply:
        log.info("{connection_id} message {message_id} from <{sender}> to {count} "
                 "recipient(s), {size} bytes, relayed for {identity}: {upstream}",
                 connection_id=message.connection_id, message_id=message.id,
                 sender=message.envelope.mail_from, count=len(message.envelope.recipients),
                 size=message.size, identity=message.identity, upstream=str(upstream))
        return Reply(250, "2.0.0", f"Message accepted as {message.id}")

    def failed(failure: Failure):
        if failure.check(RelayError):
            error = failure.value
            log.info("{connection_id} message {message_id} not relayed ({reason}): {detail}",
                     connection_id=message.connection_id, message_id=message.id,
                     reason=error.reason, detail=str(error))
            raise SMTPReplyError(error.reply)
        log.failure("{connection_id} message {message_id}: relay failed", failure,
                    connection_id=message.connection_id, message_id=message.id)
        raise SMTPReplyError(RELAY_ERROR)

    def release(result):
        message.close()
        return result

    d = defer.maybeDeferred(relay.deliver, message)
    return d.addCallbacks(accepted, failed).addBoth(release)


@implementer(ITransaction)
class RelayTransaction:
    def __init__(self, delivery: "RelayDelivery", context: ConnectionContext,
                 mail_from: str, params: dict):
        self.id = new_id()
        self._delivery = delivery
        self._context = context
        self._mail_from = mail_from
        self._params = params
        self._recipients: list[str] = []
        self._spool = MessageSpool(delivery.policy.spool_memory_limit)

    def addRecipient(self, recipient: str, params: dict) -> None:
        self._recipients.append(recipient)

    def write(self, data: bytes) -> None:
        self._spool.write(data)

    def finish(self) -> defer.Deferred:
        delivery = self._delivery
        envelope = envelope_from_params(self._mail_from, self._recipients, self._params)
        prefix = received_header(
            self._context, delivery.policy.hostname, self.id,
            authenticated=delivery.identity.via != "anonymous",
            smtputf8=envelope.smtputf8, hide_client=delivery.policy.hide_client)
        message = OutboundMessage(
            envelope, self._spool, prefix=prefix, id=self.id,
            connection_id=self._context.connection_id, identity=str(delivery.identity))
        return relay_message(delivery.relay, message)

    def abort(self) -> None:
        self._spool.close()


@implementer(IMessageDelivery)
class RelayDelivery:
    def __init__(self, identity: Identity, relay: IRelay, policy: DeliveryPolicy):
        self.identity = identity
        self.relay = relay
        self.policy = policy

    def startTransaction(self, context: ConnectionContext, mail_from: str,
                         params: dict) -> RelayTransaction:
        return RelayTransaction(self, context, mail_from, params)
