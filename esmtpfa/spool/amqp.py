"""The spool in RabbitMQ quorum queues: one durable queue shared by relay replicas.

Only what Debian's ``rabbitmq-server`` (3.10) does without a plugin is used: quorum
queues (Raft-replicated, fsync'd), queue-level message TTL on them (3.10), at-least-once
dead-lettering (3.10), length limits with ``reject-publish``, publisher confirms and the
``x-delivery-count`` header.  All of it goes through pika's Twisted adapter, in the
reactor given: no thread but the one that reads a message's chunks.

Topology (``prefix`` is ``esmtpfa`` by default; every queue durable, ``x-queue-type:
quorum``, declared idempotently at every connect):

* ``PREFIX.queue``: messages due now.  The relays consume it.  With ``max_bytes`` it has
  ``x-max-length-bytes`` and ``x-overflow: reject-publish``: a queue over its limit
  (a quorum queue takes the message that crosses it) nacks a publish, and ``store``
  fails with ``FULL`` (452 4.3.1); ``accepting`` then says no for ``full_pause``
  seconds.  Changing ``max_bytes`` needs a new prefix or the queue deleted when empty:
  RabbitMQ refuses to redeclare a queue with other arguments (406).
* ``PREFIX.retry.Ns``, one per delay (15, 300, 600, 1200, 2400, 4000 s by default):
  nobody consumes them.  ``x-message-ttl`` is the delay; an expired message is
  dead-lettered through the default exchange back into ``PREFIX.queue``, with
  ``x-dead-letter-strategy: at-least-once`` (which needs ``reject-publish``) so that a
  broker crash in the middle duplicates a message rather than losing it.  A message
  waits in the queue of the shortest delay that is not shorter than its wait; one that
  comes back before its ``next_attempt`` (its wait was longer than every delay) is parked
  again for the rest.  As every message of a queue has the same TTL, the head always
  expires first (RabbitMQ expires at the head only).
* ``PREFIX.held``: messages kept for an operator.  Nobody consumes it.

A message is one AMQP message: the body is the content, exactly as the upstream gets it;
the ``esmtpfa-state`` header is the state as JSON (the ``SpoolEntry``, every recipient's
state and last reply, attempts, next attempt, hold reason), and ``esmtpfa-id`` the
message id.  ``message_id`` (a basic property) is new for every copy we publish: it
tells this process's copies apart.  A state is never changed in place: a new copy is
published (confirmed) and only then is the old one acknowledged, so a crash in between
duplicates a queue entry and never loses one.

Durability (docs/spool.md, "The guarantee").  ``store`` publishes with ``delivery_mode``
2, ``mandatory``, on a channel in publisher-confirm mode, and fires only on the
broker's ``basic.ack``: for a quorum queue that is sent once a quorum of nodes has the
message on disk.  A ``basic.nack``, a ``basic.return`` (no queue to route to), no
confirm within ``confirm_timeout`` or a lost connection fail it with ``UNAVAILABLE``
(a message confirmed too late is stored all the same: the client, told 451, sends it
again, a duplicate and never a loss).  The content is read whole into memory (AMQP
sends a message in one piece): the size bound is ``max_message_bytes``, below
RabbitMQ's 128 MiB ``max_message_size``.  An ack (settling) has no confirm in AMQP
0-9-1: one lost with the connection makes the message come back redelivered, and the
rule below deals with it.

The crash rule.  AMQP cannot mark a message it has delivered: ``started`` cannot be
written to the broker.  What the broker does tell is whether a message was delivered
before and returned unacknowledged (``redelivered``, and on quorum queues a
``x-delivery-count`` that grows by one at each return: a consumer's channel closed, its
process died, the broker restarted).  So:

* A redelivered message is moved to the held queue, its pending recipients ``UNKNOWN``,
  with the reason ``REDELIVERED``: whoever had it may have sent the final dot.  It is
  never attempted again by the relay's own hand.
* Except when this very process can vouch for it.  Each process remembers (bounded) the
  copies it received and what it did with them.  A copy that comes back to it with a
  delivery count of exactly one more than it saw was returned by the loss of *our*
  channel and by nobody else's (another consumer's loss would have counted too; the
  broker counts a restart's and a crash's returns as well), so our memory is the whole
  story: received and never claimed, it is attempted as usual; settled (the ack was
  lost with the connection), it is dropped; its outcome known but not yet recorded,
  that outcome is recorded now; its attempt still running here (``started`` now
  refuses it: the claim was lost), it waits for that attempt's settlement, which is
  then carried out on it.  Any other redelivery is held.
* On ``close``, what this process holds and never started goes back as a fresh copy
  (published, then acked: not redelivered), and what it started and never settled is
  held with its started recipients ``UNKNOWN``.

The cost: the messages a consumer had prefetched and not started when its process died
are held too.  Keep ``prefetch`` near the delivery concurrency.

Fairness.  ``claim`` hands out what the consumer received (never more than ``limit``),
in arrival order, skipping identities in ``busy``: those wait in the local buffer.  The
buffer is bounded by the prefetch window (``basic.qos``): a message that waits there
takes a slot.  When every slot is taken and nothing can be claimed, one waiting message
goes back to the end of the queue (a fresh copy, then an ack) per ``claim``, so one
identity's backlog cannot stall the others for good.  This is weaker than a database's
"oldest due first, any identity": the order is the queue's, per replica.

Admin.  The RabbitMQ management HTTP API is a plugin (not enabled by Debian's package,
and a second credential and port to configure), and its "get messages" requeues what it
shows, which marks every message redelivered: our crash rule would then hold them all.
So the queue tool works over AMQP itself: it reads the held and retry queues with
``basic.get`` (nobody consumes them, and a message returned there keeps its expiry and
does not carry its delivery count into the main queue), acts on the one it is after
(publishes the new copy, confirmed, then acks), and lets the rest go back when its
channel closes.  The main queue is never read by the tool: its messages are due now, or
being attempted, and a read would make them redelivered.  So on AMQP:

* ``list`` and ``show`` see held messages and those waiting in retry queues; the ones
  due now or being attempted are counted (``counts``, ``stats``), not listed.
* ``flush``, ``hold``, ``release``, ``delete``, ``requeue`` work on held and waiting
  messages; a message due now cannot be reached (``NOT_FOUND``, saying why); ``requeue``
  without an id resets the held and waiting ones, not those due now.
* Two tools at once each see part of the queues (each holds what it has read), and
  what a command read is back in its queue a moment after the command ended.

Stats: counts come from passive ``queue.declare`` (``message_count``: ready messages)
plus what this process holds; another replica's unacknowledged messages are not seen.
``bytes`` and ``oldest_received`` are ``None``: AMQP has no cheap way to know them.

Connection: ``amqp://`` or ``amqps://``; amqps verifies the broker's certificate (the
system's trust store, or ``tls_ca``) and its host name.  Lost, it is reconnected with
a doubling delay (``reconnect_delay``: first and longest), and consuming resumes; while
it is down (or the broker blocks publishers for a resource alarm), ``accepting`` says
no and why.  The URL's credentials never leave ``AMQPURL``: descriptions, reprs, log
lines and error texts use ``AMQPURL.redacted``.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, cast
from urllib.parse import quote, unquote

import pika
from pika import exceptions as amqp_errors
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet import error as error_types
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope
from esmtpfa.common.probe import IProbe
from esmtpfa.common.urls import query_parameters, split_secret_url
from esmtpfa.spool.interfaces import (
    IContent,
    IQueueAdmin,
    ISpool,
    MessageState,
    Phase,
    QueuedMessage,
    QueueSummary,
    Recipient,
    RecipientState,
    Settlement,
    SpoolEntry,
    SpoolError,
    SpoolErrorKind,
    SpoolStats,
    probe_counts,
)

log = logger("esmtpfa.spool.amqp")

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
#: The delays of the retry queues, in seconds: the runner's neutral retry (15 s) and
#: Postfix's default backoff (300 s doubling to 4,000 s).
DEFAULT_RETRY_DELAYS = (15, 300, 600, 1200, 2400, 4000)
#: RabbitMQ refuses messages over ``max_message_size`` (128 MiB by default); the state
#: header and framing need some room.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024 - 256 * 1024
#: The state travels in the content header frame, which must fit one frame (pika and
#: RabbitMQ negotiate ``frame_max`` = 128 KiB by default).
MAX_STATE_BYTES = 96 * 1024
#: A reply kept per recipient in the state (an upstream's line is at most 512 octets,
#: RFC 5321 §4.5.3.1.5).
REPLY_LIMIT = 512
#: A message that comes back from a retry queue up to this early is due.
DUE_SLACK = 1.0

STATE_HEADER = "esmtpfa-state"
ID_HEADER = "esmtpfa-id"
FOREIGN_HEADER = "esmtpfa-foreign"
STATE_VERSION = 1

REDELIVERED = ("redelivered after a consumer was lost: the upstream may have it "
               "(outcome unknown)")
DUPLICATED = ("the broker delivered a copy this relay already had (a duplicate from "
              "dead-lettering): the upstream may have it (outcome unknown)")
STOPPED = "the relay stopped during the attempt: the upstream may have it (outcome unknown)"
NO_VERDICT = "no verdict was recorded for it (outcome unknown)"


# -- the URL ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AMQPURL:
    """``amqp[s]://[user[:password]@]host[:port][/vhost][?heartbeat=S]`` (the RabbitMQ
    URI spec: the vhost is the path without its slash, percent-decoded; no path means
    ``/``; no credentials mean ``guest``).  The credentials are kept out of ``repr``."""

    tls: bool
    host: str
    port: int
    vhost: str = "/"
    username: str = field(default="guest", repr=False)
    password: str = field(default="guest", repr=False)
    heartbeat: int | None = None

    @classmethod
    def parse(cls, text: str) -> "AMQPURL":
        """Raises ``ValueError`` with a message that never quotes the URL."""
        parts, scheme, host, port = split_secret_url(text, ("amqp", "amqps"))
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if "/" in path:
            raise ValueError("the vhost is one path segment: write a / in it as %2F")
        vhost = unquote(path) if path else "/"
        query = query_parameters(parts, ("heartbeat",))
        heartbeat = None
        if "heartbeat" in query:
            value = query["heartbeat"][-1]
            if not value.isdigit():
                raise ValueError("heartbeat must be a number of seconds")
            heartbeat = int(value)
        return cls(tls=scheme == "amqps", host=host,
                   port=port or (DEFAULT_TLS_PORT if scheme == "amqps" else DEFAULT_PORT),
                   vhost=vhost,
                   username=unquote(parts.username) if parts.username else "guest",
                   password=unquote(parts.password) if parts.password is not None
                   else "guest",
                   heartbeat=heartbeat)

    @property
    def redacted(self) -> str:
        """Where, for a log line: scheme, host, port and vhost; never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{'amqps' if self.tls else 'amqp'}://{host}:{self.port}/"
                f"{quote(self.vhost, safe='')}")

    def scrub(self, text: str) -> str:
        """``text`` without the password, should a library have quoted it."""
        for secret in {self.password, quote(self.password, safe="")}:
            if len(secret) >= 4:
                text = text.replace(secret, "<redacted>")
        return text

    def __str__(self) -> str:
        return self.redacted


# -- the queues ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    """The queues' names and arguments (AMQP 0-9-1 ``queue.declare``; RabbitMQ's
    ``x-`` arguments for quorum queues, TTL, dead-lettering and length limits)."""

    prefix: str = "esmtpfa"
    retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
        if not self.prefix or len(self.prefix) > 200 or set(self.prefix) - allowed:
            raise ValueError("the queue prefix is 1 to 200 letters, digits, - _ . or :")
        delays = tuple(sorted(set(self.retry_delays)))
        if not delays or any(not isinstance(d, int) or d <= 0 for d in delays):
            raise ValueError("retry delays are whole seconds above zero")
        object.__setattr__(self, "retry_delays", delays)

    @property
    def main(self) -> str:
        return f"{self.prefix}.queue"

    @property
    def held(self) -> str:
        return f"{self.prefix}.held"

    def retry(self, delay: int) -> str:
        return f"{self.prefix}.retry.{delay}s"

    @property
    def retries(self) -> tuple[str, ...]:
        return tuple(self.retry(d) for d in self.retry_delays)

    def retry_for(self, wait: float) -> str:
        """The retry queue for a wait of ``wait`` seconds: the shortest delay that is not
        shorter (give or take ``DUE_SLACK``), else the longest (the message comes back
        early and is parked again for the rest)."""
        for delay in self.retry_delays:
            if delay >= wait - DUE_SLACK:
                return self.retry(delay)
        return self.retry(self.retry_delays[-1])

    def declarations(self) -> list[tuple[str, dict[str, Any]]]:
        quorum: dict[str, Any] = {"x-queue-type": "quorum"}
        main = dict(quorum)
        if self.max_bytes:
            main.update({"x-max-length-bytes": self.max_bytes,
                         "x-overflow": "reject-publish"})
        queues = [(self.main, main)]
        for delay in self.retry_delays:
            queues.append((self.retry(delay), {
                **quorum, "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.main,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}))
        queues.append((self.held, dict(quorum)))
        return queues


# -- the state of a message ---------------------------------------------------------------

def _clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class StoredState:
    """What the ``esmtpfa-state`` header says about one copy of a message."""

    entry: SpoolEntry
    recipients: tuple[Recipient, ...]
    attempts: int
    lifetime_start: float
    next_attempt: float | None = None
    hold_reason: str | None = None
    last_reply: str | None = None

    @classmethod
    def new(cls, entry: SpoolEntry) -> "StoredState":
        return cls(entry, tuple(Recipient(a) for a in entry.envelope.recipients), 0,
                   entry.received)

    # -- the header --------------------------------------------------------------------

    def encode(self) -> str:
        """JSON (ASCII, so any AMQP field-table reader takes it); raises ``ValueError``
        when even with shortened replies it would not fit one frame."""
        for limit in (REPLY_LIMIT, 64, 0):
            text = json.dumps(self._fields(limit), separators=(",", ":"))
            if len(text) <= MAX_STATE_BYTES:
                return text
        raise ValueError(f"the state of {len(self.recipients)} recipients does not fit "
                         f"an AMQP header ({MAX_STATE_BYTES} octets)")

    def _fields(self, limit: int) -> dict[str, Any]:
        entry, envelope = self.entry, self.entry.envelope
        return {
            "v": STATE_VERSION, "id": entry.id, "identity": entry.identity,
            "ending": entry.ending, "received": entry.received, "size": entry.size,
            "connection_id": entry.connection_id, "mail_from": envelope.mail_from,
            "body": envelope.body, "smtputf8": envelope.smtputf8,
            "requiretls": envelope.requiretls, "declared_size": envelope.declared_size,
            "recipients": [[r.address, r.state, _clip(r.reply, limit) if limit else ""]
                           for r in self.recipients],
            "attempts": self.attempts, "lifetime_start": self.lifetime_start,
            "next_attempt": self.next_attempt,
            "hold_reason": _clip(self.hold_reason, max(limit, 200)),
            "last_reply": _clip(self.last_reply, limit) if limit else None}

    @classmethod
    def decode(cls, headers: dict[str, Any] | None) -> "StoredState":
        """The state of a delivered message; ``ValueError`` for a message that is not
        one of ours (or of a version this code does not read)."""
        raw = (headers or {}).get(STATE_HEADER)
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if not isinstance(raw, str):
            raise ValueError(f"no {STATE_HEADER} header")
        try:
            data = json.loads(raw)
            if data.get("v") != STATE_VERSION:
                raise ValueError(f"state version {data.get('v')!r}")
            recipients = tuple(Recipient(str(a), str(s), str(r))
                               for a, s, r in data["recipients"])
            if any(r.state not in RecipientState.ALL for r in recipients):
                raise ValueError("an unknown recipient state")
            envelope = Envelope(str(data["mail_from"]), tuple(r.address for r in recipients),
                                data["body"], bool(data["smtputf8"]),
                                bool(data["requiretls"]), data["declared_size"])
            entry = SpoolEntry(str(data["id"]), envelope, str(data["identity"]),
                               str(data["ending"]), float(data["received"]),
                               int(data["size"]), str(data["connection_id"]))
            return cls(entry, recipients, int(data["attempts"]),
                       float(data["lifetime_start"]),
                       None if data["next_attempt"] is None else float(data["next_attempt"]),
                       data["hold_reason"], data["last_reply"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"an unreadable {STATE_HEADER} header ({error})") from None

    # -- new states --------------------------------------------------------------------

    def settled(self, settlement: Settlement) -> "StoredState":
        """After an attempt: its changes applied, one more attempt counted.  A recipient
        still ``STARTED`` has no verdict: ``UNKNOWN`` (the crash rule)."""
        changes = {r.address: r for r in settlement.recipients}
        recipients = []
        for recipient in self.recipients:
            recipient = changes.get(recipient.address, recipient)
            if recipient.state == RecipientState.STARTED:
                recipient = Recipient(recipient.address, RecipientState.UNKNOWN,
                                      recipient.reply or NO_VERDICT)
            recipients.append(recipient)
        replies = [r.reply for r in settlement.recipients if r.reply]
        return replace(self, recipients=tuple(recipients), attempts=self.attempts + 1,
                       next_attempt=settlement.retry_at, hold_reason=settlement.hold,
                       last_reply=replies[-1] if replies else self.last_reply)

    def held(self, reason: str, unknown: set[str] | None = None) -> "StoredState":
        """Held for ``reason``: the recipients in ``unknown`` (by default every one not
        yet ended) may have been sent the final dot, so their outcome is ``UNKNOWN``."""
        open_states = (RecipientState.PENDING, RecipientState.STARTED)
        recipients = tuple(
            Recipient(r.address, RecipientState.UNKNOWN, reason)
            if r.state in open_states and (unknown is None or r.address in unknown) else r
            for r in self.recipients)
        return replace(self, recipients=recipients, next_attempt=None, hold_reason=reason,
                       last_reply=reason)

    def released(self, now: float, reset_attempts: bool = False) -> "StoredState":
        """Queued again and due now, its lifetime starting again: every recipient not
        delivered is pending (``IQueueAdmin.release``)."""
        recipients = tuple(r if r.state == RecipientState.DELIVERED else
                           Recipient(r.address, RecipientState.PENDING, r.reply)
                           for r in self.recipients)
        return replace(self, recipients=recipients, lifetime_start=now, next_attempt=None,
                       hold_reason=None, attempts=0 if reset_attempts else self.attempts)

    def due_now(self) -> "StoredState":
        return replace(self, next_attempt=None)

    def queued(self, token: object = None) -> QueuedMessage:
        return QueuedMessage(self.entry, self.recipients, self.attempts,
                             self.lifetime_start, token=token)

    def summary(self, state: str) -> QueueSummary:
        return QueueSummary(
            id=self.entry.id, state=state, sender=self.entry.envelope.mail_from,
            recipients=self.recipients, identity=self.entry.identity, size=self.entry.size,
            received=self.entry.received, attempts=self.attempts,
            next_attempt=self.next_attempt if state == MessageState.QUEUED else None,
            hold_reason=self.hold_reason if state == MessageState.HELD else None,
            last_reply=self.last_reply)


def _foreign_summary(properties: Any, size: int, reason: str) -> QueueSummary:
    """A held message that is not one of ours (published by something else)."""
    return QueueSummary(
        id=properties.message_id or "(no id)", state=MessageState.HELD, sender="",
        recipients=(), identity="", size=size,
        received=float(properties.timestamp or 0), attempts=0, next_attempt=None,
        hold_reason=reason, last_reply=None)


@implementer(IContent)
class BodyContent:
    """The content of a delivered message: AMQP hands it over whole, in memory."""

    def __init__(self, body: bytes):
        self._body: bytes | None = body
        self.size = len(body)

    def read_from(self, offset: int = 0, chunk_size: int = 65536) -> Iterator[bytes]:
        body = self._body
        if body is None:
            raise ValueError("read from closed content")
        for position in range(offset, len(body), chunk_size):
            yield body[position:position + chunk_size]

    def close(self) -> None:
        self._body = None


# -- the connection -----------------------------------------------------------------------

class _LinkError(Exception):
    """The broker cannot be used now; the text says why (no credentials)."""


class _PublishFailed(Exception):
    """A publish was not confirmed; ``why`` is one of the constants below."""

    DOWN, BLOCKED, NACKED, RETURNED, TIMEOUT, LOST = (
        "down", "blocked", "nacked", "returned", "timeout", "lost")

    def __init__(self, why: str, detail: str):
        super().__init__(detail)
        self.why = why


def describe(error: Any) -> str:
    """One line about a connection, channel or publish failure, for logs and errors."""
    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, amqp_errors.ChannelClosedByBroker):
        return f"the broker closed the channel ({error.reply_code} {error.reply_text})"
    if isinstance(error, (amqp_errors.ProbableAuthenticationError,
                          amqp_errors.AuthenticationError)):
        return "the broker refused the login (user name or password)"
    if isinstance(error, amqp_errors.ProbableAccessDeniedError):
        return "the broker refused access to the virtual host"
    if isinstance(error, amqp_errors.ConnectionClosedByBroker):
        if error.reply_code == 403:  # its text may name the user
            return "the broker refused the login or the virtual host (403 ACCESS_REFUSED)"
        return f"the broker closed the connection ({error.reply_code} {error.reply_text})"
    if isinstance(error, amqp_errors.StreamLostError):
        return "the connection was lost"
    name = type(error).__name__
    if "SSL" in name or type(error).__module__.startswith(("OpenSSL", "service_identity")):
        return f"the TLS handshake failed (untrusted certificate or wrong name: {error})"
    text = str(error).strip() or name
    if isinstance(error, ConnectionRefusedError) or "refused" in text.lower():
        return "connection refused"
    return f"{name}: {text}" if name not in text else text


#: Why pika could not open a connection, when it knows better than the socket.
_REFUSALS = (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError,
             amqp_errors.ProbableAccessDeniedError, amqp_errors.ConnectionClosedByBroker)


def _open_failure(built: "_BrokerProtocol", error: BaseException) -> BaseException:
    """The broker's own refusal (login, vhost) if there was one, else what the socket
    or TLS said: pika's adapter reduces both to "connection error"."""
    if built.refusal is not None:
        return built.refusal
    if isinstance(built.open_error, _REFUSALS):
        return built.open_error
    if not isinstance(error, amqp_errors.AMQPConnectionError):
        return error
    lost = built.lost
    if lost is not None and not isinstance(lost, (error_types.ConnectionDone,
                                                  error_types.ConnectionLost)):
        return lost  # a TLS failure, a reset
    return built.open_error or lost or error


def _within(d: defer.Deferred, seconds: float, reactor: Any, what: str) -> defer.Deferred:
    """``d``'s result, or a ``TimeoutError`` after ``seconds``.  ``d`` itself is left
    alone (pika still owns it and may fire it later); its late result is dropped."""
    outcome: defer.Deferred = defer.Deferred()

    def expire() -> None:
        if not outcome.called:
            outcome.errback(TimeoutError(f"{what}: no answer within {seconds:g} s"))

    timer = reactor.callLater(seconds, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not outcome.called:
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)
    d.addBoth(done)
    return outcome


class _BrokerProtocol(TwistedProtocolConnection):
    """pika's protocol, plus two connection events its Twisted adapter does not pass
    on: why opening failed (the real reason, not "connection error") and RabbitMQ's
    ``connection.blocked`` (publishers stopped for a memory or disk alarm).  The adapter
    keeps pika's ``Connection`` as ``_impl`` and offers no other way to them."""

    transport: ITCPTransport  # TCP or TLS: both can abort

    def __init__(self, parameters: pika.ConnectionParameters, reactor: Any):
        super().__init__(parameters, custom_reactor=reactor)
        self.open_error: BaseException | None = None
        self.lost: BaseException | None = None  # why the TCP (TLS) connection ended
        self.blocked: str | None = None
        self.ended: defer.Deferred = defer.Deferred()  # fires once the TCP connection is gone
        #: The broker's connection.close while opening (a refused login, vhost): the
        #: adapter replaces it with "connection done" once the socket closes.
        self.refusal: BaseException | None = None
        connection = self._impl  # type: ignore[attr-defined]  # pika's private Connection
        connection.add_on_connection_blocked_callback(self._blocked)
        connection.add_on_connection_unblocked_callback(self._unblocked)
        connection.callbacks.add(0, pika.spec.Connection.Close, self._broker_closes,
                                 one_shot=False)

    def _broker_closes(self, frame: Any) -> None:
        method = frame.method
        self.refusal = amqp_errors.ConnectionClosedByBroker(method.reply_code,
                                                            method.reply_text)

    def _on_connection_failed(self, connection: Any, error: Any = None) -> None:
        # The adapter's open-error callback (registered by its constructor, so this
        # override is what pika calls) fails ``ready`` with a bare "connection error";
        # the reason is kept first.
        self.open_error = error if isinstance(error, BaseException) else None
        super()._on_connection_failed(connection, error)  # type: ignore[misc]  # private

    def _blocked(self, _connection: Any, frame: Any) -> None:
        self.blocked = getattr(frame.method, "reason", "") or "a resource alarm"

    def _unblocked(self, _connection: Any, _frame: Any) -> None:
        self.blocked = None

    def connectionLost(self, reason: Failure | BaseException = protocol.connectionDone
                       ) -> None:
        self.lost = reason.value if isinstance(reason, Failure) else reason
        super().connectionLost(reason)
        if not self.ended.called:
            self.ended.callback(None)


class _Factory(protocol.ClientFactory):
    noisy = False

    def __init__(self, make: Callable[[], _BrokerProtocol]):
        self._make = make

    def buildProtocol(self, addr: Any) -> _BrokerProtocol:
        built = self._make()
        built.factory = self
        return built


class _Link:
    """One AMQP connection at a time, with its channels: one in publisher-confirm mode
    for every publish, one for consuming (opened on demand), and short-lived ones for
    declarations and the queue tool, so that a channel error there (a passive declare's
    404) never closes the channel whose deliveries are unacknowledged.

    ``generation`` counts the connections: a delivery tag is valid on the channel of its
    own generation only (AMQP 0-9-1 §1.8.3.13 ``basic.ack``: tags are per channel).
    Losing any channel we did not close ourselves drops the whole connection, so the
    broker returns its deliveries at once and the state stays simple: up or not."""

    DOWN, CONNECTING, UP, CLOSED = "down", "connecting", "up", "closed"

    def __init__(self, url: AMQPURL, reactor: Any, *, connect_timeout: float,
                 confirm_timeout: float, heartbeat: int | None, tls_ca: str | None,
                 reconnect_delay: tuple[float, float],
                 prepare: Callable[[_BrokerProtocol], Any],
                 on_up: Callable[[int], None], on_down: Callable[[str], None]):
        self.url = url
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._confirm_timeout = confirm_timeout
        self._heartbeat = heartbeat
        self._tls_ca = tls_ca
        self._reconnect_delay = reconnect_delay
        self._prepare = prepare
        self._on_up = on_up
        self._on_down = on_down
        self.state = self.DOWN
        self.reason = "not connected yet"
        self.generation = 0
        self.keep_up = False
        self._protocol: _BrokerProtocol | None = None
        self._publisher: Any = None
        self._consumer: Any = None
        self._consumer_tag: str | None = None
        self._deliberate: weakref.WeakSet = weakref.WeakSet()  # channels we close
        self._failures = 0
        self._retry: Any = None

    @property
    def up(self) -> bool:
        return self.state == self.UP

    @property
    def blocked(self) -> str | None:
        return self._protocol.blocked if self.up and self._protocol is not None else None

    # -- connecting ---------------------------------------------------------------------

    def _parameters(self) -> pika.ConnectionParameters:
        # Host, port and TLS are Twisted's (the endpoint); pika only speaks AMQP on it.
        # erase_on_connect: the password is dropped from memory once sent; each
        # connection gets parameters of its own.
        return pika.ConnectionParameters(
            virtual_host=self.url.vhost,
            credentials=pika.PlainCredentials(self.url.username, self.url.password,
                                              erase_on_connect=True),
            heartbeat=self.url.heartbeat if self.url.heartbeat is not None
            else self._heartbeat,
            client_properties={"connection_name": "esmtpfa spool", "product": "esmtpfa"})

    def _endpoint(self) -> Any:
        endpoint = endpoints.HostnameEndpoint(self._reactor, self.url.host, self.url.port,
                                              timeout=self._connect_timeout)
        if not self.url.tls:
            return endpoint
        trust = None
        if self._tls_ca:
            with open(self._tls_ca, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        # optionsForClientTLS verifies the chain (system store unless ``trust``) and the
        # name (RFC 6125, via service_identity), always.
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(self.url.host, trustRoot=trust),
                                       endpoint)

    def connect(self) -> defer.Deferred:
        """One attempt: TCP (TLS), the AMQP handshake, the publisher channel and the
        declarations; fails with ``_LinkError``."""
        return defer.ensureDeferred(self._connect())

    async def _connect(self) -> None:
        if self.state in (self.UP, self.CLOSED):
            return
        self.state = self.CONNECTING
        try:
            built, publisher = await self._open()
        except Exception as error:
            if self.state != self.CLOSED:
                self.state = self.DOWN
            self.reason = self.url.scrub(describe(error))
            raise _LinkError(self.reason) from None
        if self.state == self.CLOSED:  # closed while connecting
            built.transport.abortConnection()
            raise _LinkError("the spool is closed")
        self.generation += 1
        generation = self.generation
        self._protocol, self._publisher = built, publisher
        self._consumer = self._consumer_tag = None
        self.state, self.reason, self._failures = self.UP, "", 0
        closed = built.closed
        assert isinstance(closed, defer.Deferred)  # pika sets it once the connection is ready
        closed.addCallback(lambda reason: self._lost(generation, reason))
        self._watch(publisher, generation)
        self._on_up(generation)

    async def _open(self) -> tuple[_BrokerProtocol, Any]:
        factory = _Factory(lambda: _BrokerProtocol(self._parameters(), self._reactor))
        # HostnameEndpoint bounds the TCP connect; the handshake is bounded below.
        built = await self._endpoint().connect(factory)
        try:
            await _within(built.ready, self._connect_timeout, self._reactor,
                          "the AMQP handshake")
            publisher = await built.channel()
            await publisher.confirm_delivery()
            await self._prepare(built)
        except Exception as error:
            if built.transport is not None:
                built.transport.abortConnection()
            raise _open_failure(built, error) from None
        return built, publisher

    def _watch(self, channel: Any, generation: int) -> None:
        def closed(reason: Any) -> None:
            if channel in self._deliberate:
                return
            self._lost(generation, f"a channel closed: {describe(reason)}")
        channel.on_closed.addCallback(closed)

    def fail(self, generation: int, reason: Any) -> None:
        """Drop the connection of ``generation`` (if still current) and reconnect."""
        self._lost(generation, reason)

    def _lost(self, generation: int, reason: Any) -> None:
        if generation != self.generation or self.state != self.UP:
            return
        self.state = self.DOWN
        self.reason = self.url.scrub(reason if isinstance(reason, str) else describe(reason))
        lost, self._protocol = self._protocol, None
        self._publisher = self._consumer = self._consumer_tag = None
        if lost is not None and lost.transport is not None:
            lost.transport.abortConnection()  # every channel goes: the broker requeues
        log.warn("spool: lost the broker {url}: {reason}", url=self.url.redacted,
                 reason=self.reason)
        self._on_down(self.reason)
        if self.keep_up:
            self._schedule()

    def _schedule(self) -> None:
        first, longest = self._reconnect_delay
        delay = min(first * 2 ** min(self._failures, 20), longest)
        self._failures += 1
        self._retry = self._reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        if self.state != self.DOWN:
            return

        def again(failure: Failure) -> None:
            failure.trap(_LinkError)
            log.debug("spool: reconnecting to {url} failed: {reason}",
                      url=self.url.redacted, reason=self.reason)
            if self.keep_up and self.state == self.DOWN:
                self._schedule()
        self.connect().addCallbacks(
            lambda _: log.info("spool: connected to {url} again", url=self.url.redacted),
            again)

    # -- channels -----------------------------------------------------------------------

    async def channel(self, watched: bool = False) -> Any:
        """A new channel on the current connection; a ``watched`` one that closes drops
        the connection."""
        protocol = self._protocol
        if not self.up or protocol is None:
            raise _LinkError(self.reason)
        generation = self.generation
        opened = await _within(protocol.channel(), self._confirm_timeout,
                               self._reactor, "opening a channel")
        if generation != self.generation:
            raise _LinkError("the connection was lost")
        if watched:
            self._watch(opened, generation)
        return opened

    def release(self, channel: Any, wait: bool = False) -> defer.Deferred:
        """Close a channel of ours: its unacknowledged messages go back to their queues.
        Fires at once, or with ``wait`` once the broker's close-ok came (bounded)."""
        if channel is None or not channel.is_open:
            return defer.succeed(None)
        self._deliberate.add(channel)
        try:
            channel.close()
        except Exception:
            return defer.succeed(None)
        if not wait:
            return defer.succeed(None)
        return _within(channel.on_closed, self._confirm_timeout, self._reactor,
                       "closing a channel").addErrback(lambda _: None)

    async def consume(self, queue: str, prefetch: int) -> tuple[Any, int]:
        """Start consuming with manual acks and ``prefetch`` unacknowledged at most
        (``basic.qos``); the deliveries' queue and the generation they belong to."""
        generation = self.generation
        channel = await self.channel(watched=True)
        await channel.basic_qos(prefetch_count=prefetch)
        deliveries, tag = await channel.basic_consume(queue=queue, auto_ack=False)
        if generation != self.generation or not self.up:
            raise _LinkError("the connection was lost")
        self._consumer, self._consumer_tag = channel, tag
        return deliveries, generation

    async def stop_consuming(self) -> None:
        if self.up and self._consumer is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await _within(self._consumer.basic_cancel(tag), self._confirm_timeout,
                              self._reactor, "cancelling the consumer")
            except Exception:
                pass

    def ack(self, generation: int, tag: int) -> bool:
        """Acknowledge a delivery if its channel is still the one it came on (AMQP has
        no confirm for an ack: it is final once sent, or lost with the connection)."""
        if generation != self.generation or not self.up or self._consumer is None \
                or not self._consumer.is_open:
            return False
        self._consumer.basic_ack(delivery_tag=tag)
        return True

    # -- publishing ---------------------------------------------------------------------

    def publish(self, queue: str, body: bytes, properties: Any) -> defer.Deferred:
        """Publish to ``queue`` (the default exchange, ``mandatory``) and fire on the
        broker's confirm; fails with ``_PublishFailed``."""
        if not self.up:
            return defer.fail(_PublishFailed(_PublishFailed.DOWN,
                                             f"not connected to the broker: {self.reason}"))
        if self.blocked:
            return defer.fail(_PublishFailed(_PublishFailed.BLOCKED,
                                             f"the broker blocks publishers ({self.blocked})"))
        try:
            confirm = self._publisher.basic_publish(
                exchange="", routing_key=queue, body=body, properties=properties,
                mandatory=True)
        except Exception as error:
            return defer.fail(_PublishFailed(_PublishFailed.LOST, describe(error)))
        return _within(confirm, self._confirm_timeout, self._reactor,
                       "the publisher confirm").addErrback(self._publish_failed, queue)

    def _publish_failed(self, failure: Failure, queue: str) -> None:
        error = failure.value
        if isinstance(error, amqp_errors.NackError):
            raise _PublishFailed(_PublishFailed.NACKED,
                                 f"the broker refused the message for {queue} (nack)")
        if isinstance(error, amqp_errors.UnroutableError):
            raise _PublishFailed(_PublishFailed.RETURNED,
                                 f"the broker returned the message: no queue {queue}")
        if isinstance(error, TimeoutError):
            raise _PublishFailed(_PublishFailed.TIMEOUT, str(error))
        raise _PublishFailed(_PublishFailed.LOST, self.url.scrub(describe(error)))

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        self.keep_up = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        closing, self._protocol = self._protocol, None
        self.state = self.CLOSED
        self.reason = "the spool is closed"
        if closing is None:
            return
        try:
            closing.close()
        except Exception:
            pass
        try:
            await _within(closing.ended, self._confirm_timeout, self._reactor, "closing")
        except TimeoutError:
            if closing.transport is not None:
                closing.transport.abortConnection()


# -- what this process holds and remembers ------------------------------------------------

@dataclass(frozen=True)
class _Disposal:
    """What becomes of a delivered copy: a new copy of ``state`` published to ``queue``
    (None: nothing to publish), then the delivery acknowledged.  ``foreign`` is set for
    a message that is not ours: it is held as it came, with that reason."""

    queue: str | None
    state: StoredState | None = None
    foreign: str | None = None


class _Delivery:
    """One delivery of one copy to this process: the token of a ``QueuedMessage``."""

    BUFFERED, CLAIMED, DISPOSING, FOLLOWING, DONE = (
        "buffered", "claimed", "disposing", "following", "done")

    __slots__ = ("generation", "tag", "copy_id", "count", "redelivered", "body",
                 "properties", "state", "phase", "started", "successor", "work")

    def __init__(self, generation: int, tag: int, copy_id: str | None, count: int | None,
                 redelivered: bool, body: bytes, properties: Any):
        self.generation = generation
        self.tag = tag
        self.copy_id = copy_id
        self.count = count
        self.redelivered = redelivered
        self.body = body
        self.properties = properties
        self.state: StoredState | None = None
        self.phase = self.BUFFERED
        self.started: set[str] = set()
        #: A redelivery of this copy that waits for this attempt's settlement.
        self.successor: _Delivery | None = None
        self.work: defer.Deferred | None = None

    @property
    def stored(self) -> StoredState:
        """The decoded state: every delivery kept past its arrival has one (one that
        does not decode is held as foreign at once, ``_received``)."""
        assert self.state is not None
        return self.state

    @property
    def key(self) -> object:
        return self.copy_id if self.copy_id is not None else id(self)


class _Recollection:
    """What this process knows about the copies it received (the ``x-delivery-count``
    they had, and how far it got with each), so that a copy which its own lost
    connection returned needs no operator (module docstring, "The crash rule").  Bounded:
    the oldest memories go first; a copy forgotten is held if it comes back."""

    RECEIVED, CLAIMED, STARTED, OUTCOME, SETTLED = (
        "received", "claimed", "started", "outcome", "settled")

    # verdicts
    ATTEMPT, FOLLOW, REPLAY, DROP, HOLD = "attempt", "follow", "replay", "drop", "hold"

    def __init__(self, size: int = 10000):
        self._size = size
        self._copies: OrderedDict[str, list] = OrderedDict()  # id -> [count, status, disposal]

    def verdict(self, copy_id: str | None, redelivered: bool, count: int | None
                ) -> tuple[str, Any]:
        known = self._copies.get(copy_id) if copy_id is not None else None
        if not redelivered:
            # A copy id is new at every publish; the broker hands the same one out as
            # new only when dead-lettering duplicated it.
            return (self.ATTEMPT, None) if known is None else (self.HOLD, DUPLICATED)
        if known is None or count is None or known[0] is None or count != known[0] + 1:
            return self.HOLD, REDELIVERED
        known[0] = count
        status = known[1]
        if status == self.RECEIVED:
            return self.ATTEMPT, None
        if status in (self.CLAIMED, self.STARTED):
            return self.FOLLOW, None
        if status == self.OUTCOME:
            return self.REPLAY, known[2]
        return self.DROP, None

    def note(self, copy_id: str | None, status: str, count: int | None = None,
             disposal: _Disposal | None = None) -> None:
        if copy_id is None:
            return
        known = self._copies.pop(copy_id, None)
        if known is None:
            known = [count, status, disposal]
        else:
            known[1] = status
            if count is not None:
                known[0] = count
            if disposal is not None or status != self.OUTCOME:
                known[2] = disposal
        self._copies[copy_id] = known
        while len(self._copies) > self._size:
            self._copies.popitem(last=False)

    def status(self, copy_id: str | None) -> str | None:
        known = self._copies.get(copy_id) if copy_id is not None else None
        return known[1] if known else None


def _delivery_count(headers: dict[str, Any] | None) -> int | None:
    value = (headers or {}).get("x-delivery-count")
    return int(value) if isinstance(value, int) else None


def _delivery_of(message: QueuedMessage) -> _Delivery:
    """The delivery this spool handed out as ``message`` (its ``token``, opaque to the
    runner)."""
    return cast(_Delivery, message.token)


# -- the queue tool's view ----------------------------------------------------------------

@dataclass
class _Browsed:
    """One message read by the queue tool (not acknowledged yet)."""

    queue: str
    tag: int
    properties: Any
    size: int
    state: StoredState | None
    foreign: str | None
    body: bytes

    @property
    def id(self) -> str | None:
        return self.state.entry.id if self.state is not None else self.properties.message_id

    def summary(self, held: bool) -> QueueSummary:
        if self.state is None:
            return _foreign_summary(self.properties, self.size,
                                    self.foreign or "not an esmtpfa message")
        return self.state.summary(MessageState.HELD if held else MessageState.QUEUED)


class _Browser:
    """Reads queues with ``basic.get`` on a channel of its own, leaving every message
    unacknowledged, so each is seen once; what it does not ack goes back to its queue
    when the channel closes (AMQP 0-9-1 §1.8.3.10, §1.5.2.13).  Used only on queues
    nobody consumes (held, retry)."""

    def __init__(self, link: _Link, channel: Any, reactor: Any, timeout: float):
        self._link = link
        self._channel = channel
        self._reactor = reactor
        self._timeout = timeout

    async def next(self, queue: str) -> _Browsed | None:
        """The next message of ``queue`` not read yet, or None."""
        got = await _within(self._channel.basic_get(queue=queue, auto_ack=False),
                            self._timeout, self._reactor, f"reading {queue}")
        if got is None:
            return None
        headers = got.properties.headers or {}
        try:
            state, foreign = StoredState.decode(headers), None
        except ValueError as error:
            state = None
            foreign = headers.get(FOREIGN_HEADER) or str(error)
            if isinstance(foreign, bytes):
                foreign = foreign.decode("utf-8", "replace")
        return _Browsed(queue, got.method.delivery_tag, got.properties, len(got.body),
                        state, foreign, got.body)

    def ack(self, item: _Browsed) -> None:
        self._channel.basic_ack(delivery_tag=item.tag)

    async def close(self) -> None:
        """Give back what was not acted upon (``basic.nack`` with requeue, all at once:
        AMQP 0-9-1 §1.8.3.16) and close the channel, waiting for its close-ok."""
        if self._channel.is_open:
            self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        await self._link.release(self._channel, wait=True)


# -- the spool ----------------------------------------------------------------------------

@implementer(ISpool, IQueueAdmin, IProbe)
class AMQPSpool:
    """The spool in RabbitMQ (module docstring).  ``url`` is ``amqp[s]://...``;
    ``reactor`` runs everything; ``threads`` (the relay's pool for blocking work, passed
    in like every resource) reads the chunks ``store`` is given.  ``max_bytes`` caps the
    main queue's content (FULL past it); ``retry_delays`` are the retry queues' delays in
    whole seconds."""

    def __init__(self, url: str, reactor: Any, *, threads: Any, prefix: str = "esmtpfa",
                 prefetch: int = 20, confirm_timeout: float = 10.0,
                 tls_ca: str | None = None,
                 retry_delays: tuple[int, ...] = DEFAULT_RETRY_DELAYS,
                 max_bytes: int | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 connect_timeout: float = 10.0, heartbeat: int = 30,
                 reconnect_delay: tuple[float, float] = (0.5, 30.0),
                 full_pause: float = 5.0, remember: int = 10000,
                 now: Callable[[], float] = time.time):
        try:
            self.url = AMQPURL.parse(url)
        except ValueError as error:
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.OPEN,
                             f"the spool URL: {error}") from None
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.topology = Topology(prefix, tuple(retry_delays), max_bytes or None)
        self.prefetch = prefetch
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        self._reactor = reactor
        self._threads = threads
        self._now = now
        self._full_pause = full_pause
        self._full_until = 0.0
        self._link = _Link(self.url, reactor, connect_timeout=connect_timeout,
                           confirm_timeout=confirm_timeout, heartbeat=heartbeat,
                           tls_ca=tls_ca, reconnect_delay=reconnect_delay,
                           prepare=self._declare, on_up=self._link_up,
                           on_down=self._link_down)
        self._timeout = confirm_timeout
        self._memory = _Recollection(remember)
        self._buffer: list[_Delivery] = []          # received, not claimed (arrival order)
        self._watchers: list[Callable[[], None]] = []  # told of each message received
        self._claimed: dict[object, _Delivery] = {}  # key -> claimed delivery
        self._disposing: set[_Delivery] = set()      # being published/acked
        self._retries: dict[_Delivery, Any] = {}     # disposal retries waiting
        self._consuming = False   # claim() was called: this process is a consumer
        self._stores: set[defer.Deferred] = set()    # stores waiting for their confirm
        self._closing = False  # close() began: no new store, claim or start
        self._closed = False   # close() is done
        self._admin = defer.DeferredLock()
        self.description = (f"RabbitMQ quorum queues {self.topology.prefix}.* at "
                            f"{self.url.redacted}")

    def __repr__(self) -> str:
        return f"<AMQPSpool {self.url.redacted} prefix={self.topology.prefix}>"

    # -- opening and the connection ---------------------------------------------------

    def start(self) -> defer.Deferred:
        """Connect and declare the queues; consuming starts at the first ``claim`` (so
        the queue tool, which never claims, never takes a message)."""
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        try:
            await self._link.connect()
        except _LinkError as error:
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.OPEN,
                             f"cannot use the broker at {self.url.redacted}: {error}"
                             ) from None
        self._link.keep_up = True
        log.info("spool: connected to {url}, queues {prefix}.*", url=self.url.redacted,
                 prefix=self.topology.prefix)

    async def _declare(self, connection: _BrokerProtocol) -> None:
        channel = await connection.channel()
        for name, arguments in self.topology.declarations():
            try:
                await channel.queue_declare(name, durable=True, arguments=arguments)
            except amqp_errors.ChannelClosedByBroker as error:
                hint = ""
                if error.reply_code == 406:
                    hint = (": it exists with other arguments (another prefix, or delete "
                            "the queue once it is empty)")
                raise _LinkError(f"declaring {name} failed ({error.reply_code} "
                                 f"{error.reply_text}){hint}") from None
        channel.close()

    def _link_up(self, generation: int) -> None:
        if self._consuming and not self._closing:
            self._start_consumer()

    def _link_down(self, reason: str) -> None:
        # The broker requeues every unacknowledged delivery of the lost channel: what
        # waited in the buffer is gone from here (and remembered, for its return).
        for delivery in self._buffer:
            delivery.phase = _Delivery.DONE
        self._buffer.clear()

    def accepting(self) -> SpoolError | None:
        def refused(kind: str, why: str) -> SpoolError:
            return SpoolError(kind, Phase.STORE, why)
        if self._closing:
            return refused(SpoolErrorKind.UNAVAILABLE, "the spool is closed")
        if not self._link.up:
            return refused(SpoolErrorKind.UNAVAILABLE,
                           f"the spool's broker is unreachable ({self._link.reason})")
        if self._link.blocked:
            return refused(SpoolErrorKind.UNAVAILABLE,
                           f"the spool's broker blocks publishers ({self._link.blocked})")
        if self._reactor.seconds() < self._full_until:
            return refused(SpoolErrorKind.FULL, "the spool's queue is full")
        return None

    # -- storing ----------------------------------------------------------------------

    def store(self, entry: SpoolEntry, chunks: Iterator[bytes],
              claim: bool = False) -> defer.Deferred:
        """Never claims at once (``claim`` is ignored): the broker hands the message to a
        consumer, and ``watch`` tells the runner when it does."""
        storing = defer.ensureDeferred(self._store(entry, chunks))
        self._stores.add(storing)
        return storing.addBoth(_passing(self._stores.discard, storing))

    async def _store(self, entry: SpoolEntry, chunks: Iterator[bytes]) -> None:
        if self._closing:
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.STORE, "the spool is closed")
        body = await deferToThreadPool(self._reactor, self._threads, _read_all, chunks,
                                       self.max_message_bytes)
        if body is None:
            raise SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                             f"the message is larger than the broker takes "
                             f"({self.max_message_bytes} octets)")
        state = StoredState.new(replace(entry, size=len(body)))
        try:
            await self._publish(self.topology.main, body, state)
        except ValueError as error:
            raise SpoolError(SpoolErrorKind.FULL, Phase.STORE, str(error)) from None
        except _PublishFailed as error:
            if error.why == _PublishFailed.NACKED and self.topology.max_bytes:
                self._full_until = self._reactor.seconds() + self._full_pause
                raise SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                                 f"{self.topology.main} is full (x-max-length-bytes "
                                 f"{self.topology.max_bytes})") from None
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.STORE, str(error)) from None

    def _publish(self, queue: str, body: bytes, state: StoredState,
                 extra: dict[str, Any] | None = None) -> defer.Deferred:
        """Publish a new copy of ``state`` (a new copy id); raises ``ValueError`` when
        the state does not fit a header."""
        headers = {STATE_HEADER: state.encode(), ID_HEADER: state.entry.id, **(extra or {})}
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type="message/rfc822",
            message_id=uuid.uuid4().hex, timestamp=int(state.entry.received),
            app_id="esmtpfa", headers=headers)
        return self._link.publish(queue, body, properties)

    def _publish_foreign(self, queue: str, delivery: _Delivery, reason: str
                         ) -> defer.Deferred:
        source = delivery.properties
        headers = dict(source.headers or {})
        headers[FOREIGN_HEADER] = reason
        # Its own message_id is kept: it is how an operator names it (``delete``).
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type=source.content_type,
            message_id=source.message_id, timestamp=source.timestamp, headers=headers)
        return self._link.publish(queue, delivery.body, properties)

    # -- consuming --------------------------------------------------------------------

    def _start_consumer(self) -> None:
        def consuming(result: tuple[Any, int]) -> None:
            deliveries, generation = result
            self._next(deliveries, generation)

        def failed(failure: Failure) -> None:
            log.warn("spool: consuming {queue} failed: {reason}",
                     queue=self.topology.main, reason=describe(failure))
        defer.ensureDeferred(self._link.consume(self.topology.main, self.prefetch)
                             ).addCallbacks(consuming, failed)

    def _next(self, deliveries: Any, generation: int) -> None:
        # A DeferredQueue's get fires at once while deliveries wait: the recursion is
        # bounded by the prefetch window.
        deliveries.get().addCallbacks(self._received, self._consumer_ended,
                                      callbackArgs=(deliveries, generation),
                                      errbackArgs=(generation,))

    def _received(self, received: Any, deliveries: Any, generation: int) -> None:
        if generation == self._link.generation and self._link.up and not self._closed:
            try:
                self._arrived(received, generation)
            except Exception:
                log.failure("spool: a delivery could not be handled")
        self._next(deliveries, generation)

    def _consumer_ended(self, failure: Failure, generation: int) -> None:
        if generation == self._link.generation and self._link.up and not self._closing:
            # The broker cancelled the consumer (its queue was deleted): start afresh.
            self._link.fail(generation, f"the consumer ended: {describe(failure)}")

    def _arrived(self, received: Any, generation: int) -> None:
        method, properties = received.method, received.properties
        redelivered = bool(method.redelivered)
        count = _delivery_count(properties.headers)
        if count is None and not redelivered:
            count = 0  # a first delivery
        delivery = _Delivery(generation, method.delivery_tag, properties.message_id, count,
                             redelivered, received.body, properties)
        try:
            delivery.state = StoredState.decode(properties.headers)
        except ValueError as error:
            reason = f"not an esmtpfa message: {error}"
            log.warn("spool: a message in {queue} is held: {reason}",
                     queue=self.topology.main, reason=reason)
            self._dispose(delivery, _Disposal(self.topology.held, foreign=reason))
            return
        state = delivery.state
        verdict, detail = self._memory.verdict(delivery.copy_id, delivery.redelivered,
                                               delivery.count)
        if verdict == _Recollection.HOLD:
            log.warn("spool: {message_id} held: {reason}", message_id=state.entry.id,
                     reason=detail, identity=state.entry.identity)
            self._dispose(delivery, _Disposal(self.topology.held, state.held(detail)))
            return
        if verdict == _Recollection.DROP:  # settled here; the ack was lost
            self._dispose(delivery, _Disposal(None))
            return
        if verdict == _Recollection.REPLAY:  # its outcome is known here: record it now
            self._dispose(delivery, detail)
            return
        if verdict == _Recollection.FOLLOW:
            attempt = self._claimed.get(delivery.key)
            if attempt is None:
                self._dispose(delivery, _Disposal(self.topology.held, state.held(REDELIVERED)))
            else:
                delivery.phase = _Delivery.FOLLOWING
                attempt.successor = delivery
            return
        self._memory.note(delivery.copy_id, _Recollection.RECEIVED, delivery.count)
        wait = (state.next_attempt - self._now()) if state.next_attempt is not None else 0.0
        if wait > DUE_SLACK:  # back from a retry queue shorter than its wait
            self._dispose(delivery, _Disposal(self.topology.retry_for(wait), state))
            return
        self._buffer.append(delivery)
        for wake in list(self._watchers):  # the runner claims it now, not at its next look
            wake()

    # -- claiming ---------------------------------------------------------------------

    def watch(self, callback: Callable[[], None]) -> None:
        """``callback()`` whenever the broker hands this consumer a message: it can be
        claimed at once (the runner's own poll would find it up to a second later)."""
        self._watchers.append(callback)

    def claim(self, limit: int, busy: frozenset = frozenset(), fill: bool = False,
              start: bool = False) -> defer.Deferred:
        """What the consumer has received, up to ``limit``, in arrival order, skipping
        ``busy`` identities (module docstring, "Fairness"), then with ``fill`` taking
        theirs for what is left.  While the broker is unreachable there is nothing to
        claim (``accepting`` says why).  ``start`` changes nothing: ``started`` writes
        nothing here."""
        if self._closing:
            return defer.succeed([])
        if not self._consuming:
            self._consuming = True
            if self._link.up:
                self._start_consumer()
        taken = self._take(limit, lambda identity: identity not in busy)
        if not taken and limit > 0 and self._buffer and self._window_full():
            # Every slot holds a message nobody may take now: one goes to the back.
            waiting = self._buffer.pop(0)
            self._dispose(waiting, _Disposal(self.topology.main, waiting.state))
        if fill and busy and len(taken) < limit:
            taken += self._take(limit - len(taken), busy.__contains__)
        return defer.succeed(taken)

    def _take(self, limit: int, eligible: Callable[[str], bool]) -> list[QueuedMessage]:
        taken: list[QueuedMessage] = []
        for delivery in list(self._buffer):
            if len(taken) >= limit:
                break
            if not eligible(delivery.stored.entry.identity):
                continue
            self._buffer.remove(delivery)
            delivery.phase = _Delivery.CLAIMED
            self._claimed[delivery.key] = delivery
            self._memory.note(delivery.copy_id, _Recollection.CLAIMED)
            taken.append(delivery.stored.queued(token=delivery))
        return taken

    def _window_full(self) -> bool:
        held_here = len(self._buffer) + len(self._claimed) + len(self._disposing)
        return held_here >= self.prefetch

    def content(self, message: QueuedMessage) -> defer.Deferred:
        return defer.succeed(BodyContent(_delivery_of(message).body))

    def _live(self, delivery: _Delivery) -> bool:
        return (not self._closing and self._link.up
                and delivery.generation == self._link.generation)

    def started(self, message: QueuedMessage, recipients: tuple[str, ...]) -> defer.Deferred:
        """Nothing to write (AMQP cannot mark a delivered message): the broker will
        redeliver it if this process dies, and a redelivered message is held.  Refused
        if the claim was lost with the connection: the broker has requeued the message,
        and another consumer may be attempting it."""
        delivery = _delivery_of(message)
        if delivery.phase != _Delivery.CLAIMED or not self._live(delivery):
            return defer.fail(SpoolError(
                SpoolErrorKind.UNAVAILABLE, Phase.START,
                f"{message.entry.id}: the broker connection was lost since it was claimed "
                f"(it went back to its queue): not sent"))
        delivery.started.update(recipients)
        self._memory.note(delivery.copy_id, _Recollection.STARTED)
        return defer.succeed(None)

    # -- settling ---------------------------------------------------------------------

    def settle(self, message: QueuedMessage, settlement: Settlement) -> defer.Deferred:
        """Retry: a new copy in the retry queue that fits ``retry_at``; hold: a new copy
        in the held queue; done: nothing.  Each published and confirmed first, then the
        delivery acked, so a crash in between leaves two entries, never none."""
        delivery = _delivery_of(message)
        if delivery.phase != _Delivery.CLAIMED:
            return defer.fail(SpoolError(SpoolErrorKind.CONFLICT, Phase.SETTLE,
                                         f"{message.entry.id} is not claimed"))
        try:
            state = delivery.stored.settled(settlement)
            state.encode()
        except ValueError as error:  # still claimed: close() holds it if it must
            return defer.fail(SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.SETTLE,
                                         str(error)))
        self._claimed.pop(delivery.key, None)
        if settlement.hold is not None:
            disposal = _Disposal(self.topology.held, state)
        elif settlement.retry_at is not None:
            disposal = _Disposal(self.topology.retry_for(settlement.retry_at - self._now()),
                                 state)
        else:
            disposal = _Disposal(None)
        # The redelivery that waits for this attempt, if the connection was lost.
        target = delivery.successor or delivery
        if target is not delivery:
            delivery.phase = _Delivery.DONE
        return self._dispose(target, disposal, Phase.SETTLE)

    def _dispose(self, delivery: _Delivery, disposal: _Disposal,
                 phase: str | None = None) -> defer.Deferred:
        """Carry ``disposal`` out for ``delivery``.  On failure, while the delivery is
        still ours, it is tried again a little later; ``phase`` set, the failure is
        also the caller's (``SpoolError``), else it is logged."""
        delivery.phase = _Delivery.DISPOSING
        self._disposing.add(delivery)
        self._memory.note(delivery.copy_id, _Recollection.OUTCOME, delivery.count, disposal)
        work = defer.ensureDeferred(self._carry_out(delivery, disposal))
        delivery.work = work

        def done(result: Any) -> Any:
            delivery.work = None
            if isinstance(result, Failure) and self._live(delivery) and \
                    delivery.phase == _Delivery.DISPOSING:
                self._again_later(delivery, disposal)
            else:
                self._disposing.discard(delivery)
            if not isinstance(result, Failure):
                return None
            detail = self.url.scrub(str(result.value) if result.check(
                _PublishFailed, _LinkError, ValueError) else describe(result))
            message_id = delivery.state.entry.id if delivery.state else delivery.copy_id
            if phase is None:
                log.warn("spool: {message_id}: moving it failed: {reason}",
                         message_id=message_id, reason=detail)
                return None
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, phase, f"{message_id}: {detail}")
        return work.addBoth(done)

    async def _carry_out(self, delivery: _Delivery, disposal: _Disposal) -> None:
        if disposal.queue is not None:
            if disposal.foreign is not None:
                await self._publish_foreign(disposal.queue, delivery, disposal.foreign)
            else:
                assert disposal.state is not None  # a disposal to a queue carries one
                await self._publish(disposal.queue, delivery.body, disposal.state)
            # The new copy is stored: the delivered one is a duplicate from here on.
            self._memory.note(delivery.copy_id, _Recollection.SETTLED)
        acked = self._link.ack(delivery.generation, delivery.tag)
        if acked:
            self._memory.note(delivery.copy_id, _Recollection.SETTLED)
        elif disposal.queue is None:
            raise _LinkError("the broker connection was lost before the outcome was "
                             "recorded: the message will come back redelivered")
        delivery.phase = _Delivery.DONE

    def _again_later(self, delivery: _Delivery, disposal: _Disposal) -> None:
        def retry() -> None:
            self._retries.pop(delivery, None)
            if self._live(delivery) and delivery.phase == _Delivery.DISPOSING:
                self._disposing.discard(delivery)
                self._dispose(delivery, disposal)
            else:
                self._disposing.discard(delivery)
        self._retries[delivery] = self._reactor.callLater(min(self._timeout, 2.0), retry)

    # -- stats ------------------------------------------------------------------------

    #: For ``--check-connect`` (``esmtpfa.common.probe``).
    probe_subject = "spool"

    def probe(self):
        """Its counts, once started (``probe_counts``)."""
        return probe_counts(self)

    def stats(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stats())

    async def _stats(self) -> SpoolStats:
        counts = await self.counts()
        queued = counts[self.topology.main] + sum(counts[q] for q in self.topology.retries)
        queued += len(self._buffer) + len(self._claimed) + len(
            [d for d in self._disposing if d.phase != _Delivery.DONE])
        return SpoolStats({MessageState.QUEUED: queued,
                           MessageState.HELD: counts[self.topology.held]},
                          None, None)  # not known on AMQP

    def counts(self) -> defer.Deferred:
        """Fires with ``{queue name: ready messages}`` (passive ``queue.declare``)."""
        return defer.ensureDeferred(self._counts())

    async def _counts(self) -> dict[str, int]:
        try:
            channel = await self._link.channel()
            try:
                counts = {}
                for name, _ in self.topology.declarations():
                    frame = await _within(channel.queue_declare(name, passive=True),
                                          self._timeout, self._reactor, "counting")
                    counts[name] = frame.method.message_count
                return counts
            finally:
                self._link.release(channel)
        except Exception as error:
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.ADMIN,
                             f"counting the queues failed: "
                             f"{self.url.scrub(describe(error))}") from None

    # -- closing ----------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        """Wait for the stores in flight; stop consuming; give back what was received
        and never started (a fresh copy, not a redelivery), hold what was started and
        never settled; then close the connection."""
        if self._closing:
            return
        self._closing = True
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        if self._stores:
            await defer.DeferredList([_settled(d) for d in self._stores])
        if self._link.up:
            # Deliveries keep arriving until the cancel-ok, and are buffered: every one
            # this process received is given back below, none left to be redelivered.
            await self._link.stop_consuming()
            ending = []
            for delivery in self._buffer:
                ending.append(self._end(delivery, _Disposal(self.topology.main,
                                                            delivery.state)))
            self._buffer.clear()
            for delivery in list(self._claimed.values()):
                target = delivery.successor or delivery
                if delivery.started:
                    disposal = _Disposal(self.topology.held,
                                         delivery.stored.held(STOPPED, delivery.started))
                else:
                    disposal = _Disposal(self.topology.main, delivery.state)
                ending.append(self._end(target, disposal))
            self._claimed.clear()
            ending += [_settled(d.work) for d in self._disposing if d.work is not None]
            if ending:
                await defer.DeferredList(ending, consumeErrors=True)
        self._closed = True
        await self._link.close()

    def _end(self, delivery: _Delivery, disposal: _Disposal) -> defer.Deferred:
        if not self._link.up or delivery.generation != self._link.generation:
            return defer.succeed(None)  # requeued by the broker already
        delivery.phase = _Delivery.DISPOSING
        self._disposing.add(delivery)
        work = defer.ensureDeferred(self._carry_out(delivery, disposal))
        return work.addBoth(lambda _: self._disposing.discard(delivery))

    # -- the queue tool ---------------------------------------------------------------

    def _tool(self, operation: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run one queue-tool operation, one at a time, on a channel of its own."""
        async def run() -> Any:
            try:
                channel = await self._link.channel()
            except _LinkError as error:
                raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.ADMIN,
                                 f"the broker is unreachable ({error})") from None
            browser = _Browser(self._link, channel, self._reactor, self._timeout)
            try:
                return await operation(browser, *args)
            except SpoolError:
                raise
            except Exception as error:
                detail = str(error) if isinstance(error, (_PublishFailed, _LinkError)) \
                    else describe(error)
                raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.ADMIN,
                                 self.url.scrub(detail)) from None
            finally:
                await browser.close()
        return self._admin.run(lambda: defer.ensureDeferred(run()))

    @property
    def _browsable(self) -> tuple[str, ...]:
        return (self.topology.held, *self.topology.retries)

    def list(self) -> defer.Deferred:
        """Held messages and those waiting in retry queues, oldest first (the ones due
        now are only counted: ``counts``)."""
        async def listing(browser: _Browser) -> list[QueueSummary]:
            found = []
            for queue in self._browsable:
                while (item := await browser.next(queue)) is not None:
                    found.append(item.summary(queue == self.topology.held))
            return sorted(found, key=lambda s: s.received)
        return self._tool(listing)

    async def _find(self, browser: _Browser, message_id: str, queues: tuple[str, ...],
                    every: bool = False) -> builtins.list[_Browsed]:
        """The copies of ``message_id`` in ``queues`` (the first one, unless ``every``)."""
        found = []
        for queue in queues:
            while (item := await browser.next(queue)) is not None:
                if item.id != message_id:
                    continue
                found.append(item)
                if not every:
                    return found
        return found

    def _not_found(self, message_id: str) -> SpoolError:
        return SpoolError(SpoolErrorKind.NOT_FOUND, Phase.ADMIN,
                          f"no held or waiting message {message_id} (on AMQP a message "
                          f"due now, in {self.topology.main}, cannot be reached: it may "
                          f"be being delivered)")

    def show(self, message_id: str) -> defer.Deferred:
        async def showing(browser: _Browser) -> tuple[QueueSummary, bytes]:
            found = await self._find(browser, message_id, self._browsable)
            if not found:
                raise self._not_found(message_id)
            from esmtpfa.spool.dsn import original_headers
            item = found[0]
            return (item.summary(item.queue == self.topology.held),
                    original_headers(iter((item.body,))))
        return self._tool(showing)

    def flush(self) -> defer.Deferred:
        """Every waiting message to the main queue, due now; fires with how many."""
        async def flushing(browser: _Browser) -> int:
            moved = 0
            for queue in self.topology.retries:
                while (item := await browser.next(queue)) is not None:
                    await self._move(browser, item, self.topology.main,
                                     item.state.due_now() if item.state else None)
                    moved += 1
            return moved
        return self._tool(flushing)

    def hold(self, message_id: str, reason: str = "held by an operator") -> defer.Deferred:
        """A waiting message to the held queue (one due now cannot be reached)."""
        async def holding(browser: _Browser) -> None:
            found = await self._find(browser, message_id, self.topology.retries)
            if not found:
                if await self._find(browser, message_id, (self.topology.held,)):
                    raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                                     f"{message_id} is held already")
                raise self._not_found(message_id)
            item = found[0]
            state = item.state.held(reason, unknown=set()) if item.state else None
            await self._move(browser, item, self.topology.held, state)
        return self._tool(holding)

    def release(self, message_id: str) -> defer.Deferred:
        return self._tool(self._requeue_one, message_id, False)

    def requeue(self, message_id: str | None = None) -> defer.Deferred:
        """One held or waiting message, or every one, to the main queue: due now,
        attempts from zero, lifetime anew.  Messages due now are left as they are."""
        if message_id is not None:
            return self._tool(self._requeue_one, message_id, True)

        async def requeue_all(browser: _Browser) -> int:
            moved = 0
            for queue in self._browsable:
                while (item := await browser.next(queue)) is not None:
                    if item.state is None:
                        continue  # a foreign message stays held
                    await self._move(browser, item, self.topology.main,
                                     item.state.released(self._now(), reset_attempts=True))
                    moved += 1
            return moved
        return self._tool(requeue_all)

    async def _requeue_one(self, browser: _Browser, message_id: str, reset: bool) -> int:
        """``release`` (a held message; ``reset`` False) or ``requeue`` with an id (a
        held or waiting one, attempts from zero)."""
        queues = self._browsable if reset else (self.topology.held,)
        found = await self._find(browser, message_id, queues)
        if not found:
            if not reset and await self._find(browser, message_id, self.topology.retries):
                raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                                 f"{message_id} is queued, not held")
            raise self._not_found(message_id)
        item = found[0]
        if item.state is None:
            raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                             f"{message_id} is not an esmtpfa message: it can only be "
                             f"deleted")
        await self._move(browser, item, self.topology.main,
                         item.state.released(self._now(), reset_attempts=reset))
        return 1

    def delete(self, message_id: str) -> defer.Deferred:
        """Every held or waiting copy of ``message_id`` is forgotten."""
        async def deleting(browser: _Browser) -> None:
            found = await self._find(browser, message_id, self._browsable, every=True)
            if not found:
                raise self._not_found(message_id)
            for item in found:
                browser.ack(item)
        return self._tool(deleting)

    async def _move(self, browser: _Browser, item: _Browsed, queue: str,
                    state: StoredState | None) -> None:
        """A new copy in ``queue`` (confirmed), then the old one acked."""
        if state is None:
            properties = item.properties
            await self._link.publish(queue, item.body, pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type=properties.content_type, message_id=properties.message_id,
                timestamp=properties.timestamp, headers=properties.headers))
        else:
            await self._publish(queue, item.body, state)
        browser.ack(item)


def _passing(function: Callable[[Any], Any], argument: Any) -> Callable[[Any], Any]:
    """A callback that calls ``function(argument)`` and passes the result on."""
    def callback(result: Any) -> Any:
        function(argument)
        return result
    return callback


def _settled(d: defer.Deferred) -> defer.Deferred:
    """Fires (with None) when ``d`` has, without taking its result from its owner."""
    signal: defer.Deferred = defer.Deferred()

    def passing(result: Any) -> Any:
        signal.callback(None)
        return result
    d.addBoth(passing)
    return signal


def _read_all(chunks: Iterator[bytes], limit: int) -> bytes | None:
    """The content, read in a thread; None past ``limit`` octets (read no further)."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


__all__ = ["AMQPSpool", "AMQPURL", "BodyContent", "DEFAULT_RETRY_DELAYS", "REDELIVERED",
           "STOPPED", "StoredState", "Topology"]
