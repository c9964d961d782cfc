"""SASL client mechanisms toward the upstream (RFC 4954): SCRAM, CRAM-MD5, PLAIN, LOGIN,
and the bearer-token mechanisms OAUTHBEARER (RFC 7628) and XOAUTH2.

Each mechanism is a small state machine that knows nothing about SMTP: ``initial()`` gives
the initial response (or None to wait for a challenge), ``respond(challenge)`` answers one
334 challenge, and ``complete`` says whether the exchange reached the point where the
client is satisfied.  For SCRAM that means the server proved that it knows the password
too (RFC 5802 §5.1 ``v=``): a server that says 235 without that proof is not trusted.

The order of preference is the one of docs/design.md, "The relay and the delivery guarantee" and
mox's smtpclient: SCRAM-SHA-256, then
SCRAM-SHA-1, CRAM-MD5, PLAIN, LOGIN.  Channel binding (the ``-PLUS`` variants) is not
offered: the GS2 header says so (``n,,``), which RFC 5802 allows.

OAUTHBEARER and XOAUTH2 carry an OAuth2 access token instead of a password (Microsoft
365 and Gmail after basic auth).  They are not in ``PREFERENCE``: an upstream gets them
only when it has a token broker (an ``oauth2`` block), and then ``choose_token_mechanism``
picks between the two.  When the server refuses the token it does not answer 535 at
once: it sends a 334 "error challenge" (a base64 JSON object, RFC 7628 §3.2.2) and waits
for the client to close the exchange (``^A`` for OAUTHBEARER, RFC 7628 §3.2.3; an empty
line for XOAUTH2, as Google documents it).  The mechanism answers that way and keeps a
``TokenRefused`` in ``refusal``: the session can then drop the token, have it refreshed
once, and retry once on a new connection.

Nothing here logs: every byte of an exchange can be, or lead to, the password (or the
token).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stringprep
import unicodedata

#: Strongest first (docs/design.md, "The relay and the delivery guarantee").
PREFERENCE = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
#: Bearer-token mechanisms, preferred first: OAUTHBEARER is the standard (RFC 7628),
#: XOAUTH2 the older form that Microsoft 365 and Gmail both accept.
TOKEN_PREFERENCE = ("OAUTHBEARER", "XOAUTH2")
TOKEN_MECHANISMS = frozenset(TOKEN_PREFERENCE)
MECHANISMS = frozenset(PREFERENCE + TOKEN_PREFERENCE)

#: An error challenge longer than this is not parsed (a real one is ~100 bytes).
MAX_ERROR_CHALLENGE = 4096

#: A server asking for more PBKDF2 iterations than this is refused: the hash runs in the
#: reactor thread and a hostile server must not be able to stall the relay (RFC 7677 §4
#: recommends 4096 at least; Cyrus uses 4096, Dovecot 4096, Postfix via Cyrus 4096).
MAX_SCRAM_ITERATIONS = 100_000


class SASLError(Exception):
    """The server's side of the exchange is malformed or does not prove itself."""


def choose_mechanism(offered: frozenset[str] | set[str], forced: str | None = None) -> str | None:
    """The mechanism to use: ``forced`` when configured (and offered), else the strongest
    offered one we implement; None when there is nothing usable."""
    offered = {m.upper() for m in offered}
    if forced:
        forced = forced.upper()
        return forced if forced in offered else None
    return next((m for m in PREFERENCE if m in offered), None)


def choose_token_mechanism(offered: frozenset[str] | set[str],
                           forced: str | None = None) -> str | None:
    """Like ``choose_mechanism`` for an upstream that logs in with an OAuth2 token:
    OAUTHBEARER, then XOAUTH2, unless one is forced (a forced password mechanism is
    refused here: a token is not a password)."""
    offered = {m.upper() for m in offered}
    if forced:
        forced = forced.upper()
        return forced if forced in offered and forced in TOKEN_MECHANISMS else None
    return next((m for m in TOKEN_PREFERENCE if m in offered), None)


def token_client_for(mechanism: str, username: str, token: str, host: str,
                     port: int, authzid: str | None = None) -> "TokenMechanism":
    """A bearer-token mechanism for one AUTH exchange.  ``username`` is the mailbox the
    token is for (XOAUTH2 ``user=``); OAUTHBEARER sends it as the authzid (``a=``)
    unless ``authzid`` says otherwise, and ``host``/``port`` as the server it talks to."""
    mechanism = mechanism.upper()
    if mechanism == "XOAUTH2":
        return XOAuth2(username, token)
    if mechanism == "OAUTHBEARER":
        return OAuthBearer(token, host, port, username if authzid is None else authzid)
    raise ValueError(f"unsupported token SASL mechanism {mechanism}")


def client_for(mechanism: str, username: str, password: str,
               cache: dict | None = None) -> "Mechanism":
    mechanism = mechanism.upper()
    if mechanism == "PLAIN":
        return Plain(username, password)
    if mechanism == "LOGIN":
        return Login(username, password)
    if mechanism == "CRAM-MD5":
        return CramMD5(username, password)
    if mechanism == "SCRAM-SHA-256":
        return Scram("sha256", username, password, cache=cache)
    if mechanism == "SCRAM-SHA-1":
        return Scram("sha1", username, password, cache=cache)
    raise ValueError(f"unsupported SASL mechanism {mechanism}")


class Mechanism:
    name = ""
    #: Whether the password itself crosses the wire (PLAIN, LOGIN): for the log only.
    cleartext = False

    def __init__(self) -> None:
        self.complete = False

    def initial(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        raise NotImplementedError


class Plain(Mechanism):
    """RFC 4616: ``authzid NUL authcid NUL passwd``, sent as the initial response."""

    name = "PLAIN"
    cleartext = True

    def __init__(self, username: str, password: str):
        super().__init__()
        self._response = b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
        self._sent = 0

    def initial(self) -> bytes:
        self._sent += 1
        self.complete = True
        return self._response

    def respond(self, challenge: bytes) -> bytes:
        # A server that ignored the initial response asks with an empty challenge.
        if self._sent > 1 or challenge:
            raise SASLError("unexpected PLAIN challenge")
        self._sent += 1
        return self._response


class Login(Mechanism):
    """The de-facto LOGIN mechanism (draft-murchison-sasl-login): user, then password."""

    name = "LOGIN"
    cleartext = True

    def __init__(self, username: str, password: str):
        super().__init__()
        self._answers = [username.encode("utf-8"), password.encode("utf-8")]

    def respond(self, challenge: bytes) -> bytes:
        if not self._answers:
            raise SASLError("unexpected third LOGIN challenge")
        answer = self._answers.pop(0)
        self.complete = not self._answers
        return answer


class CramMD5(Mechanism):
    """RFC 2195: ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"

    def __init__(self, username: str, password: str):
        super().__init__()
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        if self.complete:
            raise SASLError("unexpected second CRAM-MD5 challenge")
        if not challenge:
            raise SASLError("empty CRAM-MD5 challenge")
        digest = hmac.new(self._password, challenge, hashlib.md5).hexdigest()
        self.complete = True
        return self._username + b" " + digest.encode("ascii")


class Scram(Mechanism):
    """RFC 5802 (SCRAM-SHA-1) and RFC 7677 (SCRAM-SHA-256), without channel binding.

    ``cache`` (shared per relay) keeps SaltedPassword per (hash, salt, iterations): it is
    what the server stores, so caching it costs nothing in secrecy compared to the password
    the relay holds anyway, and a new pooled connection does not pay PBKDF2 again.
    """

    _GS2_HEADER = b"n,,"

    def __init__(self, hash_name: str, username: str, password: str,
                 nonce: str | None = None, cache: dict | None = None):
        super().__init__()
        self.name = "SCRAM-SHA-256" if hash_name == "sha256" else "SCRAM-SHA-1"
        self._hash = hash_name
        self._username = _sasl_name(saslprep(username))
        self._password = saslprep(password).encode("utf-8")
        self._nonce = nonce or base64.b64encode(os.urandom(24)).decode("ascii")
        self._cache = cache if cache is not None else {}
        self._client_first_bare = f"n={self._username},r={self._nonce}".encode("utf-8")
        self._server_signature: bytes | None = None
        self._step = 0

    def initial(self) -> bytes:
        self._step = 1
        return self._GS2_HEADER + self._client_first_bare

    def respond(self, challenge: bytes) -> bytes:
        if self._step == 1:
            self._step = 2
            return self._client_final(challenge)
        if self._step == 2:
            self._step = 3
            self._verify_server_final(challenge)
            return b""
        raise SASLError("unexpected SCRAM challenge after the server's final message")

    def _client_final(self, server_first: bytes) -> bytes:
        attributes = _attributes(server_first)
        if "m" in attributes:
            raise SASLError("SCRAM server requires an unknown extension")
        nonce, salt64, count = attributes.get("r"), attributes.get("s"), attributes.get("i")
        if not nonce or not salt64 or not count:
            raise SASLError("malformed SCRAM server-first message")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise SASLError("SCRAM server nonce does not extend ours")
        if not count.isdigit() or not 0 < int(count) <= MAX_SCRAM_ITERATIONS:
            raise SASLError(f"SCRAM iteration count {count[:12]!r} refused")
        try:
            salt = base64.b64decode(salt64, validate=True)
        except ValueError:
            raise SASLError("malformed SCRAM salt") from None
        key = (self._hash, salt, int(count), self._password)
        salted = self._cache.get(key)
        if salted is None:
            salted = hashlib.pbkdf2_hmac(self._hash, self._password, salt, int(count))
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = salted
        client_key = _hmac(self._hash, salted, b"Client Key")
        stored_key = hashlib.new(self._hash, client_key).digest()
        channel = base64.b64encode(self._GS2_HEADER).decode("ascii")
        without_proof = f"c={channel},r={nonce}".encode("ascii")
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(self._hash, stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = _hmac(self._hash, salted, b"Server Key")
        self._server_signature = _hmac(self._hash, server_key, auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def _verify_server_final(self, server_final: bytes) -> None:
        attributes = _attributes(server_final)
        if "e" in attributes:
            raise SASLError(f"SCRAM server error: {attributes['e'][:64]}")
        try:
            verifier = base64.b64decode(attributes.get("v", ""), validate=True)
        except ValueError:
            raise SASLError("malformed SCRAM server signature") from None
        if self._server_signature is None or not hmac.compare_digest(
                verifier, self._server_signature):
            raise SASLError("SCRAM server signature does not match: the server does not "
                            "know the password")
        self.complete = True


class TokenRefused(Exception):
    """The upstream refused the access token (its 334 error challenge).

    ``status`` is the JSON ``status`` member (``invalid_token``, ``insufficient_scope``,
    Google's ``"400"``/``"401"``…), reduced to a short safe token, or "unknown".  It
    never holds the token itself: the server does not echo it, and nothing else is kept.
    """

    def __init__(self, mechanism: str, status: str = "unknown"):
        super().__init__(f"{mechanism}: the upstream refused the access token ({status})")
        self.mechanism = mechanism
        self.status = status


#: What ``TokenRefused.status`` may keep from the server's JSON.
_STATUS = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


def _error_status(challenge: bytes) -> str:
    """The ``status`` of an RFC 7628 §3.2.2 error challenge, or "unknown"."""
    if len(challenge) > MAX_ERROR_CHALLENGE:
        return "unknown"
    try:
        document = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "unknown"
    status = document.get("status") if isinstance(document, dict) else None
    if isinstance(status, int) and not isinstance(status, bool):
        status = str(status)
    return status if isinstance(status, str) and _STATUS.match(status) else "unknown"


class TokenMechanism(Mechanism):
    """What OAUTHBEARER and XOAUTH2 share: the token goes in the initial response, and
    a non-empty challenge after it is the server's error report.

    ``refusal`` (a ``TokenRefused``) is set when the server refused the token; the
    exchange then ends with the server's failure reply (``AuthenticationFailed``), and
    the session tells a refused token from a refused account by this attribute.
    """

    #: What the client sends after an error challenge.
    _after_error = b"\x01"

    def __init__(self, response: bytes):
        super().__init__()
        self._response = response
        self._sent = 0
        self.refusal: TokenRefused | None = None

    @property
    def token_refused(self) -> bool:
        return self.refusal is not None

    def initial(self) -> bytes:
        self._sent += 1
        self.complete = True
        return self._response

    def respond(self, challenge: bytes) -> bytes:
        if self.refusal is not None:
            raise SASLError(f"unexpected {self.name} challenge after the error report")
        if not challenge and self._sent == 0:
            # A server that did not take the initial response asks for it (RFC 4954 §4).
            self._sent += 1
            self.complete = True
            return self._response
        if not challenge:
            raise SASLError(f"unexpected empty {self.name} challenge")
        self.refusal = TokenRefused(self.name, _error_status(challenge))
        self.complete = False  # a 235 now would be a server we cannot make sense of
        return self._after_error

    def __repr__(self) -> str:
        return f"<{type(self).__name__} refused={self.token_refused}>"


class XOAuth2(TokenMechanism):
    """Google's and Microsoft's XOAUTH2: ``user=<user>^Aauth=Bearer <token>^A^A``.

    After an error challenge Google documents an empty response; Microsoft accepts it.
    """

    name = "XOAUTH2"
    _after_error = b""

    def __init__(self, username: str, token: str):
        super().__init__(b"user=" + username.encode("utf-8") + b"\x01auth=Bearer "
                         + _bearer(token) + b"\x01\x01")


class OAuthBearer(TokenMechanism):
    """RFC 7628 §3.1: GS2 header ``n,a=<authzid>,`` then ``^Ahost=…^Aport=…^A``
    ``auth=Bearer <token>^A^A``.  Channel binding is not offered (``n``)."""

    name = "OAUTHBEARER"

    def __init__(self, token: str, host: str, port: int, authzid: str | None = None):
        authz = f"a={_sasl_name(authzid)}" if authzid else ""
        gs2 = f"n,{authz},".encode("utf-8")
        super().__init__(gs2 + b"\x01host=" + host.encode("utf-8") + b"\x01port="
                         + str(int(port)).encode("ascii") + b"\x01auth=Bearer "
                         + _bearer(token) + b"\x01\x01")


#: RFC 6750 §2.1 b64token: what a bearer token may contain.
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


def _bearer(token: str) -> bytes:
    """The token as bytes, refused (without quoting it) when it is not a b64token: a
    ``^A`` or a line break in it would forge fields of the exchange."""
    raw = token.encode("utf-8", "replace")
    if not _B64TOKEN.match(raw):
        raise ValueError("the access token is not an RFC 6750 b64token")
    return raw


def _hmac(hash_name: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hash_name).digest()


def _attributes(message: bytes) -> dict[str, str]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("SCRAM message is not UTF-8") from None
    attributes: dict[str, str] = {}
    for part in text.split(","):
        name, equals, value = part.partition("=")
        if len(name) != 1 or not equals:
            raise SASLError("malformed SCRAM message")
        attributes.setdefault(name, value)
    return attributes


def _sasl_name(name: str) -> str:
    """RFC 5802 §5.1 (and RFC 5801 saslname for the GS2 authzid): "=" and "," in a
    name are escaped."""
    return name.replace("=", "=3D").replace(",", "=2C")


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep (stringprep profile) for a query string (unassigned allowed)."""
    mapped = []
    for char in text:
        if stringprep.in_table_c12(char):
            mapped.append(" ")          # non-ASCII space → space
        elif not stringprep.in_table_b1(char):
            mapped.append(char)         # commonly mapped to nothing → removed
    result = unicodedata.normalize("NFKC", "".join(mapped))
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9)
    for char in result:
        if any(table(char) for table in prohibited):
            raise ValueError("prohibited character in a SASL string (RFC 4013 §2.3)")
    if any(stringprep.in_table_d1(char) for char in result):  # RFC 3454 §6 bidi rules
        if any(stringprep.in_table_d2(char) for char in result) or not (
                stringprep.in_table_d1(result[0]) and stringprep.in_table_d1(result[-1])):
            raise ValueError("invalid bidirectional text in a SASL string (RFC 3454 §6)")
    return result
