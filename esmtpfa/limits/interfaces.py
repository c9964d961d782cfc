"""The seams between the relay's limits and the place their counts live.

Every method answers with a Deferred, because a ledger may be another process: the
workers' supervisor (``esmtpfa.runtime.workers``) or Redis (``esmtpfa.limits.redis``).  The
in-process ledgers answer with Deferreds that have already fired, so a single process
pays no more than a call.  A ledger that cannot answer fails with ``StateUnavailable``;
what the relay does then is the operator's choice (``esmtpfa.limits.guard``).

The in-process ledgers (``esmtpfa.limits.ledgers``) also answer at once, through one
synchronous twin per method, ``<method>_now`` (``ILocalLoginLedger``,
``ILocalRateLedger``, ``ILocalConnectionLedger``): the workers' supervisor counts for all
its workers through them.
"""

from __future__ import annotations

from typing import Sequence

from zope.interface import Attribute, Interface

from esmtpfa.auth.sendingrates import Limit


class StateUnavailable(Exception):
    """The shared state could not be read or written in time (down, slow, refused)."""


class Exceeded(Exception):
    """Over a sending rate: ``kind`` ("messages" or "recipients"), ``limit``,
    ``retry_after`` (seconds).  A rate ledger's refusal, whichever ledger it is."""

    def __init__(self, kind: str, limit: Limit, retry_after: float):
        super().__init__(f"{kind} rate {limit} reached; retry in {retry_after:.0f} s")
        self.kind, self.limit, self.retry_after = kind, limit, retry_after


class ILoginLedger(Interface):
    """Failed logins per client address, per identity, and per (identity, address), in
    a sliding window (docs/login-throttle.md).

    ``address`` is ``esmtpfa.limits.throttle.address_key`` of the client; an identity is
    ``"provider\\0user"`` with the user case-folded.  A ledger never keeps an identity
    as given: it keys it by a keyed digest (the user may have come out of a password
    field)."""

    per_address = Attribute("failures one address may make within the window")
    per_identity = Attribute("failures against one identity that put it under attack")
    window = Attribute("the sliding window, in seconds")

    def refusal(address: str, identities: Sequence[str]):
        """Deferred: why a login from ``address`` claiming ``identities`` is refused
        before any provider is asked, or None."""

    def failed(address: str, identities: Sequence[str]):
        """Deferred: count one failed login; fires with each identity's failures within
        the window, this one included (in the order given)."""

    def succeeded(address: str, identity: str):
        """Deferred: the owner logged in from ``address``: take that address's failures
        against ``identity`` back."""


class IRateLedger(Interface):
    """Sending counts per identity and kind ("messages", "recipients"), with
    reservations (``esmtpfa.limits.rates``)."""

    def take(key: str, kind: str, limit, n: int):
        """Deferred: reserve ``n`` under ``limit`` (an ``esmtpfa.auth.sendingrates.Limit``),
        or fail with ``Exceeded``."""

    def give(key: str, kind: str, limit, n: int, count: bool):
        """Deferred: settle ``n`` reserved: they count (``count``) or are given back."""


class IConnectionLedger(Interface):
    """Open connections in total and per client address, for one kind of listener
    (the SMTP listeners share one; the HTTP API has its own)."""

    total = Attribute("connections allowed in all")
    per_ip = Attribute("connections allowed from one address")

    def refusal(ip: str):
        """Deferred: take a slot for ``ip`` and fire with None; or, taking none, fire
        with the limit that refuses it ("total limit", "per-address limit")."""

    def release(ip: str) -> None:
        """Free a slot that ``refusal`` gave."""


# -- the in-process ledgers' synchronous twins ------------------------------------------------


class ILocalLoginLedger(ILoginLedger):
    """A login ledger in this process: each method also answers at once."""

    def refusal_now(address: str, identities: list[str]) -> str | None:
        """What ``refusal`` fires with."""

    def failed_now(address: str, identities: list[str]) -> list[int]:
        """What ``failed`` fires with."""

    def succeeded_now(address: str, identity: str) -> None:
        """What ``succeeded`` does."""


class ILocalRateLedger(IRateLedger):
    """A rate ledger in this process: each method also answers at once."""

    def take_now(key: str, kind: str, limit, n: int) -> Exceeded | None:
        """Reserve and answer None; or, reserving nothing, answer the ``Exceeded`` that
        ``take`` fails with (a value, not raised)."""

    def give_now(key: str, kind: str, limit, n: int, count: bool) -> None:
        """What ``give`` does."""


class ILocalConnectionLedger(IConnectionLedger):
    """A connection ledger in this process: ``refusal`` also answers at once."""

    def refusal_now(ip: str) -> str | None:
        """What ``refusal`` fires with (taking the slot when None)."""

    def take_spare(ip: str, wanted: int) -> int:
        """Take up to ``wanted`` more slots for ``ip`` while both counts stay at most
        half their limits (slots a worker may keep ahead of its connections); how many
        were taken."""


__all__ = ["Exceeded", "IConnectionLedger", "ILocalConnectionLedger", "ILocalLoginLedger",
           "ILocalRateLedger", "ILoginLedger", "IRateLedger", "StateUnavailable"]
