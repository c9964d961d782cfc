"""A timeout that is pushed back on every command and almost never fires.

The SMTP server restarts its idle timeout for each command and the upstream client its
reply timeout for each reply: as ``cancel()`` + ``callLater()`` that is two heap
operations and a new ``DelayedCall`` per command.  ``Deadline`` keeps one ``DelayedCall``
and moves it with ``reset()``, which for a later time only records the delay (the
reactor re-inserts the call when it comes due); disarming only clears a flag.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Calls ``expired()`` once ``seconds`` pass without ``set()`` being called again."""

    __slots__ = ("_clock", "_expired", "_armed", "_call")

    def __init__(self, clock: IReactorTime, expired: Callable[[], None]):
        self._clock = clock
        self._expired = expired
        self._armed = False
        self._call: IDelayedCall | None = None

    def set(self, seconds: float) -> None:
        """(Re)start: ``expired()`` in ``seconds`` unless set or cleared before."""
        self._armed = True
        call = self._call
        if call is not None and call.active():
            call.reset(seconds)
        else:
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
        if self._armed:
            self._armed = False
            self._expired()
