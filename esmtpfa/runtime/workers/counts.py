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

Connection slots are lent ahead (docs/workers.md, "Connection slots lent ahead").  While
the counts are far from the limits (both at most half of theirs) a worker that asks for
one slot gets up to ``LEASE_BATCH``, and keeps a slot its connection freed, so that most
new connections and every close cost no round trip.  The limits stay exact both ways:

* never exceeded: every slot a worker keeps counts at the supervisor, used or not;
* never refused early: before the supervisor refuses, it asks every worker that was
  lent slots for that limit (``conn.recall``) to give back those it does not use, and
  then decides again.  A worker keeps slots only while its last answer said there was
  room, and gives back a slot unused for ``LEASE_IDLE`` seconds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

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
from esmtpfa.limits.ledgers import PER_ADDRESS_LIMIT
from esmtpfa.runtime.workers.control import (
    CONN_RECALL,
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

#: The most connection slots a worker asks for at once (one for the connection that
#: asks, the rest kept for the next ones), and the most it keeps per address.
LEASE_BATCH = 8
#: Seconds after which slots a worker kept and did not use go back to the supervisor.
LEASE_IDLE = 1.0


class SharedLimits:
    """The supervisor's counts, for all workers: in-process ledgers of its own
    (``esmtpfa.limits.ledgers``), asked through their synchronous twins."""

    def __init__(self, *, login: ILocalLoginLedger, rates: ILocalRateLedger,
                 connections: dict[str, ILocalConnectionLedger]):
        self.login = login
        self.rates = rates
        self.connections = connections
        self.accounts: set[WorkerAccount] = set()

    def for_worker(self, slot: int) -> "WorkerAccount":
        account = WorkerAccount(self, slot)
        self.accounts.add(account)
        return account

    def recall(self, kind: str, ip: str | None) -> defer.Deferred | None:
        """Ask every worker that may keep unused slots toward the limit that is about to
        refuse (``ip``'s, or with None the total) to give them back; fires when all
        have answered (or failed to: their slots then stay theirs).  None when no
        worker may keep any: the refusal stands at once."""
        asked = [account.recall(kind, ip) for account in list(self.accounts)
                 if account.may_keep(kind, ip)]
        if not asked:
            return None
        return defer.DeferredList(asked, consumeErrors=True)


def take_back(held: Counter[Any], key: Any, n: int) -> int:
    """Lower what is held under ``key`` by ``n``, never below nothing (a release never
    taken must not free another's share); how much was really given back.  The
    supervisor's account of a worker and a worker's slots kept ahead both count so."""
    n = min(n, held[key])
    if n <= 0:
        held.pop(key, None)
        return 0
    held[key] -= n
    if not held[key]:
        del held[key]
    return n


class WorkerAccount:
    """What one worker holds in the shared counts, and the control calls it may make."""

    def __init__(self, limits: SharedLimits, slot: int):
        self.limits = limits
        self.slot = slot
        self.slots: Counter[tuple[str, str]] = Counter()
        self.reserved: Counter[tuple[str, str, int, float]] = Counter()
        #: (kind, ip) for which the worker was lent slots ahead and may keep some.
        self.lent: set[tuple[str, str]] = set()
        #: Asks the worker to give back what it keeps (``attach``).
        self._recall: Callable[..., defer.Deferred] | None = None

    def attach(self, channel: ControlChannel) -> None:
        """The worker's channel, for ``conn.recall``."""
        self._recall = lambda **args: channel.call(CONN_RECALL, **args)

    def handlers(self) -> dict[Call, Handler]:
        return {
            CONN_TAKE: self.conn_take, CONN_RELEASE: self.conn_release,
            LOGIN_REFUSAL: self.login_refusal, LOGIN_FAILED: self.login_failed,
            LOGIN_SUCCEEDED: self.login_succeeded,
            RATE_TAKE: self.rate_take, RATE_GIVE: self.rate_give,
        }

    # -- connections ----------------------------------------------------------------------

    def conn_take(self, kind: str, ip: str, want: int = 1) -> int | str | defer.Deferred:
        """How many slots the worker now holds more (at least the one it asked for, up
        to ``want`` while there is room); or the limit that refuses, once no other
        worker keeps an unused slot toward it."""
        ledger = self.limits.connections[kind]
        reason = ledger.refusal_now(ip)
        if reason is None:
            return self._lend(kind, ip, 1 + ledger.take_spare(ip, max(want - 1, 0)))
        recalled = self.limits.recall(kind, ip if reason == PER_ADDRESS_LIMIT else None)
        if recalled is None:
            return reason

        def again(_: Any) -> int | str:
            reason = ledger.refusal_now(ip)
            return reason if reason is not None else self._lend(kind, ip, 1)
        return recalled.addCallback(again)

    def _lend(self, kind: str, ip: str, granted: int) -> int:
        self.slots[(kind, ip)] += granted
        if granted > 1:
            self.lent.add((kind, ip))
        return granted

    def conn_release(self, kind: str, ip: str, n: int = 1) -> None:
        slot = (kind, ip)
        n = take_back(self.slots, slot, n)
        if slot not in self.slots:
            self.lent.discard(slot)  # it holds none there: none kept (and no memory)
        ledger = self.limits.connections[kind]
        for _ in range(n):
            ledger.release(ip)

    def may_keep(self, kind: str, ip: str | None) -> bool:
        """Whether the worker may keep unused slots toward ``ip``'s limit (None: the
        total)."""
        if ip is not None:
            return (kind, ip) in self.lent
        return any(lent_kind == kind for lent_kind, _ in self.lent)

    def recall(self, kind: str, ip: str | None) -> defer.Deferred:
        """Ask the worker to give back the slots it keeps toward that limit: it sends
        them back as ``conn.release`` notices before it answers, so they are counted
        back when the answer comes."""
        self.lent -= {key for key in self.lent
                      if key[0] == kind and (ip is None or key[1] == ip)}
        if self._recall is None:
            return defer.succeed(0)
        return self._recall(kind=kind, ip=ip or "")

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
        n = take_back(self.reserved, (key, kind, count, window), n)
        if n:
            self.limits.rates.give_now(key, kind, Limit(count, window), n, counted)

    # -- the worker went away -----------------------------------------------------------------

    def close(self) -> None:
        """Give back everything the worker held (its process is gone)."""
        self.limits.accounts.discard(self)
        self.lent.clear()
        self._recall = None
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
    """A worker's connection caps: the supervisor counts for all workers, and lends
    slots ahead while there is room (the module's docstring says how that stays exact).
    """

    def __init__(self, channel: ControlChannel, kind: str, total: int, per_ip: int,
                 clock: Any):
        self.channel, self.kind, self.clock = channel, kind, clock
        self.total, self.per_ip = total, per_ip
        #: Connections waiting for their count.  Each holds a descriptor for up to the
        #: call deadline; when the supervisor stalls, a flood must not pile them up
        #: beyond what the cap would let in anyway.
        self.waiting = 0
        #: Slots held for an address and not in use.
        self.spare: Counter[str] = Counter()
        #: Addresses whose last answer lent ahead: a slot freed there is kept.
        self._keep: set[str] = set()
        #: Addresses whose kept slots were used since the last sweep.
        self._used: set[str] = set()
        self._sweep: Any = None

    def refusal(self, ip: str) -> defer.Deferred:
        if take_back(self.spare, ip, 1):
            self._used.add(ip)
            return defer.succeed(None)
        if self.waiting >= self.total:
            return defer.fail(StateUnavailable(
                f"{self.waiting} {self.kind} connections already wait for their count"))
        self.waiting += 1

        def answered(result: Any) -> Any:
            self.waiting -= 1
            if isinstance(result, str):
                return result  # the limit that refuses
            if result > 1:
                self._keep.add(ip)
                self._hold(ip, result - 1)
            else:
                self._keep.discard(ip)
            return None

        def failed(failure: Any) -> Any:
            self.waiting -= 1
            return failure
        return self.channel.call(CONN_TAKE, kind=self.kind, ip=ip,
                                 want=LEASE_BATCH).addCallbacks(answered, failed)

    def release(self, ip: str) -> None:
        if ip in self._keep and self.spare[ip] < LEASE_BATCH:
            self._hold(ip, 1)
        else:
            self.channel.notify(CONN_RELEASE, kind=self.kind, ip=ip)

    def recall(self, ip: str) -> int:
        """The supervisor is about to refuse a connection at a limit (``ip``'s; the
        total when empty): give back what is kept toward it, and keep no more until
        an answer lends ahead again.  The notices leave before the answer."""
        addresses = [ip] if ip else list(self.spare)
        if ip:
            self._keep.discard(ip)
        else:
            self._keep.clear()
        return sum(self._give_back(address) for address in addresses)

    def _hold(self, ip: str, n: int) -> None:
        self.spare[ip] += n
        self._used.add(ip)
        if self._sweep is None:
            self._sweep = self.clock.callLater(LEASE_IDLE, self._swept)

    def _swept(self) -> None:
        """Give back what was kept and not used since the last sweep, and forget those
        addresses: what is remembered stays bounded by recent clients, and a slot
        freed there later goes back at once."""
        self._sweep = None
        for ip in [ip for ip in self.spare if ip not in self._used]:
            self._give_back(ip)
            self._keep.discard(ip)
        self._used.clear()
        if self.spare:
            self._sweep = self.clock.callLater(LEASE_IDLE, self._swept)

    def _give_back(self, ip: str) -> int:
        n = self.spare.pop(ip, 0)
        if n:
            self.channel.notify(CONN_RELEASE, kind=self.kind, ip=ip, n=n)
        return n


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
        """A notice: the login is answered without waiting for it (it only takes
        failures back), and the channel keeps it in order with later calls."""
        self.channel.notify(LOGIN_SUCCEEDED, address=address, identity=identity)
        return defer.succeed(None)


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


__all__ = ["HTTP", "LEASE_BATCH", "LEASE_IDLE", "RemoteConnections", "RemoteLoginLedger",
           "RemoteRateLedger", "SMTP", "SharedLimits", "WorkerAccount"]
