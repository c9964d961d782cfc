"""Server certificates that follow their files: reload, SNI, expiry (docs/operations.md,
"Certificates").

certbot and cert-manager renew a certificate by replacing its files; a relay that read
them once serves the old certificate until it expires.  So the files are read again on
SIGHUP and whenever a poll sees them change (``CertificateWatcher``), and each
handshake takes the contexts in use *when it starts*:

* ``ServerTLS`` is what a listener holds (an ``IOpenSSLServerConnectionCreator``): each
  new connection gets an ``SSL.Connection`` on the current default context.  OpenSSL
  keeps a context alive as long as a connection uses it, so a session established before
  a reload keeps its certificate and goes on; the next handshake gets the new one.
* ``CertificateStore`` keeps the last good version of every certificate/key pair.  A
  pair that cannot be loaded (unreadable, not PEM, a key that does not match) keeps its
  previous version and is reported in one warning line naming the file; the others are
  still renewed.  A reload that changed nothing builds nothing (a new context would also
  mean a new session ticket key, and clients would lose resumption for nothing).
* Extra pairs (``--tls-sni-certs``) are chosen by the name the client sends (SNI,
  RFC 6066 section 3): an exact name first, then a wildcard covering one left-most label
  (RFC 6125 section 6.4.3), else the default certificate.  Certificates naming exactly
  the same names but with different key types (RSA and ECDSA) share one context, where
  OpenSSL chooses by what the client supports (its signature algorithms).

Nothing here logs or labels a key; names and dates are public in every handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.servertls import TLSConfigError, TLSPolicy, parse_certificates

log = logger("esmtpfa.certificates")

#: A PEM file larger than this is not a certificate or a key: refused unread.
MAX_PEM_BYTES = 1 << 20
#: Suffixes of certificate files in a ``--tls-sni-certs`` directory; the key is beside
#: each, with the same stem and ``.key``.
CERTIFICATE_SUFFIXES = (".crt", ".pem")


@dataclass(frozen=True)
class CertificatePair:
    cert_path: str
    key_path: str


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise TLSConfigError(f"{what} {path}: {error.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TLSConfigError(f"{what} {path}: larger than {MAX_PEM_BYTES} bytes")
    return data


def _key_type(key: crypto.PKey) -> str:
    return {crypto.TYPE_RSA: "rsa", crypto.TYPE_EC: "ecdsa",
            crypto.TYPE_DSA: "dsa"}.get(key.type(), f"type{key.type()}")


def _names(cert: crypto.X509) -> tuple[str, ...]:
    """The DNS names a client may ask for: the subjectAltName's, else the CN (RFC 6125
    section 6.4.4 allows the CN only without DNS names)."""
    from cryptography import x509
    certificate = cert.to_cryptography()
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names))


@dataclass(frozen=True)
class Certificate:
    """One loaded certificate/key pair: what a context is built from."""

    pair: CertificatePair
    chain: tuple[crypto.X509, ...]
    key: crypto.PKey = field(repr=False)
    names: tuple[str, ...]
    not_after: float  # Unix time
    key_type: str
    digest: str  # of both files: the same content is not swapped in again

    @property
    def name(self) -> str:
        """The primary name (the first DNS name), for logs and the expiry gauge."""
        return self.names[0] if self.names else "-"

    def describe(self) -> str:
        expiry = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
        return (f"names {', '.join(self.names) or '(none)'}, {self.key_type} key, "
                f"notAfter {expiry:%Y-%m-%d %H:%M:%S} UTC")


def load_certificate(pair: CertificatePair) -> Certificate:
    """Read, parse and check one pair; ``TLSConfigError`` names the file at fault."""
    pem = _read(pair.cert_path, "certificate file")
    chain = parse_certificates(pem, pair.cert_path)
    key_pem = _read(pair.key_path, "key file")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise TLSConfigError(f"key file {pair.key_path}: no PEM private key found") from None
    check = SSL.Context(SSL.TLS_METHOD)
    try:
        check.use_certificate(chain[0])
        check.use_privatekey(key)
        check.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"key file {pair.key_path}: does not match the certificate "
                             f"{pair.cert_path}") from None
    not_after = chain[0].to_cryptography().not_valid_after_utc.timestamp()
    return Certificate(pair, tuple(chain), key, _names(chain[0]), not_after,
                       _key_type(key), hashlib.sha256(pem + b"\0" + key_pem).hexdigest())


@dataclass(frozen=True)
class CertificateSources:
    """Where a listener's certificates come from: the default pair, extra pairs, and
    directories of pairs (``NAME.crt`` or ``NAME.pem`` with ``NAME.key``; a mounted
    Kubernetes TLS Secret, ``tls.crt`` and ``tls.key``, is one such pair)."""

    default: CertificatePair
    extra: tuple[CertificatePair, ...] = ()
    directories: tuple[str, ...] = ()

    def pairs(self) -> tuple[list[CertificatePair], list[str]]:
        """Every pair, the default first; and the problems of unreadable directories."""
        pairs, problems = [self.default, *self.extra], []
        for directory in self.directories:
            try:
                names = sorted(os.listdir(directory))
            except OSError as error:
                problems.append(f"certificate directory {directory}: {error.strerror}")
                continue
            for name in names:
                stem, suffix = os.path.splitext(name)
                if suffix in CERTIFICATE_SUFFIXES and not name.startswith("."):
                    key = os.path.join(directory, stem + ".key")
                    if os.path.exists(key):
                        pairs.append(CertificatePair(os.path.join(directory, name), key))
        return list(dict.fromkeys(pairs)), problems

    def fingerprint(self) -> tuple:
        """What a poll compares: for each file, where its symlinks lead and the stat of
        what is there, so an edit in place, a rename over it and a Kubernetes Secret
        update (``..data`` swapped to a new directory: same path, new target) all
        change it; and the listing of each directory."""
        paths: list[str] = []
        for pair in (self.default, *self.extra):
            paths += [pair.cert_path, pair.key_path]
        listings = []
        for directory in self.directories:
            try:
                names = sorted(os.listdir(directory))
            except OSError as error:
                names = [f"error {error.errno}"]
            listings.append((directory, tuple(names)))
            paths += [os.path.join(directory, n) for n in names if not n.startswith(".")]
        return tuple(_file_state(path) for path in paths), tuple(listings)


def _floor(policy: TLSPolicy) -> dict[str, Any]:
    """The version floor as ``CertificateOptions`` takes it: raising above Twisted's
    TLS 1.2 and lowering below it (the legacy listeners only) are separate arguments."""
    if policy.below_tls12:
        return {"insecurelyLowerMinimumTo": policy.min_version}
    return {"raiseMinimumTo": policy.min_version}


def _file_state(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as error:
        return (path, "error", error.errno)
    return (os.path.realpath(path), st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def _groups(certificates: Sequence[Certificate]) -> list[list[Certificate]]:
    """Certificates naming exactly the same names share a context, one per key type
    (OpenSSL keeps one certificate per key type in a context and picks the one the
    client can verify).  A second certificate of the same names and key type is a
    configuration error: which one should a client get?"""
    groups: dict[frozenset, list[Certificate]] = {}
    for certificate in certificates:
        group = groups.setdefault(frozenset(certificate.names), [])
        for other in group:
            if other.key_type == certificate.key_type:
                raise TLSConfigError(
                    f"certificate file {certificate.pair.cert_path}: names the same names "
                    f"with the same key type as {other.pair.cert_path}")
        group.append(certificate)
    return list(groups.values())


class ContextSet:
    """The contexts built from one set of certificates; never changed once built."""

    def __init__(self, certificates: Sequence[Certificate], policy: TLSPolicy):
        self.certificates = tuple(certificates)
        groups = _groups(self.certificates)
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        self.default = self._context(groups[0], policy, sni=len(groups) > 1)
        contexts = [self.default] + [self._context(g, policy) for g in groups[1:]]
        for group, context in zip(groups, contexts, strict=True):
            for name in group[0].names:  # the first listed wins a name
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], context)
                else:
                    self._exact.setdefault(name, context)

    def _context(self, group: list[Certificate], policy: TLSPolicy,
                 sni: bool = False) -> SSL.Context:
        first = group[0]
        extra: dict[str, Any] = {}
        if policy.ca_certs:
            extra = {"verify": True, "requireCertificate": False,
                     "caCerts": list(policy.ca_certs)}
        if sni:
            extra["contextForServerName"] = self.for_server_name
        options = ssl.CertificateOptions(
            privateKey=first.key, certificate=first.chain[0],
            extraCertChain=list(first.chain[1:]) if len(group) == 1 else [],
            enableSessionTickets=True, **extra, **_floor(policy))
        context = options.getContext()
        if policy.ciphers:
            context.set_cipher_list(policy.ciphers.encode("ascii"))
        if len(group) > 1:
            # One certificate per key type, each with its own chain (the intermediates of
            # an RSA and an ECDSA certificate differ): ``use_certificate_chain_file``
            # sets the chain of the certificate it loads, ``add_extra_chain_cert`` would
            # share one chain.  The file is read again, so the key is checked again.
            for certificate in group:
                try:
                    context.use_certificate_chain_file(certificate.pair.cert_path.encode())
                    context.use_privatekey(certificate.key)
                    context.check_privatekey()
                except SSL.Error:
                    raise TLSConfigError(f"certificate file {certificate.pair.cert_path}: "
                                         "changed while it was loaded") from None
        return context

    def for_server_name(self, server_name: bytes | None) -> SSL.Context | None:
        """The servername callback (``set_tlsext_servername_callback``, through
        CertificateOptions' ``contextForServerName``): None keeps the default."""
        if not server_name:
            return None
        name = server_name.decode("ascii", "replace").lower().rstrip(".")
        context = self._exact.get(name)
        if context is None and "." in name:
            context = self._wildcard.get(name.partition(".")[2])
        return None if context is self.default else context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """What a TLS listener (and STARTTLS) holds: each connection starts on the contexts
    current when it is made; ``current`` is replaced by a reload."""

    def __init__(self, contexts: ContextSet):
        self.current = contexts

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.current.default, None)

    def getContext(self) -> SSL.Context:
        """The default context now (``IOpenSSLContextFactory``, for code that asks)."""
        return self.current.default


#: Told ``(listener, certificates)`` after every load that changed them.
CertificateObserver = Callable[[str, Sequence[Certificate]], None]


class CertificateStore:
    """The certificates of one listener group (``what``: "SMTP TLS", "HTTP TLS"), their
    last good versions, and the ``ServerTLS`` the listeners hold."""

    def __init__(self, sources: CertificateSources, policy: TLSPolicy, *,
                 what: str = "SMTP TLS", listener: str = "smtp"):
        self.sources = sources
        self.policy = policy
        self.what = what
        self.listener = listener
        self._observers: list[CertificateObserver] = []
        pairs, problems = sources.pairs()
        if problems:
            raise TLSConfigError(problems[0])
        self._loaded = {pair: load_certificate(pair) for pair in pairs}
        self.tls = ServerTLS(ContextSet(list(self._loaded.values()), policy))

    @property
    def certificates(self) -> tuple[Certificate, ...]:
        return self.tls.current.certificates

    def observe(self, observer: CertificateObserver) -> None:
        """``observer`` hears the certificates in use now, and after each change."""
        self._observers.append(observer)
        observer(self.listener, self.certificates)

    def log_in_use(self) -> None:
        for certificate in self.certificates:
            log.info("{what} certificate {path}: {description}", what=self.what,
                     path=certificate.pair.cert_path, description=certificate.describe())

    def reload(self, *, quiet: bool = False) -> list[str]:
        """Read every pair again; swap in new contexts if anything changed.  Returns the
        problems (each naming its file), logged as warnings unless ``quiet`` (a poll that
        may have caught a renewal half-written tries again before it reports)."""
        pairs, problems = self.sources.pairs()
        loaded: dict[CertificatePair, Certificate] = {}
        changed: list[Certificate] = []
        for pair in pairs:
            previous = self._loaded.get(pair)
            try:
                certificate = load_certificate(pair)
            except TLSConfigError as error:
                problems.append(str(error))
                if previous is not None:
                    loaded[pair] = previous
                continue
            if previous is not None and previous.digest == certificate.digest:
                loaded[pair] = previous
            else:
                loaded[pair] = certificate
                changed.append(certificate)
        if changed or set(loaded) != set(self._loaded):
            try:
                contexts = ContextSet(list(loaded.values()), self.policy)
            except (TLSConfigError, SSL.Error, ValueError) as error:
                problems.append(str(error))
            else:
                self._loaded = loaded
                self.tls.current = contexts
                for certificate in changed:
                    log.info("{what} certificate reloaded from {path}: {description}",
                             what=self.what, path=certificate.pair.cert_path,
                             description=certificate.describe())
                for observer in self._observers:
                    observer(self.listener, self.certificates)
        if not quiet:
            for problem in problems:
                log.warn("{what} certificate NOT reloaded, keeping the one in use: "
                         "{problem}", what=self.what, problem=problem)
        return problems


class CertificateWatcher(Service):
    """Polls the files of some stores every ``interval`` seconds (a stat per file: cheap)
    and reloads a store whose files changed.

    Renewals replace the certificate and the key one after the other (certbot swaps two
    symlinks), so a poll can see the new certificate with the old key.  A change whose
    load fails is therefore tried again at the next poll, and only a failure that is
    still there then is logged: a half-written renewal is never reported, a broken one
    is, once.
    """

    name = "certificates"

    def __init__(self, stores: Iterable[CertificateStore], *, interval: float, clock: Any):
        self.stores = list(stores)
        self.interval = interval
        self._seen = {id(store): store.sources.fingerprint() for store in self.stores}
        self._recheck: set[int] = set()
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def check(self) -> None:
        for store in self.stores:
            key = id(store)
            fingerprint = store.sources.fingerprint()
            if fingerprint != self._seen[key]:
                self._seen[key] = fingerprint
                if store.reload(quiet=True):
                    self._recheck.add(key)
                else:
                    self._recheck.discard(key)
            elif key in self._recheck:
                self._recheck.discard(key)
                store.reload()

    def reload_now(self) -> None:
        """SIGHUP: every store, at once, reporting every problem."""
        for store in self.stores:
            self._seen[id(store)] = store.sources.fingerprint()
            self._recheck.discard(id(store))
            store.reload()

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


def parse_sni_entries(text: str) -> tuple[tuple[CertificatePair, ...], tuple[str, ...]]:
    """``--tls-sni-certs``: comma-separated ``CERT:KEY`` pairs and directories."""
    pairs, directories = [], []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        if os.path.isdir(entry):
            directories.append(entry)
            continue
        cert, colon, key = entry.rpartition(":")
        if not colon or not cert or not key:
            raise ValueError(f"{entry!r} is neither CERT:KEY nor a directory")
        pairs.append(CertificatePair(cert, key))
    return tuple(pairs), tuple(directories)


__all__ = ["Certificate", "CertificatePair", "CertificateSources", "CertificateStore",
           "CertificateWatcher", "ContextSet", "ServerTLS", "load_certificate",
           "parse_sni_entries"]
