"""Server-side SASL mechanisms for SMTP AUTH (RFC 4954).

Each mechanism is a tiny state machine that turns client responses into what the Portal
needs (username, secret, whether the secret is a bearer token) or into an SMTP reply.
Keeping them free of I/O lets the protocol own the wire and the tests drive every byte.

PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) carry a password; XOAUTH2
(Google's) and OAUTHBEARER (RFC 7628) carry a bearer token.  CRAM-MD5 is deliberately
absent: it needs the plaintext password on our side, which federated providers never give.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from esmtpfa.common.replies import (
    AUTH_CANCELLED,
    AUTH_INVALID,
    AUTH_MALFORMED,
    Reply,
    SMTPReplyError,
)

#: RFC 4954 §4: a SASL response line may be long (JWTs); we allow 12288 octets.
MAX_RESPONSE = 12288


@dataclass(frozen=True)
class Challenge:
    data: bytes  # raw bytes, base64-encoded on the wire


@dataclass(frozen=True)
class Offer:
    """What the client offered; the selector decides which provider checks it."""

    username: str
    secret: str
    bearer: bool
    oauth_host: str | None = None

    def __repr__(self) -> str:
        return f"Offer(username={self.username!r}, bearer={self.bearer}, secret=<redacted>)"


Step = Challenge | Offer


def decode_response(line: bytes) -> bytes:
    """Decode one base64 SASL response; ``*`` cancels (RFC 4954 §4), ``=`` is empty."""
    line = line.strip()
    if line == b"*":
        raise SMTPReplyError(AUTH_CANCELLED)
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPReplyError(AUTH_MALFORMED) from None


def _text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPReplyError(AUTH_MALFORMED) from None
    if "\x00" in text:
        raise SMTPReplyError(AUTH_MALFORMED)
    return text


class Mechanism:
    name = ""
    bearer = False

    def start(self, initial: bytes | None) -> Step:
        """``initial`` is the decoded initial response, or None when none was sent."""
        raise NotImplementedError

    def respond(self, response: bytes) -> Step:
        raise NotImplementedError

    def failure_challenge(self) -> bytes | None:
        """RFC 7628 §3.2.2: token mechanisms send an error challenge before 535."""
        return None


class Plain(Mechanism):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise SMTPReplyError(AUTH_MALFORMED)
        authzid, authcid, password = (_text(part) for part in parts)
        if authzid and authzid != authcid:
            # Acting for someone else is a privilege no provider grants.
            raise SMTPReplyError(AUTH_INVALID)
        if not authcid:
            raise SMTPReplyError(AUTH_MALFORMED)
        return Offer(authcid, password, bearer=False)


class Login(Mechanism):
    """The LOGIN mechanism: username, then password, each its own exchange."""

    name = "LOGIN"

    def __init__(self):
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        if self._username is None:
            self._username = _text(response)
            if not self._username:
                raise SMTPReplyError(AUTH_MALFORMED)
            return Challenge(b"Password:")
        return Offer(self._username, _text(response), bearer=False)


def _error_challenge(status: str = "invalid_token") -> bytes:
    return json.dumps({"status": status, "schemes": "bearer"}).encode()


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SMTPReplyError(AUTH_MALFORMED)
    return token.strip()


class TokenMechanism(Mechanism):
    bearer = True

    def __init__(self):
        self._failed = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def failure_challenge(self) -> bytes | None:
        return _error_challenge()


class XOAuth2(TokenMechanism):
    """Google's XOAUTH2: ``user=U ^A auth=Bearer T ^A ^A``."""

    name = "XOAUTH2"

    def respond(self, response: bytes) -> Step:
        fields = _text(response.replace(b"\x01", b"\n")).split("\n")
        values = dict(field.split("=", 1) for field in fields if "=" in field)
        if "auth" not in values:
            raise SMTPReplyError(AUTH_MALFORMED)
        return Offer(values.get("user", ""), _bearer(values["auth"]), bearer=True)


class OAuthBearer(TokenMechanism):
    """RFC 7628: GS2 header ``n,a=user,`` then ``^A``-separated key=value pairs."""

    name = "OAUTHBEARER"

    def respond(self, response: bytes) -> Step:
        header, sep, rest = response.partition(b"\x01")
        if not sep:
            raise SMTPReplyError(AUTH_MALFORMED)
        gs2 = _text(header).split(",")
        if len(gs2) < 2 or gs2[0] not in ("n", "y"):
            raise SMTPReplyError(AUTH_MALFORMED)
        user = gs2[1][2:] if gs2[1].startswith("a=") else ""
        user = user.replace("=2C", ",").replace("=3D", "=")  # RFC 5801 saslname
        pairs = [item for item in _text(rest).split("\x01") if item]
        values = dict(item.split("=", 1) for item in pairs if "=" in item)
        if "auth" not in values:
            raise SMTPReplyError(AUTH_MALFORMED)
        return Offer(user, _bearer(values["auth"]), bearer=True,
                     oauth_host=values.get("host") or None)


MECHANISMS: dict[str, type[Mechanism]] = {
    mechanism.name: mechanism for mechanism in (Plain, Login, XOAuth2, OAuthBearer)
}

UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")


def mechanism_for(name: str) -> Mechanism:
    try:
        return MECHANISMS[name.upper()]()
    except KeyError:
        raise SMTPReplyError(UNKNOWN_MECHANISM) from None
