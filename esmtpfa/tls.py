"""Server-side TLS options for the SMTP and HTTP listeners.

TLS 1.2 is the floor (docs/design.md §1).  With a CA file, client certificates are requested and
verified but not required: submission clients authenticate with SMTP AUTH, a client
certificate is an extra the operator may log or use later.

Session resumption is on, with stateless session tickets (RFC 5077, and TLS 1.3's
tickets): a client that opens a connection per message (most applications and printers
do) resumes instead of paying a full handshake each time, which costs the relay several
times the CPU of the rest of the message.  Twisted turns both the session cache and
tickets off by default; the cache (stateful) stays off, tickets need no memory per
client.  Each process has its own ticket key, made at startup: with ``--workers`` a
client resumes when the kernel gives it the worker that issued its ticket
(docs/workers.md).
"""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion


class TLSConfigError(Exception):
    pass


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise TLSConfigError(f"{what} {path}: {error.strerror}") from None


def _certificates(pem: bytes, path: str) -> list[crypto.X509]:
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in pem.split(marker)[1:]]
    if not blocks:
        raise TLSConfigError(f"certificate file {path}: no PEM certificate found")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error as error:
        raise TLSConfigError(f"certificate file {path}: {error}") from None


def server_tls_options(cert_path: str, key_path: str,
                       ca_path: str | None = None) -> ssl.CertificateOptions:
    """Options for a listener: certificate chain, key, optional client-cert CA."""
    chain = _certificates(_read(cert_path, "certificate file"), cert_path)
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, _read(key_path, "key file"))
    except crypto.Error as error:
        raise TLSConfigError(f"key file {key_path}: {error}") from None
    extra = {}
    if ca_path:
        extra = dict(verify=True, requireCertificate=False,
                     caCerts=_certificates(_read(ca_path, "CA file"), ca_path))
    try:
        options = ssl.CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:],
            raiseMinimumTo=TLSVersion.TLSv1_2, enableSessionTickets=True, **extra)
        options.getContext()  # fail now if the key does not match the certificate
    except Exception as error:
        raise TLSConfigError(f"{cert_path} / {key_path}: {error}") from None
    return options
