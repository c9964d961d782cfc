"""The ``http_basic`` provider: an HTTP endpoint judges ``user:password`` (docs/design.md,
"Provider types").

The relay sends ``Authorization: Basic base64(user ":" password)`` (RFC 7617 §2, UTF-8
as in §2.1's ``charset``) and the endpoint's status is the verdict; see ``httpcheck``
for the request rules (no redirects, one deadline, 5xx = temporary).

Refused before any request, because the encoding cannot carry them faithfully:
a user-id containing ``:`` (RFC 7617 §2: the first colon is the separator, so the server
would read a different user), control characters in either part (RFC 7617 §2: "MUST NOT
contain any control characters"), and an empty user or password (never a real login;
some endpoints treat an empty password as an anonymous bind).
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from esmtpfa.auth.credentials import IUserPasswordCredentials
from esmtpfa.auth.errors import MALFORMED
from esmtpfa.auth.provider import IProvider, Principal, ProviderMeta
from esmtpfa.common.logs import logger
from esmtpfa.common.resources import Resources
from esmtpfa.providers.base import refused, session_of
from esmtpfa.providers.httpcheck import HTTPAuthChecker, HTTPCheckProvider, has_control_chars

log = logger("esmtpfa.providers.http_basic")


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` field value for RFC 7617 Basic."""
    raw = f"{username}:{password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


@implementer(IProvider)
class HTTPBasicProvider(HTTPCheckProvider):
    """Accepts when the endpoint answers one of ``success_codes`` to the Basic request."""

    credentialInterfaces = (IUserPasswordCredentials,)

    def __init__(self, meta: ProviderMeta, checker: HTTPAuthChecker):
        super().__init__(meta, checker)

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: Resources) -> "HTTPBasicProvider":
        return cls(meta, cls.checker_from_params(meta, params, resources=resources))

    # Twisted's ICredentialsChecker says bytes; the relay's realm takes a Principal.
    def requestAvatarId(self, credentials: IUserPasswordCredentials) -> Deferred[Principal]:  # type: ignore[override]
        username, password = credentials.username, credentials.password
        problem = ("empty user or password" if not username or not password else
                   "user name contains ':' (RFC 7617 §2)" if ":" in username else
                   "control characters in user or password"
                   if has_control_chars(username) or has_control_chars(password) else None)
        if problem is not None:
            return fail(refused(log, f"http_basic provider {self.meta.name!r}", credentials,
                                MALFORMED, problem))
        d = self.checker.check({"Authorization": basic_authorization(username, password)},
                               connection_id=session_of(credentials),
                               keep=self.identity_attributes)
        # the user the endpoint judged, and the response headers the policy names
        return d.addCallback(lambda verdict: Principal(username, attributes=verdict.kept))


__all__ = ["HTTPBasicProvider", "basic_authorization"]
