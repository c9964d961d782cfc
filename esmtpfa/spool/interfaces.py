"""The seam between the delivery modes, the queue runner and a spool backend.

A backend keeps two things for each queued message: its content, exactly the octets the
upstream is to receive (our Received header included, CRLF line ends, no dot-stuffing),
and its state: the envelope, who sent it, and for every recipient whether it is still
pending, delivered, failed or in an unknown state (docs/spool.md, "States").

The durability rule is the whole point (docs/spool.md, "The guarantee"): ``store`` fires
only once the message is on stable storage (fsync'd file and directory plus a committed
index, or a broker's publisher confirm), and ``started`` fires only once the backend has
recorded that the final dot may leave for these recipients.  A recipient recorded as
started whose outcome was never recorded (the process died) is never sent again by the
relay on its own: it is held for an operator.

Backends are driven from the reactor thread and answer with Deferreds; the blocking work
(files, SQLite, a broker's I/O) is theirs to keep off the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esmtpfa.common.message import Envelope
from esmtpfa.common.probe import ProbeResult
from esmtpfa.common.replies import Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class Mode:
    """How a message is delivered (``--delivery-mode``, per provider in its policy)."""

    #: The client's 250 means the upstream accepted the message (no spool).
    PASSTHROUGH = "passthrough"
    #: As passthrough; a failure known to come before the final dot spools the message.
    FALLBACK = "fallback"
    #: The client's 250 means the message is durably stored; delivered in the background.
    SPOOL = "spool"

    ALL = (PASSTHROUGH, FALLBACK, SPOOL)


class Ending:
    """What ends a message that cannot be delivered (a 5xx, or the end of its lifetime)."""

    #: An RFC 3464 delivery status notification to the envelope sender (``dsn``).
    BOUNCE = "bounce"
    #: The message is kept, held, until an operator releases or deletes it.
    HOLD = "hold"

    ALL = (BOUNCE, HOLD)


class RecipientState:
    PENDING = "pending"      #: still to be delivered (retried at ``next_attempt``)
    STARTED = "started"      #: the final dot may have left for it: outcome not yet known
    DELIVERED = "delivered"  #: the upstream accepted it (never sent again)
    FAILED = "failed"        #: permanently refused, or expired (bounced or held)
    UNKNOWN = "unknown"      #: the dot left and no verdict was recorded: held

    ALL = (PENDING, STARTED, DELIVERED, FAILED, UNKNOWN)


class MessageState:
    QUEUED = "queued"  #: waiting for its next attempt, or being attempted
    HELD = "held"      #: kept for an operator; never attempted until released

    ALL = (QUEUED, HELD)


class SpoolErrorKind:
    #: The size cap or the free-disk floor is reached: ``452 4.3.1``.
    FULL = "full"
    #: The storage itself failed (I/O error, broker down or unconfirmed): ``451 4.3.0``.
    UNAVAILABLE = "unavailable"
    #: No such message (the queue tool's commands).
    NOT_FOUND = "not-found"
    #: The request does not fit the message's state (release a queued one, …).
    CONFLICT = "conflict"


class Phase:
    """Which spool operation failed."""

    STORE = "store"
    CLAIM = "claim"
    START = "start"
    SETTLE = "settle"
    ADMIN = "admin"
    OPEN = "open"


class QueuedReply(Reply):
    """The final reply when the spool took the message (``250 2.0.0 Queued as <id>``):
    the client is told this text rather than "accepted", so it knows the message is
    stored, not yet delivered."""


INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
STORAGE_FAILED = Reply(451, "4.3.0", "The message could not be stored, try again later")


class SpoolError(Exception):
    """One error type for every spool failure, raised where it happens: its ``kind``
    (``SpoolErrorKind``) and ``phase`` (``Phase``) say what failed; ``reply`` is what
    an SMTP client hears when it happened while accepting a message.  The text never
    holds a credential (a broker URL is redacted before it gets here)."""

    def __init__(self, kind: str, phase: str, detail: str):
        super().__init__(f"spool {phase}: {detail}")
        self.kind = kind
        self.phase = phase
        self.detail = detail

    @property
    def reply(self) -> Reply:
        return INSUFFICIENT_STORAGE if self.kind == SpoolErrorKind.FULL else STORAGE_FAILED


@dataclass(frozen=True)
class SpoolEntry:
    """What is stored with the content when a message is accepted into the spool."""

    #: The message id the client was told (``urn:uuid:…``); the queue's key.
    id: str
    #: The envelope; its recipients are the ones the message is for.
    envelope: Envelope
    #: ``provider/user`` (or ``anonymous``): logs, fairness between identities.
    identity: str
    #: ``Ending.BOUNCE`` or ``Ending.HOLD``, chosen by the identity's policy at acceptance.
    ending: str
    #: Wall-clock time (``time.time()``) of acceptance: the lifetime counts from here.
    received: float
    #: Octets of content (as stored).
    size: int
    #: The connection it came in on (logs).
    connection_id: str = ""

    @property
    def is_bounce(self) -> bool:
        """A message with the null sender (a bounce, ours or a client's) is never
        bounced itself (RFC 3464 §2, RFC 5321 §4.5.5): it is held instead."""
        return self.envelope.mail_from == ""


@dataclass(frozen=True)
class Recipient:
    address: str
    state: str = RecipientState.PENDING
    #: The last reply about it (the upstream's line, or ours), for logs and bounces.
    reply: str = ""


@dataclass
class QueuedMessage:
    """A message handed out by ``ISpool.claim``: this process owns it until ``settle``.

    ``token`` is the backend's own handle (a claim id, an AMQP delivery tag)."""

    entry: SpoolEntry
    recipients: tuple[Recipient, ...]
    attempts: int
    #: Wall-clock time the lifetime counts from: acceptance, or the last release/requeue.
    lifetime_start: float
    token: object = field(default=None, compare=False, repr=False)

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.state == RecipientState.PENDING)


@dataclass(frozen=True)
class Settlement:
    """The outcome of one delivery attempt, as the backend records it in one step.

    ``recipients`` holds the new state of every recipient the attempt changed.  Then one
    of: ``retry_at`` (wall-clock time of the next attempt: some recipient is still
    pending), ``hold`` (a reason: the message is held for an operator), or neither (the
    message is finished: every recipient delivered or failed, and the backend forgets it).
    """

    recipients: tuple[Recipient, ...] = ()
    retry_at: float | None = None
    hold: str | None = None


@dataclass(frozen=True)
class QueueSummary:
    """One queued message as the queue tool lists it."""

    id: str
    state: str
    sender: str
    recipients: tuple[Recipient, ...]
    identity: str
    size: int
    received: float
    attempts: int
    next_attempt: float | None
    hold_reason: str | None
    last_reply: str | None


@dataclass(frozen=True)
class SpoolStats:
    """For the metrics: counts by ``MessageState``, bytes, and the oldest message
    (None where a backend cannot say it cheaply: a broker's queues)."""

    messages: dict[str, int]
    bytes: int | None
    oldest_received: float | None


def probe_counts(spool: "ISpool") -> "Deferred[ProbeResult]":
    """A started spool's ``probe()``: its counts, read as the metrics read them (the
    file spool's database, or the broker's queues), in one line."""
    def counted(stats: SpoolStats) -> ProbeResult:
        held = stats.messages.get("held", 0)
        return ProbeResult.passed(
            f"{spool.description}: {stats.messages.get('queued', 0)} queued, {held} held"
            + (" (esmtpfa-queue list)" if held else ""))
    return spool.stats().addCallbacks(counted, ProbeResult.from_failure)


class IContent(Interface):
    """Stored content, read back for delivery (the interface ``message.MessageSpool``
    offers, so an ``OutboundMessage`` can carry it)."""

    size = Attribute("int: octets")

    def read_from(offset: int = 0, chunk_size: int = 65536) -> Iterator[bytes]:
        """Chunks from ``offset`` on; blocking file reads: called in a thread or for
        content small enough to read at once."""

    def close() -> None:
        """Release the file (or buffer)."""


class ISpool(Interface):
    """A durable queue of messages (docs/spool.md)."""

    description = Attribute("str: where the spool is, without credentials (startup log)")

    def start() -> "Deferred":
        """Open the storage (create it when missing); fails with ``SpoolError``."""

    def store(entry: SpoolEntry, chunks: Iterator[bytes], claim: bool = False
              ) -> "Deferred":
        """Keep a message: fires only once content and state are on stable storage;
        fails with ``SpoolError`` (``FULL``: refuse with 452 4.3.1).  ``chunks`` is read
        in the backend's own thread.

        With ``claim`` (this process's runner has a free attempt for it), the backend
        may store the message already claimed by this process and fire with its
        ``QueuedMessage``, as ``claim`` would hand it out: the runner starts it without
        looking for it.  Otherwise, and always without ``claim``, it fires with None."""

    def accepting() -> "SpoolError | None":
        """None when ``store`` can take a message now; else why not, as the error a
        store would fail with (``FULL``: the size cap or the free-disk floor;
        ``UNAVAILABLE``: closed, or the broker is not connected).  Cheap and
        synchronous: readiness asks it, and MAIL is refused with its reply."""

    def claim(limit: int, busy: frozenset = frozenset(), fill: bool = False,
              start: bool = False) -> "Deferred":
        """Up to ``limit`` queued messages whose next attempt is due, oldest due first,
        none of an identity in ``busy`` (with ``fill``, what no other identity takes
        then goes to theirs, in the same claim); fires with a list of
        ``QueuedMessage``.  A claimed message is attempted by no other process until it
        is settled or its owner dies.

        With ``start`` the claim also records, durably and before it fires, what
        ``started`` would for each message's pending recipients: for a caller that
        attempts what it claims, so that no attempt waits for the disk between its
        claim and the upstream, and its ``started`` then writes nothing.  A crash before
        the attempt leaves those recipients ``UNKNOWN`` (held) as a crash after
        ``started`` would; ``close`` makes the claims whose ``started`` never came due
        again.  A backend whose ``started`` writes nothing ignores it."""

    def watch(callback) -> None:
        """Call ``callback()`` (no arguments) when messages may have become claimable
        without this process storing them (a broker delivered one to this consumer), so
        the runner claims them at once; a backend with nothing to tell ignores it."""

    def content(message: QueuedMessage) -> "Deferred":
        """Fires with the ``IContent`` of a claimed message."""

    def started(message: QueuedMessage, recipients: tuple[str, ...]) -> "Deferred":
        """Record (durably) that the final dot may now leave for ``recipients``; fires
        once recorded.  Until a settlement says otherwise they are ``STARTED``, and a
        crash leaves them ``UNKNOWN``: held, never retried on our own."""

    def settle(message: QueuedMessage, settlement: Settlement) -> "Deferred":
        """Record the attempt's outcome durably and release the claim."""

    def stats() -> "Deferred":
        """Fires with ``SpoolStats``."""

    def close() -> "Deferred":
        """Stop: wait for the storage work in flight, release claims, close files."""


class IQueueAdmin(Interface):
    """What the queue tool (``esmtpfa-queue``) does, for every backend, also while the
    relay runs.  Each fails with ``SpoolError`` (``NOT_FOUND``, ``CONFLICT``)."""

    def list() -> "Deferred":
        """Fires with every message as a ``QueueSummary``, oldest first."""

    def show(message_id: str) -> "Deferred":
        """Fires with ``(QueueSummary, headers: bytes)``."""

    def flush() -> "Deferred":
        """Every queued (not held) message is due now; fires with how many."""

    def hold(message_id: str, reason: str = "held by an operator") -> "Deferred":
        """Hold a queued message."""

    def release(message_id: str) -> "Deferred":
        """A held message is queued again and due now, its lifetime starting again:
        every recipient not delivered becomes ``PENDING`` (for ``UNKNOWN`` ones the
        operator checked the upstream's log; a ``FAILED`` one is tried once more)."""

    def delete(message_id: str) -> "Deferred":
        """Forget a message (queued or held)."""

    def requeue(message_id: str | None = None) -> "Deferred":
        """One message (or, with None, every message, queued or held) is queued again,
        due now, its attempts counted from zero and its lifetime starting again; held
        ones are released as by ``release``.  Fires with how many."""
