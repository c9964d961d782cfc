"""Authentication outcomes beyond twisted.cred's ``UnauthorizedLogin``, as values.

A refused login says *why* with a ``kind`` from ``REASONS``, a small closed vocabulary
an operator can filter on (docs/logging.md, "Failed logins").  The kind is for the log
only: the client hears the same ``535 5.7.8`` (or HTTP 401) whatever it is, so a guesser
cannot learn whether a user exists (RFC 4954 §6 leaves the detail to the server; we
keep it).  Providers raise ``LoginRefused`` with the kind they can tell apart; any other
``UnauthorizedLogin`` reads as ``rejected``.

``attempted`` is whom the login claimed to be (provider and user as selected, never a
secret); provider selection sets it, since only it knows which provider was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.error import LoginFailed, UnauthorizedLogin

#: The user does not exist at the provider (or the name matches more than one entry).
UNKNOWN_USER = "unknown-user"
#: The user exists and the password is wrong.
BAD_PASSWORD = "bad-password"
#: A token that does not verify (signature, issuer, audience, claims, unknown key).
BAD_TOKEN = "bad-token"
#: A token that verified once but is past its ``exp`` (or not valid yet).
EXPIRED_TOKEN = "expired-token"
#: The back end said no without saying why (an HTTP endpoint's 401/403, an LDAP bind
#: refused for another reason than a wrong password).
REJECTED = "rejected"
#: The credentials cannot be what the provider checks: empty, control characters, a
#: password without the ``user:`` part for a provider named by the username, a bearer
#: token for a password provider, a token that is not a JWT, a broken HTTP Basic header.
MALFORMED = "malformed"
#: A rule of the configuration refused it before any check (a provider restricted to
#: another connected domain).
POLICY = "policy"
#: Too many recent failures: refused without asking a provider (docs/login-throttle.md).
THROTTLED = "throttled"
#: The provider could not answer (down, timed out, 5xx, misconfigured): nobody's fault.
BACKEND_UNAVAILABLE = "backend-unavailable"

REASONS = frozenset({UNKNOWN_USER, BAD_PASSWORD, BAD_TOKEN, EXPIRED_TOKEN, REJECTED,
                     MALFORMED, POLICY, THROTTLED, BACKEND_UNAVAILABLE})

#: When several fallback providers refuse, the line reports the most telling refusal:
#: a provider that knows the user says more than one that does not.
_TELLING = (BAD_PASSWORD, EXPIRED_TOKEN, BAD_TOKEN, REJECTED, POLICY, MALFORMED,
            UNKNOWN_USER)

#: Longest user name shown in a log line; a user name is typed by the client.
MAX_SHOWN = 64


def _shown(text: str | None) -> str:
    """Client-typed text, safe on one log line: bounded, no control characters, no
    quotes or backslashes (so nothing it holds can pass for another field)."""
    if not text:
        return "-"
    clipped = text[:MAX_SHOWN]
    safe = "".join(c if c.isprintable() and c not in ' "\\' else f"\\x{ord(c):02x}"
                   for c in clipped)
    return safe + ("…" if len(text) > MAX_SHOWN else "")


#: Shown instead of a user taken from the password field that no provider confirmed.
FROM_PASSWORD_FIELD = "<user from the password field>"


@dataclass(frozen=True)
class Attempted:
    """Whom a failed login claimed to be: the provider it went to (None when no provider
    was asked) and the user as the client typed it.  Never a password or token.

    A user taken from the password field (the client named the provider as its user,
    docs/design.md, "Provider selection", step 2) may be part of a password a client put in the
    wrong
    place, so it is ``None`` (and ``from_password_field``) unless the provider said the
    password was wrong, which confirms such a user exists.

    ``str()`` is ``provider/user`` escaped for a text line; the JSON log reads the
    attributes (``{"provider": …, "user": …}``, esmtpfa.common.jsonlog).
    """

    provider: str | None
    username: str | None
    from_password_field: bool = False

    def __str__(self) -> str:
        shown = FROM_PASSWORD_FIELD if self.from_password_field else _shown(self.username)
        return f"{self.provider or '-'}/{shown}"


class LoginRefused(UnauthorizedLogin):
    """The credentials were refused, and the ``kind`` of refusal (one of ``REASONS``).

    ``detail`` is for the provider's debug line; it never holds a secret either."""

    def __init__(self, kind: str, detail: str = "", *,
                 attempted: Attempted | None = None):
        super().__init__(detail or kind)
        self.kind = kind if kind in REASONS else REJECTED
        self.detail = detail or kind
        self.attempted = attempted

    def about(self, attempted: Attempted) -> "LoginRefused":
        return LoginRefused(self.kind, self.detail, attempted=attempted)


class ProviderUnavailable(Exception):
    """The provider could not give an answer (down, timed out, 5xx).

    Temporary by definition: the user's password is not wrong because the IdP is down,
    so the SMTP server answers ``454 4.7.0`` and the client retries (docs/design.md,
    "The SMTP session").
    """

    kind = BACKEND_UNAVAILABLE

    def __init__(self, *args: object, attempted: Attempted | None = None):
        super().__init__(*args)
        self.attempted = attempted

    def about(self, attempted: Attempted) -> "ProviderUnavailable":
        """The same error, saying whom the login was for (same class: throttled stays
        throttled)."""
        return type(self)(*self.args, attempted=attempted)


def reason_of(error: BaseException) -> str:
    """The log's reason for a failed login: the error's kind, ``rejected`` for any
    other refusal, ``backend-unavailable`` for anything else (a bug is not the client's
    wrong password)."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str) and kind in REASONS:
        return kind
    if isinstance(error, LoginFailed):
        return REJECTED
    return BACKEND_UNAVAILABLE


def most_telling(refusals: list[LoginRefused]) -> LoginRefused | None:
    """Of several providers' refusals of one login, the one the log reports."""
    for kind in _TELLING:
        for refusal in refusals:
            if refusal.kind == kind:
                return refusal
    return refusals[0] if refusals else None


__all__ = [
    "Attempted", "BACKEND_UNAVAILABLE", "BAD_PASSWORD", "BAD_TOKEN", "EXPIRED_TOKEN",
    "FROM_PASSWORD_FIELD", "LoginRefused", "MALFORMED", "POLICY", "ProviderUnavailable",
    "REASONS", "REJECTED", "THROTTLED", "UNKNOWN_USER", "UnauthorizedLogin",
    "most_telling", "reason_of",
]
