"""Client TLS toward the upstream: who we trust, who we are, which name we expect.

Built once when the relay starts (the files are read then, so a missing CA file is a
startup error, not a failure on the first message), used for implicit TLS (RFC 8314) and
for STARTTLS (RFC 3207) alike.  TLS 1.2 is the minimum (RFC 8996 retired 1.0 and 1.1).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from esmtpfa.common.logs import logger

log = logger("esmtpfa.relay.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
_PEM = Encoding.PEM


def load_trust_root(ca_file: str) -> Any:
    """Every certificate in a PEM bundle becomes a trust anchor (not only the first)."""
    with open(ca_file, "rb") as f:
        pem = f.read()
    certificates = x509.load_pem_x509_certificates(pem)
    if not certificates:
        raise ValueError(f"no certificate in {ca_file}")
    return ssl.trustRootFromCertificates([
        ssl.Certificate.loadPEM(c.public_bytes(_PEM)) for c in certificates])


def load_client_certificate(cert_file: str, key_file: str) -> tuple[ssl.PrivateCertificate,
                                                                    list[Any]]:
    """Our certificate and key, plus any intermediates that follow it in ``cert_file``."""
    with open(cert_file, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    with open(key_file, "rb") as f:
        key_pem = f.read()
    if not chain:
        raise ValueError(f"no certificate in {cert_file}")
    leaf = ssl.PrivateCertificate.loadPEM(chain[0].public_bytes(_PEM) + b"\n" + key_pem)
    intermediates = [ssl.Certificate.loadPEM(c.public_bytes(_PEM)).original for c in chain[1:]]
    return leaf, intermediates


def client_tls_options(server_name: str, ca_cert: str | None = None,
                       client_cert: str | None = None, client_key: str | None = None,
                       skip_verify: bool = False) -> IOpenSSLClientConnectionCreator:
    """The connection creator for ``wrapClientTLS`` and ``transport.startTLS``.

    ``server_name`` is both the SNI name and the identity checked in the certificate
    (service_identity; an IP address is matched against IP SANs and sent without SNI).
    Trust is ``ca_cert`` when given, else the platform's store.  ``skip_verify`` turns all
    verification off: encryption without authentication, logged as a warning.
    """
    extra: dict[str, Any] = {"raiseMinimumTo": MINIMUM_VERSION}
    client = None
    if client_cert or client_key:
        if not (client_cert and client_key):
            raise ValueError("a client certificate needs both the certificate and the key")
        client, intermediates = load_client_certificate(client_cert, client_key)
        if intermediates:
            extra["extraCertChain"] = intermediates
    if skip_verify:
        log.warn("TLS certificate verification toward the upstream {name} is DISABLED "
                 "(skip-verify): the connection is encrypted but not authenticated",
                 name=server_name)
        if client is not None:
            extra.update(privateKey=client.privateKey.original, certificate=client.original)
        options = ssl.CertificateOptions(verify=False, **extra)
        return _UnverifiedClientTLS(options, server_name)
    trust = load_trust_root(ca_cert) if ca_cert else ssl.platformTrust()
    return ssl.optionsForClientTLS(server_name, trustRoot=trust, clientCertificate=client,
                                   extraCertificateOptions=extra)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Like ``optionsForClientTLS`` (SNI included) but without any peer verification.

    Twisted's ``ClientTLSOptions`` always installs its verify callback, so skip-verify needs
    its own small creator.
    """

    def __init__(self, options: ssl.CertificateOptions, server_name: str):
        self._options = options
        self._server_name = server_name
        self._send_sni = not (isIPAddress(server_name) or isIPv6Address(server_name))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._send_sni:
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        return connection
