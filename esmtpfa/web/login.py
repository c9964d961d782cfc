"""Logging in an HTTP client from its request headers, through the relay's Portal.

One ``HeaderLogin`` serves both places that need it: the submission channel, which logs
the client in as soon as the request head arrived and before it reads a byte of the body
(``docs/http-limits.md``), and the resource, for a request without a body.  Either way
the credentials go through the same Portal (and so the same ``ThrottlingChecker`` and
provider selection) as SMTP AUTH.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.credentials import Anonymous
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import Portal

from esmtpfa.auth.credentials import SubmissionCredentials
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.auth.throttle import LoginThrottled
from esmtpfa.context import ConnectionContext
from esmtpfa.smtp.interfaces import IMessageDelivery
from esmtpfa.web.errors import HTTPError

CHALLENGE = b'Basic realm="esmtpfa", charset="UTF-8"'
RETRY_AFTER = b"60"


def host_name(header: bytes | None) -> str | None:
    """The ``Host`` header without port: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    if not header:
        return None
    host = header.decode("latin-1").strip()
    if host.startswith("["):
        return host[1:].partition("]")[0] or None
    return host.rpartition(":")[0] if host.count(":") == 1 else host or None


def request_context(request: Any, connection_id: str) -> ConnectionContext:
    """What a login over HTTP knows of its connection; the ``Host`` header (without
    port) is the connected domain for provider selection (docs/design.md §3)."""
    peer, local = request.getClientAddress(), request.getHost()
    return ConnectionContext(
        connection_id=connection_id, protocol="http",
        peer_host=getattr(peer, "host", ""), peer_port=getattr(peer, "port", 0),
        local_host=getattr(local, "host", ""), local_port=getattr(local, "port", 0),
        tls=request.isSecure(), http_host=host_name(request.getHeader(b"host")))


def _unauthorized(message: str) -> HTTPError:
    return HTTPError(401, message, headers={b"www-authenticate": CHALLENGE})


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
                raise _unauthorized("authentication required")
            credentials: Any = Anonymous()
        else:
            user, password = basic_credentials(authorization)
            credentials = SubmissionCredentials(user, password, context,
                                                mechanism="HTTP-BASIC")
        try:
            _, avatar, logout = await self._portal.login(credentials, None, IMessageDelivery)
        except (UnauthorizedLogin, LoginFailed):
            raise _unauthorized("authentication failed") from None
        except LoginThrottled:
            raise HTTPError(429, "too many failed authentications, try again later",
                            headers={b"retry-after": RETRY_AFTER}) from None
        except ProviderUnavailable:
            raise HTTPError(503, "authentication temporarily unavailable, try again later",
                            headers={b"retry-after": RETRY_AFTER}) from None
        return Login(str(avatar.identity), avatar, logout)


__all__ = ["CHALLENGE", "HeaderLogin", "Login", "RETRY_AFTER", "basic_credentials",
           "host_name", "request_context"]
