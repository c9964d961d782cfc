"""What every provider type is: a twisted.cred checker plus the meta config of docs/design.md,
"Provider selection".

A provider *type* (userpass, ldap, jwt, …) is a class; a configured provider is an
instance.  Each class declares which credentials it checks through the ordinary
``credentialInterfaces`` attribute:

* ``IUserPasswordCredentials``: it needs a user and a password, so when it is chosen by
  name the client's secret is split on the first colon;
* ``IBearerTokenCredentials``: it checks one opaque token, passed whole.

``requestAvatarId`` fires with the ``Principal`` the provider vouches for (a bare user
name is accepted too), fails with ``UnauthorizedLogin`` for wrong credentials and with
``ProviderUnavailable`` when it cannot tell (server down, timeout): the SMTP server turns
those into 535 and 454.

A provider's ``policy`` (``esmtpfa.auth.policy``, from the entry's ``policy`` block) is set by
the config loader right after ``from_params``, before anyone can use the instance; a
changed policy makes a new instance, like changed params.  ``identity_attributes`` is what
the policy needs the provider to deliver with the user (an LDAP attribute, a JWT claim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute

from esmtpfa.auth.credentials import IUserPasswordCredentials
from esmtpfa.common.context import domain_key

if TYPE_CHECKING:
    from esmtpfa.auth.policy import Policy
    from esmtpfa.common.resources import Resources


@dataclass(frozen=True)
class ProviderMeta:
    name: str
    type: str
    domain: str | None = None  # normalized with context.normalize_domain
    fallback: bool = False
    unique_domain_auth: bool = False
    #: The relay's own domains a login name may carry (``domain_key`` form): a login
    #: ``printer@relay.example.com`` reaches the provider as ``printer`` (docs/policy.md,
    #: "Login names with the relay's domain").
    login_domains: tuple[str, ...] = ()

    def login_name(self, user: str) -> str:
        """``user`` without a trailing ``@`` and one of ``login_domains``; any other
        name as it is.  Only that exact domain: a subdomain, or another domain, is a
        different login that the provider judges as typed."""
        if self.login_domains:
            local, at, domain = user.rpartition("@")
            if at and local and domain_key(domain) in self.login_domains:
                return local
        return user


@dataclass(frozen=True)
class Principal:
    """Who a provider vouches for: the user, and what the policy needs to know about them.

    ``attributes`` are ``(name, values)`` pairs, named as the policy names them (LDAP
    attributes, JWT claims), so the value is hashable and cannot be changed after the
    login.  Nothing here is a secret: it goes into logs as ``provider/user``.
    """

    user: str
    dn: str | None = None
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, user: str, dn: str | None = None,
           attributes: Mapping[str, Iterable[str]] | None = None) -> "Principal":
        pairs = tuple(sorted((name, tuple(values))
                             for name, values in (attributes or {}).items()))
        return cls(user, dn, pairs)


class IProvider(ICredentialsChecker):
    meta = Attribute("ProviderMeta")

    def stopProvider() -> Deferred:
        """Release connections and timers; called when a reload removes the provider."""


class Provider:
    """Base class: keeps ``meta`` and gives providers a no-op ``stopProvider``.

    Subclasses implement ``from_params`` (validation of their own params, raising
    ``ConfigError``) and ``requestAvatarId``.
    """

    credentialInterfaces: tuple = (IUserPasswordCredentials,)
    if TYPE_CHECKING:  # each type's own, for the credentials it declares
        requestAvatarId: Callable[[Any], Deferred[Principal]]
    #: Set by the config loader (``esmtpfa.config.providers``); None: no policy, any sender.
    policy: "Policy | None" = None

    def __init__(self, meta: ProviderMeta):
        self.meta = meta

    @property
    def identity_attributes(self) -> tuple[str, ...]:
        """The attributes or claims the policy needs with every identity (none without)."""
        return self.policy.identity_attributes if self.policy is not None else ()

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: "Resources") -> "Provider":
        """A provider from its entry's ``params``; ``resources`` is what the process
        lends it (reactor, clock, HTTP clients, threads, the JWKS cache:
        ``esmtpfa.common.resources``), never taken from a global."""
        raise NotImplementedError

    @property
    def probe_subject(self) -> str:
        """What ``probe()`` reaches, for ``--check-connect`` (the types with a back end
        provide ``esmtpfa.common.probe.IProbe``)."""
        return f"provider {self.meta.name!r} ({self.meta.type})"

    @property
    def needs_password(self) -> bool:
        """True for user+password providers (docs/design.md, "Provider selection": first-colon split
        by name)."""
        return IUserPasswordCredentials in self.credentialInterfaces

    def stopProvider(self) -> Deferred:
        return succeed(None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.meta.name!r}>"
