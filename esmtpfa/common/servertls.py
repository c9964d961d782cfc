"""Server-side TLS settings for the SMTP and HTTP listeners.

TLS 1.2 is the floor (docs/design.md, "Listeners, TLS and health"); ``--tls-min-version 1.3`` raises
it, and
``--tls-ciphers`` chooses the TLS 1.2 cipher suites (TLS 1.3's suites are all sound and
OpenSSL configures them apart).  With a CA file, client certificates are requested and
verified but not required: submission clients authenticate with SMTP AUTH, a client
certificate is an extra the operator may log or use later.

Session resumption is on, with stateless session tickets (RFC 5077, and TLS 1.3's
tickets): a client that opens a connection per message (most applications and printers
do) resumes instead of paying a full handshake each time, which costs the relay several
times the CPU of the rest of the message.  Twisted turns both the session cache and
tickets off by default; the cache (stateful) stays off, tickets need no memory per
client.  Each context has its own ticket key, made when it is built: with ``--workers``
a client resumes when the kernel gives it the worker that issued its ticket
(docs/workers.md), and after a certificate reload the next handshake of each client is
a full one.

The workers do not share a ticket key, because nothing here can set one: pyOpenSSL has
no call for it, the OpenSSL it runs on (linked into ``cryptography``) binds neither
``SSL_CTX_ctrl`` (behind ``SSL_CTX_set_tlsext_ticket_keys``) nor the ticket key callback
even in its private ``_lib``, and exports no symbol ``ctypes`` could reach; the system's
``libssl`` is another copy of OpenSSL, with other contexts.  Workers are started by
``exec``, so none inherits a context either.  What resumption would save is measured in
docs/performance.md, "The cost of a STARTTLS connection".

The legacy listeners for old printers and scanners (docs/devices.md) are the one place
TLS 1.0 and 1.1 are spoken: ``legacy_policy`` lowers the floor there only, with OpenSSL
security level 0 (``legacy_cipher_string``), and never for the listeners above.

The certificates themselves, their reload and the choice by SNI are in
``esmtpfa.common.certificates``.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL, crypto
from twisted.internet.ssl import TLSVersion


class TLSConfigError(Exception):
    """A certificate, key or TLS setting that cannot be used; the text names the file or
    the setting."""


#: ``--tls-min-version`` values; 1.0 and 1.1 are refused (RFC 8996 deprecates them).
MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


def parse_min_version(text: str) -> str:
    """``1.2`` or ``1.3`` (``TLSv1.3`` too); the key of ``MIN_VERSIONS``."""
    value = text.strip().lower().removeprefix("tlsv").removeprefix("tls")
    if value in ("1.0", "1", "1.1"):
        raise ValueError(f"TLS {value} is not offered (RFC 8996); expected 1.2 or 1.3 "
                         "(old devices: a legacy listener, docs/devices.md)")
    if value not in MIN_VERSIONS:
        raise ValueError(f"expected 1.2 or 1.3, got {text!r}")
    return value


def parse_cipher_string(text: str) -> str:
    """An OpenSSL cipher string (TLS 1.2 and below) that selects at least one suite."""
    try:
        text.encode("ascii")
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(text.encode("ascii"))
    except (UnicodeEncodeError, SSL.Error):
        raise ValueError(f"OpenSSL accepts no cipher from {text!r}") from None
    return text


#: The TLS 1.0/1.1 suites old devices know (all CBC with SHA-1 MACs), after the modern
#: ones a device that can do TLS 1.2 gets; ECDHE first for forward secrecy, then RSA key
#: exchange (no ECDHE on the oldest firmware).  No 3DES (Sweet32), no RC4 (OpenSSL 3 has
#: none).  RSA suites need an RSA certificate: most old devices know no ECDSA either.
LEGACY_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:RSA+AESGCM:RSA+AES:"
                  "!aNULL:!MD5:!DSS")

#: The OpenSSL security level TLS 1.0 and 1.1 need.  OpenSSL 3 refuses both at level 1
#: and above: their handshake signatures are SHA-1 (or MD5+SHA-1), which level 1 no
#: longer allows, so every handshake below TLS 1.2 fails ("unsupported protocol").
LEGACY_SECURITY_LEVEL = "@SECLEVEL=0"


def legacy_cipher_string(text: str) -> str:
    """``--legacy-tls-ciphers``: an OpenSSL cipher string that selects a suite, run at
    security level 0 (appended when the string names no level; any other level is an
    error, since it would silently refuse every TLS 1.0 and 1.1 client)."""
    text = text.strip()
    if "@SECLEVEL=" in text.upper():
        if LEGACY_SECURITY_LEVEL not in text.upper():
            raise ValueError("TLS 1.0 and 1.1 need OpenSSL security level 0: use "
                             "@SECLEVEL=0 or leave the level out")
    else:
        text = f"{text}:{LEGACY_SECURITY_LEVEL}"
    return parse_cipher_string(text)


@dataclass(frozen=True)
class TLSPolicy:
    """What every server context of a listener group is built with."""

    min_version: TLSVersion = TLSVersion.TLSv1_2
    ciphers: str | None = None
    ca_certs: tuple[crypto.X509, ...] = ()

    @property
    def below_tls12(self) -> bool:
        """Whether the floor is under Twisted's own (TLS 1.2), which only
        ``insecurelyLowerMinimumTo`` can set."""
        return self.min_version in (TLSVersion.TLSv1_0, TLSVersion.TLSv1_1)


def legacy_policy(ciphers: str, ca_certs: tuple[crypto.X509, ...] = ()) -> TLSPolicy:
    """The legacy listeners' policy: TLS 1.0 and up, ``ciphers`` at security level 0."""
    return TLSPolicy(TLSVersion.TLSv1_0, legacy_cipher_string(ciphers), ca_certs)


def parse_certificates(pem: bytes, path: str) -> list[crypto.X509]:
    """Every PEM certificate in ``pem`` (leaf first, then its chain)."""
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in pem.split(marker)[1:]]
    if not blocks:
        raise TLSConfigError(f"certificate file {path}: no PEM certificate found")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error:
        raise TLSConfigError(f"certificate file {path}: a PEM certificate that does not "
                             "parse") from None


def read_ca_certificates(path: str) -> tuple[crypto.X509, ...]:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as error:
        raise TLSConfigError(f"CA file {path}: {error.strerror}") from None
    return tuple(parse_certificates(pem, path))


__all__ = ["LEGACY_CIPHERS", "LEGACY_SECURITY_LEVEL", "MIN_VERSIONS", "TLSConfigError",
           "TLSPolicy", "legacy_cipher_string", "legacy_policy", "parse_certificates",
           "parse_cipher_string", "parse_min_version", "read_ca_certificates"]
