"""Sending rates per identity: messages and recipients over rolling windows (docs/policy.md).

A limit reads like ``100/1h``: at most 100 in any hour.  Counting every event of a day
per identity would cost up to a day's worth of timestamps each; instead each limit keeps
two fixed windows, the current and the previous one, and estimates the rolling count as
the current window's count plus the previous one's weighted by how much of it still lies
inside the rolling window.  That costs a few numbers per identity, is exact when traffic
is even, and errs by at most the previous window's count times the fraction of a window
elapsed otherwise (the well-known sliding-window-counter estimate).

What is counted is what the upstream accepted.  A transaction *reserves* its message and
each recipient as the client asks (so parallel transactions of one identity cannot all
pass a check before any of them counts), then commits the reservation when the upstream
accepted the message, or releases it when it did not: a refused or failed message costs
the client nothing.

Memory is bounded: the limiter keeps at most ``max_keys`` identities and forgets the one
used least recently first (a forgotten identity starts afresh, which errs toward letting
mail through, never toward losing it: a refusal here is always temporary).

What a limit *is* (``Limit``, ``Rates``, the ``100/1h`` syntax) is part of an identity's
policy, ``esmtpfa.auth.sendingrates``; this module only counts against it.

The counts live in a ledger (``esmtpfa.limits.interfaces.IRateLedger``): ``RateLimiter``
(``esmtpfa.limits.ledgers``, where the two windows are counted: ``_Counter``) keeps them
in this process; the workers' supervisor and Redis (``esmtpfa.limits.redis``) keep the
same counts for several processes, so N workers or N replicas share one budget.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from esmtpfa.auth.sendingrates import Limit, Rates
from esmtpfa.common.logs import logger
from esmtpfa.limits.interfaces import IRateLedger

log = logger("esmtpfa.ratelimit")


class Reservation:
    """One transaction's place in its identity's budgets: the message and each
    recipient, reserved as the client asks, then committed or released once.

    The ledger may be another process, so reserving answers with a Deferred.  A
    reservation that is settled while a ``take`` is still on its way gives that take
    back when it lands: a client that leaves mid-command costs its identity nothing."""

    __slots__ = ("_ledger", "_key", "_rates", "_recipients", "_message", "_settled")

    def __init__(self, ledger: IRateLedger, key: str, rates: Rates):
        self._ledger, self._key, self._rates = ledger, key, rates
        self._recipients = 0
        self._message = False
        self._settled = False

    def message(self) -> Deferred:
        """Reserve the message; fails with ``Exceeded`` when the message rate is full."""
        if self._message or self._rates.messages is None:
            return succeed(None)

        def taken(_):
            if self._settled:
                self._give("messages", self._rates.messages, 1, False)
            else:
                self._message = True
        return self._ledger.take(self._key, "messages", self._rates.messages, 1
                                 ).addCallback(taken)

    def recipient(self) -> Deferred:
        """Reserve one more recipient; fails with ``Exceeded`` when that rate is full."""
        if self._rates.recipients is None:
            return succeed(None)

        def taken(_):
            if self._settled:
                self._give("recipients", self._rates.recipients, 1, False)
            else:
                self._recipients += 1
        return self._ledger.take(self._key, "recipients", self._rates.recipients, 1
                                 ).addCallback(taken)

    def drop_recipient(self) -> None:
        """A recipient reserved and then refused (by the upstream): give its place back."""
        if self._recipients and not self._settled:
            self._recipients -= 1
            self._give("recipients", self._rates.recipients, 1, False)

    def commit(self) -> None:
        """The upstream accepted the message: what was reserved now counts."""
        self._settle(count=True)

    def release(self) -> None:
        """The message did not go: give its reservations back."""
        self._settle(count=False)

    def _settle(self, count: bool) -> None:
        if self._settled:
            return
        self._settled = True
        if self._message:
            self._give("messages", self._rates.messages, 1, count)
        if self._recipients:
            self._give("recipients", self._rates.recipients, self._recipients, count)

    def _give(self, kind: str, limit: Limit | None, n: int, count: bool) -> None:
        """Settling never waits and never fails the client: what the ledger could not
        record is logged by the ledger's guard (``esmtpfa.limits.guard``)."""
        self._ledger.give(self._key, kind, limit, n, count).addErrback(
            lambda failure: log.failure("settling a {kind} reservation failed",
                                        failure, kind=kind))


__all__ = ["Reservation"]
