"""Server-side TLS settings for the SMTP and HTTP listeners.

TLS 1.2 is the floor (docs/design.md, "Listeners, TLS and health"); ``--tls-min-version 1.3`` raises it, and
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
        raise ValueError(f"TLS {value} is not offered (RFC 8996); expected 1.2 or 1.3")
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


@dataclass(frozen=True)
class TLSPolicy:
    """What every server context of a listener group is built with."""

    min_version: TLSVersion = TLSVersion.TLSv1_2
    ciphers: str | None = None
    ca_certs: tuple[crypto.X509, ...] = ()


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


__all__ = ["MIN_VERSIONS", "TLSConfigError", "TLSPolicy", "parse_certificates",
           "parse_cipher_string", "parse_min_version", "read_ca_certificates"]
