"""Failed-login throttling per client address and per username (SPEC §7).

The per-connection limit stops one session from guessing forever; these stop a client
that reconnects, and a username attacked from many addresses.  Past the limit a login is
refused *before* any provider is asked (``454 4.7.0`` over SMTP, ``429`` over HTTP), so a
flood of guesses costs the identity provider nothing.

Counts live in a sliding window and are bounded in memory: keys come from clients, so the
oldest are forgotten first when ``max_keys`` is reached.  A success clears the username's
count but not the address's: one valid account must not reset an attacker's budget.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from esmtpfa.auth.credentials import ISubmissionCredentials
from esmtpfa.auth.errors import ProviderUnavailable


class FailureWindow:
    def __init__(self, limit: int, window: float, clock, max_keys: int = 100_000):
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key: str) -> bool:
        times = self._recent(key)
        return times is not None and len(times) >= self.limit

    def failed(self, key: str) -> None:
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.limit)
        self._failures.move_to_end(key)
        times.append(self.clock.seconds())
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)


class AuthThrottle:
    """One per relay, shared by every SMTP listener and the HTTP API."""

    def __init__(self, per_address: int = 30, per_username: int = 10, window: float = 600.0,
                 clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.addresses = FailureWindow(per_address, window, clock)
        self.usernames = FailureWindow(per_username, window, clock)

    @staticmethod
    def _user_key(username: str) -> str:
        return username.strip().lower()[:256]

    def allows(self, address: str, username: str) -> bool:
        return not (self.addresses.blocked(address)
                    or self.usernames.blocked(self._user_key(username)))

    def failed(self, address: str, username: str) -> None:
        self.addresses.failed(address)
        self.usernames.failed(self._user_key(username))

    def succeeded(self, address: str, username: str) -> None:
        self.usernames.clear(self._user_key(username))


class LoginThrottled(ProviderUnavailable):
    """Refused without asking a provider: too many recent failures (temporary)."""


@implementer(ICredentialsChecker)
class ThrottlingChecker:
    """Decorates the provider selector: refuse early when throttled, count the outcome.

    Only wrong credentials count as failures; an unavailable provider is nobody's fault.
    """

    credentialInterfaces = (ISubmissionCredentials,)

    def __init__(self, checker: ICredentialsChecker, throttle: AuthThrottle):
        self.checker = checker
        self.throttle = throttle

    def requestAvatarId(self, credentials) -> Deferred:
        address, username = credentials.context.peer_host, credentials.username
        if not self.throttle.allows(address, username):
            return fail(LoginThrottled("too many failed logins"))

        def accepted(avatar_id):
            self.throttle.succeeded(address, username)
            return avatar_id

        def refused(failure):
            if failure.check(UnauthorizedLogin):
                self.throttle.failed(address, username)
            return failure

        return self.checker.requestAvatarId(credentials).addCallbacks(accepted, refused)
