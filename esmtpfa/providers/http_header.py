"""The ``http_header`` provider: an HTTP endpoint judges an opaque token (SPEC §4).

The client's whole secret goes, unchanged, into the configured header (``header:
X-Bearer-Token`` → ``X-Bearer-Token: <token>``); the endpoint's status is the verdict
(see ``httpcheck``).

The token comes from the client, so it is checked before it is put on the wire: CR, LF
or NUL would let a client add headers or a second request of its own choosing (header
injection / request splitting, RFC 9110 §5.5: field values never contain them), and the
other control characters are invalid in a field value too (HTAB is allowed).  Twisted
would silently replace CR/LF with spaces, which changes the credential; we refuse it.

The header name is fixed by config; it must be a token (RFC 9110 §5.1) and not one of
the fields that frame the request or the connection, which an auth header must not
override.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from esmtpfa.auth.credentials import IBearerTokenCredentials
from esmtpfa.auth.errors import UnauthorizedLogin
from esmtpfa.providers.base import ConfigError, IProvider, ProviderMeta, require_string
from esmtpfa.providers.httpcheck import (
    HTTPAuthChecker,
    HTTPCheckProvider,
    has_control_chars,
    is_http_token,
)

#: Fields that frame the message or steer the connection (RFC 9110 §7.6.1, §8.6, RFC
#: 9112 §6-§7): letting config set them would break or smuggle the request.
FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "expect",
})
#: SPEC §2: AUTH lines up to 12288 octets; a header longer than that is not a token.
MAX_TOKEN_LENGTH = 12288


@implementer(IProvider)
class HTTPHeaderProvider(HTTPCheckProvider):
    """Accepts when the endpoint answers one of ``success_codes`` to the header."""

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, meta: ProviderMeta, checker: HTTPAuthChecker, header: str):
        super().__init__(meta, checker)
        self.header = header

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *, reactor=None,
                    **_: Any) -> "HTTPHeaderProvider":
        header = require_string(meta, params, "header")
        if not is_http_token(header):
            raise ConfigError(f"provider {meta.name!r} ({meta.type}): param 'header' "
                              f"must be an HTTP field name (RFC 9110 token)")
        if header.lower() in FORBIDDEN_HEADERS:
            raise ConfigError(f"provider {meta.name!r} ({meta.type}): param 'header' "
                              f"cannot be {header!r}")
        return cls(meta, cls.checker_from_params(meta, params, reactor), header)

    def requestAvatarId(self, credentials: IBearerTokenCredentials) -> Deferred[str]:
        token = credentials.token
        if not token:
            return fail(UnauthorizedLogin("empty token"))
        if len(token) > MAX_TOKEN_LENGTH:
            return fail(UnauthorizedLogin("token too long"))
        if has_control_chars(token, allow_tab=True):
            return fail(UnauthorizedLogin("control characters (CR, LF, NUL…) in token"))
        d = self.checker.check({self.header: token})
        # The endpoint says yes or no, not who: the name is the one the client gave.
        return d.addCallback(lambda _: credentials.username)


__all__ = ["FORBIDDEN_HEADERS", "HTTPHeaderProvider"]
