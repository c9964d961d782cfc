"""Timeouts that are moved on every command and almost never fire.

Two shapes, for two patterns:

``Deadline``
    One timer pushed back again and again by the same amount (the upstream client's
    reply timeout): as ``cancel()`` + ``callLater()`` that is two heap operations and a
    new ``DelayedCall`` per reply.  ``Deadline`` keeps one ``DelayedCall``; moving the
    deadline later only records the new time, and the call, when it comes, waits again
    for the rest; disarming only clears a flag.  A call is never moved *sooner* (the
    reactor would find it by a linear search of its heap): it is replaced.

``Sweeper``
    Deadlines of seconds or minutes for many owners that move them back *and forth*
    (an SMTP client's stage changes at every command; a relay operation's deadline starts
    and stops per operation).  The due times sit in a dict, and while there are any, one
    sweep every ``resolution`` seconds expires the overdue ones: setting, moving and
    clearing are dict operations, whatever the number of connections, and a deadline
    fires at most ``resolution`` late.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from esmtpfa.common.logs import logger

log = logger("esmtpfa")


class Deadline:
    """Calls ``expired()`` once ``seconds`` pass without ``set()`` being called again."""

    __slots__ = ("_clock", "_expired", "_armed", "_call", "_at", "_due")

    def __init__(self, clock: IReactorTime, expired: Callable[[], None]):
        self._clock = clock
        self._expired = expired
        self._armed = False
        self._call: IDelayedCall | None = None
        self._at = 0.0   # when the pending call fires
        self._due = 0.0  # when the deadline expires (never before ``_at``)

    def set(self, seconds: float) -> None:
        """(Re)start: ``expired()`` in ``seconds`` unless set or cleared before.

        A later time is only recorded: the pending call, when it comes, finds the
        deadline moved and waits again for the rest (a reply timeout is set for every
        reply and almost never expires, so this is one clock read per set).  A sooner
        one replaces the call, because the reactor finds a call moved sooner by a
        linear search of its heap, while a cancel and a new call cost two heap
        operations."""
        self._armed = True
        due = self._due = self._clock.seconds() + seconds
        call = self._call
        if call is not None:
            if due >= self._at:
                return
            call.cancel()
        self._at = due
        self._call = self._clock.callLater(seconds, self._fire)

    def clear(self) -> None:
        """Disarm; the pending call, if any, fires into nothing (or is reused by set)."""
        self._armed = False

    def stop(self) -> None:
        """Disarm and cancel the pending call (the connection is gone)."""
        self._armed = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def armed(self) -> bool:
        return self._armed

    def _fire(self) -> None:
        self._call = None
        if not self._armed:
            return
        left = self._due - self._clock.seconds()
        if left > 0:  # moved later since the call was made: wait for the rest
            self._at = self._due
            self._call = self._clock.callLater(left, self._fire)
            return
        self._armed = False
        self._expired()


class Sweeper:
    """Due times for many owners; ``expired(owner)`` once each, by a periodic sweep."""

    __slots__ = ("_clock", "_expired", "resolution", "_due", "_sweep_call")

    def __init__(self, clock: IReactorTime, expired: Callable[[Any], None],
                 resolution: float = 1.0):
        self._clock = clock
        self._expired = expired
        self.resolution = resolution
        self._due: dict[Hashable, float] = {}
        self._sweep_call: IDelayedCall | None = None

    def set(self, owner: Hashable, seconds: float) -> None:
        """(Re)arm ``owner``: expired in ``seconds`` (at most ``resolution`` later)."""
        self._due[owner] = self._clock.seconds() + seconds
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(self.resolution, self._sweep)

    def clear(self, owner: Hashable) -> None:
        self._due.pop(owner, None)

    def armed(self, owner: Hashable) -> bool:
        return owner in self._due

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self._clock.seconds()
        overdue = [owner for owner, due in self._due.items() if due <= now]
        for owner in overdue:
            del self._due[owner]
        for owner in overdue:
            try:
                self._expired(owner)
            except Exception:
                log.failure("a deadline's expiry failed")
        if self._due:
            self._sweep_call = self._clock.callLater(self.resolution, self._sweep)

    def close(self) -> None:
        self._due.clear()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None

    def __len__(self) -> int:
        return len(self._due)
