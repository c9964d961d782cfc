"""What the relay does when a shared ledger cannot answer (``--state-failure``).

A ledger in Redis (or in the workers' supervisor) can be down, slow or refusing.  The
limits are there to protect the relay and its users, not to be the reason mail stops, so
the choice is the operator's (docs/shared-state.md):

* **open** (the default): the limit is skipped for that one decision.  A login is asked
  of its provider as if no failures were counted, a failed login is answered at once, a
  message or recipient goes through uncounted.  Mail keeps flowing through a Redis
  outage; an attacker gets unthrottled guesses for as long as it lasts (the provider's
  own lockout and ``--max-auth-failures`` per connection still apply).
* **closed**: what the relay cannot check, it refuses, always temporarily: a login hears
  ``454 4.7.0`` (HTTP 503), a message or recipient ``451 4.3.0`` (HTTP 503), so clients
  queue and retry; nothing is ever refused permanently for an outage.

Records that only settle what was decided (a failed login's count, a success taken back,
a reservation given back) are dropped under both policies: nothing waits on them.

Either way one log line says what happened (repeats within a minute are summed up by
``RepeatSummary``) and ``state_errors_total{operation, outcome}`` counts every one.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.logs import logger
from esmtpfa.logsummary import RepeatSummary
from esmtpfa.replies import Reply, SMTPReplyError
from esmtpfa.state.interfaces import ILoginLedger, IRateLedger, StateUnavailable

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


class FailurePolicy:
    """The policy, its log line and its counter; shared by the guarded ledgers of one
    relay.  ``timeout``, when set, is a last bound on any ledger call (the Redis client
    bounds its own; a ledger that might not gets cut off here)."""

    def __init__(self, policy: str, reactor: IReactorTime, *,
                 observer: StateErrorObserver | None = None, timeout: float | None = None,
                 summary_interval: float = 60.0):
        if policy not in POLICIES:
            raise ValueError(f"state failure policy must be open or closed, got {policy!r}")
        self.policy = policy
        self.reactor = reactor
        self.observer = observer
        self.timeout = timeout
        self._summary = RepeatSummary(log, "shared state errors", interval=summary_interval,
                                      clock=reactor)

    @property
    def closed(self) -> bool:
        return self.policy == CLOSED

    def call(self, operation: str, make: Callable[[], defer.Deferred],
             unavailable: Callable[[], object]) -> defer.Deferred:
        """``make()``; if it fails because the state is unavailable, record that and
        answer ``unavailable()`` (which may raise the closed policy's refusal)."""
        try:
            d = make()
        except UNAVAILABLE:
            d = defer.fail()
        if self.timeout is not None:
            d.addTimeout(self.timeout, self.reactor)

        def failed(failure: Failure):
            failure.trap(*UNAVAILABLE)
            self.record(operation, failure)
            return unavailable()
        return d.addErrback(failed)

    def record(self, operation: str, failure: Failure) -> None:
        outcome = self.policy
        consequence = _CONSEQUENCES[operation][outcome == CLOSED]
        self._summary.record(
            f"{operation} {outcome}",
            "shared state unavailable for {operation} ({why}): {consequence} "
            "(--state-failure {outcome})", operation=operation,
            why=str(failure.value)[:200] or failure.type.__name__,
            consequence=consequence, outcome=outcome)
        if self.observer is not None:
            try:
                self.observer.state_error(operation, outcome)
            except Exception:
                log.failure("counting a shared state error failed")

    def stop(self) -> None:
        self._summary.stop()


#: What each operation does without its state: (open, closed).
_CONSEQUENCES = {
    "login_refusal": ("the login is asked of its provider unthrottled",
                      "the login is refused with a temporary error"),
    "login_failed": ("the failed login is not counted", "the failed login is not counted"),
    "login_succeeded": ("the success is not recorded", "the success is not recorded"),
    "rate_take": ("the message or recipient goes through uncounted",
                  "the message or recipient is refused with a temporary error"),
    "rate_give": ("the settlement is dropped", "the settlement is dropped"),
}


@implementer(ILoginLedger)
class GuardedLoginLedger:
    """An ``ILoginLedger`` that never fails for an unavailable state: it answers by the
    policy instead."""

    def __init__(self, ledger: ILoginLedger, policy: FailurePolicy):
        self.ledger, self.policy = ledger, policy
        self.per_address = ledger.per_address
        self.per_identity = ledger.per_identity
        self.window = ledger.window

    def refusal(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        def unavailable():
            if self.policy.closed:
                raise StateRefusedLogin("shared state unavailable")
            return None
        return self.policy.call("login_refusal",
                                lambda: self.ledger.refusal(address, identities), unavailable)

    def failed(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        # No counts: no delay.  Under the closed policy the next refusal() refuses anyway.
        return self.policy.call("login_failed",
                                lambda: self.ledger.failed(address, identities), list)

    def succeeded(self, address: str, identity: str) -> defer.Deferred:
        return self.policy.call("login_succeeded",
                                lambda: self.ledger.succeeded(address, identity),
                                lambda: None)


@implementer(IRateLedger)
class GuardedRateLedger:
    """An ``IRateLedger`` that never fails for an unavailable state (``Exceeded`` still
    passes through: that is an answer, not a failure)."""

    def __init__(self, ledger: IRateLedger, policy: FailurePolicy):
        self.ledger, self.policy = ledger, policy

    def take(self, key: str, kind: str, limit, n: int) -> defer.Deferred:
        def unavailable():
            if self.policy.closed:
                raise StateRefusedRate()
            return None
        return self.policy.call("rate_take",
                                lambda: self.ledger.take(key, kind, limit, n), unavailable)

    def give(self, key: str, kind: str, limit, n: int, count: bool) -> defer.Deferred:
        return self.policy.call("rate_give",
                                lambda: self.ledger.give(key, kind, limit, n, count),
                                lambda: None)


__all__ = ["CLOSED", "FailurePolicy", "GuardedLoginLedger", "GuardedRateLedger", "OPEN",
           "POLICIES", "RATES_UNAVAILABLE", "StateRefusedLogin", "StateRefusedRate"]
