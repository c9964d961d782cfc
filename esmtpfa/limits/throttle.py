"""Failed-login throttling per identity and per client address (docs/design.md,
"Configuration, reload and limits").

The per-connection limit stops one session from guessing for ever; this module stops a
client that reconnects, and an account attacked from many addresses, without ever letting
an attacker refuse the account's owner.  The design and the reasons for it are in
``docs/login-throttle.md``; in short:

* an **identity** is the provider a login goes to and the user that provider is asked
  about (``Claim``, from ``ProviderSelector.plan``), never the provider's name alone.  A
  token claim names nobody before it verifies, so it counts against its address only;
* an **address** that failed too often is refused before any provider is asked
  (``454 4.7.0`` over SMTP, ``429`` over HTTP), whatever it claims to be;
* an identity with many recent failures is *under attack*: addresses that failed against
  it are refused early for it, and a failed attempt from anywhere is answered only after a
  growing, capped delay.  An address with no failures is always asked, and a success is
  answered at once, so the owner logs in while the attack goes on;
* refused attempts are not counted, so a refusal ends one window after the last real
  failure however often the address keeps knocking;
* only ``UnauthorizedLogin`` counts: an unavailable provider is nobody's fault;
* every table is bounded (keys come from clients): the oldest are forgotten first.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.credentials import ISubmissionCredentials
from esmtpfa.auth.errors import THROTTLED, ProviderUnavailable
from esmtpfa.auth.selection import Claim, Identity, IProviderSelection
from esmtpfa.common.logs import logger
from esmtpfa.limits.interfaces import ILoginLedger
from esmtpfa.limits.ledgers import LocalLoginLedger

log = logger("esmtpfa.auth")

#: An IPv6 client usually holds a whole /64 (SLAAC, privacy addresses): counting each of
#: its 2**64 addresses apart would give it as many budgets.
IPV6_PREFIX = 64


def address_key(host: str) -> str:
    """The key a client address counts under: IPv4 as is (also when IPv4-mapped), IPv6
    by its /64, anything else (a UNIX socket, a test transport) as given, bounded."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host[:64]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def identity_text(claim: Claim) -> str | None:
    """What a ledger counts an identity under, before its keyed digest, or None for a
    token claim.  The user is case-folded: providers (LDAP, most IdPs) match users
    case-insensitively, and ``Alice`` must not be a fresh budget."""
    if claim.user is None:
        return None
    return f"{claim.provider}\0{claim.user.strip().casefold()}"


#: The first delay of a failed login for an identity under attack (then doubling).
FIRST_DELAY = 1.0


def identity_depth(per_identity: int, max_delay: float,
                   first_delay: float = FIRST_DELAY) -> int:
    """How many failures of one identity a ledger keeps: enough for the delay to reach
    its cap (``first_delay`` doubled up to ``max_delay``); more would only cost memory.
    Every ledger (here, the workers' supervisor, Redis) is sized by this."""
    steps = 0
    if 0 < first_delay < max_delay:
        steps = math.ceil(math.log2(max_delay / first_delay))
    return per_identity + steps + 1


class AuthThrottle:
    """One per relay, shared by every SMTP listener and the HTTP API.

    ``per_address``: failures one address may make within ``window`` before all its
    logins are refused.  ``per_identity``: failures against one identity (from anywhere)
    within ``window`` that put it under attack.  Under attack, a failed attempt is
    answered after ``first_delay`` seconds, doubling with each further failure up to
    ``max_delay``; an address that failed against the identity is refused for it.

    The counts live in ``ledger`` (this process's ``LocalLoginLedger`` unless one is
    given: the workers' supervisor's, or Redis); the rules live here.
    """

    def __init__(self, per_address: int = 30, per_identity: int = 10, window: float = 600.0,
                 *, clock: IReactorTime, first_delay: float = FIRST_DELAY,
                 max_delay: float = 8.0, max_keys: int = 100_000,
                 ledger: ILoginLedger | None = None):
        self.clock = clock
        self.per_identity = per_identity
        self.first_delay, self.max_delay = first_delay, max(max_delay, 0.0)
        if ledger is None:
            ledger = LocalLoginLedger(
                per_address, per_identity, window, clock, max_keys=max_keys,
                depth=identity_depth(per_identity, self.max_delay, first_delay))
        self.ledger = ledger

    def refusal(self, peer_host: str, claims: Sequence[Claim]) -> Deferred:
        """Fires with why a login from ``peer_host`` claiming ``claims`` is refused before
        any provider is asked, or None: it is asked."""
        return self.ledger.refusal(address_key(peer_host), _identities(claims))

    def failed(self, peer_host: str, claims: Sequence[Claim]) -> Deferred:
        """Count a refused login; fires with how long its answer waits (0: at once)."""
        named = [(claim, text) for claim in claims
                 if (text := identity_text(claim)) is not None]

        def counted(counts: list[int]) -> float:
            # No counts at all when the shared state is closed (``guard``): nothing to warn.
            for (claim, _), count in zip(named, counts, strict=False):
                if count == self.per_identity:
                    log.warn("{identity}: {count} failed logins within {window:.0f} s; its "
                             "failed logins are now answered late, and refused from "
                             "addresses that failed", identity=claim.label, count=count,
                             window=self.ledger.window)
            return self.delay(max(counts, default=0))
        return self.ledger.failed(address_key(peer_host),
                                  [text for _, text in named]).addCallback(counted)

    def delay(self, failures: int) -> float:
        """How long the answer to a failed attempt waits, given its identity's failures."""
        if failures < self.per_identity or self.max_delay <= 0:
            return 0.0
        excess = min(failures - self.per_identity, 62)
        return min(self.max_delay, self.first_delay * 2.0 ** excess)

    def succeeded(self, peer_host: str, claim: Claim | None) -> Deferred:
        """The owner of ``claim`` logged in from ``peer_host``: that address's failures
        against the identity are taken back, so it is no longer refused for it.  The
        address's own budget is not reset: one valid account must not buy an attacker
        more guesses at others."""
        text = identity_text(claim) if claim is not None else None
        if text is None:
            return succeed(None)
        return self.ledger.succeeded(address_key(peer_host), text)


def _identities(claims: Sequence[Claim]) -> list[str]:
    return [text for claim in claims if (text := identity_text(claim)) is not None]


class LoginThrottled(ProviderUnavailable):
    """Refused without asking a provider: too many recent failures (temporary)."""

    kind = THROTTLED


def _answer_later(clock, seconds: float, failure: Failure) -> Deferred:
    """A Deferred that fails with ``failure`` after ``seconds``.  Cancelling it (the
    client went away) cancels the timer, so nothing is left waiting in the reactor."""
    call = None

    def cancel(_: Deferred) -> None:
        if call is not None and call.active():
            call.cancel()

    delayed: Deferred = Deferred(cancel)
    call = clock.callLater(seconds, delayed.errback, failure)
    return delayed


@implementer(ICredentialsChecker)
class ThrottlingChecker:
    """Decorates provider selection: plan, decide, then ask; count the outcome.

    The plan says whom the login claims to be before anyone is asked, so the decision
    needs no knowledge of the selection rules (docs/design.md, "Provider selection").
    """

    credentialInterfaces = (ISubmissionCredentials,)

    def __init__(self, checker: IProviderSelection, throttle: AuthThrottle):
        self.checker = checker
        self.throttle = throttle

    def requestAvatarId(self, credentials) -> Deferred:
        peer_host = credentials.context.peer_host
        plan = self.checker.plan(credentials)
        claims = plan.claims
        throttle = self.throttle

        def decided(why: str | None) -> Deferred:
            if why is not None:
                raise LoginThrottled(why, attempted=plan.attempted)
            return self.checker.check(plan).addCallbacks(accepted, refused)

        def accepted(identity: Identity) -> Identity:
            # At once, even for an identity under attack; a ledger that fails to record
            # it only keeps a refusal a little longer (its guard logs why).
            throttle.succeeded(peer_host, plan.claim_of(identity)).addErrback(
                lambda failure: log.failure("recording a login failed", failure))
            return identity

        def refused(failure: Failure):
            if not failure.check(UnauthorizedLogin):
                return failure  # unavailable, cancelled: nobody's fault, nothing counted

            def answer(delay: float):
                if delay <= 0:
                    return failure
                failure.cleanFailure()  # held while waiting: no frames kept alive
                return _answer_later(throttle.clock, delay, failure)

            def uncounted(error: Failure):
                log.failure("counting a failed login failed", error)
                return failure
            return throttle.failed(peer_host, claims).addCallbacks(answer, uncounted)

        return throttle.refusal(peer_host, claims).addCallback(decided)


__all__ = ["AuthThrottle", "LoginThrottled", "ThrottlingChecker", "address_key",
           "identity_depth", "identity_text"]
