"""A circuit breaker: after ``failures`` consecutive failures, stop asking for
``cooldown`` seconds, then let one trial decide whether the other side is back.

Closed (ask), open (do not, until the cool-down has passed), half-open (one trial under
way; the others do not ask).  Shared by what may fail in the same way: an upstream's
connections (``esmtpfa.relay.pool``) and the shared state's requests
(``esmtpfa.limits.state_breaker``); it depends on nothing of either, only on a clock.
"""

from __future__ import annotations

from typing import Any, Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """``on_change(previous, state)`` is called on every change of state."""

    def __init__(self, failures: int, cooldown: float, clock: Any,
                 on_change: Callable[[str, str], None] | None = None):
        if failures < 1 or cooldown <= 0:
            raise ValueError("a breaker needs failures >= 1 and a positive cool-down")
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self._on_change = on_change
        self.state = CLOSED
        self.consecutive = 0
        self.open_until = 0.0
        self._probing = False

    def open_now(self) -> bool:
        """Open and still cooling down (no side effect, unlike ``allow``)."""
        return self.state == OPEN and self.clock.seconds() < self.open_until

    def allow(self) -> bool:
        """May a trial be made now?  In half-open state only one at a time."""
        if self.state == OPEN:
            if self.clock.seconds() < self.open_until:
                return False
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return True

    def success(self) -> None:
        self.consecutive = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.state == HALF_OPEN or self.consecutive >= self.threshold:
            self.open_until = self.clock.seconds() + self.cooldown
            self._set(OPEN)

    def release(self) -> None:
        """A trial that ended without telling anything (e.g. its caller went away)."""
        self._probing = False

    def _set(self, state: str) -> None:
        previous, self.state = self.state, state
        if previous != state and self._on_change is not None:
            self._on_change(previous, state)


__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker"]
