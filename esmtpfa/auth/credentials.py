"""Credential interfaces and classes (twisted.cred).

Two layers:

* ``ISubmissionCredentials`` is what a client *offers* (SASL PLAIN/LOGIN, OAuth bearer
  mechanisms, HTTP Basic) before any provider is chosen: the raw username and secret and
  the connection context.  The ``ProviderSelector`` checker is registered for it.
* ``IUserPasswordCredentials`` and ``IBearerTokenCredentials`` are what a *provider*
  checks after selection has split or passed through the secret (docs/design.md,
  "Provider selection").  Each provider
  type is an ``ICredentialsChecker`` for exactly one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, implementer

from esmtpfa.common.context import ConnectionContext


class ISubmissionCredentials(ICredentials):
    username = Attribute("str: the SASL authentication identity, or HTTP Basic user")
    secret = Attribute("str: the password or token as the client sent it")
    bearer = Attribute("bool: the mechanism carried a bearer token (XOAUTH2/OAUTHBEARER)")
    context = Attribute("ConnectionContext of the client")


class IUserPasswordCredentials(ICredentials):
    username = Attribute("str")
    password = Attribute("str")
    context = Attribute("ConnectionContext of the client")


class IBearerTokenCredentials(ICredentials):
    token = Attribute("str: the whole token (JWT, API key, header value)")
    username = Attribute("str: the username the client gave, possibly empty")
    context = Attribute("ConnectionContext of the client")


@implementer(ISubmissionCredentials)
@dataclass(frozen=True)
class SubmissionCredentials:
    username: str
    secret: str
    context: ConnectionContext
    bearer: bool = False
    mechanism: str = "PLAIN"

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return (f"SubmissionCredentials(username={self.username!r}, "
                f"mechanism={self.mechanism!r}, secret=<redacted>)")


@implementer(IUserPasswordCredentials)
@dataclass(frozen=True)
class UserPassword:
    username: str
    password: str
    context: ConnectionContext

    def __repr__(self) -> str:
        return f"UserPassword(username={self.username!r}, password=<redacted>)"


@implementer(IBearerTokenCredentials)
@dataclass(frozen=True)
class BearerToken:
    token: str
    context: ConnectionContext
    username: str = ""

    def __repr__(self) -> str:
        return f"BearerToken(username={self.username!r}, token=<redacted>)"
