"""The legacy listeners for old printers and scanners (docs/devices.md), with real
clients against a real ``twistd esmtpfa``:

* ``openssl s_client -tls1`` and ``-tls1_1`` complete a handshake (implicit TLS and
  STARTTLS) on the legacy listeners, and the normal listeners still refuse TLS 1.0;
* a client from outside ``--legacy-networks`` (its socket bound to 127.0.0.2) hears
  ``554 5.7.1``, is closed, and is counted with reason ``network``;
* a printer emulated on a raw socket logs in after HELO with AUTH LOGIN in cleartext
  from ``--legacy-cleartext-auth-networks`` (235), while from another address of the
  legacy networks, and on the normal listener, AUTH is refused as always (538 5.7.11);
* swaks with ``--protocol SMTP`` (HELO) logs in and sends over the legacy listeners;
* every misconfiguration is one line at startup naming the setting.

The relay serves 127.0.0.1 and 127.0.0.3 on its legacy listeners, cleartext AUTH to
127.0.0.1 only; 127.0.0.2 is outside.  OpenSSL 3's own client refuses TLS 1.0 at its
default security level, so the tests' clients run at level 0, as an old device's
stack in effect does.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

from twisted.internet import defer, threads
from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.runtime.tap import Options
from tests.support.builders import b64, providers_document, userpass_provider, write_providers
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.processes import Twistd, require
from tests.support.rawsmtp import RawSMTP
from tests.support.webclient import get_blocking

USER, PASSWORD = "scanner", "floor2 scan"
PROVIDERS = providers_document(userpass_provider("devices", USER, PASSWORD, fallback=True))
ALLOWED, OUTSIDE, NO_CLEARTEXT = "127.0.0.1", "127.0.0.2", "127.0.0.3"
#: What an old device's TLS stack amounts to, for OpenSSL 3's client.
OLD_CLIENT = "DEFAULT:@SECLEVEL=0"


def s_client(port: int, version: str, *extra: str) -> str:
    """``openssl s_client`` at ``version`` (``-tls1``...): connect, say QUIT, and
    return everything it printed."""
    result = subprocess.run(
        [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", version,
         "-cipher", OLD_CLIENT, "-crlf", "-ign_eof", *extra],
        input=b"QUIT\n", capture_output=True, timeout=20)
    return (result.stdout + result.stderr).decode("utf-8", "replace")


class LegacyRelayCase(unittest.TestCase):
    timeout = 60
    #: More arguments for the relay (``--workers 2``).
    extra: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        ca = CertificateAuthority(os.path.join(self.directory, "ca"))
        leaf = ca.issue("relay.test", "127.0.0.1")
        config = write_providers(self.directory, PROVIDERS)
        self.maildir = os.path.join(self.directory, "maildir")
        self.plain, self.tls = free_port(), free_port()
        self.legacy_plain, self.legacy_tls = free_port(), free_port()
        self.relay = Twistd([
            "--plain", "--tls", "--addr", "127.0.0.1", "--port", str(self.plain),
            "--tls-port", str(self.tls), "--tls-cert", leaf.cert_path,
            "--tls-key", leaf.key_path, "--config", config, "--hostname", "relay.test",
            "--maildir", self.maildir,
            "--legacy-plain", f"127.0.0.1:{self.legacy_plain}",
            "--legacy-tls", f"127.0.0.1:{self.legacy_tls}",
            "--legacy-networks", f"{ALLOWED}/32,{NO_CLEARTEXT}/32",
            "--legacy-cleartext-auth-networks", f"{ALLOWED}/32", *self.extra])
        self.relay.start()
        self.addCleanup(self.relay.stop)
        for port in (self.plain, self.tls, self.legacy_plain, self.legacy_tls):
            yield self.relay.wait_for_port(port)

    def delivered(self) -> list[str]:
        return glob.glob(os.path.join(self.maildir, "new", "*"))


class TLSVersionTests(LegacyRelayCase):

    @defer.inlineCallbacks
    def test_tls1_and_tls1_1_on_the_legacy_listeners_only(self):
        for version, name in (("-tls1", "TLSv1"), ("-tls1_1", "TLSv1.1")):
            for port, extra in ((self.legacy_tls, ()),
                                (self.legacy_plain, ("-starttls", "smtp"))):
                output = yield threads.deferToThread(s_client, port, version, *extra)
                self.assertIn(f"Protocol  : {name}\n", output, output)
                self.assertNotIn("Cipher is (NONE)", output, output)
                self.assertIn("221 2.0.0", output, output)  # the session went on
            for port, extra in ((self.tls, ()), (self.plain, ("-starttls", "smtp"))):
                output = yield threads.deferToThread(s_client, port, version, *extra)
                self.assertIn("Cipher is (NONE)", output, output)
                self.assertIn("alert protocol version", output, output)
                self.assertNotIn("221 2.0.0", output, output)
        # A client that can do better gets TLS 1.2 or above on the legacy listener too.
        output = yield threads.deferToThread(s_client, self.legacy_tls, "-tls1_2")
        self.assertIn("Protocol  : TLSv1.2\n", output, output)


class NetworkTests(LegacyRelayCase):

    @defer.inlineCallbacks
    def test_a_client_from_elsewhere_hears_554_is_closed_and_counted(self):
        def outsider() -> tuple[tuple[int, str], bool]:
            client = RawSMTP("127.0.0.1", self.legacy_plain, source=OUTSIDE)
            try:
                return client.greeting, client.is_closed()
            finally:
                client.close()
        (code, text), closed = yield threads.deferToThread(outsider)
        self.assertEqual((code, text.split(" ")[0]), (554, "5.7.1"))
        self.assertTrue(closed)

        def insider() -> int:
            client = RawSMTP("127.0.0.1", self.legacy_plain, source=ALLOWED)
            try:
                return client.greeting[0]
            finally:
                client.close()
        self.assertEqual((yield threads.deferToThread(insider)), 220)
        status, scrape = yield threads.deferToThread(
            get_blocking, self.relay.metrics_port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn('esmtpfa_connections_refused_total{listener="legacy-plain",'
                      'reason="network"} 1.0', scrape)
        self.assertIn('esmtpfa_connections_refused_total{listener="plain",'
                      'reason="network"} 0.0', scrape)
        yield self.relay.wait_for_lines(
            re.escape(f"[{OUTSIDE}] is not in this listener's networks"))

    @defer.inlineCallbacks
    def test_the_start_warns_naming_each_listener_and_its_networks(self):
        for name, port in (("legacy-plain", self.legacy_plain),
                           ("legacy-tls", self.legacy_tls)):
            [line] = yield self.relay.wait_for_lines(rf"#warn.*\b{name} listener")
            self.assertIn(f"[127.0.0.1]:{port}", line)
            self.assertIn("TLS 1.0 and 1.1 allowed", line)
            self.assertIn(f"{ALLOWED}/32,{NO_CLEARTEXT}/32", line)
            self.assertIn(f"cleartext AUTH from {ALLOWED}/32", line)


class WorkersTests(LegacyRelayCase):
    """With ``--workers 2`` the workers accept on the legacy listeners the supervisor
    bound, and keep their rules: TLS 1.0 for an old device, 554 for an outsider."""

    extra = ("--workers", "2")

    @defer.inlineCallbacks
    def test_tls1_handshake_and_the_network_rule_in_the_workers(self):
        output = yield threads.deferToThread(s_client, self.legacy_tls, "-tls1")
        self.assertIn("Protocol  : TLSv1\n", output, output)
        self.assertNotIn("Cipher is (NONE)", output, output)
        self.assertIn("221 2.0.0", output, output)

        def greeting(source: str) -> tuple[tuple[int, str], bool]:
            client = RawSMTP("127.0.0.1", self.legacy_plain, source=source)
            try:
                return client.greeting, source == OUTSIDE and client.is_closed()
            finally:
                client.close()
        (code, text), closed = yield threads.deferToThread(greeting, OUTSIDE)
        self.assertEqual((code, text.split(" ")[0]), (554, "5.7.1"))
        self.assertTrue(closed)
        (code, _), _ = yield threads.deferToThread(greeting, ALLOWED)
        self.assertEqual(code, 220)


class PrinterTests(LegacyRelayCase):
    """A scan-to-mail printer as it speaks: HELO, AUTH LOGIN, no TLS."""

    def printer(self, port: int, source: str) -> list[tuple[int, str]]:
        client = RawSMTP("127.0.0.1", port, source=source)
        replies = []
        try:
            replies.append(client.command("HELO mfp-2f.example"))
            replies.append(client.command("AUTH LOGIN"))
            if replies[-1][0] == 334:
                replies.append(client.command(b64(USER)))
                replies.append(client.command(b64(PASSWORD)))
            if replies[-1][0] == 235:
                replies.append(client.send_message(
                    b"Subject: scan\r\n\r\nscanned page\r\n", "scanner@example.com",
                    ["someone@example.net"]))
            client.command("QUIT")
        finally:
            client.close()
        return replies

    def ehlo_offers_auth(self, port: int, source: str) -> bool:
        client = RawSMTP("127.0.0.1", port, source=source)
        try:
            return any(line.startswith("AUTH ")
                       for line in client.command("EHLO mfp.example")[1].splitlines())
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_cleartext_auth_login_after_helo_from_the_trusted_network(self):
        replies = yield threads.deferToThread(self.printer, self.legacy_plain, ALLOWED)
        self.assertEqual([code for code, _ in replies], [250, 334, 334, 235, 250])
        self.assertEqual(len(self.delivered()), 1)
        self.assertTrue((yield threads.deferToThread(
            self.ehlo_offers_auth, self.legacy_plain, ALLOWED)))

    @defer.inlineCallbacks
    def test_cleartext_auth_is_refused_as_today_everywhere_else(self):
        for port, source in ((self.legacy_plain, NO_CLEARTEXT), (self.plain, ALLOWED)):
            replies = yield threads.deferToThread(self.printer, port, source)
            self.assertEqual(replies[-1][0], 538, (port, source))
            self.assertTrue(replies[-1][1].startswith("5.7.11 "), replies)
            self.assertFalse((yield threads.deferToThread(
                self.ehlo_offers_auth, port, source)))
        self.assertEqual(self.delivered(), [])


class SwaksTests(LegacyRelayCase):

    """swaks authenticates only when the EHLO reply announces AUTH (it never tries AUTH
    after HELO: the raw printer above does that), so ``--protocol SMTP`` shows the
    HELO session over TLS 1.0 and ``--protocol ESMTP`` the logins."""

    def swaks(self, *extra: str) -> tuple[int, str]:
        result = subprocess.run(
            [require("swaks"), "--server", "127.0.0.1",
             "--from", "scanner@example.com", "--to", "someone@example.net",
             "--header", "Subject: scan", "--body", "scanned page", "--timeout", "15",
             *extra], capture_output=True, timeout=30)
        return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")

    def tls1(self) -> list[str]:
        return ["--port", str(self.legacy_tls), "--tls-on-connect",
                "--tls-protocol", "tlsv1", "--tls-cipher", OLD_CLIENT]

    def login(self) -> list[str]:
        return ["--protocol", "ESMTP", "--auth", "LOGIN", "--auth-user", USER,
                "--auth-password", PASSWORD]

    @defer.inlineCallbacks
    def test_helo_over_tls1_and_auth_login_in_cleartext_and_over_tls1(self):
        code, output = yield threads.deferToThread(
            self.swaks, "--protocol", "SMTP", *self.tls1())
        self.assertIn("TLS started with cipher TLSv1:", output)
        self.assertIn(" ~> HELO ", output)
        self.assertIn("<~  250 relay.test", output)
        self.assertIn("<~* 530 5.7.0", output)  # no login: the relay's usual answer
        code, output = yield threads.deferToThread(
            self.swaks, "--port", str(self.legacy_plain), *self.login())
        self.assertEqual(code, 0, output)
        self.assertIn("<-  235 2.7.0", output)
        code, output = yield threads.deferToThread(self.swaks, *self.tls1(), *self.login())
        self.assertEqual(code, 0, output)
        self.assertIn("TLS started with cipher TLSv1:", output)
        self.assertIn("<~  235 2.7.0", output)
        self.assertEqual(len(self.delivered()), 2)


class SettingTests(unittest.TestCase):
    """Each mistake: one line naming the setting (docs/devices.md, "Settings")."""

    def problem(self, *args: str, env: dict | None = None) -> str:
        options = Options(environ=env or {})
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--maildir", self.mktemp(), *args])
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_each_misconfiguration_is_one_line_naming_the_setting(self):
        listener = ["--legacy-plain", "127.0.0.1:2525"]
        for args, env, name in (
                (listener, None, "--legacy-networks"),
                ([*listener, "--legacy-networks", "10.0.0.0/33"], None,
                 "--legacy-networks"),
                (listener, {"SMTP_LEGACY_NETWORKS": "printers"}, "SMTP_LEGACY_NETWORKS"),
                ([*listener, "--legacy-networks", "0.0.0.0/0"], None,
                 "--legacy-networks"),
                (["--legacy-plain", "printers:25"], None, "--legacy-plain"),
                (["--legacy-cleartext-auth-networks", "10.0.0.0/8"], None,
                 "--legacy-cleartext-auth-networks"),
                ([*listener, "--legacy-networks", "0.0.0.0/0",
                  "--legacy-cleartext-auth-networks", "0.0.0.0/0"], None,
                 "--legacy-networks"),
                ([*listener, "--legacy-networks", "10.0.0.0/8,8.8.8.0/24",
                  "--legacy-cleartext-auth-networks", "8.8.8.0/24"], None,
                 "--legacy-cleartext-auth-networks"),
                ([*listener, "--legacy-networks", "10.1.0.0/16",
                  "--legacy-cleartext-auth-networks", "10.2.0.0/16"], None,
                 "--legacy-cleartext-auth-networks"),
                (["--legacy-tls", "127.0.0.1:4465", "--legacy-networks", "10.0.0.0/8"],
                 None, "--tls-cert"),
                ([*listener, "--legacy-networks", "10.0.0.0/8",
                  "--legacy-tls-ciphers", "AES128-SHA:@SECLEVEL=2"], None,
                 "--legacy-tls-ciphers")):
            with self.subTest(args=args, env=env):
                self.assertIn(name, self.problem(*args, env=env), args)

    def test_no_default_configuration_has_a_legacy_listener(self):
        options = Options(environ={})
        options.parseOptions(["--maildir", self.mktemp(), "--plain"])
        for flag in ("legacy-plain", "legacy-tls", "legacy-networks",
                     "legacy-cleartext-auth-networks"):
            self.assertIn(options[flag], (None, ()))


class StartupLineTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_legacy_listener_without_networks_stops_twistd_with_one_line(self):
        relay = Twistd(["--legacy-plain", f"127.0.0.1:{free_port()}",
                        "--maildir", os.path.abspath(self.mktemp())])
        relay.start()
        self.addCleanup(relay.stop)
        code = yield relay.exited()
        self.assertEqual(code, 1, relay.output)
        [line] = [line for line in relay.output.splitlines() if line.strip()]
        self.assertTrue(line.startswith("esmtpfa: --legacy-plain and --legacy-tls need "
                                        "--legacy-networks"), line)
