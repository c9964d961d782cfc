"""Certificates as an operator handles them (docs/operations.md, "Certificates").

A real ``twistd esmtpfa`` and a real ``openssl s_client``: the files are replaced as
certbot, cert-manager and a Kubernetes Secret replace them, and the certificate the relay
serves is read from the handshake.  The watcher's own rules (a half-written renewal is
not reported, a broken one is, once) are checked against real files with a ``Clock``.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import ssl
import subprocess
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from esmtpfa.common.certificates import (
    CertificatePair,
    CertificateSources,
    CertificateStore,
    CertificateWatcher,
)
from esmtpfa.common.servertls import TLSPolicy
from tests.support.builders import OFFICE, providers_document, write_providers
from tests.support.certs import CertificateAuthority, Leaf
from tests.support.logcapture import observe_logs
from tests.support.ports import free_port
from tests.support.processes import Twistd, require
from tests.support.rawsmtp import RawSMTP
from tests.support.webclient import metrics

PROVIDERS = providers_document(OFFICE)

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: kept\r\n\r\nstill here\r\n"


def issue_rsa(ca: CertificateAuthority, name: str, *alt_names: str, filename: str,
              days: int = 7) -> Leaf:
    """An RSA leaf for ``name`` and ``alt_names`` (the fixture's are ECDSA), valid
    ``days``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in (name, *alt_names)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    base = os.path.join(ca.directory, filename)
    leaf = Leaf(base + ".crt", base + ".key", cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    write(leaf.cert_path, leaf.cert_pem)
    write(leaf.key_path, leaf.key_pem)
    return leaf


def write(path: str, data: bytes) -> None:
    """Replace ``path`` atomically, as certbot and careful operators do."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def leaf_of(output: str) -> str | None:
    """The first certificate ``s_client -showcerts`` printed: the leaf served."""
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output,
                      re.DOTALL)
    return match.group(0).strip() if match else None


def s_client(port: int, *args: str) -> tuple[str | None, str, int]:
    """``openssl s_client`` against 127.0.0.1:port (blocking: run it in a thread):
    (leaf served or None, output, exit code)."""
    result = subprocess.run(
        [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts",
         *args], input=b"", capture_output=True, timeout=15, check=False)
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    return leaf_of(output), output, result.returncode


def expiry(scrape, name: str, file: str, key: str) -> float | None:
    """The SMTP listeners' expiry gauge for one certificate (None: no such series)."""
    labels = {"listener": "smtp", "name": name, "file": file, "key": key}
    for sample in scrape.samples:
        if (sample.name == "esmtpfa_tls_certificate_expiry_seconds"
                and sample.labels == labels):
            return sample.value
    return None


def pem(leaf: Leaf) -> str:
    return leaf.cert_pem.decode().strip()


class Relay(Twistd):
    """``twistd esmtpfa`` with both SMTP listeners on loopback and a provider file."""

    def __init__(self, directory: str, cert: str, key: str, *args: str):
        self.port, self.tls_port = free_port(), free_port()
        config = write_providers(directory, PROVIDERS)
        super().__init__([
            "--plain", "--tls", "--addr", "127.0.0.1", "--port", str(self.port),
            "--tls-port", str(self.tls_port), "--tls-cert", cert, "--tls-key", key,
            "--config", config, "--hostname", "relay.test",
            "--maildir", os.path.join(directory, "maildir"), *args])

    def hangup(self) -> None:
        self._process.signalProcess(signal.SIGHUP)

    def lines(self, text: str) -> list[str]:
        return [line for line in self.output.splitlines() if text in line]


class ProcessTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        self.old = self.ca.issue("relay.test", "localhost", filename="old")
        self.new = self.ca.issue("relay.test", "localhost", filename="new")
        self.live = os.path.join(self.directory, "live")
        os.makedirs(self.live)
        self.cert = os.path.join(self.live, "cert.pem")
        self.key = os.path.join(self.live, "key.pem")
        self.install(self.old)

    def install(self, leaf: Leaf) -> None:
        write(self.cert, leaf.cert_pem)
        write(self.key, leaf.key_pem)

    @defer.inlineCallbacks
    def start(self, *args: str, cert: str | None = None, key: str | None = None):
        relay = Relay(self.directory, cert or self.cert, key or self.key, *args)
        relay.start()
        self.addCleanup(relay.stop)
        yield relay.wait_for_port(relay.tls_port)
        yield relay.wait_for_port(relay.port)
        return relay

    def served(self, port: int, *args: str) -> defer.Deferred:
        return threads.deferToThread(s_client, port, "-servername", "relay.test", *args)

    @defer.inlineCallbacks
    def until_served(self, port: int, leaf: Leaf, within: float) -> defer.Deferred:
        """Seconds until ``leaf`` is served on ``port``; fails after ``within``."""
        start = time.monotonic()
        while True:
            served, output, _ = yield self.served(port)
            if served == pem(leaf):
                return time.monotonic() - start
            if time.monotonic() - start > within:
                self.fail(f"{leaf.cert_path} not served within {within:g} s:\n{output}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca.cert_path)

    @defer.inlineCallbacks
    def test_sighup_serves_the_new_certificate_and_open_sessions_go_on(self):
        """certbot's deploy hook: files replaced, SIGHUP.  Port 465 and STARTTLS serve the
        new certificate at once; a session that did STARTTLS before goes on and sends."""
        relay = yield self.start()
        self.assertEqual((yield self.served(relay.tls_port))[0], pem(self.old))

        def open_session() -> RawSMTP:
            client = RawSMTP("127.0.0.1", relay.port)
            client.command("EHLO client.example")
            assert client.starttls(self.client_context(), "relay.test")[0] == 220
            client.command("EHLO client.example")
            assert client.auth_plain("alice", "correct horse")[0] == 235
            return client
        session = yield threads.deferToThread(open_session)
        self.addCleanup(session.close)

        self.install(self.new)
        relay.hangup()
        yield self.until_served(relay.tls_port, self.new, within=5)
        starttls = yield self.served(relay.port, "-starttls", "smtp")
        self.assertEqual(starttls[0], pem(self.new), starttls[1])

        code, text = yield threads.deferToThread(
            session.send_message, MESSAGE, "a@example.com", ["b@example.net"])
        self.assertEqual(code, 250, text)
        reloaded = yield relay.wait_for_lines(re.escape("certificate reloaded from"))
        self.assertEqual(len(reloaded), 1, relay.output)
        self.assertIn(self.cert, reloaded[0])
        self.assertRegex(reloaded[0], r"names relay\.test, localhost, ecdsa key, "
                                      r"notAfter \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
        self.assertNotIn("PRIVATE KEY", relay.output)

    @defer.inlineCallbacks
    def test_kubernetes_secret_update_is_seen_without_sighup(self):
        """A mounted Secret: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>.  The
        kubelet writes a new directory and swaps ``..data`` atomically; the relay notices
        within the poll interval, no signal sent."""
        mount = os.path.join(self.directory, "secret")
        os.makedirs(mount)

        def publish(leaf: Leaf, version: str) -> None:
            os.makedirs(os.path.join(mount, version))
            write(os.path.join(mount, version, "tls.crt"), leaf.cert_pem)
            write(os.path.join(mount, version, "tls.key"), leaf.key_pem)
            os.symlink(version, os.path.join(mount, "..data_tmp"))
            os.replace(os.path.join(mount, "..data_tmp"), os.path.join(mount, "..data"))

        publish(self.old, "..2026_01_01")
        for name in ("tls.crt", "tls.key"):
            os.symlink(os.path.join("..data", name), os.path.join(mount, name))
        interval = 0.5
        relay = yield self.start("--tls-poll-interval", str(interval),
                                 cert=os.path.join(mount, "tls.crt"),
                                 key=os.path.join(mount, "tls.key"))
        self.assertEqual((yield self.served(relay.tls_port))[0], pem(self.old))
        publish(self.new, "..2026_02_01")
        took = yield self.until_served(relay.tls_port, self.new, within=interval + 1.5)
        self.assertLess(took, interval + 1.5)
        reloaded = yield relay.wait_for_lines(re.escape("certificate reloaded from"))
        self.assertEqual(len(reloaded), 1, relay.output)

    @defer.inlineCallbacks
    def test_a_broken_renewal_keeps_the_certificate_in_use(self):
        """Garbage in the certificate file, then a key that does not match: each SIGHUP
        keeps the old certificate and says in one warning line which file is wrong."""
        relay = yield self.start()
        write(self.cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                         b"-----END CERTIFICATE-----\n")
        relay.hangup()
        yield relay.wait_for_lines(re.escape("NOT reloaded"))
        self.assertEqual((yield self.served(relay.tls_port))[0], pem(self.old))
        warnings = relay.lines("NOT reloaded")
        self.assertEqual(len(warnings), 1, relay.output)
        self.assertIn(f"certificate file {self.cert}", warnings[0])

        write(self.cert, self.new.cert_pem)  # the new certificate, the old key
        relay.hangup()
        yield relay.wait_for_lines(re.escape("NOT reloaded"), count=2)
        self.assertEqual((yield self.served(relay.tls_port))[0], pem(self.old))
        warnings = relay.lines("NOT reloaded")
        self.assertEqual(len(warnings), 2, relay.output)
        self.assertIn(f"key file {self.key}: does not match the certificate", warnings[1])
        self.assertEqual(relay.lines("certificate reloaded from"), [])
        self.assertNotIn("Traceback", relay.output)

    @defer.inlineCallbacks
    def test_sni_chooses_the_certificate(self):
        """Exact names, then a wildcard of one label, else the default; for the same
        names an RSA and an ECDSA certificate, chosen by what the client can verify."""
        other = self.ca.issue("other.test", filename="other")
        directory = os.path.join(self.directory, "sni")
        os.makedirs(directory)
        wildcard = self.ca.issue("*.wild.test", filename=os.path.join("..", "sni", "wild"))
        rsa_leaf = issue_rsa(self.ca, "relay.test", "localhost",  # the default's names
                             filename=os.path.join("..", "sni", "rsa"))
        relay = yield self.start(
            "--tls-sni-certs", f"{other.cert_path}:{other.key_path},{directory}")
        port = relay.tls_port

        def ask(*args: str):
            return threads.deferToThread(s_client, port, *args)
        self.assertEqual((yield ask("-servername", "other.test"))[0], pem(other))
        self.assertEqual((yield ask("-servername", "OTHER.test"))[0], pem(other))
        self.assertEqual((yield ask("-servername", "mx.wild.test"))[0], pem(wildcard))
        self.assertEqual((yield ask("-servername", "a.b.wild.test"))[0], pem(self.old))
        self.assertEqual((yield ask("-servername", "unknown.test"))[0], pem(self.old))
        self.assertEqual((yield ask("-noservername"))[0], pem(self.old))
        for sigalgs, leaf in (("ECDSA+SHA256", self.old),
                              ("RSA-PSS+SHA256:RSA+SHA256", rsa_leaf)):
            served = yield ask("-servername", "relay.test", "-tls1_2", "-sigalgs", sigalgs)
            self.assertEqual(served[0], pem(leaf), served[1])
        starttls = yield threads.deferToThread(
            s_client, relay.port, "-starttls", "smtp", "-servername", "other.test")
        self.assertEqual(starttls[0], pem(other), starttls[1])

    def assertNear(self, seconds: float | None, expected: float) -> None:
        self.assertIsNotNone(seconds)
        self.assertLess(abs(seconds - expected), 300, (seconds, expected))

    @defer.inlineCallbacks
    def test_expiry_gauge(self):
        """notAfter minus now, per certificate, labelled with public names only; a reload
        updates it."""
        other = issue_rsa(self.ca, "other.test", filename="other", days=30)
        relay = yield self.start("--tls-sni-certs", f"{other.cert_path}:{other.key_path}")
        name = "esmtpfa_tls_certificate_expiry_seconds"
        scrape = yield metrics(relay.metrics_port)
        self.assertNear(expiry(scrape, "relay.test", "cert.pem", "ecdsa"), 7 * 86400)
        self.assertNear(expiry(scrape, "other.test", "other.crt", "rsa"), 30 * 86400)
        self.assertEqual(len(scrape.labelsets(name)), 2)
        renewed = issue_rsa(self.ca, "relay.test", "localhost", filename="renewed", days=60)
        self.install(renewed)
        relay.hangup()
        yield relay.wait_for_lines(re.escape("certificate reloaded from"))
        scrape = yield metrics(relay.metrics_port)
        self.assertNear(expiry(scrape, "relay.test", "cert.pem", "rsa"), 60 * 86400)
        self.assertEqual(len(scrape.labelsets(name)), 2, scrape.text)

    @defer.inlineCallbacks
    def test_minimum_version_13_refuses_tls12(self):
        relay = yield self.start("--tls-min-version", "1.3")
        served, output, code = yield self.served(relay.tls_port, "-tls1_2")
        self.assertIsNone(served, output)
        self.assertNotEqual(code, 0)
        served, output, code = yield self.served(relay.tls_port, "-tls1_3")
        self.assertEqual(served, pem(self.old), output)

    @defer.inlineCallbacks
    def test_ciphers_choose_the_tls12_suites(self):
        relay = yield self.start("--tls-ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256")
        served, output, _ = yield self.served(
            relay.tls_port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384")
        self.assertIsNone(served, output)
        served, output, _ = yield self.served(
            relay.tls_port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(served, pem(self.old), output)

    @defer.inlineCallbacks
    def refused_at_start(self, args: list[str], env: dict[str, str], setting: str):
        relay = Relay(self.directory, self.cert, self.key, *args)
        relay.env.update(env)
        relay.start()
        self.addCleanup(relay.stop)
        self.assertNotEqual((yield relay.exited()), 0)
        last = relay.output.strip().splitlines()[-1]
        self.assertIn(setting, last)
        self.assertNotIn("Traceback", relay.output)
        return last

    @defer.inlineCallbacks
    def test_bad_settings_stop_startup_with_one_line(self):
        last = yield self.refused_at_start(["--tls-ciphers", "NO-SUCH-CIPHER"], {},
                                           "--tls-ciphers")
        self.assertIn("NO-SUCH-CIPHER", last)
        yield self.refused_at_start([], {"TLS_CIPHERS": "NO-SUCH-CIPHER"},
                                    "environment variable TLS_CIPHERS")
        last = yield self.refused_at_start(["--tls-min-version", "1.1"], {},
                                           "--tls-min-version")
        self.assertIn("1.2 or 1.3", last)

    @defer.inlineCallbacks
    def test_every_worker_reloads_on_sighup(self):
        """``--workers 2``: the supervisor takes SIGHUP and every worker reloads."""
        relay = yield self.start("--workers", "2", "--tls-poll-interval", "600")
        yield relay.wait_for_lines(re.escape("serving (pid"), count=2)
        self.assertEqual((yield self.served(relay.tls_port))[0], pem(self.old))
        self.install(self.new)
        relay.hangup()
        yield relay.wait_for_lines(re.escape("certificate reloaded from"), count=2)
        for _ in range(8):  # the kernel spreads them over both workers
            served, output, _ = yield self.served(relay.tls_port)
            self.assertEqual(served, pem(self.new), output)
        self.assertEqual({re.search(r"worker (\d+)", line).group(1)
                          for line in relay.lines("certificate reloaded from")}, {"1", "2"})


class WatcherTests(unittest.TestCase):
    """The watcher's rules, with real files and a ``Clock``."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        self.old = self.ca.issue("relay.test", filename="old")
        self.new = self.ca.issue("relay.test", filename="new")
        self.cert = os.path.join(self.directory, "cert.pem")
        self.key = os.path.join(self.directory, "key.pem")
        write(self.cert, self.old.cert_pem)
        write(self.key, self.old.key_pem)
        self.store = CertificateStore(CertificateSources(
            CertificatePair(self.cert, self.key)), TLSPolicy())
        self.clock = Clock()
        self.watcher = CertificateWatcher([self.store], interval=5, clock=self.clock)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)
        self.events = observe_logs(self)

    def serving(self) -> bytes:
        return self.store.certificates[0].chain[0].to_cryptography().public_bytes(
            serialization.Encoding.PEM)

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "esmtpfa.certificates"
                and getattr(e.get("log_level"), "name", "") == "warn"]

    def test_a_renewal_caught_half_written_is_not_reported(self):
        """certbot swaps the certificate, then the key: a poll in between sees a
        mismatch, says nothing, and the next poll loads the pair."""
        write(self.cert, self.new.cert_pem)
        self.clock.advance(5)
        self.assertEqual(self.serving(), self.old.cert_pem)
        write(self.key, self.new.key_pem)
        self.clock.advance(5)
        self.assertEqual(self.serving(), self.new.cert_pem)
        self.assertEqual(self.warnings(), [])

    def test_a_broken_file_is_reported_once(self):
        write(self.cert, b"garbage")
        for _ in range(5):
            self.clock.advance(5)
        self.assertEqual(self.serving(), self.old.cert_pem)
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"certificate file {self.cert}: no PEM certificate found", warnings[0])

    def test_a_symlink_swap_is_seen(self):
        """Same path, same mtime even (a copied directory), new target: seen."""
        for name, leaf in (("v1", self.old), ("v2", self.new)):
            os.makedirs(os.path.join(self.directory, name))
            write(os.path.join(self.directory, name, "c"), leaf.cert_pem)
            write(os.path.join(self.directory, name, "k"), leaf.key_pem)
            stamp = (1_700_000_000, 1_700_000_000)
            os.utime(os.path.join(self.directory, name, "c"), stamp)
            os.utime(os.path.join(self.directory, name, "k"), stamp)
        data = os.path.join(self.directory, "..data")
        os.symlink("v1", data)
        for link, target in ((self.cert, "c"), (self.key, "k")):
            os.unlink(link)
            os.symlink(os.path.join("..data", target), link)
        self.watcher.reload_now()
        self.assertEqual(self.serving(), self.old.cert_pem)
        os.symlink("v2", data + ".tmp")
        os.replace(data + ".tmp", data)
        self.clock.advance(5)
        self.assertEqual(self.serving(), self.new.cert_pem)
        self.assertEqual(self.warnings(), [])

    def test_an_unchanged_file_builds_no_new_context(self):
        """A new context means new ticket keys: clients would lose resumption."""
        before = self.store.tls.current
        self.watcher.reload_now()
        os.utime(self.cert)
        self.clock.advance(5)
        self.assertIs(self.store.tls.current, before)
