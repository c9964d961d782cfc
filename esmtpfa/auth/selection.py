"""Provider selection (SPEC §3) as the one credentials checker the Portal knows.

The order is exact and is the contract with users:

1. a ``unique_domain_auth`` provider whose ``domain`` is the connected domain gets the
   credentials as they are;
2. else a provider *named* by the username gets them, the secret split on the first colon
   for user+password providers; if it rejects, no fallback is tried;
3. else the ``fallback`` providers are tried in config order, each once, as-is;
4. else the login is rejected.

A provider with a ``domain`` (and no ``unique_domain_auth``) is only considered for
clients whose connected domain equals it.
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Iterable, Protocol

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from zope.interface import implementer

from esmtpfa.logs import logger
from esmtpfa.auth.credentials import (
    BearerToken,
    IBearerTokenCredentials,
    ISubmissionCredentials,
    SubmissionCredentials,
    UserPassword,
)
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.providers.base import ConfigError, Provider

log = logger("esmtpfa.auth")

VIA_UNIQUE_DOMAIN = "unique_domain"
VIA_USERNAME = "username"
VIA_FALLBACK = "fallback"


@dataclass(frozen=True)
class Identity:
    """The avatar id: who logged in, and which provider vouched for them."""

    provider: str
    username: str
    via: str = VIA_USERNAME

    def __str__(self) -> str:
        return f"{self.provider}/{self.username}"


ANONYMOUS = Identity(provider="anonymous", username="", via="anonymous")


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


def _domain_allows(provider: Provider, credentials: ISubmissionCredentials) -> bool:
    domain = provider.meta.domain
    return domain is None or domain == credentials.context.connected_domain


def _as_is(provider: Provider, credentials: ISubmissionCredentials):
    """Credentials for a provider that gets username and secret unchanged."""
    if provider.needs_password:
        if credentials.bearer:
            return None  # a bearer token is no password
        return UserPassword(credentials.username, credentials.secret, credentials.context)
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
    return UserPassword(user, password, credentials.context)


@implementer(ICredentialsChecker)
class ProviderSelector:
    credentialInterfaces = (ISubmissionCredentials,)

    def __init__(self, directory: ProviderDirectory, observer: AuthObserver | None = None,
                 clock=time.monotonic):
        self._directory = directory
        self._observer = observer or _NoObserver()
        self._clock = clock

    def requestAvatarId(self, credentials: SubmissionCredentials) -> Deferred:
        return ensureDeferred(self._select(credentials))

    async def _select(self, credentials: ISubmissionCredentials) -> Identity:
        providers = self._directory.current  # one snapshot for the whole login
        domain = credentials.context.connected_domain
        unique = providers.unique_by_domain.get(domain) if domain else None
        if unique is not None:
            return await self._check(unique, _as_is(unique, credentials), VIA_UNIQUE_DOMAIN)
        named = providers.by_name.get(credentials.username)
        if named is not None:
            if not _domain_allows(named, credentials):
                self._observer.checked(named.meta.name, VIA_USERNAME, "rejected", 0.0)
                raise UnauthorizedLogin("provider not available on this domain")
            return await self._check(named, _split(named, credentials), VIA_USERNAME)
        return await self._try_fallbacks(providers, credentials)

    async def _try_fallbacks(self, providers: ProviderSet,
                             credentials: ISubmissionCredentials) -> Identity:
        unavailable = None
        for provider in providers.fallbacks:
            if not _domain_allows(provider, credentials):
                continue
            try:
                return await self._check(
                    provider, _as_is(provider, credentials), VIA_FALLBACK)
            except UnauthorizedLogin:
                continue
            except ProviderUnavailable as error:
                unavailable = error
        if unavailable is not None:
            self._observer.unmatched("unavailable")
            raise unavailable  # some fallback could not answer: let the client retry
        self._observer.unmatched()
        raise UnauthorizedLogin("no provider accepted the credentials")

    async def _check(self, provider: Provider, credentials, via: str) -> Identity:
        name = provider.meta.name
        if credentials is None:
            self._observer.checked(name, via, "rejected", 0.0)
            raise UnauthorizedLogin("credentials do not fit the provider type")
        started = self._clock()
        try:
            username = await provider.requestAvatarId(credentials)
        except UnauthorizedLogin:
            self._observer.checked(name, via, "rejected", self._clock() - started)
            raise
        except ProviderUnavailable:
            self._observer.checked(name, via, "unavailable", self._clock() - started)
            raise
        except CancelledError:
            raise  # the client went away: the login is abandoned, no fallback is asked
        except Exception as error:  # a provider bug must not look like a wrong password
            log.failure("provider {provider} failed unexpectedly", provider=name)
            self._observer.checked(name, via, "unavailable", self._clock() - started)
            raise ProviderUnavailable(f"provider {name} failed") from error
        self._observer.checked(name, via, "accepted", self._clock() - started)
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        fallback_name = getattr(credentials, "username", "") or ""
        return Identity(provider=name, username=str(username or fallback_name), via=via)


__all__ = [
    "ANONYMOUS", "Identity", "ProviderDirectory", "ProviderSelector", "ProviderSet",
    "IBearerTokenCredentials", "VIA_FALLBACK", "VIA_UNIQUE_DOMAIN", "VIA_USERNAME",
]
