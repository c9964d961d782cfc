"""When to stop asking the shared state, and when to ask it again (docs/shared-state.md,
"When Redis is slow or down").

Every request to the shared state already has a deadline (``--state-timeout``).  A
deadline alone bounds one decision, not a message: a login, a ``MAIL`` and each ``RCPT``
each ask, so a store that stalls would make every message wait several deadlines.  The
breaker bounds the whole: after ``failures`` consecutive requests without an answer the
store is *degraded* and is not asked at all for ``cooldown`` seconds (decisions are then
answered by ``esmtpfa.state.guard`` at once).  After the cool-down one request is let
through as a probe while the others keep going around it; an answer ends the
degradation, a failure starts another cool-down.

The states are those of the upstream relay's breaker (``esmtpfa.relay.pool``).  This one
lives here so that the state layer does not depend on the relay, and it reports only
what the operator needs: whether the store is degraded, and why it became so.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

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


class StateBreaker:
    """Closed (ask the store), open (do not, until ``cooldown`` has passed), half-open
    (one probe under way; the rest do not ask).

    ``on_change(degraded, why)`` is called when the store becomes degraded (the breaker
    opens from closed) and when it answers again, never on the steps in between, so a
    caller can log once per transition."""

    def __init__(self, clock: IReactorTime, *, failures: int = FAILURES,
                 cooldown: float = COOLDOWN,
                 on_change: Callable[[bool, str], None] | None = None):
        if failures < 1 or cooldown <= 0:
            raise ValueError("a breaker needs failures >= 1 and a positive cool-down")
        self.clock = clock
        self.failures, self.cooldown = failures, cooldown
        self.on_change = on_change
        self.state = CLOSED
        self.consecutive = 0
        self.open_until = 0.0
        #: When the store became degraded (the clock's seconds), else None.
        self.degraded_since: float | None = None
        self._probing = False

    @property
    def degraded(self) -> bool:
        return self.state != CLOSED

    def allow(self) -> bool:
        """May this request go to the store?  Open: no, until the cool-down is over;
        then one probe at a time."""
        if self.state == OPEN:
            if self.clock.seconds() < self.open_until:
                return False
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def succeeded(self) -> None:
        """The store answered (an ``Exceeded`` is an answer too)."""
        self.consecutive = 0
        self._probing = False
        if self.state != CLOSED:
            self.state = CLOSED
            self.degraded_since = None
            self._changed(False, "answered")

    def failed(self, why: str) -> None:
        """A request failed or passed its deadline."""
        self.consecutive += 1
        probe, self._probing = self._probing, False
        if self.state == CLOSED and self.consecutive < self.failures:
            return
        self.open_until = self.clock.seconds() + self.cooldown
        if self.state == CLOSED:
            self.degraded_since = self.clock.seconds()
            self.state = OPEN
            self._changed(True, why)
        elif probe or self.state == HALF_OPEN:
            self.state = OPEN

    def released(self) -> None:
        """A request that ended without telling anything (cancelled by its caller)."""
        self._probing = False

    def _changed(self, degraded: bool, why: str) -> None:
        if self.on_change is not None:
            self.on_change(degraded, why)


__all__ = ["CLOSED", "COOLDOWN", "FAILURES", "HALF_OPEN", "OPEN", "StateBreaker"]
