"""SASL client mechanisms toward the upstream (RFC 4954): SCRAM, CRAM-MD5, PLAIN, LOGIN.

Each mechanism is a small state machine that knows nothing about SMTP: ``initial()`` gives
the initial response (or None to wait for a challenge), ``respond(challenge)`` answers one
334 challenge, and ``complete`` says whether the exchange reached the point where the
client is satisfied.  For SCRAM that means the server proved that it knows the password
too (RFC 5802 §5.1 ``v=``): a server that says 235 without that proof is not trusted.

The order of preference is the one of docs/design.md §5 and mox's smtpclient: SCRAM-SHA-256, then
SCRAM-SHA-1, CRAM-MD5, PLAIN, LOGIN.  Channel binding (the ``-PLUS`` variants) is not
offered: the GS2 header says so (``n,,``), which RFC 5802 allows.

Nothing here logs: every byte of an exchange can be, or lead to, the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stringprep
import unicodedata

#: Strongest first (docs/design.md §5).
PREFERENCE = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
MECHANISMS = frozenset(PREFERENCE)

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
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
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
    """RFC 5802 §5.1: "=" and "," in a username are escaped."""
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
