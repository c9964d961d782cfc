"""The limits' ledgers in this process, and which ledger each limit of a process uses.

A ledger keeps what a limit counts; the limit's rules that do not depend on where the
counts live stay with the limit (``throttle``: who is asked, how long an answer waits;
``rates``: reserving per transaction).  Every ledger answers the interfaces of
``esmtpfa.limits.interfaces`` with Deferreds, because a ledger may be another process.
The three in-process ledgers here also have one synchronous twin per method, named
``<method>_now``, answering the same thing at once (``ILocal*Ledger``):

=============  ============================  =========================================
kind           Deferred (the interface)      synchronous twin (this process)
=============  ============================  =========================================
login          ``refusal``, ``failed``,      ``refusal_now`` → reason or None,
               ``succeeded``                 ``failed_now`` → counts, ``succeeded_now``
rates          ``take`` (fails with          ``take_now`` → ``Exceeded`` or None,
               ``Exceeded``), ``give``       ``give_now``
connections    ``refusal``, ``release``      ``refusal_now`` → limit or None
                                             (``release`` is synchronous already)
=============  ============================  =========================================

A refusal is a value in every twin, never an exception; the Deferred method is the twin
wrapped in a fired Deferred.  The workers' supervisor (``esmtpfa.runtime.workers.counts``)
calls the twins for all its workers, so its limits are exactly these.

Rules implemented twice
-----------------------

The login throttle's and the sending rates' ledgers exist twice: here in Python, and in
Lua in Redis (``esmtpfa.limits.redis``, for ``--state-url``; docs/shared-state.md,
"What is shared, and what is not").  Each rule below must give the same answer for the
same events and clock readings in both; ``LedgerEquivalenceTests`` in
``tests/test_state_redis.py`` runs both against a real ``redis-server`` step by step, on
fixed tables and on seeded random sequences; every line of the rules listed runs
in it:

* **failures in a sliding window** (``FailureWindow``; Lua ``_RECENT``): a failure counts
  for ``window`` seconds; each list keeps at most its depth, the oldest dropped first
  (address: ``per_address``; identity: ``throttle.identity_depth``; (identity, address):
  ``per_identity``);
* **a login refused before any provider is asked** (``refusal_now``; ``LOGIN_REFUSAL``):
  an address with ``per_address`` failures, or an identity with ``per_identity``
  failures claimed from an address that failed against it;
* **a failed login** (``failed_now``; ``LOGIN_FAILED``): one failure for the address,
  each identity and each (identity, address); the answer is each identity's count;
* **a login succeeded** (``succeeded_now``; ``LOGIN_SUCCEEDED``): the (identity,
  address) failures still listed are taken back from the identity's, the address's stay;
* **a rate's two fixed windows** (``_Counter.roll`` and ``estimate``; Lua ``_COUNTER``):
  the window moves by whole windows; the previous one is the current one only when
  exactly one window passed; the rolling count is the current window's, the previous
  one's weighted by its part still inside, and what is reserved;
* **a take** (``take_now``; ``RATE_TAKE``): refused when the estimate plus ``n`` is over
  the limit, with ``_Counter.retry_after``; else ``n`` is reserved;
* **a give** (``give_now``; ``RATE_GIVE``): the reserved count goes down by ``n``, never
  below zero, and ``n`` counts in the current window when it counts.

The intended differences (docs/shared-state.md, "What is shared, and what is not"): the
tables here forget the least recently used key past ``max_keys``, Redis forgets a key
when it expires; and only Redis drops a reservation nobody settled (``RESERVATION_TTL``).
The connection ledger exists once: open connections belong to one host.

Which ledger a process uses is ``Ledgers``: a field left None means the limit counts in
this process, as a relay of one process does.  A worker gets the supervisor's ledgers;
with ``--state-url`` the login throttle and the sending rates use Redis instead
(docs/workers.md, docs/shared-state.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from bisect import bisect_right
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from esmtpfa.auth.sendingrates import Limit
from esmtpfa.limits.interfaces import (
    Exceeded,
    IConnectionLedger,
    ILocalConnectionLedger,
    ILocalLoginLedger,
    ILocalRateLedger,
    ILoginLedger,
    IRateLedger,
)

# -- login --------------------------------------------------------------------------------


class FailureWindow:
    """Recent failures per key, in a sliding window and in bounded memory.

    Each key keeps at most ``depth`` timestamps (an ``array`` of doubles: 8 octets each),
    and at most ``max_keys`` keys are kept: the key whose last failure is the oldest is
    forgotten first.  Reading never refreshes a key, so only failures keep one alive.
    """

    def __init__(self, limit: int, window: float, clock, max_keys: int = 100_000,
                 depth: int | None = None):
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self.depth = max(limit, depth or 0, 1)
        self._failures: OrderedDict[Hashable, array] = OrderedDict()

    def _recent(self, key: Hashable) -> array | None:
        times = self._failures.get(key)
        if times is None:
            return None
        expired = bisect_right(times, self.clock.seconds() - self.window)
        if expired:
            del times[:expired]
        if not times:
            del self._failures[key]
            return None
        return times

    def count(self, key: Hashable) -> int:
        """Failures of ``key`` within the window (at most ``depth``)."""
        times = self._recent(key)
        return 0 if times is None else len(times)

    def blocked(self, key: Hashable) -> bool:
        return self.count(key) >= self.limit

    def failed(self, key: Hashable) -> float:
        """Count one failure now; return its timestamp (to ``forget`` it later)."""
        now = self.clock.seconds()
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = array("d")
        else:
            self._failures.move_to_end(key)
        times.append(now)
        if len(times) > self.depth:
            del times[0]
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        return now

    def times(self, key: Hashable) -> tuple[float, ...]:
        times = self._recent(key)
        return () if times is None else tuple(times)

    def forget(self, key: Hashable, stamps: Iterable[float]) -> None:
        """Take these failures (timestamps from ``failed``) back, each once."""
        times = self._failures.get(key)
        if times is None:
            return
        for stamp in stamps:
            try:
                times.remove(stamp)
            except ValueError:
                pass  # already expired, or pushed out past ``depth``
        if not times:
            del self._failures[key]

    def clear(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)



class IdentityDigest:
    """A keyed digest of an identity: a user that came out of the password field
    (``Claim.user_in_secret``) is never kept as typed, and every key has the same small
    size however long the username a client sent.  Ledgers shared by several processes
    share the key (the supervisor's, or one kept in Redis)."""

    def __init__(self, key: bytes | None = None):
        self.key = key if key is not None else os.urandom(16)

    def __call__(self, identity: str) -> bytes:
        return hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=16,
                               key=self.key).digest()



@implementer(ILocalLoginLedger)
class LocalLoginLedger:
    """The throttle's counts in this process (bounded ``FailureWindow`` tables)."""

    def __init__(self, per_address: int, per_identity: int, window: float, clock, *,
                 depth: int | None = None, max_keys: int = 100_000,
                 digest: IdentityDigest | None = None):
        self.per_address, self.per_identity, self.window = per_address, per_identity, window
        self.digest = digest or IdentityDigest()
        self.addresses = FailureWindow(per_address, window, clock, max_keys)
        self.identities = FailureWindow(per_identity, window, clock, max_keys,
                                        depth=max(depth or 0, per_identity + 1))
        # (identity, address) → that address's recent failures against that identity.
        self.pairs = FailureWindow(1, window, clock, max_keys, depth=per_identity)

    def refusal(self, address: str, identities: Sequence[str]) -> Deferred:
        return succeed(self.refusal_now(address, identities))

    def refusal_now(self, address: str, identities: Sequence[str]) -> str | None:
        """Why a login from ``address`` claiming ``identities`` is refused, or None."""
        if self.addresses.blocked(address):
            return "too many failed logins from this address"
        for identity in identities:
            key = self.digest(identity)
            if (self.identities.count(key) >= self.per_identity
                    and self.pairs.count((key, address))):
                return "too many failed logins for this identity, and some from this address"
        return None

    def failed(self, address: str, identities: Sequence[str]) -> Deferred:
        return succeed(self.failed_now(address, identities))

    def failed_now(self, address: str, identities: Sequence[str]) -> list[int]:
        """Count one failed login; each identity's failures within the window."""
        self.addresses.failed(address)
        counts = []
        for identity in identities:
            key = self.digest(identity)
            self.identities.failed(key)
            self.pairs.failed((key, address))
            counts.append(self.identities.count(key))
        return counts

    def succeeded(self, address: str, identity: str) -> Deferred:
        self.succeeded_now(address, identity)
        return succeed(None)

    def succeeded_now(self, address: str, identity: str) -> None:
        """Take ``address``'s failures against ``identity`` back (the pair's list may
        hold fewer than the identity's: only those are taken back)."""
        key = self.digest(identity)
        pair = (key, address)
        self.identities.forget(key, self.pairs.times(pair))
        self.pairs.clear(pair)


# -- sending rates ------------------------------------------------------------------------


class _Counter:
    """Two fixed windows of one limit, plus what is reserved and not yet settled."""

    __slots__ = ("start", "current", "previous", "reserved")

    def __init__(self, start: float):
        self.start, self.current, self.previous, self.reserved = start, 0, 0, 0

    def roll(self, now: float, window: float) -> None:
        elapsed = now - self.start
        if elapsed < window:
            return
        windows = int(elapsed // window)
        self.previous = self.current if windows == 1 else 0
        self.current = 0
        self.start += windows * window

    def estimate(self, now: float, window: float) -> float:
        """Events in the rolling window ending now, reservations included."""
        self.roll(now, window)
        inside = 1.0 - (now - self.start) / window
        return self.previous * inside + self.current + self.reserved

    def retry_after(self, now: float, window: float, limit: int, wanted: int) -> float:
        """Seconds until ``wanted`` more would fit (at least one second)."""
        self.roll(now, window)
        room = limit - self.current - self.reserved - wanted
        if room < 0 or self.previous == 0:
            # Only the next window's start can help (and after it, the decay of this one).
            return max(1.0, self.start + window - now)
        # previous * (1 - (elapsed + t) / window) <= room
        elapsed = now - self.start
        t = window * (1.0 - room / self.previous) - elapsed
        return max(1.0, math.ceil(t))



@implementer(ILocalRateLedger)
class RateLimiter:
    """The sending rates' counts of every identity, in this process; time from ``clock``.

    At most ``max_keys`` (identity, kind) counters are kept: the one used least recently
    is forgotten first (it starts afresh, which errs toward letting mail through)."""

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000):
        self.clock = clock
        self.max_keys = max_keys
        self._counters: OrderedDict[tuple[str, str], _Counter] = OrderedDict()

    def _counter(self, key: str, kind: str, now: float) -> _Counter:
        slot = (key, kind)
        counter = self._counters.get(slot)
        if counter is None:
            counter = self._counters[slot] = _Counter(now)
            while len(self._counters) > self.max_keys:
                self._counters.popitem(last=False)
        else:
            self._counters.move_to_end(slot)
        return counter

    def take(self, key: str, kind: str, limit: Limit, n: int) -> Deferred:
        refused = self.take_now(key, kind, limit, n)
        return succeed(None) if refused is None else fail(refused)

    def take_now(self, key: str, kind: str, limit: Limit, n: int) -> Exceeded | None:
        """Reserve ``n`` under ``limit`` and answer None; or, reserving nothing, answer
        the ``Exceeded`` that refuses them (a value: the caller decides to raise it)."""
        now = self.clock.seconds()
        counter = self._counter(key, kind, now)
        if counter.estimate(now, limit.window) + n > limit.count:
            return Exceeded(kind, limit,
                            counter.retry_after(now, limit.window, limit.count, n))
        counter.reserved += n
        return None

    def give(self, key: str, kind: str, limit: Limit, n: int, count: bool) -> Deferred:
        self.give_now(key, kind, limit, n, count)
        return succeed(None)

    def give_now(self, key: str, kind: str, limit: Limit, n: int, count: bool) -> None:
        """Settle ``n`` reserved: they count (``count``) or are given back.  Giving back
        more than is reserved frees nothing that another transaction holds."""
        now = self.clock.seconds()
        counter = self._counter(key, kind, now)
        counter.roll(now, limit.window)
        counter.reserved = max(0, counter.reserved - n)
        if count:
            counter.current += n

    def __len__(self) -> int:
        return len(self._counters)


# -- connections --------------------------------------------------------------------------


#: The reasons ``ConnectionLimits`` refuses a connection with.
TOTAL_LIMIT = "total limit"
PER_ADDRESS_LIMIT = "per-address limit"


@implementer(ILocalConnectionLedger)
class ConnectionLimits:
    """Open connections in total and per client address, in this process: the SMTP
    listeners of one relay share one, the HTTP API has its own, and the workers'
    supervisor keeps one of each for all workers (``esmtpfa.runtime.workers.counts``).

    Only this ledger has no Redis twin: open connections are this host's resources."""

    def __init__(self, total: int, per_ip: int):
        self.total, self.per_ip = total, per_ip
        self.active = 0
        self.by_ip: Counter[str] = Counter()

    def refusal(self, ip: str) -> Deferred:
        return succeed(self.refusal_now(ip))

    def refusal_now(self, ip: str) -> str | None:
        """Take a slot for ``ip``; or, without taking one, the limit that refuses it."""
        if self.active >= self.total:
            return TOTAL_LIMIT
        if self.by_ip[ip] >= self.per_ip:
            return PER_ADDRESS_LIMIT
        self.active += 1
        self.by_ip[ip] += 1
        return None

    def take_spare(self, ip: str, wanted: int) -> int:
        """Slots taken ahead of need only while there is room for all: up to half of
        each limit, so what one worker keeps in hand never refuses another's client
        while the relay is far from its limits (``esmtpfa.runtime.workers.counts``)."""
        taken = 0
        while (taken < wanted and 2 * (self.active + 1) <= self.total
               and 2 * (self.by_ip[ip] + 1) <= self.per_ip):
            self.active += 1
            self.by_ip[ip] += 1
            taken += 1
        return taken

    def release(self, ip: str) -> None:
        self.active -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


# -- which ledger each limit uses ---------------------------------------------------------


@dataclass(frozen=True)
class Ledgers:
    login: ILoginLedger | None = None
    rates: IRateLedger | None = None
    #: Shared by the SMTP listeners (plain and implicit TLS).
    smtp_connections: IConnectionLedger | None = None
    #: The HTTP submission listener's.
    http_connections: IConnectionLedger | None = None


@implementer(IConnectionLedger)
class ConnectionLedgerWrapper:
    """An ``IConnectionLedger`` in front of another: it keeps the wrapped ledger's
    limits and releases, and a subclass changes only ``refusal`` (refuse some clients
    before the counts are asked, or watch the verdicts go by).  Other attributes (e.g.
    ``ConnectionLimits.active``) are the wrapped ledger's."""

    def __init__(self, ledger: IConnectionLedger):
        self._ledger = ledger

    @property
    def total(self) -> int:
        return self._ledger.total

    @property
    def per_ip(self) -> int:
        return self._ledger.per_ip

    def refusal(self, ip: str) -> Deferred:
        return self._ledger.refusal(ip)

    def release(self, ip: str) -> None:
        self._ledger.release(ip)

    def __getattr__(self, name: str) -> object:
        return getattr(self._ledger, name)


__all__ = ["ConnectionLedgerWrapper", "ConnectionLimits", "FailureWindow", "IdentityDigest",
           "Ledgers", "LocalLoginLedger", "PER_ADDRESS_LIMIT", "RateLimiter", "TOTAL_LIMIT"]
