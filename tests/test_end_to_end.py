"""End to end, as a user runs it: ``twistd esmtpfa`` in its own process, real clients.

swaks (Debian) and smtplib send; the message must land in the Maildir or at a real SMTP
upstream on loopback; a wrong password gets 535, a dead upstream 451 (nothing lost:
the client keeps the message and retries).
"""

from __future__ import annotations

import glob
import os
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.runtime.service import DEMO_PASSWORD, DEMO_USER
from tests.support.ports import free_port
from tests.support.processes import Twistd, run_tool
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.upstream import RecordingUpstream

SECRET = "Zebra-Unicorn-42:secret"


def swaks_args(port: int, *extra: str, user: str = DEMO_USER,
               password: str = DEMO_PASSWORD) -> list[str]:
    return ["--server", "127.0.0.1", "--port", str(port), "--auth", "PLAIN",
            "--auth-user", user, "--auth-password", password,
            "--from", "sender@example.com", "--to", "rcpt@example.net",
            "--header", "Subject: esmtpfa end-to-end", "--body", "Hello through esmtpfa",
            "--timeout", "15", *extra]


class DemoModeTests(unittest.TestCase):
    """The README's first command, with swaks as the README shows it."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.maildir = os.path.abspath(self.mktemp())
        self.port = free_port()
        self.log = os.path.abspath(self.mktemp())
        self.relay = Twistd(["--demo", "--port", str(self.port), "--maildir", self.maildir],
                            env={"LOG_LEVEL": "debug"})
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.port)

    @defer.inlineCallbacks
    def test_swaks_plain_lands_in_maildir(self):
        output, code = yield run_tool("swaks", *swaks_args(self.port))
        self.assertEqual(code, 0, output)
        self.assertIn("250 2.0.0 Message accepted as urn:uuid:", output)
        files = glob.glob(os.path.join(self.maildir, "new", "*"))
        self.assertEqual(len(files), 1, output)
        with open(files[0], "rb") as f:
            content = f.read()
        self.assertIn(b"Subject: esmtpfa end-to-end", content)
        self.assertIn(b"Hello through esmtpfa", content)
        self.assertTrue(content.startswith(b"Received: from "))

    @defer.inlineCallbacks
    def test_wrong_password_is_535_and_nothing_is_delivered(self):
        output, code = yield run_tool("swaks", *swaks_args(self.port, password="nope"))
        self.assertNotEqual(code, 0)
        self.assertIn("535 5.7.8", output)
        self.assertEqual(glob.glob(os.path.join(self.maildir, "new", "*")), [])

    @defer.inlineCallbacks
    def test_no_credential_reaches_the_log(self):
        """docs/design.md, "Identifiers and logs": neither the password nor the AUTH payload, at
        debug level either."""
        import base64
        payload = base64.b64encode(f"\0{DEMO_USER}\0{SECRET}".encode()).decode()
        yield run_tool("swaks", *swaks_args(self.port, password=SECRET))
        yield run_tool("swaks", *swaks_args(self.port, user="demo-userpass",
                                            password=f"{DEMO_USER}:{SECRET}"))
        yield run_tool("swaks", *swaks_args(self.port))  # a successful one too
        yield self.relay.stop()
        log = self.relay.output
        self.assertIn("login failed: client=127.0.0.1 reason=bad-password protocol=smtp "
                      "mechanism=PLAIN identity=demo-userpass/", log)
        self.assertIn("AUTH PLAIN ok as demo-userpass/demo", log)
        for secret in (SECRET, payload, DEMO_PASSWORD, "Zebra-Unicorn"):
            self.assertNotIn(secret, log)


class UpstreamTests(unittest.TestCase):
    """``RELAY_ADDR``/``RELAY_PORT`` in the environment point at a real upstream."""

    timeout = 60

    @defer.inlineCallbacks
    def start_relay(self, relay_port: int):
        self.port = free_port()
        self.relay = Twistd(["--demo", "--port", str(self.port)],
                            env={"RELAY_ADDR": "127.0.0.1", "RELAY_PORT": str(relay_port)})
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.port)

    @defer.inlineCallbacks
    def test_message_arrives_at_the_upstream(self):
        upstream = RecordingUpstream().start()
        self.addCleanup(upstream.stop)
        yield self.start_relay(upstream.port)
        output, code = yield run_tool("swaks", *swaks_args(self.port))
        self.assertEqual(code, 0, output)
        self.assertEqual(len(upstream.messages), 1)
        message = upstream.messages[0]
        self.assertEqual((message.mail_from, message.rcpts),
                         ("sender@example.com", ["rcpt@example.net"]))
        self.assertIn(b"Hello through esmtpfa", message.data)

    @defer.inlineCallbacks
    def test_unreachable_upstream_is_451(self):
        yield self.start_relay(free_port())  # nothing listens there
        output, code = yield run_tool("swaks", *swaks_args(self.port))
        self.assertNotEqual(code, 0)
        self.assertIn("451 4.4.1", output)

    @defer.inlineCallbacks
    def test_upstream_rejection_passes_through(self):
        upstream = RecordingUpstream(
            rcpt_replies={"rcpt@example.net": "550 5.1.1 No such user here"}).start()
        self.addCleanup(upstream.stop)
        yield self.start_relay(upstream.port)
        output, code = yield run_tool("swaks", *swaks_args(self.port))
        self.assertNotEqual(code, 0)
        self.assertIn("550 5.1.1", output)
        self.assertEqual(upstream.messages, [])


class StartupErrorTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def assert_startup_error(self, args, env, *expected):
        relay = Twistd(args, env=env)
        relay.start()
        self.addCleanup(relay.stop)
        code = yield relay.exited()
        self.assertNotEqual(code, 0)
        for text in expected:
            self.assertIn(text, relay.output)
        self.assertNotIn("Traceback", relay.output)

    def test_unparsable_environment_value(self):
        return self.assert_startup_error(["--demo"], {"SMTP_PORT": "twenty-five"},
                                         "SMTP_PORT", "twenty-five")

    def test_bad_boolean_environment_value(self):
        return self.assert_startup_error(["--demo"], {"SMTP_PLAIN_ENABLE": "maybe"},
                                         "SMTP_PLAIN_ENABLE")

    def test_bad_provider_config_names_provider_and_problem(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("providers:\n- meta: {name: shop, type: userpass}\n"
                    "  params: {username: u, password: '${UNSET_SHOP_PASSWORD}'}\n")
        return self.assert_startup_error(["--plain", "--config", path], {},
                                         "shop", "UNSET_SHOP_PASSWORD")

    def test_missing_explicit_config_file(self):
        return self.assert_startup_error(["--config", "/nonexistent/providers.yaml"], {},
                                         "/nonexistent/providers.yaml")


class SmtplibTests(unittest.TestCase):
    """smtplib with PLAIN and LOGIN over STARTTLS (587-style) and implicit TLS (465)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp())
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def send(self, mechanism: str, implicit: bool):
        fixture = self.fixture
        message = (b"From: alice@example.com\r\nTo: bob@example.net\r\n"
                   b"Subject: via smtplib\r\n\r\nline one\r\n.starts with a dot\r\n")

        def script():
            context = fixture.client_context()
            if implicit:
                client = smtplib.SMTP_SSL("127.0.0.1", fixture.tls_port, context=context,
                                          timeout=10)
                client._host = "relay.test"
            else:
                client = smtplib.SMTP("127.0.0.1", fixture.plain_port, timeout=10)
                client._host = "relay.test"
                client.starttls(context=context)
            client.ehlo("client.example")
            client.user, client.password = USER, PASSWORD
            client.auth(mechanism, getattr(client, "auth_" + mechanism.lower()))
            refused = client.sendmail("alice@example.com", ["bob@example.net"], message)
            client.quit()
            return refused
        return threads.deferToThread(script).addCallback(self.check, message)

    def check(self, refused, message):
        self.assertEqual(refused, {})
        data = self.fixture.upstream.messages[-1].data
        self.assertEqual(data.split(b"\r\n", 3)[3], message)

    def test_plain_over_starttls(self):
        return self.send("PLAIN", implicit=False)

    def test_login_over_starttls(self):
        return self.send("LOGIN", implicit=False)

    def test_plain_over_implicit_tls(self):
        return self.send("PLAIN", implicit=True)

    def test_login_over_implicit_tls(self):
        return self.send("LOGIN", implicit=True)
