"""What every provider type is: a twisted.cred checker plus the meta config of SPEC §3.

A provider *type* (userpass, ldap, jwt, …) is a class; a configured provider is an
instance.  Each class declares which credentials it checks through the ordinary
``credentialInterfaces`` attribute:

* ``IUserPasswordCredentials``: it needs a user and a password, so when it is chosen by
  name the client's secret is split on the first colon;
* ``IBearerTokenCredentials``: it checks one opaque token, passed whole.

``requestAvatarId`` fires with the user name the provider vouches for, fails with
``UnauthorizedLogin`` for wrong credentials and with ``ProviderUnavailable`` when it
cannot tell (server down, timeout): the SMTP server turns those into 535 and 454.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute

from esmtpfa.auth.credentials import IUserPasswordCredentials


class ConfigError(Exception):
    """A provider configuration that must not be loaded; the text names the problem."""


@dataclass(frozen=True)
class ProviderMeta:
    name: str
    type: str
    domain: str | None = None  # normalized with context.normalize_domain
    fallback: bool = False
    unique_domain_auth: bool = False


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

    def __init__(self, meta: ProviderMeta):
        self.meta = meta

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], **resources) -> "Provider":
        raise NotImplementedError

    @property
    def needs_password(self) -> bool:
        """True for user+password providers (SPEC §3: first-colon split by name)."""
        return IUserPasswordCredentials in self.credentialInterfaces

    def stopProvider(self) -> Deferred:
        return succeed(None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.meta.name!r}>"


def require_string(meta: ProviderMeta, params: Mapping[str, Any], key: str) -> str:
    """A required, non-empty string param; the error names provider and param."""
    value = params.get(key)
    if value is None:
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): missing required param {key!r}")
    if not isinstance(value, str):
        raise ConfigError(
            f"provider {meta.name!r} ({meta.type}): param {key!r} must be a string")
    if value == "":
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param {key!r} is empty")
    return value
