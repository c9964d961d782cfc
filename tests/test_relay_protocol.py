"""The upstream client's wire protocol: replies, pipelining, timeouts, transparency, streaming.

Regression tests for docs/twisted-defects.md's client defects live here (dot-stuffing #1, doubled CR
#2, Deferreds that never fire #3, Nagle #5); the delivery policy is in
test_relay_upstream.
"""

from __future__ import annotations

import re
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from esmtpfa.common.message import READ_CHUNK, OutboundMessage
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import Kind, Phase, RelayError
from esmtpfa.relay.protocol import (
    MAX_REPLY_LINE,
    DotStuffer,
    Extensions,
    SMTPClientFactory,
    SMTPClientProtocol,
)
from tests.support.builders import outbound
from tests.support.upstream import RecordingUpstream


def reference_stuffing(content: bytes) -> bytes:
    """RFC 5321 §4.5.2 done the obvious way, line by line, for comparison."""
    if not content:
        return b".\r\n"
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    lines = content[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def stuff(*chunks: bytes) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


class DotStufferTests(unittest.TestCase):
    """RFC 5321 §4.5.2 transparency, chunk by chunk (docs/twisted-defects.md client #1, #2)."""

    timeout = 20

    def test_first_line_starting_with_a_dot_is_stuffed(self):
        self.assertEqual(stuff(b".hidden\r\nbody\r\n"), b"..hidden\r\nbody\r\n.\r\n")

    def test_lone_dot_line_cannot_end_the_data(self):
        content = b"a\r\n.\r\nMAIL FROM:<evil@x>\r\n"
        self.assertEqual(stuff(content), b"a\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n")

    def test_every_split_point_matches_the_reference(self):
        # A dot line can start anywhere relative to a read boundary: try them all.
        content = b".a\r\n..b\r\nc.d\r\n.\r\n\r\n.\r\nend.\r\n."
        expected = reference_stuffing(content)
        for i in range(len(content) + 1):
            for j in range(i, len(content) + 1):
                self.assertEqual(stuff(content[:i], content[i:j], content[j:]), expected,
                                 f"split at {i}, {j}")

    def test_crlf_is_never_doubled(self):
        content = b"line one\r\nline two\r\n\r\n"
        out = stuff(content[:9], content[9:10], content[10:])  # split inside the CRLF
        self.assertEqual(out, content + b".\r\n")
        self.assertNotIn(b"\r\r", out)

    def test_unterminated_last_line_gets_crlf_before_the_dot(self):
        self.assertEqual(stuff(b"no newline"), b"no newline\r\n.\r\n")
        self.assertEqual(stuff(b"x\r\n.tail"), b"x\r\n..tail\r\n.\r\n")

    def test_empty_content(self):
        self.assertEqual(stuff(), b".\r\n")
        self.assertEqual(stuff(b""), b".\r\n")

    def test_bare_lf_and_cr_are_normalized_never_forwarded(self):
        # Content should never carry them; if it does, no smuggling sequence survives.
        out = stuff(b"a\n.\nMAIL FROM:<evil@x>\n", b"b\r.\rc\r")
        self.assertEqual(out, b"a\r\n..\r\nMAIL FROM:<evil@x>\r\nb\r\n..\r\nc\r\n.\r\n")
        self.assertIsNone(re.search(rb"[^\r]\n|\r[^\n]", out))

    def test_cr_at_chunk_end_followed_by_lf(self):
        self.assertEqual(stuff(b"a\r", b"\n.b\r", b"\n"), b"a\r\n..b\r\n.\r\n")


class ReplyParsingTests(unittest.TestCase):
    """Replies against a StringTransport and a Clock: exact, no network."""

    timeout = 20

    def setUp(self):
        self.clock = Clock()
        self.protocol = SMTPClientProtocol(self.clock, command_timeout=10, data_timeout=60)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def lose(self):
        self.protocol.connectionLost(Failure(ConnectionDone("closed")))

    def failed(self, d: Deferred, kind: str, phase: str = Phase.BEFORE_DOT) -> RelayError:
        """``d`` failed with a ``RelayError`` of this kind and phase, stated by the
        protocol itself (no translation above it)."""
        error = self.failureResultOf(d, RelayError).value
        self.assertEqual((error.kind, error.phase), (kind, phase))
        self.assertEqual(error.reply.code, 451)
        return error

    def lost(self, d: Deferred, phase: str = Phase.BEFORE_DOT) -> RelayError:
        error = self.failed(d, Kind.UNAVAILABLE, phase)
        self.assertIn("connection lost", error.detail)
        return error

    def timed_out(self, d: Deferred, phase: str = Phase.BEFORE_DOT) -> RelayError:
        error = self.failed(d, Kind.UNAVAILABLE, phase)
        self.assertRegex(error.detail, "no reply to|stopped reading")
        return error

    def test_greeting_and_multiline_reply(self):
        greeting = self.protocol.greeting()
        self.protocol.dataReceived(b"220 upstream ESMTP\r\n")
        self.assertEqual(self.successResultOf(greeting).code, 220)
        d = self.protocol.ehlo("client.test")
        self.assertEqual(self.transport.value(), b"EHLO client.test\r\n")
        self.protocol.dataReceived(b"250-upstream hi\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
                                   b"250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
        extensions = self.successResultOf(d)
        self.assertTrue(extensions.pipelining)
        self.assertEqual(extensions.size, 1000)
        self.assertEqual(extensions.auth_mechanisms, {"PLAIN", "LOGIN"})
        self.assertTrue(extensions.eightbitmime)
        self.assertFalse(extensions.smtputf8)

    def test_reply_split_across_packets(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.command(b"NOOP")
        for byte in b"250-first\r\n250 second\r\n":
            self.assertNoResult(d)
            self.protocol.dataReceived(bytes([byte]))
        self.assertEqual(self.successResultOf(d).text, "first\nsecond")

    def test_enhanced_code_default(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.command(b"RCPT TO:<x@y>")
        self.protocol.dataReceived(b"550 No such user\r\n")
        self.assertEqual(self.successResultOf(d), Reply(550, "5.0.0", "No such user"))

    def test_pipelined_replies_in_order(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        self.transport.clear()
        d = self.protocol.pipelineAll([b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"],
                                      ["MAIL", "RCPT", "DATA"])
        self.assertEqual(self.transport.value(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        self.protocol.dataReceived(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n")
        self.assertNoResult(d)  # the group fires with its last reply
        self.protocol.dataReceived(b"354 go\r\n")
        self.assertEqual([reply.code for reply in self.successResultOf(d)], [250, 550, 354])

    def test_helo_fallback(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.ehlo("client.test")
        self.protocol.dataReceived(b"502 5.5.1 no ESMTP here\r\n")
        self.assertIn(b"HELO client.test\r\n", self.transport.value())
        self.protocol.dataReceived(b"250 upstream\r\n")
        self.assertEqual(self.successResultOf(d), Extensions.none())

    def test_ehlo_transient_failure_is_not_a_helo_fallback(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.ehlo("client.test")
        self.protocol.dataReceived(b"421 4.3.2 shutting down\r\n")
        error = self.failed(d, Kind.UNAVAILABLE)
        self.assertEqual((error.command, error.upstream_reply.code), ("EHLO", 421))
        self.assertNotIn(b"HELO", self.transport.value())

    def assertViolation(self, data: bytes):
        d = self.protocol.greeting()
        self.protocol.dataReceived(data)
        self.failed(d, Kind.PROTOCOL)
        self.assertTrue(self.transport.disconnected, "connection not aborted")
        # Later commands fail at once instead of waiting forever.
        self.failed(self.protocol.command(b"NOOP"), Kind.PROTOCOL)

    def test_garbage_reply(self):
        self.assertViolation(b"HTTP/1.1 400 Bad Request\r\n")

    def test_code_change_inside_multiline_reply(self):
        self.assertViolation(b"220-hello\r\n250 world\r\n")

    def test_overlong_reply_line(self):
        self.assertViolation(b"220 " + b"x" * MAX_REPLY_LINE)

    def test_unsolicited_reply(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        self.protocol.dataReceived(b"421 4.3.2 going away\r\n")
        self.assertTrue(self.transport.disconnected)
        self.failed(self.protocol.command(b"NOOP"), Kind.PROTOCOL)

    def test_command_injection_refused(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        self.assertRaises(ValueError, self.protocol.command, b"RCPT TO:<a@b>\r\nDATA")
        self.assertRaises(ValueError, self.protocol.command, b"MAIL FROM:<a\nb>")

    def test_connection_loss_fails_every_pending_command(self):
        # docs/twisted-defects.md client #3: nothing may wait forever.
        self.protocol.dataReceived(b"220 ok\r\n")
        group = self.protocol.pipelineAll([b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"],
                                          ["MAIL", "RCPT", "DATA"])
        single = self.protocol.command(b"NOOP")
        self.lose()
        for d in (group, single):
            self.lost(d)
        self.lost(self.protocol.command(b"NOOP"))

    def test_connection_loss_before_greeting(self):
        d = self.protocol.greeting()
        self.lose()
        self.assertEqual(self.lost(d).command, "greeting")

    def test_command_timeout(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.command(b"MAIL FROM:<a@b>")
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.timed_out(d).command, "MAIL")
        self.assertTrue(self.transport.disconnected)

    def test_greeting_timeout(self):
        d = self.protocol.greeting()
        self.clock.advance(10.1)
        self.timed_out(d)

    def test_each_pipelined_reply_gets_its_own_timeout(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        first = self.protocol.command(b"NOOP")
        second = self.protocol.pipelineAll([b"NOOP", b"NOOP"], ["NOOP", "NOOP"])
        self.clock.advance(8)
        self.protocol.dataReceived(b"250 ok\r\n")
        self.successResultOf(first)
        self.clock.advance(8)
        self.protocol.dataReceived(b"250 ok\r\n")  # 16 s since sending, 8 s since the last
        self.clock.advance(8)
        self.assertNoResult(second)
        self.clock.advance(3)
        self.timed_out(second)

    def start_data(self, content: bytes) -> Deferred:
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.command(b"DATA")
        self.protocol.dataReceived(b"354 go\r\n")
        self.successResultOf(d)
        self.transport.clear()
        return self.protocol.sendData(outbound(content).chunks())

    def test_no_command_while_the_upstream_awaits_content(self):
        # After a 354 any line is message content: RSET or QUIT would become part of a
        # message, and a later CRLF.CRLF would deliver it.  Nothing but content or a drop.
        self.protocol.dataReceived(b"220 ok\r\n")
        data = self.protocol.command(b"DATA")
        self.protocol.dataReceived(b"354 go\r\n")
        self.successResultOf(data)
        self.transport.clear()
        self.assertFalse(self.protocol.usable)
        for send in (lambda: self.protocol.command(b"RSET"),
                     lambda: self.protocol.pipelineAll([b"RSET"], ["RSET"])):
            self.assertRaises(RuntimeError, send)
        self.protocol.quit()
        self.assertEqual(self.transport.value(), b"")  # no QUIT, no dot: dropped
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def pump(self):
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def test_data_timeout_is_longer_than_command_timeout(self):
        final = self.start_data(b"Subject: x\r\n\r\nhello\r\n")
        self.pump()
        self.assertEqual(self.transport.value(), b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.clock.advance(30)  # past the command timeout, within the DATA timeout
        self.assertNoResult(final)
        self.clock.advance(31)
        self.timed_out(final, Phase.OUTCOME_UNKNOWN)

    def test_stalled_reader_times_out_while_streaming(self):
        final = self.start_data(b"x" * (3 * READ_CHUNK))
        self.transport.producer.resumeProducing()  # one chunk, then the peer stops reading
        self.clock.advance(59)
        self.assertNoResult(final)
        self.transport.producer.resumeProducing()  # progress restarts the timer
        self.clock.advance(59)
        self.assertNoResult(final)
        self.clock.advance(2)
        self.timed_out(final)
        self.assertTrue(self.transport.disconnected)

    def test_connection_lost_after_final_dot_says_duplicate_possible(self):
        final = self.start_data(b"hello\r\n")
        self.pump()
        self.lose()
        error = self.lost(final, Phase.OUTCOME_UNKNOWN)
        self.assertIn("may have accepted", error.detail)
        self.assertIn("a duplicate is possible", error.reply.text)

    def test_connection_lost_while_streaming(self):
        final = self.start_data(b"x" * (3 * READ_CHUNK))
        self.transport.producer.resumeProducing()
        self.lose()
        self.lost(final)

    def test_early_reply_during_data_stops_streaming(self):
        final = self.start_data(b"x" * (3 * READ_CHUNK))
        self.transport.producer.resumeProducing()
        self.protocol.dataReceived(b"552 5.3.4 too big\r\n")
        self.assertEqual(self.successResultOf(final).code, 552)
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.transport.disconnected)
        self.assertNotIn(b"\r\n.\r\n", self.transport.value())

    def test_starttls_reply_followed_by_injected_data(self):
        # Bytes that arrive with the 220 came in cleartext; they must not be taken as
        # replies received over TLS.
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.starttls(object())
        self.protocol.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        self.failed(d, Kind.PROTOCOL)
        self.assertTrue(self.transport.disconnected)

    def test_auth_login_exchange(self):
        self.protocol.dataReceived(b"220 ok\r\n")
        d = self.protocol.authenticate("LOGIN", "user", "secret")
        self.assertEqual(self.transport.value(), b"AUTH LOGIN\r\n")
        self.protocol.dataReceived(b"334 VXNlcm5hbWU6\r\n")
        self.protocol.dataReceived(b"334 UGFzc3dvcmQ6\r\n")
        self.protocol.dataReceived(b"235 2.7.0 ok\r\n")
        self.assertEqual(self.successResultOf(d).code, 235)
        self.assertEqual(self.transport.value(),
                         b"AUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\n")


class RecordingUpstreamMixin:
    timeout = 20

    def start_upstream(self, **kwargs) -> RecordingUpstream:
        upstream = RecordingUpstream(**kwargs).start()
        self.addCleanup(upstream.stop)
        return upstream

    async def connect(self, upstream: RecordingUpstream) -> SMTPClientProtocol:
        factory = SMTPClientFactory(reactor, command_timeout=5, data_timeout=10)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", upstream.port)
        protocol = await endpoint.connect(factory)
        self.addCleanup(protocol.quit)
        return protocol

    async def transaction(self, protocol: SMTPClientProtocol, message: OutboundMessage) -> Reply:
        await protocol.greeting()
        await protocol.ehlo("client.test")
        replies = [await protocol.command(f"MAIL FROM:<{message.envelope.mail_from}>".encode()),
                   await protocol.command(b"RCPT TO:<bob@example.com>"),
                   await protocol.command(b"DATA")]
        self.assertEqual([r.code for r in replies], [250, 250, 354])
        return await protocol.sendData(message.chunks())


class WireTests(RecordingUpstreamMixin, unittest.TestCase):
    """Against the real recording upstream on loopback."""

    async def test_tcp_nodelay_is_set(self):
        # docs/twisted-defects.md client #5: Nagle doubles the per-message latency.
        upstream = self.start_upstream()
        protocol = await self.connect(upstream)
        sock = protocol.transport.getHandle()
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def test_dot_lines_around_every_chunk_boundary(self):
        # Dot lines starting at each offset from 64 KiB - 4 to 64 KiB + 4, and at the
        # second boundary, where a per-read stuffer (docs/twisted-defects.md client #1) goes wrong.
        upstream = self.start_upstream()
        protocol = await self.connect(upstream)
        content = bytearray(b"Subject: boundaries\r\n\r\n")
        for boundary in (READ_CHUNK, 2 * READ_CHUNK):
            for offset in range(-4, 5):
                target = boundary + offset
                filler = target - len(content) - 2
                if filler < 0:
                    continue
                content += b"f" * filler + b"\r\n" + b".dot\r\n"
        content += b".\r\n..\r\nlast\r\n"
        content = bytes(content)
        reply = await self.transaction(protocol, outbound(content))
        self.assertEqual(reply.code, 250)
        [received] = upstream.messages
        self.assertEqual(received.data, content)
        self.assertEqual(received.data_raw, reference_stuffing(content))

    async def test_smuggled_transaction_arrives_as_content(self):
        # docs/twisted-defects.md client #1: a message that contains an end-of-data line and a new
        # transaction must not become two transactions upstream.
        upstream = self.start_upstream()
        protocol = await self.connect(upstream)
        content = (b".Subject: first line starts with a dot\r\n\r\nhello\r\n.\r\n"
                   b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nspoofed\r\n.\r\n")
        await self.transaction(protocol, outbound(content))
        await protocol.quit()
        await upstream.whenIdle()
        [received] = upstream.messages
        self.assertEqual(received.data, content)
        self.assertEqual(upstream.sessions[0].verbs().count("MAIL"), 1)
        self.assertNotIn(b"MAIL FROM:<evil@x>", upstream.sessions[0].lines())

    async def test_smuggling_toward_a_lax_upstream(self):
        # Even an upstream that ends data at <LF>.<LF> never sees one from us.
        upstream = self.start_upstream(lax_end_of_data=True)
        protocol = await self.connect(upstream)
        content = b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n.\r\n"
        await self.transaction(protocol, outbound(content))
        [received] = upstream.messages
        self.assertEqual(received.data,
                         b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n")

    async def test_crlf_not_doubled_on_the_wire(self):
        upstream = self.start_upstream()
        protocol = await self.connect(upstream)
        content = b"Subject: crlf\r\n\r\n" + b"line\r\n" * 20000
        await self.transaction(protocol, outbound(content))
        [received] = upstream.messages
        self.assertEqual(received.data_raw, content + b".\r\n")
        self.assertNotIn(b"\r\r", upstream.raw)

    async def test_large_message_streams_with_bounded_memory(self):
        # 20 MB through a paused upstream: the client must stop pulling from the spool
        # (backpressure) and keep at most about one chunk in its own buffer.
        paused: list = []
        upstream = self.start_upstream(
            on_data=lambda p: (p.transport.pauseProducing(), paused.append(p)))
        protocol = await self.connect(upstream)
        line = b"0123456789" * 7 + b"abcdef\r\n"
        content = b"Subject: big\r\n\r\n" + line * (20_000_000 // len(line))
        message = outbound(content)
        self.assertTrue(message.spool.on_disk)
        pulled = []
        peak_buffer = []

        def counting(chunks):
            for chunk in chunks:
                pulled.append(len(chunk))
                transport = protocol.transport
                buffered = (len(getattr(transport, "dataBuffer", b""))
                            - getattr(transport, "offset", 0)
                            + getattr(transport, "_tempDataLen", 0))
                peak_buffer.append(buffered)
                yield chunk

        await protocol.greeting()
        await protocol.ehlo("client.test")
        await protocol.command(b"MAIL FROM:<a@b>")
        await protocol.command(b"RCPT TO:<bob@example.com>")
        await protocol.command(b"DATA")
        final = protocol.sendData(counting(message.chunks()))
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(paused), 1)
        stalled_at = sum(pulled)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(sum(pulled), stalled_at, "client kept reading while upstream was paused")
        self.assertLess(stalled_at, len(content) // 2)
        self.assertLessEqual(max(peak_buffer), 2 * READ_CHUNK + 1024)
        paused[0].transport.resumeProducing()
        reply = await final
        self.assertEqual(reply.code, 250)
        [received] = upstream.messages
        self.assertEqual(len(received.data), len(content))
        self.assertEqual(received.data, content)
        self.assertLessEqual(max(peak_buffer), 2 * READ_CHUNK + 1024)
