"""Devices that cannot send as themselves: the envelope sender set from the identity
(the policy's ``envelope_sender``), and login names that carry the relay's domain
(``meta.login_domains``), as ``docs/policy.md`` describes them.

A printer is emulated on a raw socket against a real ``twistd esmtpfa`` process in front
of a recording upstream (HELO, AUTH PLAIN as ``scanner@relay.example.com``, ``MAIL
FROM:<>`` or a made-up sender), and swaks sends a null sender (``--from '<>'``: swaks
prompts for an empty ``--from ''``).  The sender from a directory runs against slapd, the one from a
token against a real JWKS endpoint, the one from an HTTP provider's answer against a
twisted.web endpoint; ``--check-config`` shows a mistake on one line.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.internet import defer, threads
from twisted.trial import unittest

from esmtpfa.auth.policy import parse_policy
from esmtpfa.common.errors import ConfigError
from esmtpfa.config.providers import parse_provider_document
from tests.support.builders import submission, write_providers
from tests.support.httpservers import AuthEndpoint, LoopbackHTTPServer
from tests.support.logcapture import log_text
from tests.support.policyfixture import JWTFixture, SessionMixin
from tests.support.ports import free_port
from tests.support.processes import Twistd, run_tool
from tests.support.rawsmtp import RawSMTP
from tests.support.slapd import SharedSlapd, add_people, ldap_provider
from tests.support.upstream import RecordingUpstream

PRINTERS = """\
providers:
- meta: {name: printers, type: userpass, fallback: true, login_domains: relay.example.com}
  params: {username: scanner, password: scan-pw}
  policy:
    allowed_senders: ["printers@example.com"]
    envelope_sender:
      map: {scanner: printers@example.com}
"""

NO_SENDER = b"550 5.7.1 No sender address is set for this login"
SCAN = b"From: Scanner <scanner@localhost>\r\nSubject: scan\r\n\r\npage 1\r\n"


def transaction(client: RawSMTP, sender: str, content: bytes) -> list[bytes]:
    """MAIL, RCPT, DATA, content as a device sends them; every reply line, stopping at
    the first refusal."""
    replies = []
    for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<office@example.net>", "DATA"):
        code, text = client.command(command)
        replies.append(f"{code} {text}".encode())
        if code >= 400:
            return replies
    client.send(content + b".\r\n")
    code, text = client.reply()
    replies.append(f"{code} {text}".encode())
    return replies


class PrinterTwistdTests(unittest.TestCase):
    """A real ``twistd esmtpfa`` with the printers' provider, cleartext AUTH allowed (as
    on a device network), a recording upstream behind it."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write_providers(directory, PRINTERS)
        self.upstream = RecordingUpstream().start()
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.relay = Twistd(["--plain", "--port", str(self.port), "--addr", "127.0.0.1",
                             "--allow-insecure-auth", "--config", config,
                             "--hostname", "relay.example.com",
                             "--relay-addr", "127.0.0.1",
                             "--relay-port", str(self.upstream.port)])
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.port)

    def printer(self, user: str, *transactions):
        """HELO, AUTH PLAIN as ``user``, then each ``(sender, content)``; the AUTH
        reply and each transaction's replies."""
        def script():
            client = RawSMTP("127.0.0.1", self.port)
            try:
                assert client.command("HELO scanner.lan")[0] == 250
                code, text = client.auth_plain(user, "scan-pw")
                if code != 235:
                    return code, []
                return code, [transaction(client, sender, content)
                              for sender, content in transactions]
            finally:
                client.close()
        return threads.deferToThread(script)

    @defer.inlineCallbacks
    def test_a_printer_sends_as_the_mapped_address(self):
        code, [null, made_up] = yield self.printer(
            "scanner@relay.example.com", ("", SCAN), ("scanner@localhost", SCAN))
        self.assertEqual(code, 235)
        self.assertTrue(null[-1].startswith(b"250 2.0.0 Message accepted"), null)
        self.assertTrue(made_up[-1].startswith(b"250 2.0.0 Message accepted"), made_up)
        self.assertEqual([m.mail_from for m in self.upstream.messages],
                         ["printers@example.com", "printers@example.com"])
        lines = b"\n".join(line for s in self.upstream.sessions for line in s.lines())
        self.assertIn(b"MAIL FROM:<printers@example.com>", lines)
        self.assertNotIn(b"MAIL FROM:<scanner@localhost>", lines)
        self.assertNotIn(b"MAIL FROM:<>", lines)
        # only the envelope: the header From is the device's own
        self.assertIn(b"From: Scanner <scanner@localhost>", self.upstream.messages[0].data)
        yield self.relay.stop()
        log = self.relay.output
        self.assertIn("AUTH PLAIN ok as printers/scanner", log)
        self.assertIn("MAIL FROM <> set to <printers@example.com> for printers/scanner", log)
        self.assertIn("from <printers@example.com>", log)
        self.assertNotIn("scan-pw", log)

    @defer.inlineCallbacks
    def test_swaks_with_a_null_sender(self):
        """swaks as a device: a null sender, the login name with the relay's domain in
        another case and with a trailing dot.  (swaks will not send AUTH after HELO,
        ``--protocol SMTP``: "Host did not advertise authentication"; the raw-socket
        printer above covers HELO.)"""
        output, code = yield run_tool(
            "swaks", "--server", "127.0.0.1", "--port", str(self.port),
            "--helo", "scanner.lan", "--auth", "PLAIN",
            "--auth-user", "scanner@Relay.Example.COM.", "--auth-password", "scan-pw",
            "--from", "<>", "--to", "office@example.net", "--header", "Subject: scan",
            "--body", "page 1", "--timeout", "15")
        self.assertEqual(code, 0, output)
        self.assertIn("-> MAIL FROM:<>", output)
        self.assertEqual([(m.mail_from, m.rcpts) for m in self.upstream.messages],
                         [("printers@example.com", ["office@example.net"])])

    @defer.inlineCallbacks
    def test_only_the_relay_domain_is_stripped(self):
        code, _ = yield self.printer("scanner@RELAY.example.com")
        self.assertEqual(code, 235)
        code, _ = yield self.printer("scanner@other.example.com")
        self.assertEqual(code, 535)
        code, _ = yield self.printer("scanner@sub.relay.example.com")
        self.assertEqual(code, 535)
        self.assertEqual(self.upstream.messages, [])


DEVICE_ENTRIES = (("device7", ["device7@example.com", "second@example.com"]),
                  ("device8", []))


class LDAPSenderTests(SharedSlapd, SessionMixin, unittest.TestCase):
    """``envelope_sender: {attribute: mail}`` against slapd."""

    added = False

    def providers(self):
        return json.dumps({"providers": [
            ldap_provider(self.slapd, "corp-ldap", policy={
                "sender_attribute": "mail",
                "envelope_sender": {"attribute": "mail", "when": "not_allowed"}}),
            ldap_provider(self.slapd, "strict-ldap", policy={
                "allowed_senders": ["@example.org"],
                "envelope_sender": {"attribute": "mail"}})]})

    @defer.inlineCallbacks
    def setUp(self):
        yield defer.maybeDeferred(super().setUp)
        cls = type(self)
        if cls.added != self.slapd.port:
            yield threads.deferToThread(self.add_devices)
            cls.added = self.slapd.port
        yield self.start_relay()

    def add_devices(self):
        add_people(self.slapd, DEVICE_ENTRIES)

    @defer.inlineCallbacks
    def test_the_sender_comes_from_the_mail_attribute(self):
        [null, made_up, own] = yield self.session(
            "corp-ldap", "device7:device7-pw", ("", submission(None)),
            ("scanner@localhost", submission(None)),
            ("second@example.com", submission(None)))
        for replies in (null, made_up, own):
            self.assertTrue(replies[-1].startswith(b"250 2.0.0"), replies)
        # not_allowed: an allowed sender of the device's own stays as it is
        self.assertEqual([s for s, _ in self.delivered()],
                         ["device7@example.com", "device7@example.com",
                          "second@example.com"])

    @defer.inlineCallbacks
    def test_a_missing_attribute_is_refused_at_mail(self):
        [null] = yield self.session("corp-ldap", "device8:device8-pw", ("", submission(None)))
        self.assertEqual(null, [NO_SENDER])
        self.assertEqual(self.delivered(), [])
        self.assertEqual(self.fixture.upstream.sessions, [])  # the upstream heard nothing
        self.assertEqual(self.rejections("corp-ldap", "mail_from"), 1)
        self.assertIn("its policy sets the envelope sender, and attribute mail is missing",
                      log_text(self.events))


    @defer.inlineCallbacks
    def test_the_rules_judge_the_sender_that_was_set(self):
        [null] = yield self.session("strict-ldap", "device7:device7-pw", ("", submission(None)))
        self.assertEqual(null, [b"553 5.7.1 The sender address set for this login is not "
                                b"allowed by its policy"])
        self.assertEqual(self.fixture.upstream.sessions, [])
        self.assertEqual(self.rejections("strict-ldap", "mail_from"), 1)


class JWTSenderTests(JWTFixture, unittest.TestCase):
    """``envelope_sender: {claim: email}`` with tokens from a real JWKS endpoint."""

    def providers(self):
        return self.jwt_providers({"sender_claim": "email",
                                   "envelope_sender": {"claim": "email", "when": "empty"}})

    @defer.inlineCallbacks
    def test_the_claim_sets_the_null_sender_and_a_missing_claim_is_refused(self):
        [null, own] = yield self.session(
            "idp", self.token("copier-3", email="copier3@example.com"),
            ("", submission(None)), ("copier3@example.com", submission(None)))
        self.assertTrue(null[-1].startswith(b"250 2.0.0"), null)
        self.assertTrue(own[-1].startswith(b"250 2.0.0"), own)
        [missing] = yield self.session("idp", self.token("copier-4"), ("", submission(None)))
        self.assertEqual(missing, [NO_SENDER])
        # a claim that would smuggle a command into MAIL FROM is no sender at all
        [smuggled] = yield self.session(
            "idp", self.token("copier-5", email="c5@example.com>\r\nRCPT TO:<x@example.net"),
            ("", submission(None)))
        self.assertEqual(smuggled, [NO_SENDER])
        lines = b"\n".join(line for s in self.fixture.upstream.sessions for line in s.lines())
        self.assertNotIn(b"c5@example.com", lines)
        self.assertEqual([s for s, _ in self.delivered()],
                         ["copier3@example.com", "copier3@example.com"])


class SenderEndpoint(AuthEndpoint):
    """An http_basic endpoint that names the device's address in its answer."""

    def render(self, request):
        if request.getHeader(b"authorization") == self.expected:
            request.setHeader(b"X-Mail-Sender", b"floor2-mfp@example.com")
        return super().render(request)

    @property
    def expected(self) -> bytes:
        user, password = self.expect_basic
        return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class HTTPSenderTests(SessionMixin, unittest.TestCase):
    """``envelope_sender: {header: X-Mail-Sender}`` on http_basic, with the relay's
    domain stripped from the login name before the endpoint sees it."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LoopbackHTTPServer({
            "sender": SenderEndpoint(expect_basic=("mfp2", "toner")),
            "bare": AuthEndpoint(expect_basic=("mfp3", "toner"))})
        yield defer.maybeDeferred(self.server.start)
        self.addCleanup(self.server.stop)
        yield self.start_relay()

    def providers(self):
        policy = {"allowed_senders": ["@example.com"],
                  "envelope_sender": {"header": "X-Mail-Sender"}}
        return json.dumps({"providers": [
            {"meta": {"name": name, "type": "http_basic",
                      "login_domains": ["relay.example.com"]},
             "params": {"url": self.server.url(f"/{name}")}, "policy": policy}
            for name in ("sender", "bare")]})

    @defer.inlineCallbacks
    def test_the_sender_comes_from_the_answer(self):
        [null] = yield self.session("sender", "mfp2@relay.example.com:toner",
                                    ("", submission(None)))
        self.assertTrue(null[-1].startswith(b"250 2.0.0"), null)
        [missing] = yield self.session("bare", "mfp3@relay.example.com:toner",
                                       ("", submission(None)))
        self.assertEqual(missing, [NO_SENDER])
        self.assertEqual([s for s, _ in self.delivered()], ["floor2-mfp@example.com"])
        text = log_text(self.events)
        self.assertIn("set to <floor2-mfp@example.com> for sender/mfp2 by its policy "
                      "(from the header X-Mail-Sender)", text)
        self.assertIn("header X-Mail-Sender is missing", text)


class ConfigTests(unittest.TestCase):
    """Mistakes in the new keys: one line naming the key, at start and on reload (the
    same parser), and under ``--check-config``."""

    def test_mistakes_name_the_key(self):
        for block, type_, words in (
                ({"envelope_sender": {"attribute": "mail"}}, "userpass",
                 "'envelope_sender.attribute' is for ldap providers, not userpass"),
                ({"envelope_sender": {"claim": "email"}}, "ldap",
                 "'envelope_sender.claim' is for jwt providers"),
                ({"envelope_sender": {"header": "X-Mail-Sender"}}, "userpass",
                 "'envelope_sender.header' is for http_basic and http_header providers"),
                ({"envelope_sender": {"header": "X Mail"}}, "http_basic",
                 "'envelope_sender.header' 'X Mail' is not an HTTP field name"),
                ({"envelope_sender": {"adress": "a@example.com"}}, "userpass",
                 "unknown key(s) 'envelope_sender.adress'"),
                ({"envelope_sender": {"when": "sometimes", "address": "a@example.com"}},
                 "userpass", "'envelope_sender.when' must be one of"),
                ({"envelope_sender": {"address": "a b@example.com"}}, "userpass",
                 "'envelope_sender.address' 'a b@example.com' is not a plain address"),
                ({"envelope_sender": {"map": {"scanner": "x@example.com\r\nRSET"}}},
                 "userpass", "is not a plain address"),
                ({"envelope_sender": {}}, "ldap", "'envelope_sender' needs"),
                ({"envelope_sender": {"when": "not_allowed", "address": "a@example.com"}},
                 "userpass", "not_allowed needs sender rules"),
                ({"allowed_senders": ["printers@example.com"],
                  "envelope_sender": {"address": "ceo@example.com"}}, "userpass",
                 "'envelope_sender.address' 'ceo@example.com' is not allowed")):
            with self.assertRaises(ConfigError, msg=block) as caught:
                parse_policy(block, type_)
            self.assertIn(words, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_login_domains_compare_as_domains(self):
        [config] = parse_provider_document(
            "providers:\n- meta: {name: p, type: userpass, login_domains: [Bücher.Example.]}\n"
            "  params: {username: scanner, password: pw}\n", "f", env={})
        meta = config.meta
        for typed, checked in (("scanner@xn--bcher-kva.example", "scanner"),
                               ("scanner@BÜCHER.example.", "scanner"),
                               ("scanner@buecher.example", "scanner@buecher.example"),
                               ("a@b@bücher.example", "a@b"),
                               ("@bücher.example", "@bücher.example")):
            self.assertEqual(meta.login_name(typed), checked, typed)

    async def problems(self, providers: str) -> list[str]:
        """``twistd esmtpfa --check-config`` on ``providers``: its PROBLEM lines."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write_providers(directory, providers)
        process = Twistd(["--check-config", "--config", config,
                          "--maildir", os.path.join(directory, "maildir")])
        process.start()
        self.addCleanup(process.stop)
        code = await process.exited()
        output = process.output
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("scan-pw", output)
        return [line for line in output.splitlines() if line.startswith("PROBLEM")]

    async def test_check_config_shows_each_problem_on_one_line(self):
        [domain] = await self.problems(PRINTERS.replace(
            "login_domains: relay.example.com", "login_domains: 'relay example'"))
        self.assertIn("'printers'", domain)
        self.assertIn("meta.login_domains 'relay example' is not a domain name", domain)
        [key] = await self.problems(PRINTERS.replace("map:", "mapping:"))
        self.assertIn("'printers'", key)
        self.assertIn("policy: unknown key(s) 'envelope_sender.mapping'", key)
        [token] = await self.problems(
            "providers:\n- meta: {name: sso, type: jwt, login_domains: relay.example.com}\n"
            "  params: {jwks_url: 'https://127.0.0.1:1/jwks', iss: x, aud: y}\n")
        self.assertIn("'sso'", token)
        self.assertIn("meta.login_domains is for providers that check a user and a "
                      "password, not jwt", token)


class SpoolTests(unittest.TestCase):
    """``--delivery-mode spool``: the spool keeps the sender that was set, so the bounce
    of a device's null-sender message reaches the address set for it (a null sender's
    message would be held, never bounced)."""

    timeout = 60

    async def test_the_bounce_goes_to_the_sender_that_was_set(self):
        from tests.support.relayfixture import PASSWORD, USER, RelayFixture
        from tests.test_spool_modes import eventually, send
        upstream = RecordingUpstream(rcpt_replies={
            "gone@example.net": "550 5.1.1 no such user"}).start()
        spool = os.path.abspath(self.mktemp())
        fixture = RelayFixture(
            self.mktemp(), "--delivery-mode", "spool", "--spool-url", f"file://{spool}",
            "--spool-retry-min", "1", "--spool-retry-max", "2", upstream=upstream,
            providers=f"""\
providers:
- meta: {{name: office, type: userpass, fallback: true}}
  params: {{username: {USER}, password: "{PASSWORD}"}}
  policy:
    allowed_senders: ["printers@example.com"]
    envelope_sender: {{address: printers@example.com, when: empty}}
""")
        self.addCleanup(fixture.stop)
        await fixture.start()
        code, text, _ = await fixture.run(send, fixture, ("gone@example.net",), "")
        self.assertEqual(code, 250, text)
        [bounce] = await eventually(lambda: upstream.accepted)
        self.assertEqual((bounce.mail_from, bounce.rcpts), ("", ["printers@example.com"]))
