"""The ``http_header`` provider: an HTTP endpoint judges an opaque token (docs/design.md,
"Provider types").

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

Who logged in (docs/policy.md): the endpoint may name the user in a response header, chosen by
the optional param ``identity_header`` (``X-Authenticated-User``, say).  Without it, or
when a success response does not carry exactly one usable value, the identity's user is
``sha256:`` and the first 12 hex digits of the token's SHA-256: stable for one token, so
its messages can be told apart in logs and policies, and never the token itself.  The
``:`` keeps a fingerprint from ever expanding ``{user}`` in a policy (it is not a valid
local part).  A weak token (a short password) could be confirmed from its fingerprint by
trying candidates, which is why ``identity_header`` is the better choice.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from esmtpfa.auth.credentials import IBearerTokenCredentials
from esmtpfa.auth.errors import MALFORMED
from esmtpfa.auth.provider import IProvider, Principal, ProviderMeta
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.common.resources import Resources
from esmtpfa.providers.base import refused, require_string, session_of
from esmtpfa.providers.httpcheck import (
    HTTPAuthChecker,
    HTTPCheckProvider,
    Verdict,
    has_control_chars,
    is_http_token,
)

log = logger("esmtpfa.providers.http_header")

#: Fields that frame the message or steer the connection (RFC 9110 §7.6.1, §8.6, RFC
#: 9112 §6-§7): letting config set them would break or smuggle the request.
FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "expect",
})
#: docs/design.md, "The SMTP session": AUTH lines up to 12288 octets; a header longer than that is
#: not a token.
MAX_TOKEN_LENGTH = 12288
#: The longest user name taken from ``identity_header`` (longer ones are not used).
MAX_IDENTITY_LENGTH = 256
FINGERPRINT_DIGITS = 12


def fingerprint(token: str) -> str:
    """A short, stable name for a token that reveals nothing usable of it."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest[:FINGERPRINT_DIGITS]}"


def usable_identity(value: str | None) -> str | None:
    """The endpoint's name for the user, if it is one a log line can carry as it is."""
    if value is None:
        return None
    value = value.strip(" \t")
    if not value or len(value) > MAX_IDENTITY_LENGTH or has_control_chars(value):
        return None
    return value


def _header_param(meta: ProviderMeta, params: Mapping[str, Any], key: str,
                  required: bool) -> str | None:
    if not required and params.get(key) is None:
        return None
    header = require_string(meta, params, key)
    if not is_http_token(header):
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param {key!r} "
                          f"must be an HTTP field name (RFC 9110 token)")
    return header


@implementer(IProvider)
class HTTPHeaderProvider(HTTPCheckProvider):
    """Accepts when the endpoint answers one of ``success_codes`` to the header."""

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, meta: ProviderMeta, checker: HTTPAuthChecker, header: str,
                 identity_header: str | None = None):
        super().__init__(meta, checker)
        self.header = header
        self.identity_header = identity_header

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: Resources) -> "HTTPHeaderProvider":
        header = _header_param(meta, params, "header", required=True)
        assert header is not None  # required: None was refused
        if header.lower() in FORBIDDEN_HEADERS:
            raise ConfigError(f"provider {meta.name!r} ({meta.type}): param 'header' "
                              f"cannot be {header!r}")
        identity_header = _header_param(meta, params, "identity_header", required=False)
        return cls(meta, cls.checker_from_params(meta, params, resources=resources), header,
                   identity_header)

    # Twisted's ICredentialsChecker says bytes; the relay's realm takes a Principal.
    def requestAvatarId(self, credentials: IBearerTokenCredentials) -> Deferred[Principal]:  # type: ignore[override]
        token = credentials.token
        label = f"http_header provider {self.meta.name!r}"
        problem = ("empty token" if not token else
                   "token too long" if len(token) > MAX_TOKEN_LENGTH else
                   "control characters (CR, LF, NUL…) in token"
                   if has_control_chars(token, allow_tab=True) else None)
        if problem is not None:
            return fail(refused(log, label, credentials, MALFORMED, problem))
        connection_id = session_of(credentials)
        d = self.checker.check({self.header: token}, capture=self.identity_header,
                               connection_id=connection_id, keep=self.identity_attributes)
        return d.addCallback(self._principal, token, connection_id)

    def _principal(self, verdict: Verdict, token: str, connection_id: str = "-"
                   ) -> Principal:
        named = usable_identity(verdict.captured)
        if named is None and self.identity_header is not None:
            log.info("{connection_id} {label}: the endpoint accepted a token but named no "
                     "usable user in {header}; the identity is the token's fingerprint",
                     connection_id=connection_id,
                     label=f"http_header provider {self.meta.name!r}",
                     header=self.identity_header)
        return Principal(named if named is not None else fingerprint(token),
                         attributes=verdict.kept)


__all__ = ["FORBIDDEN_HEADERS", "HTTPHeaderProvider", "fingerprint", "usable_identity"]
