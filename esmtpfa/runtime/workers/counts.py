"""The relay's limits across its workers: the supervisor keeps the counts (docs/workers.md).

N workers must not give a client N budgets, so with ``--workers`` the counts of every
limit live in the supervisor (``SharedLimits``): the connection caps of the SMTP
listeners and of the HTTP API, the login throttle and the sending rates.  A worker asks
over its control channel (``esmtpfa.runtime.workers.control``) through the ledgers below, which
implement the same interfaces as the in-process ones (``esmtpfa.limits.interfaces``), so
the limits' rules run unchanged in the worker.  With ``--state-url`` the throttle and
the rates go to Redis instead, shared by every replica (``esmtpfa.limits.redis``); the
connection caps stay here: they guard this host's resources.

The supervisor remembers what each worker holds (connection slots, rate reservations)
and gives it all back when that worker's channel closes: a worker that dies frees its
clients' slots at once, and its unsettled reservations cost nobody anything.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from twisted.internet import defer
from zope.interface import implementer

from esmtpfa.auth.sendingrates import Limit
from esmtpfa.common.logs import logger
from esmtpfa.limits.interfaces import (
    Exceeded,
    IConnectionLedger,
    ILocalConnectionLedger,
    ILocalLoginLedger,
    ILocalRateLedger,
    ILoginLedger,
    IRateLedger,
    StateUnavailable,
)
from esmtpfa.runtime.workers.control import (
    CONN_RELEASE,
    CONN_TAKE,
    LOGIN_FAILED,
    LOGIN_REFUSAL,
    LOGIN_SUCCEEDED,
    RATE_GIVE,
    RATE_TAKE,
    Call,
    ControlChannel,
    Handler,
)

log = logger("esmtpfa.workers")

SMTP = "smtp"
HTTP = "http"


class SharedLimits:
    """The supervisor's counts, for all workers: in-process ledgers of its own
    (``esmtpfa.limits.ledgers``), asked through their synchronous twins."""

    def __init__(self, *, login: ILocalLoginLedger, rates: ILocalRateLedger,
                 connections: dict[str, ILocalConnectionLedger]):
        self.login = login
        self.rates = rates
        self.connections = connections

    def for_worker(self, slot: int) -> "WorkerAccount":
        return WorkerAccount(self, slot)


class WorkerAccount:
    """What one worker holds in the shared counts, and the control calls it may make."""

    def __init__(self, limits: SharedLimits, slot: int):
        self.limits = limits
        self.slot = slot
        self.slots: Counter[tuple[str, str]] = Counter()
        self.reserved: Counter[tuple[str, str, int, float]] = Counter()

    def handlers(self) -> dict[Call, Handler]:
        return {
            CONN_TAKE: self.conn_take, CONN_RELEASE: self.conn_release,
            LOGIN_REFUSAL: self.login_refusal, LOGIN_FAILED: self.login_failed,
            LOGIN_SUCCEEDED: self.login_succeeded,
            RATE_TAKE: self.rate_take, RATE_GIVE: self.rate_give,
        }

    # -- connections ----------------------------------------------------------------------

    def conn_take(self, kind: str, ip: str) -> str | None:
        reason = self.limits.connections[kind].refusal_now(ip)
        if reason is None:
            self.slots[(kind, ip)] += 1
        return reason

    def conn_release(self, kind: str, ip: str) -> None:
        slot = (kind, ip)
        if self.slots[slot] <= 0:
            self.slots.pop(slot, None)
            return  # nothing held: a second release must not free another's slot
        self.slots[slot] -= 1
        if not self.slots[slot]:
            del self.slots[slot]
        self.limits.connections[kind].release(ip)

    # -- login throttle ---------------------------------------------------------------------

    def login_refusal(self, address: str, identities: list[str]) -> str | None:
        return self.limits.login.refusal_now(address, identities)

    def login_failed(self, address: str, identities: list[str]) -> list[int]:
        return self.limits.login.failed_now(address, identities)

    def login_succeeded(self, address: str, identity: str) -> None:
        self.limits.login.succeeded_now(address, identity)

    # -- sending rates ------------------------------------------------------------------------

    def rate_take(self, key: str, kind: str, count: int, window: float, n: int
                  ) -> dict | None:
        refused = self.limits.rates.take_now(key, kind, Limit(count, window), n)
        if refused is not None:
            return {"retry_after": refused.retry_after}
        self.reserved[(key, kind, count, window)] += n
        return None

    def rate_give(self, key: str, kind: str, count: int, window: float, n: int,
                  counted: bool) -> None:
        slot = (key, kind, count, window)
        n = min(n, self.reserved[slot])
        if n <= 0:
            self.reserved.pop(slot, None)
            return
        self.reserved[slot] -= n
        if not self.reserved[slot]:
            del self.reserved[slot]
        self.limits.rates.give_now(key, kind, Limit(count, window), n, counted)

    # -- the worker went away -----------------------------------------------------------------

    def close(self) -> None:
        """Give back everything the worker held (its process is gone)."""
        slots, self.slots = self.slots, Counter()
        for (kind, ip), held in slots.items():
            for _ in range(held):
                self.limits.connections[kind].release(ip)
        reserved, self.reserved = self.reserved, Counter()
        for (key, kind, count, window), n in reserved.items():
            self.limits.rates.give_now(key, kind, Limit(count, window), n, False)
        if slots or reserved:
            log.info("worker {slot}: gave back {slots} connection slot(s) and {reserved} "
                     "rate reservation(s) it held", slot=self.slot,
                     slots=sum(slots.values()), reserved=sum(reserved.values()))


# -- the worker's side ------------------------------------------------------------------------


@implementer(IConnectionLedger)
class RemoteConnections:
    """A worker's connection caps: the supervisor counts for all workers."""

    def __init__(self, channel: ControlChannel, kind: str, total: int, per_ip: int):
        self.channel, self.kind = channel, kind
        self.total, self.per_ip = total, per_ip
        #: Connections waiting for their count.  Each holds a descriptor for up to the
        #: call deadline; when the supervisor stalls, a flood must not pile them up
        #: beyond what the cap would let in anyway.
        self.waiting = 0

    def refusal(self, ip: str) -> defer.Deferred:
        if self.waiting >= self.total:
            return defer.fail(StateUnavailable(
                f"{self.waiting} {self.kind} connections already wait for their count"))
        self.waiting += 1

        def answered(result: Any) -> Any:
            self.waiting -= 1
            return result
        return self.channel.call(CONN_TAKE, kind=self.kind, ip=ip).addBoth(answered)

    def release(self, ip: str) -> None:
        self.channel.notify(CONN_RELEASE, kind=self.kind, ip=ip)


@implementer(ILoginLedger)
class RemoteLoginLedger:
    """A worker's login throttle counts, kept by the supervisor."""

    def __init__(self, channel: ControlChannel, per_address: int, per_identity: int,
                 window: float):
        self.channel = channel
        self.per_address, self.per_identity, self.window = per_address, per_identity, window

    # ``ILoginLedger`` takes any sequence of identities; the channel carries a list.

    def refusal(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        return self.channel.call(LOGIN_REFUSAL, address=address, identities=list(identities))

    def failed(self, address: str, identities: Sequence[str]) -> defer.Deferred:
        return self.channel.call(LOGIN_FAILED, address=address, identities=list(identities))

    def succeeded(self, address: str, identity: str) -> defer.Deferred:
        return self.channel.call(LOGIN_SUCCEEDED, address=address, identity=identity)


@implementer(IRateLedger)
class RemoteRateLedger:
    """A worker's sending-rate counts, kept by the supervisor."""

    def __init__(self, channel: ControlChannel):
        self.channel = channel

    def take(self, key: str, kind: str, limit: Limit, n: int) -> defer.Deferred:
        def answered(refused: dict | None) -> None:
            if refused is not None:
                raise Exceeded(kind, limit, float(refused["retry_after"]))
        return self.channel.call(RATE_TAKE, key=key, kind=kind, count=limit.count,
                                 window=limit.window, n=n).addCallback(answered)

    def give(self, key: str, kind: str, limit: Limit, n: int, count: bool) -> defer.Deferred:
        self.channel.notify(RATE_GIVE, key=key, kind=kind, count=limit.count,
                            window=limit.window, n=n, counted=count)
        return defer.succeed(None)


__all__ = ["HTTP", "RemoteConnections", "RemoteLoginLedger", "RemoteRateLedger", "SMTP",
           "SharedLimits", "WorkerAccount"]
