"""Delivery to the upstream smarthosts: per-recipient transactions, pooling and failover.

``SMTPRelay`` is the ``IRelay`` toward one or more upstreams (``--relay-addr a,b:587``,
tried in order).  Each upstream has a pool of negotiated sessions and a circuit breaker
(``pool.py``).  ``begin`` (at the client's MAIL) gives an ``UpstreamTransaction`` that
sends MAIL with the first RCPT and each further RCPT as the client names it, so every
client RCPT is answered with the upstream's verdict for that recipient; ``send`` (at the
client's final dot) sends DATA and the spooled content, and the client's reply is the
upstream's.  The SMTP server and the HTTP API both come this way: there is one path
(docs/delivery-guarantee.md, "One path").

The transaction's state.  An ``UpstreamTransaction`` is in one ``State`` at a time, and
moves only along ``_MOVES``: NEW (no upstream transaction) → OPENING (MAIL and the first
RCPT look for an upstream) → OPEN (MAIL accepted on the session it holds) → SENDING (the
client's final dot came: DATA, the content, the final reply) → DONE; or FAILED (a
verdict that answers every later operation: MAIL refused, the transaction could not be
resumed), or ABORTED (the client gave up, or the operation's deadline passed).  Each
of those is a decision made once, in ``_move``; a move the table lacks is a bug and
raises ``IllegalMove``.  Where the final dot is (``Phase``) is the protocol's to know,
not a state here: it stamps its errors with it.

Ownership.  A session is taken from its pool as a ``Lease`` and has one owner at a time:
the search over upstreams while an attempt runs, then the transaction
(docs/delivery-guarantee.md, "One owner per session").  Attempts never give a session
back; the owner releases it once, reusable only when the failure (if any) left the
connection in sync (``Kind.BROKEN`` says which do not).

Failover.  ``Failover`` is the search over the upstreams, a collaborator of the relay
with a small API (``search``, ``verdict``, ``report``).  Failures are ``RelayError``
values with a kind and a phase, stated where they happened (``errors.py``), and every
decision is made from those (docs/delivery-guarantee.md, "Before the final dot: try
elsewhere"):

* ``Phase.OUTCOME_UNKNOWN`` (anything that broke after the final dot left) ends
  everything: the message is never sent again by us, to this upstream or another; the
  client hears ``451`` with "a duplicate is possible" and decides
  (docs/delivery-guarantee.md, "After the final dot: never again by our hand").
* the upstream's own ``5xx`` to MAIL or to the end of data is final; a ``4xx`` (or a
  broken connection, a capability it lacks) before the dot moves on to the next upstream;
  a ``4xx`` to a RCPT is that recipient's verdict and goes to the client as it is.
* ``Kind.EXPIRED``: the operation's deadline passed (``PoolSettings.rcpt_deadline`` and
  ``data_deadline``, inside RFC 5321 §4.5.3.2's client timeouts); the client is answered
  at once and nothing more is tried (docs/delivery-guarantee.md, "Deadlines inside the
  client's patience").

Replay.  A pooled connection can die between the client's MAIL and its final dot (the
upstream restarted, timed out an idle client, or closed during DATA).  The transaction
then opens a new one (on the other upstreams first, then the same one) and replays MAIL
and every accepted RCPT in one flight.  If any recipient the client was told ``250`` for
is not accepted again, the rest of the transaction is answered ``451``; a ``250`` for a
message some acknowledged recipient would not receive is never given.

Fair use.  A transaction holds a pooled session from its first RCPT to its final reply,
so each holds a ``ShareTicket`` too: one client address or identity holds at most
``PoolSettings.client_cap`` sessions at once (docs/delivery-guarantee.md, "Fair use of
the upstream connections").
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar, cast

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    succeed,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.breaker import OPEN
from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope, OutboundMessage, has_bare_line_ends
from esmtpfa.common.observers import notify
from esmtpfa.common.probe import IProbeGroup
from esmtpfa.common.replies import Reply
from esmtpfa.common.resources import Resources
from esmtpfa.common.timeouts import Sweeper
from esmtpfa.relay.errors import permanent, policy, protocol_violation, rejected, unavailable
from esmtpfa.relay.interfaces import IRelay, IRelayTransaction, Kind, Phase, RelayError
from esmtpfa.relay.oauth2 import TokenBrokers
from esmtpfa.relay.pool import ClientShares, Lease, ShareTicket, Upstream
from esmtpfa.relay.session import QUIT_TIMEOUT, UpstreamSession, eight_bit_unsupported
from esmtpfa.relay.settings import (
    STARTTLS_MODES,
    PoolSettings,
    UpstreamSettings,
    parse_upstream_addresses,
)
from esmtpfa.relay.tls import client_tls_options

__all__ = ["SMTPRelay", "UpstreamTransaction", "State", "Failover", "UpstreamSettings",
           "PoolSettings", "STARTTLS_MODES", "QUIT_TIMEOUT", "parse_upstream_addresses",
           "UpstreamSession"]

log = logger("esmtpfa.relay.upstream")

T = TypeVar("T")

SHUTTING_DOWN = Reply(451, "4.3.2", "Relay shutting down, try again later")


def _ends_search(error: RelayError) -> bool:
    """After these no other upstream or connection is asked."""
    return error.outcome_unknown or error.kind == Kind.EXPIRED or error.upstream_verdict


def _only_unknown_ends_search(error: RelayError) -> bool:
    """A replay moves on even after a 5xx: the transaction stays the client's."""
    return error.outcome_unknown or error.kind == Kind.EXPIRED


def _nobody(lease: Lease | None) -> None:
    pass


@implementer(IRelay, IProbeGroup)
class SMTPRelay:
    """IRelay to one or more upstream smarthosts, tried in order, with pooled sessions.

    From ``resources``: the reactor (connections, deadlines) and the threads that scan
    a large message (8-bit, BDAT) off the reactor.
    """

    def __init__(self, settings: UpstreamSettings | Sequence[UpstreamSettings], *,
                 resources: Resources, pool: PoolSettings | None = None,
                 tokens: TokenBrokers | None = None):
        reactor = resources.reactor
        self.resources = resources
        all_settings = [settings] if isinstance(settings, UpstreamSettings) else list(settings)
        if not all_settings:
            raise ValueError("no upstream configured")
        self._reactor = reactor
        self.pool_settings = pool or PoolSettings()
        sasl_cache: dict = {}
        #: The token brokers of the upstreams that log in with OAuth2 (docs/oauth2.md),
        #: made by the caller with their HTTP client; ``close`` stops them.
        self.tokens = tokens if tokens is not None else TokenBrokers()
        self.upstreams = [
            Upstream(s, self.pool_settings, reactor, client_tls_options(
                s.tls_server_name, s.ca_cert, s.client_cert, s.client_key, s.skip_verify)
                if s.uses_tls else None, sasl_cache, self.tokens.get(s.address))
            for s in all_settings]
        self.shares = ClientShares(self.pool_settings.client_cap, self.pool_settings.size)
        #: The search over the upstreams, shared by every transaction.
        self.failover = Failover(self.upstreams)
        #: Called with every ``RelayError`` of every attempt (metrics: failures by reason);
        #: the failover's own list, which reports them.
        self.observers: list[Callable[[RelayError], None]] = self.failover.observers
        # per-operation deadlines of minutes, for operations that take milliseconds
        self.deadlines = Sweeper(reactor, UpstreamTransaction.deadline_passed)
        #: The operations whose callers wait for an answer: ``close`` waits for them.
        self.in_flight = InFlight()
        #: The reactor time of the last message an upstream accepted (readiness).
        self.last_accepted: float | None = None
        self._closed = False
        for s in all_settings:
            if s.authenticates and not s.uses_tls and not s.allow_insecure_auth:
                log.warn("relay {upstream}: credentials are set but TLS is off and insecure "
                         "AUTH is not allowed: every delivery will fail with 451 4.3.0",
                         upstream=s.address)

    @property
    def reactor(self) -> Any:
        return self._reactor

    def probes(self) -> list[Upstream]:
        """Each upstream, in failover order (``--check-connect``)."""
        return list(self.upstreams)

    @property
    def settings(self) -> UpstreamSettings:
        """The first (preferred) upstream's settings."""
        return self.upstreams[0].settings

    @property
    def description(self) -> str:
        parts = []
        for upstream in self.upstreams:
            s = upstream.settings
            tls = "implicit TLS" if s.implicit_tls else f"STARTTLS {s.starttls}"
            auth = ""
            if s.authenticates:
                auth = f", AUTH {s.auth_mechanism or 'strongest offered'} as {s.username}"
            verify = ", certificate NOT verified" if s.uses_tls and s.skip_verify else ""
            parts.append(f"{s.address} ({tls}{verify}{auth})")
        p = self.pool_settings
        failover = "; failover in this order" if len(parts) > 1 else ""
        return (f"SMTP relay {', '.join(parts)}{failover}; up to {p.size} pooled "
                f"connection(s) per upstream, {p.client_cap} per client, idle "
                f"{p.idle_timeout:g} s")

    def readiness(self) -> tuple[bool | None, str]:
        """Whether a session can be had now, from what the pools and breakers know.

        ``(False, why)`` when every upstream's breaker is open or every pool is full with
        messages waiting; ``(True, why)`` when a session is open or was just used;
        ``(None, why)`` when nothing is known yet (no session was ever needed).
        """
        if all(u.breaker.open_now() for u in self.upstreams):
            return False, "circuit breaker open for " + ", ".join(
                u.address for u in self.upstreams)
        tokens = [(u, u.tokens.readiness()) for u in self.upstreams if u.tokens is not None]
        failing = [(u, detail) for u, (ok, detail) in tokens if ok is False]
        if failing and len(failing) == len(self.upstreams):
            return False, "; ".join(f"{u.address}: {detail}" for u, detail in failing)
        if all(u.pool.exhausted for u in self.upstreams):
            return False, "every upstream connection is busy and messages are waiting"
        live = sum(u.pool.total for u in self.upstreams)
        if live:
            return True, f"{live} upstream connection(s) open"
        recent = self.last_accepted is not None and \
            self._reactor.seconds() - self.last_accepted < self.pool_settings.idle_timeout * 4
        if recent:
            return True, "an upstream accepted a message recently"
        if any(u.breaker.state != OPEN and u.breaker.consecutive for u in self.upstreams):
            return None, "the last connection attempt failed"
        return None, "no upstream connection open"

    # -- IRelay ----------------------------------------------------------------------------

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred["UpstreamTransaction"]:
        """The upstream transaction; MAIL goes out with the first RCPT (one flight).

        ``client`` names who the message is for fair use (its address and identity);
        ``paced``: the relay itself paces the content (``ClientShares``).
        Refused at once only when the answer is already known: every upstream is behind
        an open circuit breaker, or the declared size exceeds every upstream's limit.
        """
        if self._closed:
            return fail(_closing())
        if all(u.breaker.open_now() for u in self.upstreams):
            names = ", ".join(u.address for u in self.upstreams)
            # BUSY: no upstream was tried, so the message learnt nothing (a spooled one
            # is tried again soon, without backing off: docs/spool.md).
            return fail(unavailable("4.4.1", "No upstream server available, try again later",
                                    f"circuit breaker open for {names}", "MAIL",
                                    upstream=self.upstreams[0].address, kind=Kind.BUSY))
        size = envelope.declared_size
        limits = [u.known_max_size or 0 for u in self.upstreams]
        if size is not None and all(limits) and size > max(limits):  # 0: not known (yet)
            return fail(permanent(552, "5.3.4", f"Message too big for the upstream server "
                                  f"({size} > {max(limits)} octets)", "MAIL",
                                  self.upstreams[0].address))
        return succeed(UpstreamTransaction(self, envelope, message_id, connection_id,
                                           client, paced))

    def close(self) -> Deferred[None]:
        """Refuse new work; fire once every transaction in progress and every QUIT ended."""
        self._closed = True
        for upstream in self.upstreams:
            upstream.pool.close()  # idle sessions QUIT now, busy ones when released
        def closed(_: Any) -> None:
            self.deadlines.close()
        return self.in_flight.idle().addCallback(lambda _: DeferredList(
            [u.pool.close() for u in self.upstreams] + [self.tokens.stop()])
        ).addCallback(closed)


class InFlight:
    """The operations whose callers wait for an answer (``SMTPRelay.close`` waits)."""

    __slots__ = ("_operations", "_waiters")

    def __init__(self) -> None:
        self._operations: set[object] = set()
        self._waiters: list[Deferred[None]] = []

    def track(self, operation: object) -> None:
        """An operation is in progress: ``idle`` waits for it (``settled``)."""
        self._operations.add(operation)

    def settled(self, operation: object) -> None:
        """The operation's caller got its answer."""
        self._operations.discard(operation)
        if not self._operations:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires once no operation is in progress (at once when none is)."""
        waiter: Deferred[None] = Deferred()
        if self._operations:
            self._waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter


class Failover:
    """The search over the upstreams: which one takes an attempt, and what the client
    hears when none does (the module doc, "Failover"; docs/delivery-guarantee.md,
    "Before the final dot: try elsewhere").

    ``search`` runs an attempt on the first upstream that takes it; ``verdict`` is the
    answer when none did; ``report`` records one failed attempt (a log line, and the
    ``observers``: metrics of failures by reason).  The decisions are made from each
    error's ``Kind`` and ``Phase`` only, never from reply texts.
    """

    def __init__(self, upstreams: Sequence[Upstream]):
        self.upstreams = upstreams  # the relay's own list, in its order of preference
        #: Called with every ``RelayError`` reported.
        self.observers: list[Callable[[RelayError], None]] = []

    def search(self, attempt: Callable[[Upstream, UpstreamSession], Awaitable[T]],
               message_id: str, *, exclude: Sequence[Upstream] = (), fresh: bool = False,
               last: Upstream | None = None,
               ends_search: Callable[[RelayError], bool] = _ends_search,
               trying: Callable[[Lease | None], None] = _nobody
               ) -> Deferred[tuple[Lease, T]]:
        """Run ``attempt`` on a session of the first upstream that can take it.

        Fires with the lease (the caller owns the session from then on) and the attempt's
        result.  ``attempt`` (a Deferred, or a coroutine) fails with ``RelayError``; the
        search, the lease's only owner while the attempt runs, releases the session,
        reusable unless the failure broke it.  A pooled session that was already dead is
        replaced by a fresh one on the same upstream; other failures move on to the next
        upstream unless ``ends_search``.  ``last`` (the upstream that just failed us) is
        asked after the others, ``exclude`` not at all, and ``fresh`` skips idle
        sessions.  ``trying`` is told which lease an attempt runs on (and None after),
        so a deadline can drop that connection.  Fails with the ``RelayError`` that ends
        the search, or ``verdict``.
        """
        order = self.upstreams
        if last is not None:  # the one that just failed us: the others first
            order = [u for u in order if u is not last] + [last]
        return _Search(self, attempt, message_id, order, exclude, fresh, ends_search,
                       trying).next_upstream()

    def verdict(self, errors: list[RelayError], skipped: list[Upstream]) -> RelayError:
        """No upstream took it: permanent only when every upstream said so; else the
        most telling 4xx."""
        transient = [e for e in errors if e.transient]
        if errors and not transient and not skipped:
            return errors[0]
        told = [e for e in transient if e.kind == Kind.REJECTED]
        if told:
            return told[0]  # an upstream's own 4xx: its words are the best explanation
        if transient:
            if len(self.upstreams) == 1:
                return transient[0]
            details = "; ".join(e.describe() for e in transient)
            return unavailable("4.4.1", "No upstream server available, try again later",
                               details, transient[0].command, transient[0].upstream_reply,
                               kind=transient[0].kind)
        names = ", ".join(u.address for u in skipped)
        return unavailable("4.4.1", "No upstream server available, try again later",
                           f"skipped while their circuit breaker is open: {names}",
                           "connect", upstream=skipped[0].address if skipped else None,
                           kind=Kind.BUSY)

    def report(self, error: RelayError, message_id: str) -> None:
        """One failed attempt (or a refusal): the log line, then every observer."""
        log.info("relay attempt failed: message={message_id} {description}",
                 message_id=message_id, description=error.describe(),
                 upstream=error.upstream, command=error.command, reason=error.reason,
                 kind=error.kind, phase=error.phase, permanent=error.permanent,
                 upstream_reply=str(error.upstream_reply) if error.upstream_reply else None)
        for observer in list(self.observers):
            notify(observer, error)


def _log_outcome(message_id: str, connection_id: str, outcome: str, reply: Reply,
                 error: RelayError | None, upstream: str | None = None,
                 tls: bool | None = None, debug: bool = False) -> None:
    """The line that says how a transaction ended (accepted or failed)."""
    (log.debug if debug else log.info)(
        "relay {outcome}: message={message_id} connection={connection_id} "
        "upstream={upstream} tls={tls} reply={reply}{detail}",
        outcome=outcome, message_id=message_id, connection_id=connection_id,
        upstream=upstream or (error.upstream if error else None), tls=tls,
        reply=str(reply), upstream_reply=str(error.upstream_reply) if error and
        error.upstream_reply else None,
        detail=f" ({error.describe()})" if error else "",
        reason=error.reason if error else None)


class _Search:
    """One search over the upstreams (``Failover.search``) as one chain of callbacks.

    It runs for every message (the first RCPT opens the upstream transaction through
    it), so it is not a coroutine: with an idle pooled session at hand, the lease and
    the attempt are direct calls, and the verdict is a callback on the attempt's own
    Deferred (the upstream's replies, the one truly asynchronous step).  A failure
    returns the next attempt's Deferred, which Twisted chains in.  The decisions are
    those of the module doc ("Failover"), made from ``Kind`` and ``Phase`` only.
    """

    __slots__ = ("_failover", "_attempt", "_message_id", "_order", "_exclude", "_fresh",
                 "_ends_search", "_trying", "_errors", "_skipped")

    def __init__(self, failover: Failover, attempt: Callable[..., Any], message_id: str,
                 order: Sequence[Upstream], exclude: Sequence[Upstream], fresh: bool,
                 ends_search: Callable[[RelayError], bool],
                 trying: Callable[[Lease | None], None]):
        self._failover = failover
        self._attempt = attempt
        self._message_id = message_id
        self._order = iter(order)
        self._exclude = exclude
        self._fresh = fresh
        self._ends_search = ends_search
        self._trying = trying
        self._errors: list[RelayError] = []
        self._skipped: list[Upstream] = []

    def next_upstream(self) -> Deferred[tuple[Lease, Any]]:
        for upstream in self._order:
            if upstream in self._exclude:
                continue
            if not upstream.breaker.allow():
                self._skipped.append(upstream)
                continue
            return self._on(upstream, self._fresh)
        return fail(self._failover.verdict(self._errors, self._skipped))

    def _on(self, upstream: Upstream, fresh: bool) -> Deferred[tuple[Lease, Any]]:
        """An attempt on ``upstream``: on an idle session at once, else when the pool
        gives one."""
        lease = None if fresh else upstream.lease_idle()
        if lease is not None:
            return self._leased(lease, upstream, fresh)
        return upstream.lease(fresh=fresh).addCallbacks(
            self._leased, self._lease_failed, callbackArgs=(upstream, fresh),
            errbackArgs=(upstream,))

    def _lease_failed(self, failure: Failure, upstream: Upstream) -> Any:
        failure.trap(RelayError)
        error = cast(RelayError, failure.value)  # trapped above
        if error.kind in Kind.NEUTRAL:
            upstream.breaker.release()  # busy or closing: says nothing about it
        else:
            upstream.breaker.failure()
        self._failover.report(error, self._message_id)
        self._errors.append(error)
        return self.next_upstream()

    def _leased(self, lease: Lease, upstream: Upstream, fresh: bool
                ) -> Deferred[tuple[Lease, Any]]:
        self._trying(lease)
        try:
            attempt = self._attempt(upstream, lease.session)
            if not isinstance(attempt, Deferred):
                attempt = Deferred.fromCoroutine(attempt)
        except BaseException:
            attempt = fail()
        return attempt.addCallbacks(
            self._succeeded, self._attempt_failed, callbackArgs=(lease, upstream),
            errbackArgs=(lease, upstream, fresh))

    def _succeeded(self, result: Any, lease: Lease, upstream: Upstream
                   ) -> tuple[Lease, Any]:
        self._trying(None)
        upstream.breaker.success()
        return lease, result

    def _attempt_failed(self, failure: Failure, lease: Lease, upstream: Upstream,
                        fresh: bool) -> Any:
        self._trying(None)
        if not failure.check(RelayError):
            lease.release(reusable=False)
            upstream.breaker.release()
            return failure
        error = cast(RelayError, failure.value)  # checked above
        if error.upstream is None:  # an attempt's own refusal: this is where it ran
            error.upstream = upstream.address
        broken = error.kind in Kind.BROKEN
        lease.release(reusable=not broken)
        if broken and lease.reused and not fresh and not error.outcome_unknown:
            # The pooled connection died while idle (upstream restart, idle timeout
            # racing our MAIL): not the upstream's failure, not the message's.  Same
            # upstream, new connection.
            log.info("upstream {upstream}: pooled connection was dead ({detail}); "
                     "retrying on a new one", upstream=upstream.address,
                     detail=error.detail, message_id=self._message_id)
            return self._on(upstream, True)
        if broken:
            upstream.breaker.failure()
        else:
            upstream.breaker.success()  # it answered: it is alive
        self._failover.report(error, self._message_id)
        if self._ends_search(error):
            raise error
        self._errors.append(error)
        return self.next_upstream()


class State(enum.Enum):
    """Where an ``UpstreamTransaction`` is; the moves between them are ``_MOVES``."""

    #: No upstream transaction: before the first RCPT, after a recipient we refused
    #: before asking anyone (``Kind.POLICY``), or after the upstream answered an early
    #: DATA with 354 while it had accepted no recipient (that connection was dropped).
    NEW = "new"
    #: MAIL and the first RCPT (and DATA, when the client pipelined it) look for an
    #: upstream that takes them (``Failover.search``), after the client's fair share.
    OPENING = "opening"
    #: MAIL accepted on the session the transaction holds; each RCPT goes to it.  A
    #: replay (the connection broke) stays here: it re-opens the same transaction.
    OPEN = "open"
    #: The client's final dot came: DATA, the content, the final reply (and replays).
    SENDING = "sending"
    #: ``send`` was answered; the session and the client's share went back.
    DONE = "done"
    #: A verdict answers every later operation (``_verdict``): MAIL was refused, or the
    #: transaction could not be resumed on a new connection.  No session is held.
    FAILED = "failed"
    #: The client gave up (``abort``) or the operation's deadline passed
    #: (``deadline_passed``, then with a verdict too): nothing more is asked upstream,
    #: and the session goes back once the operation in flight ends.
    ABORTED = "aborted"

    # Members are singletons, so identity is hash enough; Enum's own ``__hash__`` runs
    # in Python, and every move looks a state up (several times per message).
    __hash__ = object.__hash__


#: The moves a transaction makes, written once.  ABORTED is reachable from everywhere
#: (the client may give up at any time) and left never; a verdict found after an abort
#: is kept, the state stays ABORTED (``_condemn``).
_MOVES: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.OPENING, State.ABORTED}),
    State.OPENING: frozenset({State.OPEN, State.NEW, State.FAILED, State.ABORTED}),
    State.OPEN: frozenset({State.NEW, State.SENDING, State.FAILED, State.ABORTED}),
    State.SENDING: frozenset({State.DONE, State.FAILED, State.ABORTED}),
    State.DONE: frozenset({State.ABORTED}),
    State.FAILED: frozenset({State.ABORTED}),
    State.ABORTED: frozenset(),
}

#: No more operations may start: a RCPT or a second ``send`` here is the caller's bug.
_ENDED = frozenset({State.SENDING, State.DONE, State.ABORTED})


class IllegalMove(RuntimeError):
    """A transaction was asked for a move ``_MOVES`` does not have: a bug, never a
    verdict for the client."""


@implementer(IRelayTransaction)
class UpstreamTransaction:
    """One client transaction mirrored on one upstream session (see the module doc)."""

    def __init__(self, relay: SMTPRelay, envelope: Envelope, message_id: str,
                 connection_id: str, client: tuple[str, ...] = (), paced: bool = False):
        self._relay = relay
        self.envelope = replace(envelope, recipients=()) if envelope.recipients else envelope
        self.message_id = message_id
        self.connection_id = connection_id
        self._client = client
        self._paced = paced
        self._state = State.NEW
        #: The answer to every later operation once set (FAILED, or ABORTED at the
        #: deadline): the sender's refusal, or why the transaction could not go on.
        self._verdict: RelayError | None = None
        self._lease: Lease | None = None
        self._trying: Lease | None = None  # the lease an attempt of ours runs on
        self._ticket: ShareTicket | None = None
        self._upstream: Upstream | None = None  # the last one used (for the logs)
        self._smtputf8 = False
        self._accepted: list[tuple[str, bytes]] = []
        self._replays = 0
        self._busy: Deferred[Any] | None = None
        self._answer: Deferred[Any] | None = None  # what the caller of the busy op holds
        self._deadline = 0.0  # seconds the busy operation was given
        #: The upstream's reply to a DATA sent with the last RCPT (``data_follows``).
        self._early_data: Reply | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def upstream(self) -> str | None:
        return self._upstream.address if self._upstream else None

    @property
    def _session(self) -> UpstreamSession | None:
        return self._lease.session if self._lease is not None else None

    @property
    def max_size(self) -> int | None:
        session = self._session
        return session.max_size if session is not None else None

    @property
    def refuses_8bit(self) -> bool:
        """Whether content with an 8-bit octet is already certain to be refused
        (``554 5.6.3``), so the delivery can stop taking it in
        (docs/delivery-guarantee.md, "Content the upstream cannot take").

        True only when the envelope declared 8BITMIME (or BINARYMIME), the session this
        transaction holds lacks 8BITMIME, and no other upstream could be tried instead:
        with several upstreams, ``send`` moves on to one that may offer it.  Undeclared
        content is never refused, and declared content is refused for what it holds,
        never for the declaration (clients declare 8BITMIME for ASCII all the time).
        """
        session = self._session
        return (session is not None and len(self._relay.upstreams) == 1
                and _declares_8bit(self.envelope) and not session.extensions.eightbitmime)

    @property
    def recipients(self) -> list[str]:
        return [address for address, _ in self._accepted]

    # -- the state --------------------------------------------------------------------------

    def _move(self, to: State) -> None:
        """The one way the state changes; a move ``_MOVES`` lacks raises."""
        if to not in _MOVES[self._state]:
            raise IllegalMove(f"relay transaction {self.message_id}: no move from "
                              f"{self._state.name} to {to.name}")
        self._state = to

    def _unless_aborted(self, to: State) -> None:
        """The move that ends an asynchronous step, unless the client (or the deadline)
        ended the transaction meanwhile: ABORTED stays."""
        if self._state is not State.ABORTED:
            self._move(to)

    def _condemn(self, error: RelayError) -> None:
        """``error`` answers every later operation."""
        self._verdict = error
        self._unless_aborted(State.FAILED)

    # -- IRelayTransaction --------------------------------------------------------------

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        """``data_follows``: the client pipelined DATA right behind this RCPT (RFC 2920),
        so DATA goes upstream in the same flight and ``send`` will not wait for a 354."""
        return self._serialize(self._add, self._relay.pool_settings.rcpt_deadline,
                               address, data_follows)

    def send(self, message: OutboundMessage) -> Deferred[Reply]:
        # Whatever happens, the transaction is over when send is answered: the session
        # and the client's share go back then (reusable unless something broke it).
        return self._serialize(self._send, self._relay.pool_settings.data_deadline,
                               message, last=True)

    def abort(self) -> None:
        if self._state is State.ABORTED:
            return
        self._move(State.ABORTED)
        if self._busy is None:
            self._end(reusable=True)
        # else: the operation in flight lets go of the session when it ends

    # -- MAIL with the first RCPT ----------------------------------------------------------

    def _first(self, address: str, data_follows: bool) -> Deferred[Reply]:
        """Open the transaction: [RSET,] MAIL and the first RCPT (and DATA when the client
        pipelined it) in one flight, on the first upstream that takes the MAIL.  A refused
        MAIL is every recipient's answer."""
        self._move(State.OPENING)
        if self._ticket is None and self._client:
            ticket = self._relay.shares.try_acquire(self._client, self._paced)
            if ticket is None:  # over its share: wait for one of its own messages

                def shared(ticket: ShareTicket) -> Deferred[Reply]:
                    self._ticket = ticket
                    return self._open(address, data_follows)
                return Deferred.fromCoroutine(self._fair_share()).addCallbacks(
                    shared, self._not_opened)
            self._ticket = ticket
        return self._open(address, data_follows)

    def _not_opened(self, failure: Failure) -> Failure:
        """No share in time: no upstream was asked; the next RCPT tries again."""
        self._unless_aborted(State.NEW)
        return failure

    def _open(self, address: str, data_follows: bool) -> Deferred[Reply]:
        envelope, size = self.envelope, self.envelope.declared_size

        def attempt(upstream: Upstream, session: UpstreamSession
                    ) -> Deferred[tuple[bytes, bytes, Reply, Reply | None]]:
            mail = session.mail_line(envelope, size)
            line = session.rcpt_line(address, b" SMTPUTF8" in mail)

            def started(result: tuple[Reply, list[Reply], Reply | None]
                        ) -> tuple[bytes, bytes, Reply, Reply | None]:
                mail_reply, replies, data_reply = result
                _check_mail(mail_reply, upstream)
                return mail, line, replies[0], data_reply
            return session.start(mail, [line], data=data_follows and session.pipelining
                                 ).addCallback(started)

        def opened(found: tuple[Lease, tuple[bytes, bytes, Reply, Reply | None]]) -> Reply:
            lease, (mail, line, reply, data_reply) = found
            if self._state is State.ABORTED:
                lease.release(reusable=True)
                raise _aborted()
            self._hold(lease)
            self._move(State.OPEN)
            self._smtputf8 = b" SMTPUTF8" in mail
            return self._rcpt_answered(reply, data_reply, line, address)

        def refused(failure: Failure) -> Failure:
            if failure.check(RelayError):
                error = cast(RelayError, failure.value)
                if error.command == "MAIL" or error.kind != Kind.POLICY:
                    self._condemn(error)  # the sender's verdict holds for every recipient
                else:
                    self._unless_aborted(State.NEW)  # only this address: no transaction
                self._let_go(reusable=True)  # no session: the client's share goes back
            else:
                self._unless_aborted(State.NEW)
            return failure

        return self._relay.failover.search(
            attempt, self.message_id, trying=self._try_on).addCallbacks(opened, refused)

    async def _fair_share(self) -> ShareTicket:
        timeout = self._relay.upstreams[0].settings.connect_timeout
        try:
            return await self._relay.shares.acquire(self._client, self._paced).addTimeout(
                timeout, self._relay.reactor)
        except (CancelledError, TimeoutError):
            cap = self._relay.shares.cap
            raise unavailable("4.4.5", "Too many messages in progress for this client, "
                              "try again later", f"this client already holds {cap} upstream "
                              f"connection(s) (its share) for {timeout:g} s", "RCPT",
                              kind=Kind.BUSY) from None

    # -- RCPT ------------------------------------------------------------------------------

    def _add(self, address: str, data_follows: bool) -> Deferred[Reply]:
        if self._verdict is not None:
            return fail(self._verdict)
        if self._state in _ENDED:
            return fail(RuntimeError("RCPT after the transaction ended"))
        # A refused early DATA does not end the upstream transaction (RFC 5321 §4.1.1.4
        # leaves MAIL in effect): the client may add recipients and try DATA again.
        self._early_data = None
        try:
            if self._state is State.OPEN:
                return self._next_rcpt(address, data_follows)
            return self._first(address, data_follows)
        except BaseException:
            return fail()

    def _next_rcpt(self, address: str, data_follows: bool) -> Deferred[Reply]:
        """A further RCPT on the session the transaction holds."""
        assert self._lease is not None  # the transaction is OPEN: it holds a lease
        session, upstream = self._lease.session, self._lease.upstream
        rcptmax = session.extensions.rcptmax
        if rcptmax is not None and len(self._accepted) >= rcptmax:
            # RFC 9422 §4.2 / RFC 5321 §4.5.3.1.10: the client sends the rest later.  Our
            # refusal, before asking the upstream: a policy, not the upstream's verdict.
            self._refuse(policy(
                Reply(452, "4.5.3", f"Too many recipients for the upstream server (at "
                                    f"most {rcptmax} per message), send the rest later"),
                "RCPT", upstream.address, f"LIMITS RCPTMAX={rcptmax}"))
        line = session.rcpt_line(address, self._smtputf8)
        asked: Deferred[Any]  # (the RCPT reply, the DATA reply or None)
        try:
            if data_follows and session.pipelining:
                asked = session.rcpt_then_data(line)
            else:
                asked = session.rcpt(line).addCallback(lambda reply: (reply, None))
        except RelayError:
            asked = fail()

        def lost(failure: Failure) -> Deferred[tuple[Reply, Reply | None]]:
            # Whatever fails here broke the connection (lost, timed out, garbage, 421).
            failure.trap(RelayError)
            error = cast(RelayError, failure.value)  # trapped above
            self._relay.failover.report(error, self.message_id)
            upstream.breaker.failure()
            # The replay's log names a 421 by the command and the upstream's line.
            why = f"{error.command}: {error.upstream_reply}" if error.upstream_reply \
                else None
            # With ``extra`` the replay answers with that line's Reply, never None.
            return Deferred.fromCoroutine(self._replay(error, extra=line, why=why)
                                          ).addCallback(lambda reply: (cast(Reply, reply), None))
        return asked.addErrback(lost).addCallback(
            lambda replies: self._rcpt_answered(replies[0], replies[1], line, address))

    def _rcpt_answered(self, reply: Reply, data_reply: Reply | None, line: bytes,
                       address: str) -> Reply:
        """The upstream's verdict on a RCPT (and on a DATA sent with it)."""
        if self._state is State.ABORTED:
            raise _aborted()
        accepted = reply.code in (250, 251)
        if accepted:
            self._accepted.append((address, line))
        self._keep_early_data(data_reply)
        if accepted:
            return reply
        if reply.is_positive:
            return self._refuse(unavailable(
                "4.4.2", "Upstream protocol error, try again later",
                f"RCPT answered {reply}", "RCPT", reply, self.upstream, kind=Kind.PROTOCOL))
        return self._refuse(rejected("RCPT", reply, f"upstream rejected <{address}>: "
                                     f"{reply.text}", self.upstream))

    def _keep_early_data(self, reply: Reply | None) -> None:
        """Keep the reply to an early DATA for ``send``.  An upstream that says 354 with
        no recipient accepted waits for content of a message that goes nowhere: only a
        dropped connection ends that DATA safely (a "." could deliver an empty message)."""
        if reply is None:
            return
        if reply.code == 354 and not self._accepted:
            log.info("message={message_id}: upstream {upstream} answered DATA with 354 "
                     "although it accepted no recipient; dropping that connection",
                     message_id=self.message_id, upstream=self.upstream)
            self._let_go(reusable=False)
            self._move(State.NEW)  # the next RCPT opens a new transaction
            return
        self._early_data = reply

    def _refuse(self, error: RelayError) -> Reply:
        self._relay.failover.report(error, self.message_id)
        raise error

    # -- DATA -------------------------------------------------------------------------------

    def _send(self, message: OutboundMessage) -> Deferred[Reply]:
        try:
            return self._send_first(message)
        except BaseException:
            return fail()

    def _send_first(self, message: OutboundMessage) -> Deferred[Reply]:
        if self._verdict is not None:
            self._fail(self._verdict)
        if self._state is not State.OPEN or self._lease is None:
            raise RuntimeError("send() after the transaction ended")
        self._move(State.SENDING)
        if not self._accepted:
            self._fail(permanent(554, "5.5.1", "No valid recipients", "DATA"))
        if list(message.envelope.recipients) != self.recipients:
            raise RuntimeError("the message's recipients are not the accepted ones")
        # The early DATA reply belongs to the first session (not to a replay).
        early, self._early_data = self._early_data, None
        eight_bit: list[bool] = []
        if _declares_binary(self.envelope):
            def checked(needs_bdat: bool) -> Deferred[Reply]:
                if needs_bdat:
                    self._fail(_binary_refusal())
                return self._send_on(message, early, eight_bit)
            return self._relay.resources.in_thread(_needs_bdat, message).addCallback(checked)
        return self._send_on(message, early, eight_bit)

    def _send_on(self, message: OutboundMessage, early: Reply | None,
                 eight_bit: list[bool]) -> Deferred[Reply]:
        """The first transmission, on the session that took the recipients: callbacks
        only (this is every message's path); a failure goes on in ``_resend``."""
        lease = self._lease
        assert lease is not None
        try:
            sending = self._transmit(lease, message, early, eight_bit, checked=False)
        except RelayError:
            sending = fail()

        def sent(result: Reply | Failure) -> Reply | Deferred[Reply]:
            # One callback for the end-of-data reply, whatever it is.
            if not isinstance(result, Failure):
                try:
                    final = _final_reply(result, lease.upstream.address)
                except RelayError:
                    result = Failure()
                else:
                    return self._done(final, lease)
            result.trap(RelayError)
            return Deferred.fromCoroutine(
                self._resend(message, lease, cast(RelayError, result.value), eight_bit))
        return sending.addBoth(sent)

    async def _resend(self, message: OutboundMessage, lease: Lease,
                      error: RelayError, eight_bit: list[bool]) -> Reply:
        """A transmission failed: replay elsewhere and transmit again, or give the
        client its answer."""
        tried: list[Upstream] = []
        while True:
            if error.kind in Kind.BROKEN:
                lease.upstream.breaker.failure()
                self._let_go(reusable=False, keep_share=True)
            if _ends_search(error):
                return self._fail(error)
            # Before the final dot, nothing was accepted: a broken connection is
            # replayed (same upstream allowed); a 4xx or a missing capability moves on
            # to the next upstream with the same recipients.
            self._relay.failover.report(error, self.message_id)
            broken = error.kind in Kind.BROKEN
            if not broken:
                tried.append(lease.upstream)
                if not [u for u in self._relay.upstreams if u not in tried]:
                    return self._fail(error)
            try:
                await self._replay(error, exclude=() if broken else tried)
            except RelayError as replay_error:
                # No other upstream took it: the first answer is what counts.
                return self._fail(replay_error if broken else error)
            held = self._lease
            assert held is not None
            lease = held
            try:
                reply = await self._transmit(lease, message, None, eight_bit)
            except RelayError as again:
                error = again
                continue
            return self._done(reply, lease)

    def _transmit(self, lease: Lease, message: OutboundMessage,
                  data_reply: Reply | None, eight_bit: list[bool], checked: bool = True
                  ) -> Deferred[Reply]:
        """DATA (unless it went early), the content and the final reply, on one session.

        Raises or fails with ``RelayError``: a verdict, a capability the upstream lacks,
        or the connection's failure (its phase says whether the dot left).  Without
        ``checked`` the end-of-data reply is not checked here: the caller does it
        (``_final_reply``).
        """
        session, upstream = lease.session, lease.upstream
        limit = session.max_size
        if limit is not None and message.size > limit:
            raise permanent(552, "5.3.4", f"Message too big for the upstream server "
                            f"({message.size} > {limit} octets)", "DATA", upstream.address)
        if _declares_8bit(self.envelope) and not session.extensions.eightbitmime:
            # Declared 8BITMIME, but this upstream lacks it: only 7-bit content may go
            # (clients declare 8BITMIME for plain ASCII all the time; that must not bounce).
            if not eight_bit:
                def scanned(has_8bit: bool) -> Deferred[Reply]:
                    eight_bit.append(has_8bit)
                    return self._transmit(lease, message, data_reply, eight_bit, checked)
                return self._relay.resources.in_thread(_has_8bit, message).addCallback(
                    scanned)
            if eight_bit[0]:
                raise eight_bit_unsupported(upstream.address)
        # A session still waiting for content after a refusal here is dropped by its
        # release (the protocol is not ``usable``), never sent a command.
        if data_reply is not None:
            return self._content(data_reply, session, upstream, message, checked)
        return session.data().addCallback(self._content, session, upstream, message,
                                          checked)

    def _content(self, data: Reply, session: UpstreamSession, upstream: Upstream,
                 message: OutboundMessage, checked: bool) -> Deferred[Reply]:
        if data.code != 354:
            if data.is_positive:
                raise protocol_violation(f"DATA answered {data}, not 354", "DATA",
                                         upstream.address)
            raise rejected("DATA", data, upstream=upstream.address)
        sent = session.content(message.chunks())
        return sent.addCallback(_final_reply, upstream.address) if checked else sent

    def _done(self, reply: Reply, lease: Lease) -> Reply:
        self._relay.last_accepted = self._relay.reactor.seconds()
        # The delivery logs every outcome; this line matters when the way was unusual.
        unusual = bool(self._replays) or lease.upstream is not self._relay.upstreams[0]
        _log_outcome(self.message_id, self.connection_id, "accepted", reply, None,
                     lease.upstream.address, lease.session.secure, debug=not unusual)
        return reply

    def _fail(self, error: RelayError) -> Reply:
        _log_outcome(self.message_id, self.connection_id, "failed", error.reply, error,
                     self.upstream)
        raise error

    # -- replay on a new connection -----------------------------------------------------------

    async def _replay(self, cause: RelayError, extra: bytes | None = None,
                      exclude: Sequence[Upstream] = (), why: str | None = None
                      ) -> Reply | None:
        """Re-open the transaction elsewhere: MAIL and every accepted RCPT (plus ``extra``)
        in one flight.  Returns the reply to ``extra``; raises ``RelayError`` (and answers
        the rest of the transaction with it) when that is impossible or the recipients'
        verdicts changed.  ``why`` is the log's word for ``cause`` (its detail else)."""
        lost = cause.kind in Kind.BROKEN
        failed = self._upstream
        self._let_go(reusable=not lost, keep_share=True)  # a new session comes at once
        if self._state is State.ABORTED:
            raise _aborted()
        if self._replays >= self._relay.pool_settings.max_replays:
            return self._poison(cause, f"gave up after {self._replays} replays")
        self._replays += 1
        accepted = list(self._accepted)
        lines = [line for _, line in accepted] + ([extra] if extra else [])
        log.info("message={message_id}: re-opening the upstream transaction ({cause}): "
                 "MAIL and {count} RCPT on another connection", message_id=self.message_id,
                 cause=why or cause.detail or str(cause), count=len(lines))
        envelope, size = self.envelope, self.envelope.declared_size

        async def attempt(upstream: Upstream, session: UpstreamSession) -> Reply | None:
            mail = session.mail_line(envelope, size)
            if (b" SMTPUTF8" in mail) != self._smtputf8:
                raise permanent(550, "5.6.7", "Upstream SMTPUTF8 support differs",
                                "MAIL", upstream.address)
            mail_reply, replies, _ = await session.start(mail, lines)
            _check_mail(mail_reply, upstream)
            # ``replies`` ends with the extra line's, when there is one.
            for (address, _), reply in zip(accepted, replies, strict=False):
                if reply.code not in (250, 251):
                    raise rejected("RCPT", reply, f"upstream now rejects <{address}>, "
                                   f"accepted before: {reply.text}", upstream.address)
            return replies[-1] if extra else None

        try:
            lease, extra_reply = await self._relay.failover.search(
                attempt, self.message_id, exclude=exclude, fresh=lost,
                last=failed if lost else None, ends_search=_only_unknown_ends_search,
                trying=self._try_on)
        except RelayError as error:
            return self._poison(error, "the replay failed")
        # abort() may have run during the search: mypy narrowed _state before the await.
        if self._state is State.ABORTED:  # type: ignore[comparison-overlap]
            lease.release(reusable=True)
            raise _aborted()
        self._hold(lease)
        return extra_reply

    def _poison(self, error: RelayError, why: str) -> Reply:
        """Answer the rest of this transaction with a 451: the client retries it all."""
        self._let_go(reusable=True)  # no session left: the client's share goes back
        verdict = unavailable(
            "4.4.2", "Upstream connection lost during the transaction and it could not be "
            "resumed, try again later", f"{why}: {error.describe()}", error.command,
            error.upstream_reply, error.upstream, kind=error.kind)
        self._condemn(verdict)
        self._relay.failover.report(verdict, self.message_id)
        raise verdict

    # -- ownership and deadlines ----------------------------------------------------------------

    def _serialize(self, operation: Callable[..., Deferred[Reply] | Coroutine[Any, Any, Reply]],
                   deadline: float,
                   *arguments: Any, last: bool = False) -> Deferred[Reply]:
        """Run one operation at a time; its caller is answered by ``deadline`` at the
        latest, whatever the upstreams do (RFC 5321 §4.5.3.2: the client gives up
        later than that, so it never retries a message we may still deliver).  After
        the ``last`` operation the transaction ends, whatever its outcome."""
        if self._busy is not None:
            return fail(RuntimeError("one operation at a time on a relay transaction"))
        started = operation(*arguments)
        inner = (started if isinstance(started, Deferred)
                 else Deferred.fromCoroutine(started))
        if inner.called and not inner.paused:  # answered without waiting (a refusal we
            if last:  # decided, a replay-free error): no timer, no tracking
                self._over()
            self._after(None)
            return inner
        self._busy = inner
        answer: Deferred[Reply] = Deferred()
        self._answer = answer
        self._deadline = deadline
        deadlines = self._relay.deadlines
        deadlines.set(self, deadline)
        in_flight = self._relay.in_flight

        def done(result: Any) -> None:
            try:
                if last:
                    self._over()
                self._busy = self._answer = None
                deadlines.clear(self)
                self._after(result)
            except Exception:  # a bug in the clean-up: said loudly, the caller answered
                self._busy = self._answer = None
                deadlines.clear(self)
                log.failure("relay transaction {message_id}: ending it failed",
                            message_id=self.message_id)
            finally:
                # The caller is answered whatever the clean-up did: its deadline was
                # just cleared, so nothing else would ever answer it.
                in_flight.settled(answer)
                if not answer.called:
                    answer.callback(result) if not isinstance(result, Failure) \
                        else answer.errback(result)
                # else: already answered at the deadline; this late outcome was logged
        in_flight.track(answer)
        inner.addBoth(done)
        return answer

    def _after(self, result: Any) -> None:
        if self._state is State.ABORTED:
            self._end(reusable=True)

    def _over(self) -> None:
        """``send`` was answered: the transaction is over, whatever the outcome."""
        if self._state is State.SENDING:
            self._move(State.DONE)
        self._end(reusable=True)

    def deadline_passed(self) -> None:
        """The operation's deadline passed (``SMTPRelay.deadlines``): answer now, drop
        the upstream connection."""
        deadline = self._deadline
        lease = self._lease
        unknown = lease is not None and lease.session.protocol.outcomePending
        error = unavailable(
            "4.4.7", "Upstream did not answer in time; try again later" + (
                " (a duplicate is possible)" if unknown else ""),
            f"no outcome within the {deadline:g} s deadline", "end of data" if unknown
            else None, upstream=self.upstream, kind=Kind.EXPIRED,
            phase=Phase.OUTCOME_UNKNOWN if unknown else Phase.BEFORE_DOT)
        try:
            self._relay.failover.report(error, self.message_id)
            self._verdict = error
            if self._state is not State.ABORTED:
                self._move(State.ABORTED)
            for held in (lease, self._trying):
                if held is not None:
                    held.session.protocol.abort()  # the operation in flight fails, ends
        finally:  # the caller is answered, whatever the clean-up did (as in _serialize)
            answer = self._answer
            if answer is not None and not answer.called:
                _log_outcome(self.message_id, self.connection_id, "failed", error.reply,
                             error, self.upstream)
                self._relay.in_flight.settled(answer)
                answer.errback(error)

    def _try_on(self, lease: Lease | None) -> None:
        self._trying = lease

    def _hold(self, lease: Lease) -> None:
        self._lease, self._upstream = lease, lease.upstream

    def _let_go(self, reusable: bool, keep_share: bool = False) -> None:
        """Give the session back to its pool (``_upstream`` stays, for the logs), and the
        client's share with it unless another session follows at once (a replay)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release(reusable)
        if not keep_share:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                ticket.release()

    def _end(self, reusable: bool) -> None:
        """The transaction is over: its session and its share go back."""
        self._let_go(reusable)


# --- shared steps ------------------------------------------------------------------------------

def _aborted() -> RelayError:
    return unavailable("4.3.0", "Transaction aborted", "the client ended the transaction",
                       "RCPT", kind=Kind.CLOSING)


def _closing() -> RelayError:
    return RelayError(SHUTTING_DOWN, Kind.CLOSING, None, None, "relay closed",
                      kind=Kind.CLOSING)


def _check_mail(reply: Reply, upstream: Upstream) -> None:
    if reply.code == 250:
        return
    if reply.is_positive:
        raise protocol_violation(f"MAIL answered {reply}", "MAIL", upstream.address)
    raise rejected("MAIL", reply, upstream=upstream.address)


def _final_reply(final: Reply, upstream: str) -> Reply:
    """The end-of-data reply: 250 is the message accepted; anything else is raised."""
    if final.code == 250:
        return final
    if final.is_positive:
        # Not "accepted" and not a refusal: the outcome is unknown.
        raise unavailable("4.4.2", "Upstream protocol error after the message was sent; "
                          "try again later (a duplicate is possible)",
                          f"end of data answered {final}", "end of data", final,
                          upstream, kind=Kind.PROTOCOL, phase=Phase.OUTCOME_UNKNOWN)
    raise rejected("end of data", final, upstream=upstream)


def _binary_refusal(upstream: str | None = None) -> RelayError:
    # RFC 3030 §3: BINARYMIME content is sent only with BDAT, which we do not send
    # upstream yet; DATA would have to rewrite it, and we never alter content
    # (mox: no downgrade).  Line-shaped content goes as 8BITMIME instead.
    return permanent(554, "5.6.3", "Binary content cannot be relayed: the upstream "
                     "transfer needs BDAT (RFC 3030), which is not supported", "DATA", upstream)


def _needs_bdat(message: OutboundMessage) -> bool:
    """Whether BINARYMIME content could not travel in DATA unchanged: bare CR or LF,
    NUL, or a line over 998 octets (runs in a thread: reads the whole spool)."""
    tail = b""
    for chunk in message.chunks():
        block = tail + chunk
        cut = block.rfind(b"\n") + 1
        lines, tail = block[:cut], block[cut:]
        if b"\0" in block or has_bare_line_ends(lines) or any(
                len(line) > 999 for line in lines.split(b"\n")) or len(tail) > 999:
            return True
    return bool(tail)  # content must end with CRLF to travel in DATA unchanged


def _declares_binary(envelope: Envelope) -> bool:
    return (envelope.body or "").upper() == "BINARYMIME"


def _declares_8bit(envelope: Envelope) -> bool:
    return (envelope.body or "").upper() in ("8BITMIME", "BINARYMIME")


def _has_8bit(message: OutboundMessage) -> bool:
    """Whether any octet has the high bit set (runs in a thread: reads the whole spool)."""
    return any(not chunk.isascii() for chunk in message.chunks())
