"""Logging in an HTTP client from its request headers, through the relay's Portal.

One ``HeaderLogin`` serves both places that need it: the submission channel, which logs
the client in as soon as the request head arrived and before it reads a byte of the body
(``docs/http-limits.md``), and the resource, for a request without a body.  Either way
the credentials go through the same Portal (and so the same ``ThrottlingChecker`` and
provider selection) as SMTP AUTH.

Two schemes: ``Basic`` (RFC 7617), whose user name selects the provider exactly as SMTP
AUTH's does, and ``Bearer`` (RFC 6750) for the token providers (jwt, http_header).  A
bearer token is what XOAUTH2 and OAUTHBEARER carry over SMTP, and it is selected the
same way: the provider the request names in ``Esmtpfa-Provider`` plays the part of their
user name; without one, the ``Host``'s unique-domain provider or the ``fallback`` token
providers get it (docs/design.md, "Provider selection").  A password provider never sees a bearer
token.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.credentials import Anonymous
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal

from esmtpfa.auth.credentials import SubmissionCredentials
from esmtpfa.auth.errors import MALFORMED, LoginRefused, ProviderUnavailable
from esmtpfa.auth.failures import log_failed_login
from esmtpfa.auth.interfaces import IMessageDelivery
from esmtpfa.common.context import ConnectionContext
from esmtpfa.limits.throttle import LoginThrottled
from esmtpfa.web.errors import HTTPError

CHALLENGE = b'Basic realm="esmtpfa", charset="UTF-8"'
#: RFC 6750 §3; with ``error`` when a token was refused (RFC 6750 §3.1).
BEARER_CHALLENGE = b'Bearer realm="esmtpfa"'
#: A request without credentials hears every scheme it may use (RFC 9110 §11.6.1).
EVERY_CHALLENGE = CHALLENGE + b", " + BEARER_CHALLENGE
#: Names the provider a bearer token is for, as XOAUTH2's ``user`` does over SMTP.
PROVIDER_HEADER = b"esmtpfa-provider"
RETRY_AFTER = b"60"
#: RFC 6750 §2.1: ``b64token``.
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


def host_name(header: bytes | None) -> str | None:
    """The ``Host`` header without port: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    if not header:
        return None
    host = header.decode("latin-1").strip()
    if host.startswith("["):
        return host[1:].partition("]")[0] or None
    return host.rpartition(":")[0] if host.count(":") == 1 else host or None


@dataclass(frozen=True)
class RequestContext(ConnectionContext):
    """What a login over HTTP knows of its connection, and the provider its request head
    names for a bearer token (``Esmtpfa-Provider``; None when it names none)."""

    provider: str | None = None


def request_context(request: Any, connection_id: str) -> RequestContext:
    """The ``Host`` header (without port) is the connected domain for provider selection
    (docs/design.md, "Provider selection")."""
    peer, local = request.getClientAddress(), request.getHost()
    named = (request.getHeader(PROVIDER_HEADER) or b"").decode("utf-8", "replace").strip()
    return RequestContext(
        connection_id=connection_id, protocol="http",
        peer_host=getattr(peer, "host", ""), peer_port=getattr(peer, "port", 0),
        local_host=getattr(local, "host", ""), local_port=getattr(local, "port", 0),
        tls=request.isSecure(), http_host=host_name(request.getHeader(b"host")),
        provider=named or None)


def _unauthorized(message: str, challenge: bytes = CHALLENGE) -> HTTPError:
    return HTTPError(401, message, headers={b"www-authenticate": challenge})


def _bearer_refused(message: str, error: bytes) -> HTTPError:
    """A bearer token refused: RFC 6750's challenge, then Basic, which every provider
    takes (a token can go as a Basic password)."""
    return _unauthorized(message, BEARER_CHALLENGE + b', error="' + error + b'", ' +
                         CHALLENGE)


def scheme_of(header: bytes) -> bytes:
    return header.strip().partition(b" ")[0].lower()


def mechanism_of(header: bytes) -> str:
    """The mechanism for logs and metrics, as SMTP AUTH names its own."""
    return "HTTP-BEARER" if scheme_of(header) == b"bearer" else "HTTP-BASIC"


def header_credentials(header: bytes, context: ConnectionContext) -> SubmissionCredentials:
    """The ``Authorization`` header as credentials for the Portal; ``HTTPError`` 401 when
    it holds none esmtpfa can read."""
    scheme = scheme_of(header)
    if scheme == b"bearer":
        token = header.strip()[len(scheme):].strip()
        if not _B64TOKEN.match(token):
            raise _bearer_refused("malformed Bearer credentials", b"invalid_request")
        provider = context.provider if isinstance(context, RequestContext) else None
        return SubmissionCredentials(provider or "", token.decode("ascii"), context,
                                     bearer=True, mechanism="HTTP-BEARER")
    if scheme != b"basic":
        raise _unauthorized("only Basic and Bearer authentication are supported",
                            EVERY_CHALLENGE)
    user, password = basic_credentials(header)
    return SubmissionCredentials(user, password, context, mechanism="HTTP-BASIC")


def basic_credentials(header: bytes) -> tuple[str, str]:
    """``Authorization: Basic`` → (user, password), split on the first colon (RFC 7617)."""
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise _unauthorized("only Basic authentication is supported")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("malformed Basic credentials") from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise _unauthorized("malformed Basic credentials")
    return user, password


@dataclass(frozen=True)
class Login:
    """A logged-in client: the identity for logs (``provider/user``), the avatar, and
    the logout to call when the request is done."""

    identity: str
    avatar: Any
    logout: Callable[[], None]


class HeaderLogin:
    def __init__(self, portal: Portal, *, allow_anonymous: bool = False):
        self._portal = portal
        self.allow_anonymous = allow_anonymous

    async def login(self, authorization: bytes | None, context: ConnectionContext) -> Login:
        """The ``Authorization`` header's client, logged in; ``HTTPError`` 401, 429 or 503
        saying why not."""
        if authorization is None:
            if not self.allow_anonymous:
                raise _unauthorized("authentication required", EVERY_CHALLENGE)
            credentials: Any = Anonymous()
        else:
            try:
                credentials = header_credentials(authorization, context)
            except HTTPError:  # credentials offered, but none we can read
                log_failed_login(context, mechanism_of(authorization),
                                 LoginRefused(MALFORMED))
                raise
        avatar: Any  # the realm's avatar (``SubmissionAvatar``); the Portal says ``object``
        try:
            _, avatar, logout = await self._portal.login(credentials, None, IMessageDelivery)
        except (UnauthorizedLogin, LoginFailed, ProviderUnavailable) as error:
            if authorization is not None:  # a request without credentials is no attempt
                log_failed_login(context, credentials.mechanism, error, credentials.username)
            if isinstance(error, LoginThrottled):
                raise HTTPError(429, "too many failed authentications, try again later",
                                headers={b"retry-after": RETRY_AFTER}) from None
            if isinstance(error, ProviderUnavailable):
                raise HTTPError(503, "authentication temporarily unavailable, try again "
                                "later", headers={b"retry-after": RETRY_AFTER}) from None
            if getattr(credentials, "bearer", False):
                raise _bearer_refused("authentication failed", b"invalid_token") from None
            raise _unauthorized("authentication failed") from None
        return Login(str(avatar.identity), avatar, logout)


__all__ = ["BEARER_CHALLENGE", "CHALLENGE", "EVERY_CHALLENGE", "PROVIDER_HEADER",
           "RETRY_AFTER", "HeaderLogin", "Login", "RequestContext", "basic_credentials",
           "header_credentials", "host_name", "mechanism_of", "request_context"]
