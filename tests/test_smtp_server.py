"""The SMTP server at the byte level: docs/design.md, "Listeners, TLS and health" and
"The SMTP session" and every server defect of
docs/twisted-defects.md.

Each test talks to the real ``RelayService`` over loopback with a raw socket, and where a
message is involved, checks what the real recording upstream received.
"""

from __future__ import annotations

import base64

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.trial import unittest

from esmtpfa.auth.provider import Provider, ProviderMeta
from esmtpfa.auth.selection import ProviderSet
from tests.support.builders import b64
from tests.support.relayfixture import PASSWORD, USER, RelayFixture

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: hello\r\n\r\nHi Bob,\r\n..a line that starts with a dot\r\n")
MESSAGE_CONTENT = MESSAGE.replace(b"\r\n..", b"\r\n.")


class FixtureMixin:
    timeout = 30
    fixture_args: tuple = ()
    fixture_env: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), *self.fixture_args, env=self.fixture_env)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def run_client(self, script):
        return self.fixture.run(script, self.fixture)

    def expect_reply(self, script, code: int, enhanced: str):
        """Run ``script``; the one reply it returns must carry ``code`` and ``enhanced``."""
        def check(reply):
            self.assertEqual((reply[0], reply[1].split(" ", 1)[0]), (code, enhanced))
        return self.run_client(script).addCallback(check)

    def expect_message_refused(self, content: bytes, code: int, enhanced: str):
        """The message is refused with ``code``/``enhanced``, the session stays usable,
        and nothing reaches the upstream."""
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return send_message(client, content), client.command("NOOP")

        def check(result):
            refused, noop = result
            self.assertEqual((refused[0], refused[1].split(" ", 1)[0], noop[0]),
                             (code, enhanced, 250))
            self.assertEqual(self.upstream.messages, [])
        return self.run_client(script).addCallback(check)

    @property
    def upstream(self):
        return self.fixture.upstream


def authenticate(client):
    code, text = client.auth_plain(USER, PASSWORD)
    assert code == 235, (code, text)


def send_message(client, content=MESSAGE, sender="alice@example.com",
                 recipients=("bob@example.net",)):
    return client.send_message(content, sender, recipients)


class GreetingAndEHLOTests(FixtureMixin, unittest.TestCase):
    def test_greeting_and_extensions_before_tls(self):
        def script(fixture):
            client = fixture.connect()
            assert client.greeting[0] == 220 and "relay.test ESMTP" in client.greeting[1]
            code, text = client.command("EHLO client.example")
            return code, text.split("\n")[1:]
        d = self.run_client(script)

        def check(result):
            code, extensions = result
            self.assertEqual(code, 250)
            for keyword in ("PIPELINING", "SIZE 26214400", "8BITMIME",
                            "ENHANCEDSTATUSCODES", "STARTTLS"):
                self.assertIn(keyword, extensions)
            # No AUTH in cleartext unless --allow-insecure-auth.
            self.assertFalse([e for e in extensions if e.startswith("AUTH")])
        return d.addCallback(check)

    def test_auth_offered_after_starttls_and_starttls_not_again(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.command("EHLO client.example")[1].split("\n")[1:]
        d = self.run_client(script)

        def check(extensions):
            self.assertIn("AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER", extensions)
            self.assertNotIn("STARTTLS", extensions)
        return d.addCallback(check)

    def test_implicit_tls_never_offers_starttls(self):
        def script(fixture):
            client = fixture.connect(implicit_tls=True)
            extensions = client.command("EHLO client.example")[1].split("\n")[1:]
            return extensions, client.command("STARTTLS")
        d = self.run_client(script)

        def check(result):
            extensions, starttls = result
            self.assertNotIn("STARTTLS", extensions)
            self.assertIn("AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER", extensions)
            self.assertEqual(starttls[0], 502)
        return d.addCallback(check)

    def test_simple_commands(self):
        def script(fixture):
            client = fixture.connect()
            out = [client.command(c) for c in ("NOOP", "HELO client.example", "RSET",
                                               "VRFY bob", "EXPN list", "HELP", "BOGUS")]
            out.append(client.command("QUIT"))
            out.append(client.is_closed())
            return out
        d = self.run_client(script)

        def check(out):
            codes = [reply[0] for reply in out[:-1]]
            self.assertEqual(codes, [250, 250, 250, 252, 502, 214, 500, 221])
            self.assertTrue(out[1][1] == "relay.test")
            for reply in out[:-1]:
                if reply is not out[1]:  # HELO's reply is the bare hostname
                    self.assertRegex(reply[1], r"^[245]\.\d+\.\d+ ")
            self.assertTrue(out[-1])
        return d.addCallback(check)

    def test_non_ascii_and_invalid_utf8_commands_get_500(self):
        def script(fixture):
            client = fixture.connect()
            replies = [client.command(b"NO\xffOP"), client.command("NÖOP"),
                       client.command(b"NOOP\x00x")]
            return replies, client.command("NOOP")
        d = self.run_client(script)

        def check(result):
            replies, after = result
            self.assertEqual([r[0] for r in replies], [500, 500, 500])
            self.assertTrue(all(r[1].startswith("5.5.2") for r in replies))
            self.assertEqual(after[0], 250)
        return d.addCallback(check)

    def test_overlong_command_line(self):
        def script(fixture):
            client = fixture.connect()
            return client.command("NOOP " + "x" * 2000), client.command("NOOP")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual((r[0][0], r[0][1][:5], r[1][0]),
                                                 (500, "5.5.6", 250)))
        return d


class STARTTLSTests(FixtureMixin, unittest.TestCase):
    def test_commands_pipelined_after_starttls_are_discarded(self):
        """docs/twisted-defects.md server #2: plaintext injection after STARTTLS."""
        creds = b64(f"\0{USER}\0{PASSWORD}")

        def script(fixture):
            client = fixture.connect()
            client.command("EHLO client.example")
            client.send(f"STARTTLS\r\nEHLO evil\r\nAUTH PLAIN {creds}\r\n"
                        "MAIL FROM:<evil@example.com>\r\n".encode())
            code, _ = client.reply()
            assert code == 220
            leftover = client.pending()
            client.sock = fixture.client_context().wrap_socket(
                client.sock, server_hostname="relay.test")
            # Were the injected EHLO/AUTH acted upon, MAIL would be accepted here.
            return leftover, client.command("MAIL FROM:<a@example.com>")
        d = self.run_client(script)

        def check(result):
            leftover, mail = result
            self.assertEqual(leftover, b"")
            self.assertEqual(mail[0], 503)
        return d.addCallback(check)

    def test_session_state_is_reset_by_starttls(self):
        def script(fixture):
            client = fixture.connect()
            client.command("EHLO client.example")
            client.starttls(fixture.client_context(), server_hostname="relay.test")
            return client.command("MAIL FROM:<a@example.com>"), client.auth_plain(USER, PASSWORD)
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual([x[0] for x in r], [503, 503]))
        return d


class AUTHTests(FixtureMixin, unittest.TestCase):
    def test_auth_in_cleartext_is_refused(self):
        def script(fixture):
            client = fixture.connect()
            client.command("EHLO client.example")
            return client.auth_plain(USER, PASSWORD)
        return self.expect_reply(script, 538, "5.7.11")

    def test_auth_before_ehlo(self):
        def script(fixture):
            client = fixture.connect(implicit_tls=True)
            return client.auth_plain(USER, PASSWORD)
        return self.expect_reply(script, 503, "5.5.1")

    def test_auth_after_helo_as_printers_send_it(self):
        """A scan-to-mail printer's dialect: HELO, then AUTH although nothing was
        advertised, then the message (Postfix accepts it; so does esmtpfa)."""
        def script(fixture):
            client = fixture.connect(implicit_tls=True)
            helo = client.command("HELO scanner.example")
            auth = client.auth_plain(USER, PASSWORD)
            sent = client.send_message(b"Subject: scan\r\n\r\npage 1\r\n",
                                       "scanner@example.com", ["alice@example.net"])
            return helo, auth, sent
        d = self.run_client(script)

        def check(result):
            helo, auth, sent = result
            self.assertEqual(helo[0], 250)
            self.assertEqual((auth[0], auth[1][:5]), (235, "2.7.0"))
            self.assertEqual(sent[0], 250, sent)
            self.assertEqual(len(self.upstream.messages), 1)
        return d.addCallback(check)

    def test_plain_success_then_second_auth_refused(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.auth_plain(USER, PASSWORD), client.auth_plain(USER, PASSWORD)
        d = self.run_client(script)

        def check(result):
            self.assertEqual((result[0][0], result[0][1][:5]), (235, "2.7.0"))
            self.assertEqual((result[1][0], result[1][1][:5]), (503, "5.5.1"))
        return d.addCallback(check)

    def test_wrong_password_is_535(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.auth_plain(USER, "wrong"), client.command("NOOP")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual(
            (r[0][0], r[0][1][:5], r[1][0]), (535, "5.7.8", 250)))
        return d

    def test_plain_without_initial_response_and_login_both_ways(self):
        def script(fixture):
            replies = []
            client = fixture.secure_session()
            replies.append(client.command("AUTH PLAIN"))
            replies.append(client.command(b64(f"\0{USER}\0{PASSWORD}")))
            client = fixture.secure_session()
            replies.append(client.command("AUTH LOGIN"))
            replies.append(client.command(b64(USER)))
            replies.append(client.command(b64(PASSWORD)))
            client = fixture.secure_session()
            replies.append(client.command(f"AUTH LOGIN {b64(USER)}"))
            replies.append(client.command(b64(PASSWORD)))
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([r[0] for r in replies], [334, 235, 334, 334, 235, 334, 235])
            self.assertEqual(base64.b64decode(replies[2][1]), b"Username:")
            self.assertEqual(base64.b64decode(replies[3][1]), b"Password:")
            self.assertEqual(base64.b64decode(replies[5][1]), b"Password:")
        return d.addCallback(check)

    def test_malformed_exchanges_get_replies_not_dropped_connections(self):
        """docs/twisted-defects.md server #6."""
        def script(fixture):
            client = fixture.secure_session()
            replies = [
                client.command("AUTH"),
                client.command("AUTH CRAM-MD5"),
                client.command("AUTH PLAIN ="),
                client.command("AUTH PLAIN !!!notbase64"),
                client.command(f"AUTH PLAIN {b64('only-one-part')}"),
                client.command("AUTH PLAIN " + b64(b"x\0\xff\xfe\0y")),
            ]
            client.command("AUTH PLAIN")
            replies.append(client.command("*"))
            client.command("AUTH LOGIN")
            replies.append(client.command("*"))
            replies.append(client.command("NOOP"))
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([r[0] for r in replies],
                             [501, 504, 501, 501, 501, 501, 501, 501, 250])
            self.assertEqual([r[1][:5] for r in replies[:8]],
                             ["5.5.4", "5.5.4", "5.5.2", "5.5.2", "5.5.2", "5.5.2",
                              "5.7.0", "5.7.0"])
        return d.addCallback(check)

    def test_foreign_authzid_is_refused(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.command("AUTH PLAIN " + b64(f"bob\0{USER}\0{PASSWORD}"))
        return self.expect_reply(script, 535, "5.7.8")

    def test_too_many_failures_close_the_connection(self):
        def script(fixture):
            client = fixture.secure_session()
            replies = [client.auth_plain(USER, "bad") for _ in range(2)]
            client.send(("AUTH PLAIN " + b64(f"\0{USER}\0bad") + "\r\n").encode())
            replies.append(client.reply())
            replies.append(client.reply())
            return replies, client.is_closed()
        d = self.run_client(script)

        def check(result):
            replies, closed = result
            self.assertEqual([r[0] for r in replies], [535, 535, 535, 421])
            self.assertEqual(replies[3][1][:5], "4.7.0")
            self.assertTrue(closed)
        return d.addCallback(check)

    def test_long_sasl_response_within_12288_octets(self):
        """RFC 4954 §4: AUTH lines may exceed the 1000-octet command limit (JWTs)."""
        def script(fixture):
            client = fixture.secure_session()
            long_password = "x" * 8000
            return client.auth_plain(USER, long_password), client.command("NOOP")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual((r[0][0], r[1][0]), (535, 250)))
        return d

    def test_auth_during_transaction(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<alice@example.com>")
            return client.command("AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual(r[0], 503))
        return d

    def test_mail_before_auth(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.command("MAIL FROM:<alice@example.com>")
        return self.expect_reply(script, 530, "5.7.0")

    def test_username_selects_provider_with_first_colon_split(self):
        def script(fixture):
            client = fixture.secure_session()
            return client.auth_plain("printers", "printer1:p:with:colons")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual(r[0], 235))
        return d


class SlowProvider(Provider):
    """A provider answering after a delay: makes AUTH asynchronous on the wire."""

    def __init__(self, meta, clock_delay=0.05):
        super().__init__(meta)
        self.delay = clock_delay

    def requestAvatarId(self, credentials):
        from twisted.internet import reactor
        ok = credentials.username == USER and credentials.password == PASSWORD
        return task.deferLater(
            reactor, self.delay,
            lambda: credentials.username if ok else (_ for _ in ()).throw(UnauthorizedLogin()))


class PipeliningTests(FixtureMixin, unittest.TestCase):
    def test_pipelined_transaction_behind_async_auth_keeps_order(self):
        """docs/twisted-defects.md server #5: async validation + pipelining."""
        self.fixture.service.directory.replace(ProviderSet(
            [SlowProvider(ProviderMeta("slow", "userpass", fallback=True))]))

        def script(fixture):
            client = fixture.secure_session()
            client.send(("AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}") + "\r\n"
                         "MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         "RCPT TO:<carol@example.net>\r\nDATA\r\n").encode())
            replies = [client.reply() for _ in range(5)]
            client.send(MESSAGE + b".\r\nNOOP\r\n")
            replies += [client.reply(), client.reply()]
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([r[0] for r in replies], [235, 250, 250, 250, 354, 250, 250])
            self.assertEqual(len(self.upstream.messages), 1)
            self.assertEqual(self.upstream.messages[0].rcpts,
                             ["bob@example.net", "carol@example.net"])
        return d.addCallback(check)

    def test_next_transaction_pipelined_after_data(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            send_message(client)
            client.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<dave@example.net>\r\n"
                        b"DATA\r\n")
            replies = [client.reply() for _ in range(3)]
            client.send(MESSAGE + b".\r\nQUIT\r\n")
            replies += [client.reply(), client.reply()]
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([r[0] for r in replies], [250, 250, 354, 250, 221])
            self.assertEqual(len(self.upstream.messages), 2)
        return d.addCallback(check)


SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n")


class DataTests(FixtureMixin, unittest.TestCase):
    def test_relayed_bytes_are_the_clients_plus_received_header(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return send_message(client)
        d = self.run_client(script)

        def check(reply):
            self.assertEqual(reply[0], 250)
            message_id = reply[1].split()[-1]
            self.assertTrue(message_id.startswith("urn:uuid:"))
            received = self.upstream.messages[0]
            self.assertEqual(received.mail_from, "alice@example.com")
            self.assertEqual(received.rcpts, ["bob@example.net"])
            header, _, rest = received.data.partition(b";\r\n\t")
            self.assertTrue(header.startswith(b"Received: from client.example ([127.0.0.1])"))
            self.assertIn(b"by relay.test (esmtpfa) with ESMTPSA id " + message_id.encode(),
                          header)
            self.assertEqual(rest.split(b"\r\n", 1)[1], MESSAGE_CONTENT)
        return d.addCallback(check)

    def test_long_line_in_data_never_runs_the_rest_as_commands(self):
        """docs/twisted-defects.md server #3: a 20 KB line, then lines that look like commands."""
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<alice@example.com>")
            client.command("RCPT TO:<bob@example.net>")
            client.command("DATA")
            client.send(b"Subject: x\r\n\r\n" + b"A" * 20000 + b"\r\nRSET\r\n" + SMUGGLED
                        + b".\r\n")
            return client.reply(), client.command("NOOP")
        d = self.run_client(script)

        def check(result):
            refused, noop = result
            self.assertEqual((refused[0], refused[1][:5]), (550, "5.6.0"))
            self.assertEqual(noop[0], 250)
            self.assertEqual(self.upstream.messages, [])
            self.assertNotIn(b"evil@example.com", self.upstream.raw)
        return d.addCallback(check)

    def _smuggle(self, terminator: bytes):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<alice@example.com>")
            client.command("RCPT TO:<bob@example.net>")
            client.command("DATA")
            client.send(b"Subject: x\r\n\r\nhello" + terminator + SMUGGLED + b".\r\n")
            return client.reply(), client.command("NOOP")
        return self.run_client(script)

    def _assert_normalized(self, result):
        reply, noop = result
        self.assertEqual((reply[0], noop[0]), (250, 250))
        self.assertEqual(len(self.upstream.messages), 1)
        data = self.upstream.messages[0].data
        # The would-be commands arrived as content, with clean CRLFs only.
        self.assertIn(b"MAIL FROM:<evil@example.com>\r\n", data)
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertEqual(data.count(b"\r"), data.count(b"\r\n"))
        # ... and the upstream saw exactly one MAIL command: no smuggled transaction.
        verbs = [verb for session in self.upstream.sessions for verb in session.verbs()]
        self.assertEqual(verbs.count("MAIL"), 1)

    def test_bare_lf_dot_lf(self):
        return self._smuggle(b"\n.\n").addCallback(self._assert_normalized)

    def test_bare_lf_dot_crlf(self):
        return self._smuggle(b"\n.\r\n").addCallback(self._assert_normalized)

    def test_crlf_dot_lf(self):
        return self._smuggle(b"\r\n.\n").addCallback(self._assert_normalized)

    def test_bare_cr_dot_cr(self):
        return self._smuggle(b"\r.\r").addCallback(self._assert_normalized)

    def test_cr_dot_crlf(self):
        return self._smuggle(b"\r.\r\n").addCallback(self._assert_normalized)

    def test_nul_before_the_dot(self):
        """``CRLF NUL . CRLF``: an upstream that drops NULs would end the data there and
        run what follows as a transaction nobody authenticated.  The NUL is removed
        after unstuffing, so the line stays the content line ``.``, stuffed again."""
        def check(result):
            self._assert_normalized(result)
            received = self.upstream.messages[0]
            self.assertNotIn(b"\0", received.data_raw)
            self.assertIn(b"hello\r\n.\r\nMAIL FROM:<evil@example.com>", received.data)
            self.assertIn(b"hello\r\n..\r\nMAIL FROM:", received.data_raw)
        return self._smuggle(b"\r\n\0.\r\n").addCallback(check)

    def test_nul_anywhere_is_removed(self):
        return self._smuggle(b"\r\n.\0\r\n\0").addCallback(
            lambda result: self.assertNotIn(b"\0", self.upstream.messages[0].data_raw))

    def test_size_parameter_and_unknown_parameters(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return [client.command("MAIL FROM:<a@example.com> SIZE=999999999"),
                    client.command("MAIL FROM:<a@example.com> FOO=BAR"),
                    client.command("MAIL FROM:<a@example.com> BODY=BINARYMIME"),
                    client.command("MAIL FROM:<a@example.com> SMTPUTF8"),
                    client.command("MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME"),
                    client.command("RCPT TO:<b@example.com> NOTIFY=NEVER"),
                    client.command("RCPT TO:<>"),
                    client.command("RCPT TO:<not an address>"),
                    client.command("MAIL FROM:<a@example.com>")]
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([(r[0], r[1][:5]) for r in replies],
                             [(552, "5.3.4"), (555, "5.5.4"), (555, "5.5.4"),
                              (555, "5.5.4"), (250, "2.1.0"), (555, "5.5.4"),
                              (501, "5.1.3"), (501, "5.1.3"), (503, "5.5.1")])
        return d.addCallback(check)

    def test_non_ascii_address_needs_smtputf8(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return client.command("MAIL FROM:<jösé@example.com>")
        return self.expect_reply(script, 553, "5.6.7")

    def test_data_without_recipients_and_sequence_errors(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return [client.command("RCPT TO:<b@example.com>"), client.command("DATA"),
                    client.command("MAIL FROM:<a@example.com>"), client.command("DATA")]
        d = self.run_client(script)
        d.addCallback(lambda replies: self.assertEqual(
            [r[0] for r in replies], [503, 503, 250, 554]))
        return d

    def test_rset_aborts_the_transaction(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<a@example.com>")
            client.command("RCPT TO:<b@example.com>")
            return client.command("RSET"), client.command("DATA")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual((r[0][0], r[1][0]), (250, 503)))
        return d


class LimitTests(FixtureMixin, unittest.TestCase):
    fixture_args = ("--max-recipients", "2", "--max-message-size", "1000",
                    "--max-connections-per-ip", "3")

    def test_too_many_recipients(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<a@example.com>")
            return [client.command(f"RCPT TO:<r{i}@example.com>") for i in range(3)]
        d = self.run_client(script)
        d.addCallback(lambda replies: self.assertEqual(
            [(r[0], r[1][:5]) for r in replies],
            [(250, "2.1.5"), (250, "2.1.5"), (452, "4.5.3")]))
        return d

    def test_message_over_size_is_refused_after_data(self):
        return self.expect_message_refused(MESSAGE + b"x" * 2000 + b"\r\n", 552, "5.3.4")

    def test_connections_per_ip(self):
        def script(fixture):
            held = [fixture.connect() for _ in range(3)]  # the per-IP limit is 3
            try:
                return fixture.connect().greeting
            finally:
                for client in held:
                    client.close()
        d = self.run_client(script)
        d.addCallback(lambda greeting: self.assertEqual(
            greeting, (421, "4.7.0 Too many connections, try again later")))
        return d


class SMTPUTF8Tests(FixtureMixin, unittest.TestCase):
    fixture_args = ("--enable-smtp-utf8",)

    def test_utf8_addresses_with_smtputf8(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            extensions = client.command("EHLO client.example")[1]
            return extensions, [client.command("MAIL FROM:<jösé@example.com> SMTPUTF8"),
                                client.command("RCPT TO:<søren@eksempel.dk>")]
        d = self.run_client(script)

        def check(result):
            extensions, replies = result
            self.assertIn("SMTPUTF8", extensions)
            self.assertEqual([r[0] for r in replies], [250, 250])
        return d.addCallback(check)


class RejectBareLineEndsTests(FixtureMixin, unittest.TestCase):
    fixture_args = ("--bare-line-ends", "reject")

    def test_bare_lf_message_is_refused_with_5_6_11(self):
        return self.expect_message_refused(
            b"Subject: x\r\n\r\nhello\n.\n" + SMUGGLED, 550, "5.6.11")

    def test_nul_before_the_dot_is_refused_with_5_6_0(self):
        return self.expect_message_refused(
            b"Subject: x\r\n\r\nhello\r\n\0.\r\n" + SMUGGLED, 550, "5.6.0")


class IdleTimeoutTests(unittest.TestCase):
    """docs/twisted-defects.md server #8: the factory's timeout is honoured (with a Clock)."""

    def build(self, timeout=30.0):
        from twisted.cred.portal import Portal
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from esmtpfa.auth.realm import SubmissionRealm
        from esmtpfa.smtp.factory import SMTPServerFactory
        from esmtpfa.smtp.settings import ServerSettings

        self.clock = task.Clock()
        factory = SMTPServerFactory(
            ServerSettings(hostname="relay.test", idle_timeout=timeout),
            Portal(SubmissionRealm(lambda identity: None), []), reactor=self.clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1025))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1025))
        protocol.makeConnection(self.transport)
        return protocol

    def test_silent_client_gets_421_and_is_closed(self):
        self.build(timeout=30.0)
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertIn(b"421 4.4.2 Idle timeout", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_activity_resets_the_timer(self):
        protocol = self.build(timeout=30.0)
        for _ in range(5):
            self.clock.advance(20)
            protocol.dataReceived(b"NOOP\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.value().count(b"250 2.0.0 OK"), 5)


class TokenProvider(Provider):
    """A bearer-token provider (like jwt / http_header) accepting one token."""

    from esmtpfa.auth.credentials import IBearerTokenCredentials
    credentialInterfaces = (IBearerTokenCredentials,)

    def requestAvatarId(self, credentials):
        if credentials.token == "good-token":
            return defer.succeed(credentials.username or "token-user")
        return defer.fail(UnauthorizedLogin())


class SelectionOnTheWireTests(FixtureMixin, unittest.TestCase):
    """docs/design.md, "Provider selection" inputs as the server sees them: SNI, EHLO, the SASL
    mechanism."""

    def use(self, *providers):
        self.fixture.service.directory.replace(ProviderSet(providers))

    def test_sni_selects_the_unique_domain_provider(self):
        from esmtpfa.providers.userpass import UserPassProvider
        self.use(UserPassProvider.from_params(
            ProviderMeta("corp", "userpass", domain="relay.test", unique_domain_auth=True),
            {"username": "bob", "password": "bobpw"}))

        def script(fixture):
            # SNI says relay.test, EHLO says something else: SNI wins.
            by_sni = fixture.secure_session(helo="elsewhere.example",
                                            server_hostname="relay.test")
            without_sni = fixture.secure_session(helo="elsewhere.example",
                                                 server_hostname="localhost")
            return by_sni.auth_plain("bob", "bobpw"), without_sni.auth_plain("bob", "bobpw")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual((r[0][0], r[1][0]), (235, 535)))
        return d

    def test_xoauth2_and_oauthbearer(self):
        self.use(TokenProvider(ProviderMeta("tokens", "jwt", fallback=True)))

        def script(fixture):
            replies = []
            client = fixture.secure_session()
            replies.append(client.command(
                "AUTH XOAUTH2 " + b64("user=ann@example.com\x01auth=Bearer good-token\x01\x01")))
            client = fixture.secure_session()
            replies.append(client.command(
                "AUTH OAUTHBEARER " + b64("n,a=ann@example.com,\x01host=relay.test\x01"
                                          "port=587\x01auth=Bearer good-token\x01\x01")))
            client = fixture.secure_session()
            # RFC 7628 §3.2.2: a failure is a 334 JSON error challenge, the client
            # answers ^A, then 535.
            replies.append(client.command(
                "AUTH OAUTHBEARER " + b64("n,,\x01auth=Bearer bad-token\x01\x01")))
            replies.append(client.command(b64("\x01")))
            # A bearer token is never offered to a user+password provider as a password.
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([r[0] for r in replies], [235, 235, 334, 535])
            import json
            self.assertEqual(json.loads(base64.b64decode(replies[2][1]))["status"],
                             "invalid_token")
        return d.addCallback(check)

    def test_oauthbearer_host_selects_unique_domain_without_sni(self):
        """RFC 7628 §3.1: ``host=`` names the server; docs/design.md, "Provider selection" uses it
        when SNI is absent."""
        self.use(TokenProvider(ProviderMeta(
            "corp-tokens", "jwt", domain="tokens.example", unique_domain_auth=True)))

        def script(fixture):
            def login(host, server_hostname):
                client = fixture.secure_session(server_hostname=server_hostname)
                return client.command("AUTH OAUTHBEARER " + b64(
                    f"n,,\x01host={host}\x01auth=Bearer good-token\x01\x01"))[0]
            # An IP address sends no SNI: host= decides.  With SNI, SNI decides.
            return (login("tokens.example", "127.0.0.1"), login("other.example", "127.0.0.1"),
                    login("tokens.example", "relay.test"))
        d = self.run_client(script)
        d.addCallback(lambda codes: self.assertEqual(codes, (235, 334, 334)))
        return d


class UpstreamVerdictTests(unittest.TestCase):
    """docs/twisted-defects.md server #4 and #7: the client hears the truth, and always hears."""

    timeout = 30

    @defer.inlineCallbacks
    def start(self, *args, **upstream):
        from tests.support.upstream import RecordingUpstream
        self.fixture = RelayFixture(self.mktemp(), *args,
                                    upstream=RecordingUpstream(**upstream))
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def send(self):
        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            return send_message(client), client.command("NOOP")
        return self.fixture.run(script, self.fixture)

    @defer.inlineCallbacks
    def test_transient_upstream_failure_stays_transient(self):
        yield self.start(eom_reply="451 4.3.0 Queue file write error, try later")
        reply, noop = yield self.send()
        self.assertEqual((reply[0], reply[1].split()[0], noop[0]), (451, "4.3.0", 250))

    @defer.inlineCallbacks
    def test_permanent_upstream_rejection_stays_permanent(self):
        yield self.start(eom_reply="554 5.7.1 Message rejected: spam")
        reply, _ = yield self.send()
        self.assertEqual((reply[0], reply[1].split()[0]), (554, "5.7.1"))

    @defer.inlineCallbacks
    def test_unexpected_delivery_error_still_gets_a_reply(self):
        yield self.start()

        def broken(message):
            raise RuntimeError("disk on fire")
        relay = self.fixture.service.relay
        begin = relay.begin

        def begin_broken(*args):  # the upstream transaction opens, its send() breaks
            def break_send(transaction):
                transaction.send = broken
                return transaction
            return begin(*args).addCallback(break_send)
        relay.begin = begin_broken
        reply, noop = yield self.send()
        self.assertEqual((reply[0], reply[1].split()[0], noop[0]), (451, "4.3.0", 250))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_relay_from_rewrites_envelope_and_headers_only(self):
        yield self.start("--relay-from", "relay@corp.example")
        reply, _ = yield self.send()
        self.assertEqual(reply[0], 250)
        received = self.fixture.upstream.messages[0]
        self.assertEqual(received.mail_from, "relay@corp.example")
        headers, _, body = received.data.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nFrom: Alice <relay@corp.example>\r\n", headers + b"\r\n")
        self.assertIn(b"\r\nReply-To: Alice <alice@example.com>", headers)
        self.assertEqual(body, MESSAGE_CONTENT.partition(b"\r\n\r\n")[2])


class ChunkingTests(FixtureMixin, unittest.TestCase):
    """RFC 3030 BDAT with --enable-binary-mime: counted octets are never commands."""

    fixture_args = ("--enable-binary-mime",)

    def transaction(self, client, body=""):
        authenticate(client)
        assert client.command(f"MAIL FROM:<alice@example.com>{body}")[0] == 250
        assert client.command("RCPT TO:<bob@example.net>")[0] == 250

    def test_advertised_and_text_chunks_arrive_whole(self):
        content = b"Subject: chunks\r\n\r\nfirst line\r\nsecond line\n.\r\nthird\r\n"
        pieces = [content[:5], content[5:24], content[24:25], content[25:]]

        def script(fixture):
            client = fixture.secure_session()
            extensions = client.command("EHLO client.example")[1].split("\n")
            self.transaction(client)
            replies = []
            for index, piece in enumerate(pieces):
                last = " LAST" if index == len(pieces) - 1 else ""
                client.send(f"BDAT {len(piece)}{last}\r\n".encode() + piece)
                replies.append(client.reply())
            return extensions, replies
        d = self.run_client(script)

        def check(result):
            extensions, replies = result
            self.assertIn("CHUNKING", extensions)
            self.assertIn("BINARYMIME", extensions)
            self.assertEqual([r[0] for r in replies], [250, 250, 250, 250])
            self.assertIn("Message accepted", replies[-1][1])
            data = self.upstream.messages[0].data
            # The bare LF was normalized; the body is otherwise what the client sent.
            self.assertTrue(data.endswith(
                b"Subject: chunks\r\n\r\nfirst line\r\nsecond line\r\n.\r\nthird\r\n"))
        return d.addCallback(check)

    def test_refused_chunk_octets_are_never_commands(self):
        smuggled = b"RSET\r\nMAIL FROM:<evil@example.com>\r\n"

        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.send(f"BDAT {len(smuggled)} LAST\r\n".encode() + smuggled)
            return client.reply(), client.command("NOOP"), client.command("RCPT TO:<x@y.z>")
        d = self.run_client(script)

        def check(replies):
            # BDAT without MAIL is refused; its octets did not open a transaction.
            self.assertEqual([r[0] for r in replies], [503, 250, 503])
        return d.addCallback(check)

    def test_binarymime_needs_bdat_and_malformed_bdat_closes(self):
        def script(fixture):
            client = fixture.secure_session()
            self.transaction(client, " BODY=BINARYMIME")
            data = client.command("DATA")
            bad = client.command("BDAT lots")
            return data, bad, client.is_closed()
        d = self.run_client(script)

        def check(result):
            data, bad, closed = result
            self.assertEqual((data[0], bad[0], bad[1].split()[0]), (503, 501, "5.5.4"))
            self.assertTrue(closed)
        return d.addCallback(check)

    def test_text_chunk_with_overlong_line_fails_the_transaction(self):
        def script(fixture):
            client = fixture.secure_session()
            self.transaction(client)
            body = b"x" * 3000 + b"\r\n"
            client.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
            return client.reply(), client.command("NOOP")
        d = self.run_client(script)
        d.addCallback(lambda r: self.assertEqual((r[0][0], r[0][1][:5], r[1][0]),
                                                 (550, "5.6.0", 250)))
        return d


    def _binary(self, payload: bytes):
        def script(fixture):
            client = fixture.secure_session()
            self.transaction(client, " BODY=BINARYMIME")
            client.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload)
            return client.reply(), client.command("NOOP")
        return self.run_client(script)

    def test_binary_content_is_refused_not_altered_toward_the_upstream(self):
        """No BDAT upstream yet: binary octets must not be rewritten to fit DATA."""
        d = self._binary(b"Subject: bin\r\n\r\n" + bytes(range(256)) + b"\r\n")

        def check(result):
            reply, noop = result
            self.assertEqual((reply[0], reply[1].split()[0], noop[0]), (554, "5.6.3", 250))
            self.assertEqual(self.upstream.messages, [])
        return d.addCallback(check)

    def test_line_shaped_binarymime_is_relayed_unchanged(self):
        payload = "Subject: utf8\r\n\r\nGrüße, 日本\r\n".encode()
        d = self._binary(payload)

        def check(result):
            self.assertEqual(result[0][0], 250)
            self.assertTrue(self.upstream.messages[0].data.endswith(payload))
        return d.addCallback(check)


class BinaryToMaildirTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_binary_octets_reach_the_maildir_untouched(self):
        import glob
        import os
        fixture = RelayFixture(self.mktemp(), "--enable-binary-mime", relay=False)
        self.addCleanup(fixture.stop)
        yield fixture.start()
        payload = bytes(range(256)) * 4 + b"\r\n.\r\n\n.\n\r.\r"

        def script(fixture):
            client = fixture.secure_session()
            authenticate(client)
            client.command("MAIL FROM:<alice@example.com> BODY=BINARYMIME")
            client.command("RCPT TO:<bob@example.net>")
            client.send(b"BDAT 10\r\n" + payload[:10])
            first = client.reply()
            rest = payload[10:]
            client.send(f"BDAT {len(rest)} LAST\r\n".encode() + rest)
            return first, client.reply()
        first, last = yield fixture.run(script, fixture)
        self.assertEqual((first[0], last[0]), (250, 250))
        [path] = glob.glob(os.path.join(fixture.directory, "maildir", "new", "*"))
        with open(path, "rb") as f:
            self.assertEqual(f.read().split(b";\r\n\t", 1)[1].split(b"\r\n", 1)[1], payload)


class ThrottleTests(FixtureMixin, unittest.TestCase):
    """docs/design.md, "Configuration, reload and limits": failures per username across connections,
    then no provider is asked."""

    fixture_args = ("--max-auth-failures-per-user", "2", "--max-auth-failures", "5")

    def test_username_locked_across_connections_then_released(self):
        def script(fixture):
            replies = []
            for _ in range(2):  # two connections, one wrong password each
                replies.append(fixture.secure_session().auth_plain(USER, "wrong"))
            client = fixture.secure_session()
            replies.append(client.auth_plain(USER, PASSWORD))  # even the right one waits
            other = fixture.secure_session()
            replies.append(other.auth_plain("printers", "printer1:p:with:colons"))
            return replies
        d = self.run_client(script)

        def check(replies):
            self.assertEqual([(r[0], r[1].split()[0]) for r in replies],
                             [(535, "5.7.8"), (535, "5.7.8"), (454, "4.7.0"), (235, "2.7.0")])
            self.assertIn("Too many failed authentications", replies[2][1])
        return d.addCallback(check)
