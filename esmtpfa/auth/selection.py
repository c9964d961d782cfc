"""Provider selection (docs/design.md, "Provider selection") as the one credentials checker the
Portal knows.

The order is exact and is the contract with users:

1. a ``unique_domain_auth`` provider whose ``domain`` is the connected domain gets the
   credentials as they are;
2. else a provider *named* by the username gets them, the secret split on the first colon
   for user+password providers; if it rejects, no fallback is tried;
3. else the ``fallback`` providers are tried in config order, each once, as-is;
4. else the login is rejected.

A user+password provider with ``login_domains`` is asked about ``printer`` when the
client typed ``printer@relay.example.com`` (``ProviderMeta.login_name``), whichever step
chose it; the throttle then counts both spellings as one claim.

A provider with a ``domain`` (and no ``unique_domain_auth``) is only considered for
clients whose connected domain equals it.

Selection is done in two steps, so the login throttle can key its counts by who a login
claims to be without knowing these rules (``docs/login-throttle.md``): ``plan`` decides,
from one snapshot of the providers, which providers will be asked and with what
(``SelectionPlan``, whose ``claims`` name each provider and the user it is asked about);
``check`` then asks them.  ``requestAvatarId`` does both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from zope.interface import implementer

from esmtpfa.auth.credentials import (
    BearerToken,
    IBearerTokenCredentials,
    ISubmissionCredentials,
    SubmissionCredentials,
    UserPassword,
)
from esmtpfa.auth.errors import (
    BAD_PASSWORD,
    MALFORMED,
    POLICY,
    UNKNOWN_USER,
    Attempted,
    LoginRefused,
    ProviderUnavailable,
    most_telling,
    reason_of,
)
from esmtpfa.auth.provider import Principal, Provider
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.common.observers import notify

log = logger("esmtpfa.auth")

VIA_UNIQUE_DOMAIN = "unique_domain"
VIA_USERNAME = "username"
VIA_FALLBACK = "fallback"


@dataclass(frozen=True)
class Identity:
    """The avatar id: who logged in, and which provider vouched for them.

    ``username`` is the user the provider vouched for: the login name
    that reached a user+password provider, a JWT's ``sub``, what an ``http_header``
    endpoint named (or ``sha256:`` and a short fingerprint of the token, never the
    token).  ``dn`` and ``attributes`` are what the provider found that the policy needs
    (an LDAP entry's DN and attribute values, JWT claims), as ``(name, values)`` pairs.
    ``policy`` is the provider's policy when it vouched (``esmtpfa.auth.policy``): a reload
    applies to the logins after it.  ``str()`` is ``provider/user``, for logs; no field
    holds a secret.
    """

    provider: str
    username: str
    via: str = VIA_USERNAME
    dn: str | None = None
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    policy: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.provider}/{self.username}"

    def values(self, name: str | None) -> tuple[str, ...]:
        """The values of attribute or claim ``name`` (none when absent)."""
        for key, values in self.attributes:
            if key == name:
                return values
        return ()


ANONYMOUS = Identity(provider="anonymous", username="", via="anonymous")


@dataclass(frozen=True, repr=False)
class Claim:
    """Who a login attempt says it is, before any provider vouched for it: the provider
    it goes to and the user that provider is asked about.

    The login throttle counts failures per claim, never per provider name, so that one
    account's attacker never locks out another account (docs/design.md,
    "Configuration, reload and limits").

    ``user`` is None for token providers (jwt, http_header): a token names its user only
    once it verifies, so a refused token has nobody to count against but its client's
    address.  ``user_in_secret`` says the user came out of the password field (the
    provider-name convention, docs/design.md, "Provider selection", step 2): a client that got the
    convention wrong may
    have put part of its password there, so that user is kept out of logs and reprs.
    """

    provider: str
    user: str | None
    user_in_secret: bool = False

    @property
    def label(self) -> str:
        """For log lines: never a secret, nor what might be part of one."""
        if self.user is None:
            return f"{self.provider} (token)"
        if self.user_in_secret:
            return f"{self.provider}/<user from the password field>"
        return f"{self.provider}/{self.user}"

    def __repr__(self) -> str:
        return f"Claim({self.label!r})"


class ProviderSet:
    """An immutable snapshot of the configured providers, indexed for selection."""

    def __init__(self, providers: Iterable[Provider] = ()):
        self.providers: tuple[Provider, ...] = tuple(providers)
        self.by_name: dict[str, Provider] = {}
        self.unique_by_domain: dict[str, Provider] = {}
        for provider in self.providers:
            meta = provider.meta
            if meta.name in self.by_name:
                raise ConfigError(f"provider {meta.name!r}: duplicate name")
            self.by_name[meta.name] = provider
            if meta.unique_domain_auth:
                if not meta.domain:
                    raise ConfigError(
                        f"provider {meta.name!r}: unique_domain_auth needs a domain")
                if meta.domain in self.unique_by_domain:
                    other = self.unique_by_domain[meta.domain].meta.name
                    raise ConfigError(
                        f"provider {meta.name!r}: domain {meta.domain!r} is already the "
                        f"unique domain of provider {other!r}")
                self.unique_by_domain[meta.domain] = provider
        self.fallbacks: tuple[Provider, ...] = tuple(
            p for p in self.providers if p.meta.fallback)

    def __len__(self) -> int:
        return len(self.providers)


class ProviderDirectory:
    """The swap point for hot reload: sessions read ``current`` once per login."""

    def __init__(self, providers: ProviderSet | None = None):
        self.current = providers if providers is not None else ProviderSet()

    def replace(self, providers: ProviderSet) -> ProviderSet:
        previous, self.current = self.current, providers
        return previous


class AuthObserver(Protocol):
    """Told the outcome of every provider check (metrics plug in here)."""

    def checked(self, provider: str, via: str, outcome: str, seconds: float) -> None: ...

    def unmatched(self, outcome: str = "rejected") -> None:
        """No provider accepted: all refused (``rejected``) or some could not answer."""


class _NoObserver:
    def checked(self, provider: str, via: str, outcome: str, seconds: float) -> None:
        pass

    def unmatched(self, outcome: str = "rejected") -> None:
        pass


@dataclass(frozen=True, repr=False)
class Candidate:
    """One provider a login will ask, and what it will be given.

    ``credentials`` is None when the client's credentials do not fit the provider's type
    (a bearer token for a password provider, a password without a colon for a provider
    named by the username): it is refused without being asked.  ``on_domain`` is False for
    a provider named by the username but restricted to another connected domain.
    """

    provider: Provider
    credentials: UserPassword | BearerToken | None
    via: str
    on_domain: bool = True

    @property
    def name(self) -> str:
        return self.provider.meta.name

    def attempted(self, typed_user: str, *, confirmed: bool = False) -> Attempted:
        """Whom a login to this candidate claims to be, for the failed-login line: the
        user it asks the provider about, else the one the client typed (a token's
        ``user=``); none when the client's user was only the provider's name.  A user
        from the password field is kept out (as ``Claim.label`` keeps it) unless
        ``confirmed``: the provider knows that user."""
        user = getattr(self.credentials, "username", None)
        if user is None and self.via != VIA_USERNAME:
            user = typed_user
        claim = self.claim
        if claim is not None and claim.user_in_secret and not confirmed:
            return Attempted(self.name, None, from_password_field=True)
        return Attempted(self.name, user)

    @property
    def claim(self) -> Claim | None:
        if isinstance(self.credentials, UserPassword):
            return Claim(self.name, self.credentials.username,
                         user_in_secret=self.via == VIA_USERNAME)
        if isinstance(self.credentials, BearerToken):
            return Claim(self.name, None)
        return None

    def __repr__(self) -> str:  # the credentials redact themselves; say so anyway
        return f"Candidate({self.name!r}, via={self.via!r}, claim={self.claim!r})"


@dataclass(frozen=True, repr=False)
class SelectionPlan:
    """The providers one login asks, decided from one snapshot (docs/design.md,
    "Provider selection").

    ``fallback`` False: the single candidate decides (unique domain, or named by the
    username).  True: each candidate is asked in order until one accepts.  An empty plan
    is a rejection.
    """

    candidates: tuple[Candidate, ...]
    fallback: bool = False
    #: The user name the client gave (for the failed-login line; never a secret).
    username: str = ""

    @property
    def attempted(self) -> Attempted:
        """Whom the login claims to be before any provider answered: the single
        candidate's claim, else the typed user with no provider."""
        if not self.fallback and len(self.candidates) == 1:
            return self.candidates[0].attempted(self.username)
        return Attempted(None, self.username)

    @property
    def claims(self) -> tuple[Claim, ...]:
        """Every identity the login is checked against (one per provider asked)."""
        return tuple(c.claim for c in self.candidates if c.claim is not None)

    def claim_of(self, identity: Identity) -> Claim | None:
        """The claim the accepting provider was asked, for the avatar it returned."""
        for candidate in self.candidates:
            if candidate.name == identity.provider:
                return candidate.claim
        return None

    def __repr__(self) -> str:
        return f"SelectionPlan({list(self.candidates)!r}, fallback={self.fallback})"


class IProviderSelection(ICredentialsChecker):
    """A checker that can say, before asking anyone, whom a login claims to be."""

    def plan(credentials):
        """The ``SelectionPlan`` for these ``ISubmissionCredentials`` (no I/O)."""

    def check(plan):
        """Ask the plan's providers: a Deferred firing with the ``Identity``, or failing
        with ``UnauthorizedLogin`` or ``ProviderUnavailable``."""


def _domain_allows(provider: Provider, credentials: ISubmissionCredentials) -> bool:
    domain = provider.meta.domain
    return domain is None or domain == credentials.context.connected_domain


def _as_is(provider: Provider, credentials: ISubmissionCredentials):
    """Credentials for a provider that gets username and secret unchanged."""
    if provider.needs_password:
        if credentials.bearer:
            return None  # a bearer token is no password
        return UserPassword(provider.meta.login_name(credentials.username),
                            credentials.secret, credentials.context)
    return BearerToken(credentials.secret, credentials.context, credentials.username)


def _split(provider: Provider, credentials: ISubmissionCredentials):
    """Credentials for a provider chosen by name: ``user:password`` for user+password
    providers (first colon: ``u:p:q`` is ``u`` and ``p:q``), the whole token otherwise."""
    if not provider.needs_password:
        return BearerToken(credentials.secret, credentials.context, "")
    if credentials.bearer:
        return None
    user, colon, password = credentials.secret.partition(":")
    if not colon:
        return None
    return UserPassword(provider.meta.login_name(user), password, credentials.context)


@implementer(IProviderSelection)
class ProviderSelector:
    credentialInterfaces = (ISubmissionCredentials,)

    def __init__(self, directory: ProviderDirectory, observer: AuthObserver | None = None,
                 clock=time.monotonic):
        self._directory = directory
        self._observer = observer or _NoObserver()
        self._clock = clock

    def requestAvatarId(self, credentials: SubmissionCredentials) -> Deferred:
        return self.check(self.plan(credentials))

    def plan(self, credentials: ISubmissionCredentials) -> SelectionPlan:
        providers = self._directory.current  # one snapshot for the whole login
        domain = credentials.context.connected_domain
        unique = providers.unique_by_domain.get(domain) if domain else None
        if unique is not None:
            return SelectionPlan((Candidate(
                unique, _as_is(unique, credentials), VIA_UNIQUE_DOMAIN),),
                username=credentials.username)
        named = providers.by_name.get(credentials.username)
        if named is not None:
            return SelectionPlan((Candidate(
                named, _split(named, credentials), VIA_USERNAME,
                on_domain=_domain_allows(named, credentials)),),
                username=credentials.username)
        return SelectionPlan(tuple(
            Candidate(provider, _as_is(provider, credentials), VIA_FALLBACK)
            for provider in providers.fallbacks if _domain_allows(provider, credentials)),
            fallback=True, username=credentials.username)

    def check(self, plan: SelectionPlan) -> Deferred:
        return ensureDeferred(self._select(plan))

    async def _select(self, plan: SelectionPlan) -> Identity:
        if plan.fallback:
            return await self._try_fallbacks(plan)
        [candidate] = plan.candidates
        if not candidate.on_domain:
            notify(self._observer.checked, candidate.name, candidate.via, "rejected", 0.0)
            raise LoginRefused(POLICY, "provider not available on this domain",
                               attempted=candidate.attempted(plan.username))
        return await self._check(candidate, plan.username)

    async def _try_fallbacks(self, plan: SelectionPlan) -> Identity:
        unavailable = None
        refusals: list[LoginRefused] = []
        for candidate in plan.candidates:
            try:
                return await self._check(candidate, plan.username)
            except LoginRefused as refusal:
                refusals.append(refusal)
            except ProviderUnavailable as error:
                unavailable = error
        if unavailable is not None:
            notify(self._observer.unmatched, "unavailable")
            raise unavailable  # some fallback could not answer: let the client retry
        notify(self._observer.unmatched)
        telling = most_telling(refusals)
        if telling is None:  # no fallback takes this name: nobody knows the user
            raise LoginRefused(UNKNOWN_USER, "no provider for this user",
                               attempted=plan.attempted)
        raise telling

    async def _check(self, candidate: Candidate, typed_user: str) -> Identity:
        """Ask one candidate; a refusal or an unavailability says whom it was about
        (``attempted``) and, for a refusal, why (``kind``)."""
        provider, credentials = candidate.provider, candidate.credentials
        name, via = provider.meta.name, candidate.via
        attempted = candidate.attempted(typed_user)
        if credentials is None:
            notify(self._observer.checked, name, via, "rejected", 0.0)
            raise LoginRefused(MALFORMED, "credentials do not fit the provider type",
                               attempted=attempted)
        started = self._clock()
        try:
            vouched = await provider.requestAvatarId(credentials)
        except UnauthorizedLogin as error:
            notify(self._observer.checked, name, via, "rejected", self._clock() - started)
            reason = reason_of(error)
            if reason == BAD_PASSWORD:  # the provider knows the user: it may be named
                attempted = candidate.attempted(typed_user, confirmed=True)
            raise LoginRefused(reason, str(error), attempted=attempted) from None
        except ProviderUnavailable as error:
            notify(self._observer.checked, name, via, "unavailable", self._clock() - started)
            raise error.about(attempted) from None
        except CancelledError:
            raise  # the client went away: the login is abandoned, no fallback is asked
        except Exception as error:  # a provider bug must not look like a wrong password
            log.failure("provider {provider} failed unexpectedly", provider=name)
            notify(self._observer.checked, name, via, "unavailable", self._clock() - started)
            raise ProviderUnavailable(f"provider {name} failed",
                                      attempted=attempted) from error
        notify(self._observer.checked, name, via, "accepted", self._clock() - started)
        if not isinstance(vouched, Principal):  # a provider that names only the user
            if isinstance(vouched, bytes):
                vouched = vouched.decode("utf-8", "replace")
            vouched = Principal(str(vouched or getattr(credentials, "username", "") or ""))
        return Identity(provider=name, username=vouched.user, via=via, dn=vouched.dn,
                        attributes=vouched.attributes,
                        policy=getattr(provider, "policy", None))


__all__ = [
    "ANONYMOUS", "Candidate", "Claim", "Identity", "IProviderSelection", "ProviderDirectory",
    "ProviderSelector", "ProviderSet", "SelectionPlan",
    "IBearerTokenCredentials", "VIA_FALLBACK", "VIA_UNIQUE_DOMAIN", "VIA_USERNAME",
]
