"""What the relay does when a shared ledger cannot answer (``--state-failure``).

A ledger in Redis (or in the workers' supervisor) can be down, slow or refusing.  The
limits are there to protect the relay and its users, not to be the reason mail stops, so
the choice is the operator's (docs/shared-state.md, "When Redis is slow or down"):

* **open** (the default): mail keeps flowing, and the limits keep holding.  What the
  shared ledger cannot answer, this process's own ledgers answer (``LocalLoginLedger``,
  ``RateLimiter``): each process counts alone for as long as the outage lasts, so N
  processes give a client at most N budgets, never an unlimited one;
* **closed**: what the relay cannot check, it refuses, always temporarily: a login hears
  ``454 4.7.0`` (HTTP 503), a message or recipient ``451 4.3.0`` (HTTP 503), so clients
  queue and retry; nothing is ever refused permanently for an outage.

Every call to the shared ledger is bounded (``timeout``) and goes through one
``StateBreaker`` per relay: after a few calls without an answer the shared ledger is not
asked at all for a cool-down, so a stalled store costs a few deadlines, not some on every
message.  The log says so once when the store becomes degraded and once when it answers
again; the metrics say it with the ``state_degraded`` gauge, and
``state_errors_total{operation, outcome}`` counts every decision made without it.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.common.logs import logger
from esmtpfa.common.logsummary import RepeatSummary
from esmtpfa.common.observers import notify
from esmtpfa.common.replies import Reply, SMTPReplyError
from esmtpfa.limits.interfaces import ILoginLedger, IRateLedger, StateUnavailable
from esmtpfa.limits.ledgers import LocalLoginLedger, RateLimiter
from esmtpfa.limits.state_breaker import COOLDOWN, FAILURES, StateBreaker

log = logger("esmtpfa.state")

OPEN, CLOSED = "open", "closed"
POLICIES = (OPEN, CLOSED)

#: What a message or recipient hears when its sending rate cannot be checked under the
#: closed policy: a local, temporary error (RFC 3463 X.3.0), not the rate's own 4.7.1,
#: since nobody's rate was reached.
RATES_UNAVAILABLE = Reply(451, "4.3.0", "Sending limits cannot be checked now, try again later")

#: The failures that mean "the shared state did not answer"; anything else is a bug and
#: propagates.
UNAVAILABLE = (StateUnavailable, defer.TimeoutError, TimeoutError, ConnectionError)


class StateRefusedLogin(ProviderUnavailable):
    """A login refused because the failure counts could not be read (closed policy):
    answered like any temporary authentication failure (``454 4.7.0``, HTTP 503)."""


class StateRefusedRate(SMTPReplyError):
    """A message or recipient refused because its sending rate could not be checked
    (closed policy): ``451 4.3.0`` over SMTP, 503 over HTTP."""

    def __init__(self):
        super().__init__(RATES_UNAVAILABLE)


class StateErrorObserver(Protocol):
    def state_error(self, operation: str, outcome: str) -> None: ...

    def state_degraded(self, degraded: bool) -> None: ...


class FailurePolicy:
    """The policy, the breaker, the log lines and the metrics; shared by the guarded
    ledgers of one relay process.

    ``timeout``, when set, bounds every ledger call, all its round trips included: the
    most one decision waits for the shared state.  ``failures`` and ``cooldown`` are the
    breaker's (``esmtpfa.limits.state_breaker``)."""

    def __init__(self, policy: str, reactor: IReactorTime, *,
                 observer: StateErrorObserver | None = None, timeout: float | None = None,
                 summary_interval: float = 60.0, failures: int = FAILURES,
                 cooldown: float = COOLDOWN, store: str = "the shared state"):
        if policy not in POLICIES:
            raise ValueError(f"state failure policy must be open or closed, got {policy!r}")
        self.policy = policy
        self.reactor = reactor
        self.observer = observer
        self.timeout = timeout
        self.store = store
        self.breaker = StateBreaker(reactor, failures=failures, cooldown=cooldown,
                                    on_change=self._changed)
        #: Decisions made without the shared state since it became degraded.
        self.without = 0
        self._summary = RepeatSummary(log, "shared state errors", interval=summary_interval,
                                      clock=reactor)

    @property
    def closed(self) -> bool:
        return self.policy == CLOSED

    @property
    def degraded(self) -> bool:
        return self.breaker.degraded

    def call(self, operation: str, make: Callable[[], defer.Deferred],
             unavailable: Callable[[], object]) -> defer.Deferred:
        """``make()`` when the breaker lets it through; if it is skipped, or fails
        because the state is unavailable, count that and answer ``unavailable()`` (this
        process's own ledger under the open policy, a refusal under the closed one)."""
        if not self.breaker.allow():
            self._count(operation)
            return defer.maybeDeferred(unavailable)
        try:
            d = make()
        except UNAVAILABLE:
            d = defer.fail()
        if self.timeout is not None:
            d.addTimeout(self.timeout, self.reactor)

        def answered(result):
            self.breaker.success()
            return result

        def failed(failure: Failure):
            if not failure.check(*UNAVAILABLE):
                if failure.check(defer.CancelledError):
                    self.breaker.release()
                else:
                    self.breaker.success()  # an answer, such as Exceeded
                return failure
            was_degraded = self.breaker.degraded
            self.breaker.failure(_why(failure))
            if not was_degraded and not self.breaker.degraded:
                self._log_blip(operation, failure)  # the transition logs the rest
            self._count(operation)
            return unavailable()
        return d.addCallbacks(answered, failed)

    def _count(self, operation: str) -> None:
        self.without += 1
        if self.observer is not None:
            notify(self.observer.state_error, operation, self.policy)

    def _log_blip(self, operation: str, failure: Failure) -> None:
        """A failure that did not (yet) make the store degraded: one line per operation
        and minute (``RepeatSummary``), the repeats summed up."""
        outcome = self.policy
        consequence = _CONSEQUENCES[operation][outcome == CLOSED]
        self._summary.record(
            f"{operation} {outcome}",
            "shared state unavailable for {operation} ({why}): {consequence} "
            "(--state-failure {outcome})", operation=operation, why=_why(failure),
            consequence=consequence, outcome=outcome)

    def _changed(self, degraded: bool, why: str) -> None:
        if degraded:
            self.without = 0
            consequence = (
                "logins and messages it would decide are refused with a temporary error"
                if self.closed else
                "the login throttle and the sending rates count in this process alone")
            log.warn("{store} is degraded ({why}): {consequence} (--state-failure "
                     "{policy}); asking it again in {cooldown:g} s", store=self.store,
                     why=why, consequence=consequence, policy=self.policy,
                     cooldown=self.breaker.cooldown)
        else:
            log.info("{store} answers again: the limits count in it again ({without} "
                     "decisions were made without it)", store=self.store,
                     without=self.without)
        if self.observer is not None:
            notify(self.observer.state_degraded, degraded)

    def stop(self) -> None:
        self._summary.stop()


def _why(failure: Failure) -> str:
    return str(failure.value)[:200] or type(failure.value).__name__


#: What each operation does without its state: (open, closed).
_CONSEQUENCES = {
    "login_refusal": ("this process's own failure counts decide",
                      "the login is refused with a temporary error"),
    "login_failed": ("the failed login is counted in this process",
                     "the failed login is not counted"),
    "login_succeeded": ("the success is recorded in this process",
                        "the success is not recorded"),
    "rate_take": ("this process's own sending counts decide",
                  "the message or recipient is refused with a temporary error"),
    "rate_give": ("the settlement is dropped", "the settlement is dropped"),
}


@implementer(ILoginLedger)
class GuardedLoginLedger:
    """An ``ILoginLedger`` that never fails for an unavailable state: it answers by the
    policy instead, from ``fallback`` (this process's own counts) under the open one.

    ``depth``: how many failures of one identity the fallback keeps (``identity_depth``),
    so its delays grow as far as the shared ledger's."""

    def __init__(self, ledger: ILoginLedger, policy: FailurePolicy, *,
                 fallback: ILoginLedger | None = None, depth: int | None = None):
        self.ledger, self.policy = ledger, policy
        self.per_address = ledger.per_address
        self.per_identity = ledger.per_identity
        self.window = ledger.window
        if fallback is None and not policy.closed:
            fallback = LocalLoginLedger(self.per_address, self.per_identity, self.window,
                                        policy.reactor, depth=depth)
        self.fallback = fallback

    def refusal(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        def unavailable():
            if self.fallback is None:
                raise StateRefusedLogin("shared state unavailable")
            return self.fallback.refusal(address, identities)
        return self.policy.call("login_refusal",
                                lambda: self.ledger.refusal(address, identities), unavailable)

    def failed(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        # Closed: no counts, no delay; the next refusal() refuses anyway.
        def unavailable():
            if self.fallback is None:
                return []
            return self.fallback.failed(address, identities)
        return self.policy.call("login_failed",
                                lambda: self.ledger.failed(address, identities), unavailable)

    def succeeded(self, address: str, identity: str) -> defer.Deferred:
        def unavailable():
            if self.fallback is None:
                return None
            return self.fallback.succeeded(address, identity)
        return self.policy.call("login_succeeded",
                                lambda: self.ledger.succeeded(address, identity),
                                unavailable)


@implementer(IRateLedger)
class GuardedRateLedger:
    """An ``IRateLedger`` that never fails for an unavailable state (``Exceeded`` still
    passes through: that is an answer, not a failure).

    Under the open policy a take the shared ledger cannot answer is taken from
    ``fallback``.  Its settlement must go back there, whatever the shared ledger does in
    the meantime, or it would take someone else's reservation out of Redis and hold
    this process's budget for ever; reservations of one identity and kind are
    interchangeable, so a count of those held here per (identity, kind) is enough to
    route each give (bounded by the transactions in flight)."""

    def __init__(self, ledger: IRateLedger, policy: FailurePolicy, *,
                 fallback: IRateLedger | None = None):
        self.ledger, self.policy = ledger, policy
        if fallback is None and not policy.closed:
            fallback = RateLimiter(policy.reactor)
        self.fallback = fallback
        self._held_here: Counter[tuple[str, str]] = Counter()

    def take(self, key: str, kind: str, limit, n: int) -> defer.Deferred:
        def unavailable():
            if self.fallback is None:
                raise StateRefusedRate()

            def held(_):
                self._held_here[(key, kind)] += n
            return self.fallback.take(key, kind, limit, n).addCallback(held)
        return self.policy.call("rate_take",
                                lambda: self.ledger.take(key, kind, limit, n), unavailable)

    def give(self, key: str, kind: str, limit, n: int, count: bool) -> defer.Deferred:
        slot = (key, kind)
        here = min(n, self._held_here[slot])
        if here:
            self._held_here[slot] -= here
        if not self._held_here[slot]:
            del self._held_here[slot]
        if here:
            assert self.fallback is not None  # only the fallback holds reservations here
            self.fallback.give(key, kind, limit, here, count)
        if here == n:
            return defer.succeed(None)
        return self.policy.call("rate_give",
                                lambda: self.ledger.give(key, kind, limit, n - here, count),
                                lambda: None)


__all__ = ["CLOSED", "FailurePolicy", "GuardedLoginLedger", "GuardedRateLedger", "OPEN",
           "POLICIES", "RATES_UNAVAILABLE", "StateRefusedLogin", "StateRefusedRate"]
