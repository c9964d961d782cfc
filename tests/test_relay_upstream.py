"""SMTPRelay end to end against the recording upstream: policy, TLS, AUTH, error mapping.

Every test uses real TCP on 127.0.0.1 and, where TLS is involved, real certificates from
a CA the test creates.  Timeouts are short so that failure paths stay fast but bounded.
"""

from __future__ import annotations

import base64
import os
import socket

from twisted.internet import reactor
from twisted.logger import formatEvent
from twisted.trial import unittest

from esmtpfa.common.message import OutboundMessage
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import REJECTED, UNAVAILABLE, IRelay, RelayError
from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings
from tests.support.builders import CONTENT, outbound
from tests.support.certs import CertificateAuthority
from tests.support.logcapture import observe_logs
from tests.support.ports import free_port
from tests.support.relaying import send_whole
from tests.support.resources import resources
from tests.support.upstream import CLOSE, END_OF_DATA, GREETING, RecordingUpstream

NO_PIPELINING = ("SIZE 52428800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


class RelayTestCase(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.ca = CertificateAuthority(self.mktemp())
        self.leaf = self.ca.issue("upstream.test", filename="upstream")
        self.client_leaf = self.ca.issue("relay-client.test", client=True, filename="client")

    def start_upstream(self, **kwargs) -> RecordingUpstream:
        upstream = RecordingUpstream(**kwargs).start()
        self.addCleanup(upstream.stop)
        return upstream

    def relay(self, upstream: RecordingUpstream | None = None, port: int | None = None,
              **kwargs) -> SMTPRelay:
        options = dict(server_name="upstream.test", ca_cert=self.ca.cert_path,
                       helo_name="relay.test", connect_timeout=5.0, command_timeout=2.0,
                       data_timeout=4.0)
        options.update(kwargs)
        settings = UpstreamSettings("127.0.0.1", port or upstream.port, **options)
        relay = SMTPRelay(settings, resources=resources())
        self.addCleanup(relay.close)
        return relay

    async def refused(self, relay: SMTPRelay, message: OutboundMessage | None = None
                      ) -> RelayError:
        started = reactor.seconds()
        try:
            reply = await send_whole(relay, message or outbound())
        except RelayError as error:
            self.elapsed = reactor.seconds() - started
            return error
        self.fail(f"delivery succeeded with {reply}")

    def assertNoTransaction(self, upstream: RecordingUpstream):
        self.assertEqual(upstream.messages, [])
        for session in upstream.sessions:
            self.assertNotIn("MAIL", session.verbs())

    def assertNoContent(self, upstream: RecordingUpstream):
        """The transaction opened at RCPT, but no content (not even DATA) followed."""
        self.assertEqual(upstream.messages, [])
        self.assertNotIn(CONTENT, upstream.raw)


class DeliveryTests(RelayTestCase):

    def test_provides_irelay(self):
        upstream = self.start_upstream()
        self.assertTrue(IRelay.providedBy(self.relay(upstream)))

    async def test_delivers_and_fires_with_the_upstream_reply(self):
        upstream = self.start_upstream(eom_reply="250 2.0.0 Ok: queued as ABC123")
        relay = self.relay(upstream, starttls="none")
        message = outbound(rcpts=("bob@example.com", "carol@example.com"))
        message.prefix = b"Received: from client by esmtpfa; id urn:uuid:x\r\n"
        reply = await send_whole(relay, message)
        self.assertEqual(reply, Reply(250, "2.0.0", "Ok: queued as ABC123"))
        await relay.close()
        await upstream.whenIdle()
        [received] = upstream.messages
        self.assertEqual(received.mail_from, "alice@example.com")
        self.assertEqual(received.rcpts, ["bob@example.com", "carol@example.com"])
        self.assertEqual(received.data, message.prefix + CONTENT)
        self.assertEqual(upstream.sessions[0].verbs()[-1], "QUIT")
        self.assertEqual(upstream.sessions[0].lines()[0], b"EHLO relay.test")

    async def test_smuggled_transaction_is_content(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        content = (b".From: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@x>\r\n"
                   b"RCPT TO:<victim@y>\r\nDATA\r\nevil\r\n.\r\n")
        await send_whole(relay, outbound(content))
        await relay.close()
        [received] = upstream.messages
        self.assertEqual(received.data, content)
        self.assertEqual(upstream.sessions[0].verbs().count("MAIL"), 1)
        self.assertNotIn(b"RCPT TO:<victim@y>", upstream.sessions[0].lines())

    async def test_pipelining_when_offered(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream, starttls="none")
        await send_whole(relay, outbound(rcpts=("b@example.com",)))
        await send_whole(relay, outbound(rcpts=("b@example.com", "c@example.com")))
        transaction = ("MAIL", "RCPT", "DATA", "RSET")
        first, second = [[c for c in session.commands if c.line[:4].decode() in transaction]
                         for session in (upstream.sessions[0],) * 2]
        one = [c for c in first if c.line[:4] != b"RSET"][:3]
        self.assertEqual([c.line[:4] for c in one], [b"MAIL", b"RCPT", b"DATA"])
        # One recipient: MAIL, RCPT and DATA in one write, before any reply was sent.
        self.assertEqual(len({c.packet for c in one}), 1)
        self.assertEqual(len({c.replies_before for c in one}), 1)
        # Two: RSET, MAIL and the first RCPT in one flight, the last RCPT with DATA in
        # the next (each RCPT is answered with the upstream's verdict for it).
        two = second[second.index(next(c for c in second if c.line[:4] == b"RSET")):]
        self.assertEqual([c.line[:4] for c in two],
                         [b"RSET", b"MAIL", b"RCPT", b"RCPT", b"DATA"])
        self.assertEqual(len({c.packet for c in two[:3]}), 1)
        self.assertEqual(len({c.packet for c in two[3:]}), 1)

    async def test_no_pipelining_when_not_offered(self):
        upstream = self.start_upstream(extensions=NO_PIPELINING)
        relay = self.relay(upstream, starttls="none")
        await send_whole(relay, outbound(rcpts=("b@example.com", "c@example.com")))
        commands = [c for c in upstream.sessions[0].commands
                    if c.line[:4] in (b"MAIL", b"RCPT", b"DATA")]
        waits = [c.replies_before for c in commands]
        self.assertEqual(len(commands), 4)
        self.assertEqual(waits, sorted(set(waits)), "a command was sent before its turn")

    async def test_size_parameter(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        await send_whole(relay, outbound(declared_size=len(CONTENT)))
        self.assertIn(f"SIZE={len(CONTENT)}", upstream.messages[0].mail_params)

    async def test_no_size_parameter_when_not_offered(self):
        upstream = self.start_upstream(extensions=("PIPELINING", "8BITMIME"))
        relay = self.relay(upstream)
        await send_whole(relay, outbound())
        self.assertEqual(upstream.messages[0].mail_params, [])

    async def test_over_the_upstream_size_refused_before_mail(self):
        upstream = self.start_upstream(extensions=("PIPELINING", "SIZE 100"))
        relay = self.relay(upstream)
        content = CONTENT + b"x" * 200 + b"\r\n"
        error = await self.refused(relay, outbound(content, declared_size=len(content)))
        self.assertEqual((error.reply.code, error.reply.enhanced), (552, "5.3.4"))
        self.assertEqual(error.reason, REJECTED)
        self.assertNoTransaction(upstream)
        # Undeclared: found at the final dot, before any content goes.
        error = await self.refused(relay, outbound(content))
        self.assertEqual((error.reply.code, error.reply.enhanced), (552, "5.3.4"))
        self.assertNoContent(upstream)

    async def test_8bitmime(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        await send_whole(relay, outbound(body="8BITMIME"))
        self.assertIn("BODY=8BITMIME", upstream.messages[0].mail_params)

    async def test_8bit_message_to_a_7bit_upstream(self):
        upstream = self.start_upstream(extensions=("PIPELINING",))
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(CONTENT + "Grüße\r\n".encode(),
                                                   body="8BITMIME"))
        self.assertEqual((error.reply.code, error.reply.enhanced), (554, "5.6.3"))
        self.assertTrue(error.reply.is_permanent)
        self.assertNoContent(upstream)

    async def test_declared_8bitmime_with_7bit_content_to_a_7bit_upstream(self):
        # Clients declare BODY=8BITMIME for plain ASCII all the time: that must not bounce.
        upstream = self.start_upstream(extensions=("PIPELINING",))
        relay = self.relay(upstream)
        await send_whole(relay, outbound(body="8BITMIME"))
        self.assertEqual(upstream.messages[0].mail_params, [])
        self.assertEqual(upstream.messages[0].data, CONTENT)

    async def test_smtputf8(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        await send_whole(relay, outbound(mail_from="jösé@exämple.com", rcpts=("bøb@example.com",),
                                     smtputf8=True))
        [received] = upstream.messages
        self.assertIn("SMTPUTF8", received.mail_params)
        self.assertEqual(received.mail_from, "jösé@exämple.com")
        self.assertEqual(received.rcpts, ["bøb@example.com"])

    async def test_smtputf8_missing_is_permanent(self):
        upstream = self.start_upstream(extensions=("PIPELINING", "8BITMIME"))
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(smtputf8=True))
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.6.7"))
        self.assertTrue(error.reply.is_permanent)
        self.assertNoTransaction(upstream)
        # A UTF-8 address needs SMTPUTF8 even when the client forgot to say so.
        error = await self.refused(relay, outbound(rcpts=("bøb@example.com",)))
        self.assertEqual((error.reply.code, error.reply.enhanced), (553, "5.6.7"))

    async def test_requiretls_needs_upstream_support(self):
        upstream = self.start_upstream(tls=self.leaf)
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(requiretls=True))
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.7.30"))
        self.assertNoTransaction(upstream)

    async def test_requiretls_passed_on(self):
        upstream = self.start_upstream(tls=self.leaf,
                                       extensions=("PIPELINING", "REQUIRETLS"))
        relay = self.relay(upstream)
        await send_whole(relay, outbound(requiretls=True))
        self.assertIn("REQUIRETLS", upstream.messages[0].mail_params)

    async def test_helo_fallback(self):
        upstream = self.start_upstream(replies={"EHLO": "502 5.5.1 What is EHLO?"})
        relay = self.relay(upstream)
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].verbs()[:2], ["EHLO", "HELO"])
        self.assertEqual(upstream.messages[0].mail_params, [])  # no extensions, no SIZE

    async def test_close_refuses_new_deliveries(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        await relay.close()
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.2"))
        self.assertEqual(upstream.connection_count, 0)


class RejectionTests(RelayTestCase):
    """Upstream 4xx/5xx reach our client with the upstream's codes (reason REJECTED)."""

    async def test_rejected_recipient_pipelined_aborts_before_content(self):
        upstream = self.start_upstream(rcpt_replies={"bad@example.com": "550 5.1.1 No such user"})
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(rcpts=("good@example.com", "bad@example.com")))
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.1.1"))
        self.assertEqual(error.reason, REJECTED)
        self.assertEqual(error.command, "RCPT")
        self.assertIn("<bad@example.com>", error.reply.text)
        self.assertIn("No such user", error.reply.text)
        await relay.close()
        await upstream.whenIdle()
        # DATA was pipelined and got 354: the connection is dropped, no content, no dot.
        self.assertEqual(upstream.messages, [])
        self.assertNotIn(b"Hello, Bob.", upstream.raw)
        self.assertTrue(upstream.raw.endswith(b"DATA\r\n"))

    async def test_rejected_recipient_without_pipelining_never_sends_data(self):
        upstream = self.start_upstream(extensions=NO_PIPELINING,
                                       rcpt_replies={"bad@example.com": "550 5.1.1 No such user"})
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(rcpts=("bad@example.com", "good@example.com")))
        self.assertEqual(error.reply.code, 550)
        await relay.close()
        await upstream.whenIdle()
        verbs = upstream.sessions[0].verbs()
        self.assertNotIn("DATA", verbs)
        self.assertEqual(verbs[-1], "QUIT")
        self.assertEqual(verbs.count("RCPT"), 2)

    async def test_transient_recipient_rejection_wins(self):
        upstream = self.start_upstream(rcpt_replies={
            "a@example.com": "550 5.1.1 No such user",
            "b@example.com": "452 4.2.2 Mailbox full"})
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(rcpts=("a@example.com", "b@example.com")))
        self.assertEqual((error.reply.code, error.reply.enhanced), (452, "4.2.2"))
        self.assertIn("<b@example.com>", error.reply.text)

    async def test_mail_rejected(self):
        upstream = self.start_upstream(replies={"MAIL": "451 4.3.0 Try again later"})
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual(error.reply, Reply(451, "4.3.0", "upstream: Try again later"))
        self.assertEqual(error.reason, REJECTED)

    async def test_data_rejected(self):
        upstream = self.start_upstream(replies={"DATA": "552 5.3.4 Message too big"})
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (552, "5.3.4"))
        self.assertEqual(upstream.messages, [])

    async def test_end_of_data_rejected(self):
        upstream = self.start_upstream(eom_reply="451 4.7.1 Greylisted, come back later")
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual(error.reply,
                         Reply(451, "4.7.1", "upstream: Greylisted, come back later"))
        self.assertEqual(error.reason, REJECTED)
        self.assertEqual(error.upstream_reply.code, 451)

    async def test_reply_without_enhanced_code(self):
        upstream = self.start_upstream(rcpt_replies={"bob@example.com": "550 No such user"})
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (550, "5.0.0"))

    async def test_421_becomes_451(self):
        upstream = self.start_upstream(replies={"MAIL": "421 4.3.2 Shutting down"})
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.2"))

    async def test_quit_failure_after_acceptance_changes_nothing(self):
        for quit_reply in ("500 5.5.1 What?", CLOSE):
            upstream = self.start_upstream(replies={"QUIT": quit_reply})
            relay = self.relay(upstream)
            reply = await send_whole(relay, outbound())
            self.assertEqual(reply.code, 250)
            await relay.close()

    async def test_quit_stall_after_acceptance_changes_nothing(self):
        upstream = self.start_upstream(stall_at="QUIT")
        relay = self.relay(upstream, command_timeout=0.5)
        reply = await send_whole(relay, outbound())
        self.assertEqual(reply.code, 250)
        await relay.close()  # bounded by the command timeout


class ConnectionFailureTests(RelayTestCase):
    """docs/twisted-defects.md client #3: every failure fires the Deferred, with a 451, in time."""

    async def test_connection_refused(self):
        relay = self.relay(port=free_port())
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.1"))
        self.assertEqual(error.reason, UNAVAILABLE)
        self.assertLess(self.elapsed, 5)

    async def test_stall_at_greeting(self):
        upstream = self.start_upstream(stall_at=GREETING)
        relay = self.relay(upstream, command_timeout=0.5)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertEqual(error.command, "greeting")
        self.assertLess(self.elapsed, 3)

    async def test_stall_at_mail(self):
        upstream = self.start_upstream(stall_at="MAIL")
        relay = self.relay(upstream, command_timeout=0.5)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertLess(self.elapsed, 3)
        self.assertEqual(upstream.messages, [])

    async def test_stall_after_final_dot(self):
        upstream = self.start_upstream(stall_at=END_OF_DATA)
        relay = self.relay(upstream, command_timeout=0.5, data_timeout=1.0)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertIn("duplicate", error.reply.text)
        self.assertLess(self.elapsed, 4)

    async def test_connection_lost_during_data(self):
        # Larger than the loopback socket buffers, so we are still writing when it drops.
        upstream = self.start_upstream(close_after_data_bytes=1000)
        relay = self.relay(upstream)
        error = await self.refused(relay, outbound(CONTENT + (b"x" * 78 + b"\r\n") * 100_000))
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertEqual(error.reason, UNAVAILABLE)
        self.assertNotIn("duplicate", error.reply.text)

    async def test_connection_lost_after_final_dot(self):
        upstream = self.start_upstream(eom_reply=CLOSE)
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertIn("duplicate", error.reply.text)
        self.assertEqual(len(upstream.messages), 1)  # it did arrive: duplicate, never loss

    async def test_greeting_not_220(self):
        upstream = self.start_upstream(greeting="554 5.3.2 No service for you")
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual(error.reply.code, 451)
        self.assertTrue(error.reply.enhanced.startswith("4.4."))
        self.assertEqual(error.upstream_reply.code, 554)

    async def test_tcp_nodelay_on_relay_connections(self):
        for implicit in (False, True):
            upstream = self.start_upstream(tls=self.leaf, implicit_tls=implicit)
            relay = self.relay(upstream, implicit_tls=implicit)
            lease = await relay.upstreams[0].lease()
            protocol = lease.session.protocol
            tcp = protocol.transport.transport if implicit else protocol.transport
            sock = tcp.socket  # after STARTTLS, getHandle() is the TLS connection
            self.assertIsInstance(sock, socket.socket)
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            lease.release(reusable=True)


class TLSTests(RelayTestCase):

    async def test_opportunistic_starttls_used_when_offered(self):
        upstream = self.start_upstream(tls=self.leaf)
        relay = self.relay(upstream)
        await send_whole(relay, outbound())
        [received] = upstream.messages
        self.assertTrue(received.tls)
        self.assertEqual(upstream.cleartext, b"EHLO relay.test\r\nSTARTTLS\r\n")
        self.assertEqual(upstream.sessions[0].plaintext_after_starttls, b"")

    async def test_opportunistic_without_starttls_is_cleartext(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream)
        await send_whole(relay, outbound())
        self.assertFalse(upstream.messages[0].tls)

    async def test_required_starttls_absent(self):
        upstream = self.start_upstream()
        relay = self.relay(upstream, starttls="required")
        error = await self.refused(relay)
        self.assertEqual(error.reply.code, 451)
        self.assertTrue(error.reply.is_transient)
        self.assertNoTransaction(upstream)

    async def test_starttls_none_ignores_the_offer(self):
        upstream = self.start_upstream(tls=self.leaf)
        relay = self.relay(upstream, starttls="none")
        await send_whole(relay, outbound())
        self.assertFalse(upstream.messages[0].tls)
        self.assertNotIn(b"STARTTLS", upstream.raw)

    async def test_opportunistic_handshake_failure_never_continues_in_cleartext(self):
        wrong = self.ca.issue("other.test", filename="other")
        upstream = self.start_upstream(tls=wrong)
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertEqual(error.reason, UNAVAILABLE)
        await relay.close()
        await upstream.whenIdle()
        self.assertEqual(upstream.connection_count, 1)
        self.assertEqual(upstream.sessions[0].verbs(), ["EHLO", "STARTTLS"])
        self.assertNoTransaction(upstream)

    async def test_starttls_refused_is_transient(self):
        upstream = self.start_upstream(tls=self.leaf, replies={"STARTTLS": "454 4.7.0 No TLS now"})
        relay = self.relay(upstream)
        error = await self.refused(relay)
        self.assertEqual(error.reply.code, 451)
        self.assertNoTransaction(upstream)

    async def test_implicit_tls(self):
        upstream = self.start_upstream(tls=self.leaf, implicit_tls=True)
        relay = self.relay(upstream, implicit_tls=True)
        await send_whole(relay, outbound())
        self.assertTrue(upstream.messages[0].tls)
        self.assertEqual(upstream.cleartext, b"")
        self.assertNotIn(b"STARTTLS", upstream.raw)

    async def test_wrong_certificate_name(self):
        wrong = self.ca.issue("other.test", filename="other")
        for implicit in (False, True):
            upstream = self.start_upstream(tls=wrong, implicit_tls=implicit)
            error = await self.refused(self.relay(upstream, implicit_tls=implicit))
            self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
            self.assertNoTransaction(upstream)

    async def test_skip_verify_accepts_a_wrong_name(self):
        wrong = self.ca.issue("other.test", filename="other")
        for implicit in (False, True):
            upstream = self.start_upstream(tls=wrong, implicit_tls=implicit)
            relay = self.relay(upstream, implicit_tls=implicit, skip_verify=True, ca_cert=None)
            self.assertIn("NOT verified", relay.description)
            reply = await send_whole(relay, outbound())
            self.assertEqual(reply.code, 250)
            self.assertTrue(upstream.messages[0].tls)

    async def test_platform_trust_by_default(self):
        # Our test CA is in no platform store: verification is on by default.
        upstream = self.start_upstream(tls=self.leaf, implicit_tls=True)
        error = await self.refused(self.relay(upstream, implicit_tls=True, ca_cert=None))
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))

    async def test_ca_bundle_with_several_certificates(self):
        other = CertificateAuthority(self.mktemp(), name="unrelated CA")
        bundle = os.path.join(self.mktemp())
        with open(bundle, "wb") as f:
            f.write(other.cert_pem + self.ca.cert_pem)
        upstream = self.start_upstream(tls=self.leaf)
        reply = await send_whole(self.relay(upstream, ca_cert=bundle), outbound())
        self.assertEqual(reply.code, 250)

    async def test_client_certificate_presented(self):
        upstream = self.start_upstream(tls=self.leaf, client_ca=self.ca.cert_path)
        relay = self.relay(upstream, client_cert=self.client_leaf.cert_path,
                           client_key=self.client_leaf.key_path)
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].client_certificate, "relay-client.test")
        self.assertEqual(len(upstream.messages), 1)

    async def test_client_certificate_required_but_missing(self):
        upstream = self.start_upstream(tls=self.leaf, implicit_tls=True,
                                       client_ca=self.ca.cert_path)
        error = await self.refused(self.relay(upstream, implicit_tls=True))
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.4.2"))
        self.assertNoTransaction(upstream)


class AuthTests(RelayTestCase):

    def auth_upstream(self, mechanisms=("PLAIN", "LOGIN"), tls=True, **kwargs):
        return self.start_upstream(tls=self.leaf if tls else None, auth=mechanisms,
                                   credentials=("relayuser", "s3cret:pass"), **kwargs)

    async def test_auth_plain_preferred(self):
        upstream = self.auth_upstream()
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        await send_whole(relay, outbound())
        session = upstream.sessions[0]
        self.assertEqual((session.auth_mechanism, session.auth_user, session.auth_tls),
                         ("PLAIN", "relayuser", True))
        self.assertEqual(len(upstream.messages), 1)

    async def test_auth_login(self):
        upstream = self.auth_upstream(mechanisms=("LOGIN",))
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].auth_mechanism, "LOGIN")
        self.assertEqual(upstream.sessions[0].auth_user, "relayuser")

    async def test_auth_failure_is_transient(self):
        upstream = self.auth_upstream()
        relay = self.relay(upstream, username="relayuser", password="wrong")
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.0"))
        self.assertEqual(error.reason, UNAVAILABLE)
        self.assertEqual(error.upstream_reply.code, 535)
        self.assertNoTransaction(upstream)

    async def test_no_credentials_in_cleartext(self):
        upstream = self.auth_upstream(tls=False)
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.0"))
        self.assertIn("cleartext", error.detail)
        self.assertNotIn(b"AUTH", upstream.raw)
        self.assertNotIn(b"s3cret", upstream.raw)
        self.assertNoTransaction(upstream)

    async def test_cleartext_auth_when_allowed(self):
        upstream = self.auth_upstream(tls=False)
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass",
                           allow_insecure_auth=True)
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].auth_tls, False)
        self.assertEqual(upstream.sessions[0].auth_user, "relayuser")

    async def test_auth_not_offered(self):
        upstream = self.auth_upstream(mechanisms=())
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        error = await self.refused(relay)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.0"))

    async def test_auth_over_implicit_tls(self):
        upstream = self.auth_upstream(implicit_tls=True, auth_requires_tls=True)
        relay = self.relay(upstream, implicit_tls=True, username="relayuser",
                           password="s3cret:pass")
        await send_whole(relay, outbound())
        self.assertEqual(upstream.sessions[0].auth_tls, True)
        self.assertEqual(upstream.cleartext, b"")

    async def test_auth_only_after_starttls(self):
        upstream = self.auth_upstream(auth_requires_tls=True)
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        await send_whole(relay, outbound())
        self.assertNotIn(b"AUTH", upstream.cleartext)
        self.assertEqual(upstream.sessions[0].auth_tls, True)

    async def test_password_never_logged(self):
        events = observe_logs(self)
        upstream = self.auth_upstream()
        relay = self.relay(upstream, username="relayuser", password="s3cret:pass")
        await send_whole(relay, outbound())
        bad = self.relay(upstream, username="relayuser", password="s3cret:wrong")
        await self.refused(bad)
        plain = base64.b64encode(b"\0relayuser\0s3cret:pass")
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("relay attempt failed", text)
        self.assertIn("upstream refused our AUTH", text)
        for secret in ("s3cret", plain.decode(), base64.b64encode(b"s3cret:pass").decode()):
            self.assertNotIn(secret, text)
        self.assertNotIn("s3cret", repr(relay.settings))
        self.assertIn("<redacted>", repr(relay.settings))


class SettingsTests(unittest.TestCase):
    timeout = 20

    def test_defaults_and_types(self):
        settings = UpstreamSettings("smtp.example.com", command_timeout=5)
        self.assertEqual(settings.port, 25)
        self.assertEqual(settings.starttls, "opportunistic")
        self.assertIsInstance(settings.command_timeout, float)
        self.assertEqual(settings.tls_server_name, "smtp.example.com")
        self.assertEqual(UpstreamSettings("h", server_name="n").tls_server_name, "n")

    def test_invalid(self):
        self.assertRaises(ValueError, UpstreamSettings, "h", starttls="sometimes")
        self.assertRaises(ValueError, UpstreamSettings, "h", client_cert="c.pem")
        self.assertRaises(ValueError, UpstreamSettings, "h", port=0)
        self.assertRaises(ValueError, UpstreamSettings, "h", data_timeout=0)

    def test_password_redacted(self):
        settings = UpstreamSettings("h", username="u", password="hunter2")
        self.assertNotIn("hunter2", repr(settings))
        self.assertNotIn("hunter2", str(settings))
        self.assertTrue(settings.authenticates)
        self.assertFalse(UpstreamSettings("h", username="u").authenticates)
