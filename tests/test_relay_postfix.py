"""Against a real server: a private Postfix smtpd with Cyrus SASL (sasldb), proxying to
smtp-sink.  Which SASL mechanism is chosen, that it logs in (Postfix says so in its log:
``sasl_method=…, sasl_username=…``), STARTTLS with AUTH only after TLS, and Postfix's SIZE.
"""

from __future__ import annotations

from twisted.trial import unittest

from esmtpfa.common.message import Envelope
from esmtpfa.relay.interfaces import REJECTED, RelayError
from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings
from tests.support.builders import CONTENT, outbound
from tests.support.certs import CertificateAuthority
from tests.support.postfix import PostfixSubmission
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.relaying import send_whole
from tests.support.resources import resources

PASSWORD_UPSTREAM = "s3cret pencil"


class PostfixTestCase(unittest.TestCase):
    timeout = 60

    async def postfix(self, **kwargs) -> PostfixSubmission:
        server = PostfixSubmission(users={"relayuser": PASSWORD_UPSTREAM}, **kwargs)
        self.addCleanup(server.stop)
        await server.start()
        return server

    def relay(self, server: PostfixSubmission, password: str = PASSWORD_UPSTREAM,
              **settings) -> SMTPRelay:
        options = dict(username="relayuser", password=password, helo_name="relay.test",
                       starttls="none", allow_insecure_auth=True, command_timeout=10)
        options.update(settings)
        relay = SMTPRelay(UpstreamSettings("127.0.0.1", server.port, **options),
                          resources=resources())
        self.addCleanup(relay.close)
        return relay

    async def delivered(self, server: PostfixSubmission, relay: SMTPRelay) -> None:
        reply = await send_whole(relay, outbound())
        self.assertEqual(reply.code, 250)
        await server.wait_for_log("proxy-accept: END-OF-MESSAGE: 250")
        [message] = server.sink.messages()
        self.assertEqual(message.rcpts, ["bob@example.com"])
        self.assertTrue(message.content.endswith(CONTENT.replace(b"\r\n", b"\n")))


class MechanismTests(PostfixTestCase):

    async def test_scram_sha_256_is_preferred_and_logs_in(self):
        server = await self.postfix()
        relay = self.relay(server)
        await self.delivered(server, relay)
        self.assertIn("sasl_method=SCRAM-SHA-256, sasl_username=relayuser", server.log())

    async def test_scram_sha_1_when_sha_256_is_not_offered(self):
        server = await self.postfix(mechanisms=("LOGIN", "PLAIN", "CRAM-MD5", "SCRAM-SHA-1"))
        await self.delivered(server, self.relay(server))
        self.assertIn("sasl_method=SCRAM-SHA-1, sasl_username=relayuser", server.log())

    async def test_cram_md5_when_no_scram(self):
        server = await self.postfix(mechanisms=("LOGIN", "PLAIN", "CRAM-MD5"))
        await self.delivered(server, self.relay(server))
        self.assertIn("sasl_method=CRAM-MD5, sasl_username=relayuser", server.log())

    async def test_every_forced_mechanism_logs_in(self):
        server = await self.postfix()
        for mechanism in ("SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN", "SCRAM-SHA-256"):
            relay = self.relay(server, auth_mechanism=mechanism)
            self.assertEqual((await send_whole(relay, outbound())).code, 250)
            await relay.close()
            await server.wait_for_log(f"sasl_method={mechanism}, sasl_username=relayuser")
        await server.wait_for_log("disconnect from", timeout=10)
        self.assertEqual(len(server.sink.messages()), 5)

    async def test_wrong_password_with_scram(self):
        server = await self.postfix()
        relay = self.relay(server, password="not the password")
        with self.assertRaises(RelayError) as caught:
            await send_whole(relay, outbound())
        error = caught.exception
        self.assertEqual((error.reply.code, error.reply.enhanced, error.command),
                         (451, "4.3.0", "AUTH"))
        self.assertEqual(error.upstream_reply.code, 535)
        await server.wait_for_log("SASL SCRAM-SHA-256 authentication failed")
        self.assertEqual(server.sink.messages(), [])

    async def test_pooled_session_authenticates_once(self):
        server = await self.postfix()
        relay = self.relay(server)
        for _ in range(3):
            self.assertEqual((await send_whole(relay, outbound())).code, 250)
        await relay.close()
        await server.wait_for_log("mail=3")  # one Postfix session ran all three
        self.assertEqual(server.log().count("sasl_method=SCRAM-SHA-256"), 3)  # per MAIL
        self.assertEqual(server.log().count("]: connect from localhost"), 2)  # probe, ours
        self.assertEqual(len(server.sink.messages()), 3)


class TLSTests(PostfixTestCase):

    async def tls_pair(self, certificate_name: str
                       ) -> tuple[PostfixSubmission, SMTPRelay]:
        """Postfix offering AUTH only after STARTTLS, with a certificate for
        ``certificate_name``; our relay requiring TLS and expecting ``postfix.test``."""
        ca = CertificateAuthority(self.mktemp())
        leaf = ca.issue(certificate_name, filename="postfix")
        server = await self.postfix(tls=leaf, tls_auth_only=True)
        relay = self.relay(server, starttls="required", allow_insecure_auth=False,
                           server_name="postfix.test", ca_cert=ca.cert_path)
        return server, relay

    async def test_starttls_then_scram_with_auth_only_over_tls(self):
        server, relay = await self.tls_pair("postfix.test")
        await self.delivered(server, relay)
        self.assertIn("sasl_method=SCRAM-SHA-256", server.log())
        await relay.close()  # the session ends: Postfix logs its summary
        summary = await self.session_summary(server)
        self.assertIn("starttls=1", summary)
        self.assertIn("auth=1", summary)

    async def test_wrong_certificate_name_is_refused_before_auth(self):
        server, relay = await self.tls_pair("someone-else.test")
        with self.assertRaises(RelayError) as caught:
            await send_whole(relay, outbound())
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced),
                         (451, "4.4.2"))
        self.assertNotIn("sasl_method", server.log())
        self.assertEqual(server.sink.messages(), [])

    async def session_summary(self, server: PostfixSubmission) -> str:
        await server.wait_for_log("starttls=")
        return next(line for line in server.log().splitlines() if "starttls=" in line)


class SizeTests(PostfixTestCase):
    """Postfix's message_size_limit, advertised as SIZE: larger messages are refused with
    552 5.3.4 before any byte of DATA reaches the upstream."""

    async def test_declared_size_over_the_limit(self):
        server = await self.postfix(size_limit=4000)
        relay = self.relay(server)
        transaction = await relay.begin(Envelope("a@example.com", (), declared_size=5000),
                                        "urn:uuid:t1", "urn:uuid:c1")
        with self.assertRaises(RelayError) as caught:
            await transaction.addRecipient("bob@example.com")
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced,
                          caught.exception.reason), (552, "5.3.4", REJECTED))
        transaction.abort()
        # Now the relay knows the limit: the next MAIL is refused at once.
        with self.assertRaises(RelayError) as caught:
            await relay.begin(Envelope("a@example.com", (), declared_size=5000), "t2", "c2")
        self.assertEqual(caught.exception.reply.code, 552)
        await relay.close()
        self.assertEqual(server.sink.messages(), [])

    async def test_size_discovered_while_streaming(self):
        server = await self.postfix(size_limit=4000)
        fixture = RelayFixture(self.mktemp(), "--relay-addr", "127.0.0.1", "--relay-port",
                               str(server.port), "--relay-user", "relayuser",
                               "--relay-pass", PASSWORD_UPSTREAM, "--relay-starttls", "none",
                               "--relay-allow-insecure-auth", relay=False)
        self.addCleanup(fixture.stop)
        await fixture.start()

        def client():
            session = fixture.secure_session()
            session.auth_plain(USER, PASSWORD)
            replies = [session.command("MAIL FROM:<alice@example.com>"),
                       session.command("RCPT TO:<bob@example.com>"),
                       session.command("DATA")]
            session.send(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 100 + b".\r\n")
            replies.append(session.reply())
            small = [session.command("MAIL FROM:<alice@example.com>"),
                     session.command("RCPT TO:<bob@example.com>"),
                     session.command("DATA")]
            session.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
            small.append(session.reply())
            session.command("QUIT")
            return replies, small
        replies, small = await fixture.run(client)
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 552])
        self.assertTrue(replies[-1][1].startswith("5.3.4"))
        self.assertEqual([r[0] for r in small], [250, 250, 354, 250])
        await server.wait_for_log("proxy-accept: END-OF-MESSAGE: 250")
        [message] = server.sink.messages()  # only the small one; the big one sent no DATA
        self.assertIn(b"Subject: small", message.content)
        self.assertEqual(server.log().count("END-OF-MESSAGE"), 1)

