"""The avatar of a logged-in client: turns an SMTP transaction into a relayed message.

The transaction opens the relay's own transaction at MAIL (``IRelay.begin``) and asks it
about every RCPT as the client names it, so each recipient is answered with the upstream's
verdict and refused ones are simply not part of the message.  The content is spooled
(bounded memory) until the client's final dot, then handed over with the Received header;
the client's final reply is the relay's verdict, so a ``250`` always means the upstream
accepted the message (docs/design.md, "The relay and the delivery guarantee").  Content the client
got wrong (too big, bare line ends,
overlong lines) never reaches the upstream, not even in part.

The identity's policy (``esmtpfa.auth.policy``, ``docs/policy.md``) is enforced here,
for SMTP and HTTP alike: a sender it does not allow is refused at MAIL, before the
upstream hears of the transaction (``553 5.7.1``); with ``check_header_from`` the From:
header is collected while the content streams in and checked at the final dot, before any
content goes upstream (``550 5.7.1``).  Both raise ``PolicyRefusal``, which the HTTP API
answers with 403.  A policy's ``envelope_sender`` sets the sender at MAIL, before that
check (``RelayDelivery._set_sender``).

Sending rates per identity (``esmtpfa.limits.rates``) are enforced here too: the message is
reserved at MAIL and each recipient at RCPT, counted once the upstream accepted the
message and given back otherwise.  Past a limit the client hears a temporary reply
(``451 4.7.1`` for messages, ``452 4.5.3`` for recipients), so it keeps the message and
retries; both raise ``RateLimited``, which the HTTP API answers with 429.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.interfaces import IMessageDelivery, ITransaction
from esmtpfa.auth.policy import (
    EnvelopeSender,
    HeaderFromScanner,
    SenderRules,
    first_refused,
    from_addresses,
)
from esmtpfa.auth.selection import Identity
from esmtpfa.auth.sendingrates import Rates
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import PLAIN_RECIPIENTS, RecipientLog, logger
from esmtpfa.common.message import SPOOL_MEMORY_LIMIT, Envelope, MessageSpool, OutboundMessage
from esmtpfa.common.observers import notify
from esmtpfa.common.replies import Reply, SMTPReplyError
from esmtpfa.delivery.received import received_header
from esmtpfa.limits.interfaces import Exceeded
from esmtpfa.limits.ledgers import RateLimiter
from esmtpfa.limits.rates import Reservation
from esmtpfa.relay.interfaces import IRelay, IRelayTransaction, RelayError
from esmtpfa.relay.session import eight_bit_unsupported
from esmtpfa.spool.interfaces import QueuedReply

log = logger("esmtpfa.delivery")

RELAY_ERROR = Reply(451, "4.3.0", "Local error while relaying, try again later")

#: Outcomes reported to the observer besides ``RelayError.reason`` (rejected, unavailable).
ACCEPTED = "accepted"
ERROR = "error"  # a local failure that is not a RelayError (a bug): 451 to the client

#: ``reason`` of a policy refusal (the ``policy_rejections_total`` label).
MAIL_FROM = "mail_from"
HEADER_FROM = "header_from"
#: From fields up to this many octets are parsed at once; bigger ones in a thread
#: (``getaddresses`` takes a few ms per KiB of hostile input).
INLINE_FROM_BYTES = 1024
#: The longest address a refusal quotes (RFC 5321 §4.5.3.1.3: a path is 256 octets).
SHOWN_ADDRESS = 256


class PolicyRefusal(SMTPReplyError):
    """The identity's policy does not allow this sender (``reason``: ``mail_from`` or
    ``header_from``).  An ``SMTPReplyError``, so the SMTP server simply answers it."""

    def __init__(self, reply: Reply, reason: str):
        super().__init__(reply)
        self.reason = reason


class RateLimited(SMTPReplyError):
    """Over the identity's sending rate (``kind``: messages or recipients); temporary,
    ``retry_after`` seconds is when it is worth trying again."""

    def __init__(self, exceeded: Exceeded):
        if exceeded.kind == "recipients":
            reply = Reply(452, "4.5.3", f"Recipient rate limit of this login reached "
                                        f"({exceeded.limit}), try again later")
        else:
            reply = Reply(451, "4.7.1", f"Message rate limit of this login reached "
                                        f"({exceeded.limit}), try again later")
        super().__init__(reply)
        self.kind = exceeded.kind
        self.retry_after = exceeded.retry_after


class DeliveryObserver(Protocol):
    """Told the outcome of every message handed to the relay (metrics plug in here)."""

    def relayed(self, identity: Identity, envelope: Envelope, size: int, outcome: str,
                seconds: float) -> None: ...

    def policy_rejected(self, identity: Identity, reason: str) -> None:
        """A sender refused by the identity's policy."""

    def rate_limited(self, identity: Identity, kind: str) -> None:
        """A message or recipient refused by the identity's sending rate."""


class _NoObserver:
    def relayed(self, identity: Identity, envelope: Envelope, size: int, outcome: str,
                seconds: float) -> None:
        pass

    def policy_rejected(self, identity: Identity, reason: str) -> None:
        pass

    def rate_limited(self, identity: Identity, kind: str) -> None:
        pass


def sender_rules(identity: Identity) -> SenderRules | None:
    """The identity's sender rules; None when its provider has none (any sender)."""
    policy = getattr(identity, "policy", None)
    return policy.senders if policy is not None else None


def _reservation_for(delivery: "RelayDelivery") -> Reservation | None:
    """A place in the identity's sending budgets, or None when nothing limits it (no
    limiter, no rate anywhere, or an anonymous client: anonymous is nobody's identity)."""
    limiter, identity = delivery.policy.rates, delivery.identity
    if limiter is None or identity.via == "anonymous":
        return None
    default = delivery.policy.default_rates
    policy = getattr(identity, "policy", None)
    rates = policy.rates_for(identity.values(policy.rate_source), default) \
        if policy is not None else default
    if rates.unlimited:
        return None
    return Reservation(limiter, f"{identity.provider}\0{identity.username}", rates)


def _shown(address: str) -> str:
    """An address for a reply or a log line: bounded, without control characters."""
    text = "".join(c if c.isprintable() else "?" for c in address[:SHOWN_ADDRESS])
    return text + ("…" if len(address) > SHOWN_ADDRESS else "")


@dataclass(frozen=True)
class DeliveryPolicy:
    hostname: str
    hide_client: bool = False
    spool_memory_limit: int = SPOOL_MEMORY_LIMIT
    observer: DeliveryObserver = field(default_factory=_NoObserver, compare=False)
    #: Sending rates per identity (None: none at all), and the relay's defaults for
    #: providers whose policy sets none (``--rate-messages``, ``--rate-recipients``).
    rates: RateLimiter | None = field(default=None, compare=False)
    default_rates: Rates = Rates()
    #: How the message line shows recipients (``--log-recipients``, docs/logging.md).
    log_recipients: RecipientLog = PLAIN_RECIPIENTS
    #: Runs a large From: header's parse off the reactor (``Resources.in_thread``);
    #: None: parsed inline, as a small one always is.
    in_thread: Callable[..., defer.Deferred] | None = field(default=None, compare=False)


def envelope_from_params(mail_from: str, recipients, params: dict) -> Envelope:
    size = params.get("SIZE")
    body = params.get("BODY")
    return Envelope(
        mail_from=mail_from, recipients=tuple(recipients),
        body=body.upper() if body else None,
        smtputf8="SMTPUTF8" in params, requiretls="REQUIRETLS" in params,
        declared_size=int(size) if size and size.isdigit() else None)


def relay_message(send: Callable[[OutboundMessage], defer.Deferred], message: OutboundMessage,
                  report: Callable[[str], None] | None = None,
                  where: Callable[[], str | None] = lambda: None,
                  recipients_shown: RecipientLog = PLAIN_RECIPIENTS) -> defer.Deferred:
    """Hand ``message`` to ``send`` (an open relay transaction's); fires with the reply for
    the client, or fails with ``SMTPReplyError``.  Logs the outcome (with the upstream
    ``where`` names and the duration, as fields for the JSON log), tells ``report``
    (accepted, rejected, unavailable or error) and always releases the spool."""
    started = time.monotonic()

    def outcome(name: str) -> None:
        if report is not None:
            notify(report, name)

    def accepted(upstream: Reply) -> Reply:
        try:
            outcome(ACCEPTED)
            if isinstance(upstream, QueuedReply):  # the spool logged where it went
                return upstream
            to, shown = recipients_shown.fields(message.envelope.recipients)
            log.info("{connection_id} message {message_id} from <{sender}> " + to +
                     ", {size} bytes, relayed for {identity}: {upstream_reply}",
                     connection_id=message.connection_id, message_id=message.id, **shown,
                     sender=message.envelope.mail_from,
                     count=len(message.envelope.recipients), size=message.size,
                     identity=message.identity, upstream_reply=str(upstream),
                     upstream=where(), duration=round(time.monotonic() - started, 3))
            return Reply(250, "2.0.0", f"Message accepted as {message.id}")
        finally:
            message.close()

    def failed(failure: Failure):
        try:
            error = failure.value
            if isinstance(error, RelayError):
                outcome(error.reason)
                _, shown = recipients_shown.fields(message.envelope.recipients)
                log.info("{connection_id} message {message_id} for {identity} not relayed "
                         "({reason}): {detail}", **shown, connection_id=message.connection_id,
                         message_id=message.id, identity=message.identity,
                         reason=error.reason, detail=str(error),
                         sender=message.envelope.mail_from,
                         count=len(message.envelope.recipients), size=message.size,
                         upstream=getattr(error, "upstream", None) or where(),
                         upstream_reply=str(error.upstream_reply)
                         if error.upstream_reply else None,
                         duration=round(time.monotonic() - started, 3))
                raise SMTPReplyError(error.reply)
            outcome(ERROR)
            log.failure("{connection_id} message {message_id}: relay failed", failure,
                        connection_id=message.connection_id, message_id=message.id)
            raise SMTPReplyError(RELAY_ERROR)
        finally:
            message.close()

    # The spool is released by whichever of the two answers (one callback, not two).
    return _call(send, message).addCallbacks(accepted, failed)


def _call(f: Callable[..., defer.Deferred], *arguments) -> defer.Deferred:
    """``defer.maybeDeferred`` for the relay's methods, which return Deferreds: a
    synchronous exception becomes a failure, and a Deferred is not wrapped again."""
    try:
        result = f(*arguments)
    except Exception:
        return defer.fail()
    return result if isinstance(result, defer.Deferred) else defer.succeed(result)


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
        self._upstream: IRelayTransaction | None = None
        self._too_big: int | None = None
        self._eight_bit_refused = False  # 8-bit content the only upstream cannot take
        self._reservation = _reservation_for(delivery)
        rules = sender_rules(delivery.identity)
        self._header_from = (HeaderFromScanner()
                             if rules is not None and rules.check_header_from else None)
        # The trace header is known at MAIL: its size is part of what the upstream gets.
        envelope = self._envelope = envelope_from_params(mail_from, (), params)
        self._prefix = received_header(
            context, delivery.policy.hostname, self.id,
            authenticated=delivery.identity.via != "anonymous",
            smtputf8=envelope.smtputf8, hide_client=delivery.policy.hide_client)

    def open(self) -> defer.Deferred:
        """MAIL: open the relay's transaction; fires with self or fails with the reply."""
        if self._reservation is None:
            return self._begin()

        def limited(failure: Failure):
            self._spool.close()
            return failure
        return self._reserve(Reservation.message).addCallbacks(
            lambda _: self._begin(), limited)

    def _begin(self) -> defer.Deferred:
        envelope = self._envelope
        if envelope.declared_size is not None:
            envelope = replace(envelope,
                               declared_size=envelope.declared_size + len(self._prefix))

        def opened(upstream: IRelayTransaction) -> "RelayTransaction":
            self._upstream = upstream
            return self

        def refused(failure: Failure):
            self._spool.close()
            self._settle(accepted=False)
            return self._refused(failure, "MAIL", f"<{self._mail_from}>", (), started)
        started = time.monotonic()
        d = _call(self._delivery.relay.begin, envelope, self.id,
                  self._context.connection_id, self._client_keys())
        return d.addCallbacks(opened, refused)

    def _client_keys(self) -> tuple[str, ...]:
        """Who sends, for the relay's fair use of its upstream connections: the client's
        address, and its identity when it logged in."""
        identity = self._delivery.identity
        keys: tuple[str, ...] = (f"address {self._context.peer_host}",)
        if identity.via != "anonymous":
            keys += (f"identity {identity}",)
        return keys

    def _reserve(self, what) -> defer.Deferred:
        """Reserve the message or a recipient in the identity's budget (``what`` is
        ``Reservation.message`` or ``Reservation.recipient``); fails with
        ``RateLimited`` when full."""
        reservation = self._reservation
        if reservation is None:
            return defer.succeed(None)

        def exceeded(failure: Failure):
            exceeded = failure.value
            if not isinstance(exceeded, Exceeded):
                return failure
            delivery = self._delivery
            log.info("{connection_id} message {message_id} for {identity}: {kind} rate "
                     "limit reached ({limit}), retry in {seconds:.0f} s",
                     connection_id=self._context.connection_id, message_id=self.id,
                     identity=delivery.identity, kind=exceeded.kind,
                     limit=str(exceeded.limit), seconds=exceeded.retry_after)
            notify(delivery.policy.observer.rate_limited, delivery.identity, exceeded.kind)
            raise RateLimited(exceeded) from None
        return what(reservation).addErrback(exceeded)

    def _settle(self, accepted: bool) -> None:
        """The message went (its reservation counts) or did not (given back): once."""
        if self._reservation is not None:
            reservation, self._reservation = self._reservation, None
            (reservation.commit if accepted else reservation.release)()

    def addRecipient(self, recipient: str, params: dict, data_follows: bool = False
                     ) -> defer.Deferred:
        if self._reservation is None:
            return self._ask_upstream(recipient, data_follows)
        return self._reserve(Reservation.recipient).addCallback(
            lambda _: self._ask_upstream(recipient, data_follows))

    def _ask_upstream(self, recipient: str, data_follows: bool) -> defer.Deferred:
        if self._upstream is None:  # aborted while a shared ledger answered: client gone
            return defer.fail(SMTPReplyError(RELAY_ERROR))

        def accepted(_: Reply) -> None:
            self._recipients.append(recipient)

        def refused(failure: Failure):
            if self._reservation is not None:
                self._reservation.drop_recipient()  # not part of the message
            return self._refused(failure, "RCPT", f"<{recipient}>", (recipient,), started)
        started = time.monotonic()
        return _call(self._upstream.addRecipient, recipient, data_follows).addCallbacks(
            accepted, refused)

    def _refused(self, failure: Failure, command: str, what: str, recipients: tuple,
                 started: float):
        """A relay verdict at MAIL or RCPT: logged, reported (the observer sees every
        refusal the client hears, with the recipient it was about), and answered."""
        delivery = self._delivery
        error = failure.value
        outcome = error.reason if isinstance(error, RelayError) else ERROR
        notify(delivery.policy.observer.relayed, delivery.identity,
               envelope_from_params(self._mail_from, recipients, self._params),
               0, outcome, time.monotonic() - started)
        if isinstance(error, RelayError):
            log.info("{connection_id} message {message_id} for {identity}: {command} "
                     "{what} refused ({reason}): {reply}",
                     connection_id=self._context.connection_id, message_id=self.id,
                     identity=delivery.identity, command=command, what=what,
                     reason=error.reason, reply=str(error.reply))
            raise SMTPReplyError(error.reply)
        log.failure("{connection_id} message {message_id}: {command} failed", failure,
                    connection_id=self._context.connection_id, message_id=self.id,
                    command=command)
        raise SMTPReplyError(RELAY_ERROR)

    def write(self, data: bytes) -> None:
        if self._too_big is not None or self._eight_bit_refused:
            return
        # The upstream's answer first: it is known per transaction, while a scan of the
        # chunk would cost every message of every upstream.
        if getattr(self._upstream, "refuses_8bit", False) and not data.isascii():
            # Declared 8BITMIME, an upstream without it, and now an 8-bit octet: the
            # verdict is known (docs/delivery-guarantee.md, "Content the upstream cannot
            # take").  Nothing more is spooled; the client hears 554 at its final dot.
            self._eight_bit_refused = True
            return
        if self._header_from is not None:
            self._header_from.feed(data)
        self._spool.write(data)
        limit = self._upstream.max_size if self._upstream is not None else None
        if limit is not None and self._spool.size + len(self._prefix) > limit:
            # Found while the client streams (it declared no SIZE, or a wrong one): stop
            # spooling; the client hears 552 at its final dot, the upstream nothing.
            self._too_big = limit

    def finish(self) -> defer.Deferred:
        if self._eight_bit_refused:
            self.abort()
            log.info("{connection_id} message {message_id} refused: 8-bit content for "
                     "an upstream without 8BITMIME", message_id=self.id,
                     connection_id=self._context.connection_id)
            return defer.fail(SMTPReplyError(eight_bit_unsupported().reply))
        if self._too_big is not None:
            self.abort()
            log.info("{connection_id} message {message_id} refused: larger than the "
                     "upstream's limit of {limit} octets",
                     connection_id=self._context.connection_id, message_id=self.id,
                     limit=self._too_big)
            return defer.fail(SMTPReplyError(Reply(
                552, "5.3.4", f"Message too big for the upstream server (limit "
                              f"{self._too_big} octets)")))
        if self._header_from is None:
            return self._relay()
        d = self._check_header_from(self._header_from)
        return d.addCallbacks(lambda _: self._relay(), self._check_failed)

    def _check_failed(self, failure: Failure):
        if failure.check(PolicyRefusal):
            return failure
        self.abort()  # a bug: the message is not relayed unchecked, the spool is freed
        log.failure("{connection_id} message {message_id}: checking the From: header "
                    "failed", failure, connection_id=self._context.connection_id,
                    message_id=self.id)
        raise SMTPReplyError(RELAY_ERROR)

    def _check_header_from(self, scanner: HeaderFromScanner) -> defer.Deferred:
        """Fires when every From: address is allowed; otherwise aborts the transaction
        (the upstream never gets the content) and fails with ``PolicyRefusal``."""
        scanner.finish()
        if scanner.overflow:
            return self._header_refused(Reply(
                550, "5.7.1", "The From: header is too long to be checked"))
        values = scanner.values()
        in_thread = self._delivery.policy.in_thread
        if scanner.size > INLINE_FROM_BYTES and in_thread is not None:
            d = in_thread(from_addresses, values)
        else:
            d = defer.succeed(from_addresses(values))
        return d.addCallback(self._header_checked)

    def _header_checked(self, addresses: tuple[str, ...] | None) -> defer.Deferred | None:
        if addresses is None:
            return self._header_refused(Reply(
                550, "5.7.1", "The message has no From: address that can be checked"))
        identity = self._delivery.identity
        rules = sender_rules(identity)
        if rules is None:  # no sender rules (the scanner runs only under them)
            return None
        refused = first_refused(rules, addresses, identity.username,
                                identity.values(rules.source))
        if refused is None:
            return None
        return self._header_refused(Reply(
            550, "5.7.1", f"From: header address <{_shown(refused)}> is not allowed for "
                          f"this login"))

    def _header_refused(self, reply: Reply) -> defer.Deferred:
        self.abort()
        return defer.fail(self._delivery.policy_refusal(
            reply, HEADER_FROM, self._context.connection_id, self.id))

    def _relay(self) -> defer.Deferred:
        upstream = self._upstream
        if upstream is None:  # aborted while the From: header was checked: client gone
            return defer.fail(SMTPReplyError(RELAY_ERROR))
        delivery = self._delivery
        envelope = self._envelope
        envelope = Envelope(envelope.mail_from, tuple(self._recipients), envelope.body,
                            envelope.smtputf8, envelope.requiretls, envelope.declared_size)
        message = OutboundMessage(
            envelope, self._spool, prefix=self._prefix, id=self.id,
            connection_id=self._context.connection_id, identity=str(delivery.identity))
        size, started = message.size, time.monotonic()

        def report(outcome: str) -> None:
            self._settle(accepted=outcome == ACCEPTED)
            delivery.policy.observer.relayed(
                delivery.identity, envelope, size, outcome, time.monotonic() - started)
        return relay_message(upstream.send, message, report,
                             where=lambda: getattr(self._upstream, "upstream", None),
                             recipients_shown=delivery.policy.log_recipients)

    def abort(self) -> None:
        self._settle(accepted=False)
        self._spool.close()
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            upstream.abort()


@implementer(IMessageDelivery)
class RelayDelivery:
    def __init__(self, identity: Identity, relay: IRelay, policy: DeliveryPolicy):
        self.identity = identity
        self.relay = relay
        self.policy = policy

    def startTransaction(self, context: ConnectionContext, mail_from: str,
                         params: dict) -> defer.Deferred:
        """Fires with the ``RelayTransaction`` once the upstream accepted MAIL; fails
        with ``PolicyRefusal`` for a sender the identity may not use (the upstream hears
        nothing of it)."""
        identity = self.identity
        rules = sender_rules(identity)
        setter = getattr(getattr(identity, "policy", None), "envelope_sender", None)
        if setter is not None:
            try:
                mail_from, params = self._set_sender(setter, rules, context, mail_from,
                                                     params)
            except PolicyRefusal as refusal:
                return defer.fail(refusal)
        elif rules is not None and not rules.allows(
                mail_from, identity.username, identity.values(rules.source)):
            return defer.fail(self.policy_refusal(Reply(
                553, "5.7.1", f"Sender address <{_shown(mail_from)}> is not allowed for "
                              f"this login"), MAIL_FROM, context.connection_id))
        return RelayTransaction(self, context, mail_from, params).open()

    def _set_sender(self, setter: EnvelopeSender, rules: SenderRules | None,
                    context: ConnectionContext, mail_from: str, params: dict
                    ) -> tuple[str, dict]:
        """The envelope sender the policy's ``envelope_sender`` sets (docs/policy.md,
        "Devices: the sender from the identity"), and the params to go with it.

        The sender rules judge the sender that leaves, after the change: that is the
        address the world sees, and it keeps a wrong map entry or a directory value
        from sending as someone the rules never allowed.  No usable address is a
        refusal (``550 5.7.1``), never the device's own sender passed on; the reply
        says what is missing, not what was found."""
        identity = self.identity
        own = identity.values(rules.source) if rules is not None else ()
        if not setter.applies(mail_from, lambda address: rules is None or rules.allows(
                address, identity.username, own)):
            chosen = None
        else:
            chosen = setter.choose(identity.username, identity.values(setter.source))
            if chosen.address is None:
                log.info("{connection_id} MAIL FROM refused for {identity}: its policy "
                         "sets the envelope sender, and {problem}",
                         connection_id=context.connection_id, identity=identity,
                         problem=chosen.origin)
                raise self.policy_refusal(Reply(
                    550, "5.7.1", "No sender address is set for this login"),
                    MAIL_FROM, context.connection_id)
            log.info("{connection_id} MAIL FROM <{original}> set to <{sender}> for "
                     "{identity} by its policy (from the {origin})",
                     connection_id=context.connection_id, original=_shown(mail_from),
                     sender=chosen.address, identity=identity, origin=chosen.origin)
            mail_from = chosen.address
            if not mail_from.isascii():  # RFC 6531 §3.4: a UTF-8 sender needs SMTPUTF8
                params = {**params, "SMTPUTF8": True}
        if rules is not None and not rules.allows(mail_from, identity.username, own):
            text = (f"Sender address <{_shown(mail_from)}> is not allowed for this login"
                    if chosen is None else
                    "The sender address set for this login is not allowed by its policy")
            raise self.policy_refusal(Reply(553, "5.7.1", text), MAIL_FROM,
                                      context.connection_id)
        return mail_from, params

    def policy_refusal(self, reply: Reply, reason: str, connection_id: str,
                       message_id: str | None = None) -> PolicyRefusal:
        """Log and count a policy refusal; the error to answer it with."""
        log.info("{connection_id} {what} refused for {identity} by its provider's policy "
                 "({reason}): {reply}", connection_id=connection_id,
                 what=f"message {message_id}" if message_id else "MAIL FROM",
                 message_id=message_id, identity=self.identity, reason=reason,
                 reply=str(reply))
        notify(self.policy.observer.policy_rejected, self.identity, reason)
        return PolicyRefusal(reply, reason)
