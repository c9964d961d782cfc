"""When to stop asking the shared state, and when to ask it again (docs/shared-state.md,
"When Redis is slow or down").

Every request to the shared state already has a deadline (``--state-timeout``).  A
deadline alone bounds one decision, not a message: a login, a ``MAIL`` and each ``RCPT``
each ask, so a store that stalls would make every message wait several deadlines.  The
breaker bounds the whole: after ``failures`` consecutive requests without an answer the
store is *degraded* and is not asked at all for ``cooldown`` seconds (decisions are then
answered by ``esmtpfa.limits.guard`` at once).  After the cool-down one request is let
through as a probe while the others keep going around it; an answer ends the
degradation, a failure starts another cool-down.

The mechanism is ``esmtpfa.common.breaker``'s, the upstream relay's too; what this one adds is
what the operator needs: whether the store is degraded, since when, and why it became
so, told once per degradation rather than at every step in between.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

from esmtpfa.common.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

#: Consecutive requests without an answer before the store is skipped.  A restart or a
#: failover fails the one or two requests in flight on the lost connection, and the
#: client reconnects at once; three in a row without a single answer means it is not
#: coming back within a request's time.  At most three deadlines (1.5 s at the default
#: ``--state-timeout``) are paid before the breaker opens.
FAILURES = 3

#: Seconds the store is skipped before a probe.  The Redis client pauses up to 5 s
#: between connection attempts too, so probing sooner would mostly meet that pause; a
#: probe that fails costs one decision one deadline per cool-down.  Mail is counted by
#: the shared state again at most this long after Redis answers again.
COOLDOWN = 5.0


class StateBreaker(CircuitBreaker):
    """The shared state's breaker.

    ``on_change(degraded, why)`` is called when the store becomes degraded (the breaker
    opens from closed) and when it answers again, never on the steps in between, so a
    caller can log once per transition."""

    def __init__(self, clock: IReactorTime, *, failures: int = FAILURES,
                 cooldown: float = COOLDOWN,
                 on_change: Callable[[bool, str], None] | None = None):
        super().__init__(failures, cooldown, clock, self._moved)
        self.on_degraded = on_change
        #: When the store became degraded (the clock's seconds), else None.
        self.degraded_since: float | None = None
        self._why = ""

    @property
    def degraded(self) -> bool:
        return self.state != CLOSED

    def failure(self, why: str = "") -> None:
        """A request failed or passed its deadline; ``why`` is said if it degrades the
        store."""
        self._why = why
        super().failure()

    def _moved(self, previous: str, state: str) -> None:
        if previous == CLOSED and state == OPEN:
            self.degraded_since = self.clock.seconds()
            self._tell(True, self._why)
        elif state == CLOSED:
            self.degraded_since = None
            self._tell(False, "answered")

    def _tell(self, degraded: bool, why: str) -> None:
        if self.on_degraded is not None:
            self.on_degraded(degraded, why)


__all__ = ["CLOSED", "COOLDOWN", "FAILURES", "HALF_OPEN", "OPEN", "StateBreaker"]
