"""-relay-from: envelope sender and From rewritten, author kept in Reply-To, body untouched."""

from __future__ import annotations

import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from esmtpfa.common.message import OutboundMessage
from esmtpfa.relay.interfaces import REJECTED, RelayError
from esmtpfa.relay.maildir import MaildirRelay
from esmtpfa.relay.rewrite import HEADER_LIMIT, RelayFromRewriter, display_name, unfold
from tests.support.builders import outbound
from tests.support.relaying import CapturingRelay, send_whole
from tests.support.resources import resources

RELAY_FROM = "relay@smarthost.example"
BODY = b"\r\nHello.\r\nFrom: a line in the body, not a header\r\n\xff\xfe binary-ish\r\n"


def wire(message: OutboundMessage) -> bytes:
    return b"".join(message.chunks())


class RewriteTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.inner = CapturingRelay()
        self.rewriter = RelayFromRewriter(self.inner, RELAY_FROM, resources=resources())

    def rewrite(self, content: bytes, **kwargs) -> OutboundMessage:
        reply = self.successResultOf(Deferred.fromCoroutine(
            send_whole(self.rewriter, outbound(content, **kwargs))))
        self.assertEqual(reply.code, 250)
        return self.inner.messages[-1]

    def headers_and_body(self, message: OutboundMessage) -> tuple[bytes, bytes]:
        data = wire(message)
        head, _, body = data.partition(b"\r\n\r\n")
        return head + b"\r\n", b"\r\n" + body

    def test_quoted_display_name_kept(self):
        message = self.rewrite(b'From: "Doe, Alice" <alice@client.example>\r\n'
                               b"Subject: hi\r\n" + BODY)
        self.assertEqual(wire(message),
                         b'From: "Doe, Alice" <relay@smarthost.example>\r\n'
                         b'Reply-To: "Doe, Alice" <alice@client.example>\r\n'
                         b"Subject: hi\r\n" + BODY)
        self.assertEqual(message.envelope.mail_from, RELAY_FROM)
        self.assertEqual(message.envelope.recipients, ("bob@example.com",))

    def test_unquoted_display_name_kept(self):
        message = self.rewrite(b"Subject: hi\r\nFrom: Alice Example <alice@client.example>\r\n"
                               + BODY)
        self.assertEqual(wire(message),
                         b"Subject: hi\r\n"
                         b"From: Alice Example <relay@smarthost.example>\r\n"
                         b"Reply-To: Alice Example <alice@client.example>\r\n" + BODY)

    def test_without_display_name(self):
        message = self.rewrite(b"From: alice@client.example\r\n" + BODY)
        self.assertEqual(wire(message), b"From: relay@smarthost.example\r\n"
                                        b"Reply-To: alice@client.example\r\n" + BODY)

    def test_folded_from(self):
        message = self.rewrite(b"from:  Alice\r\n\tExample\r\n  <alice@client.example>\r\n"
                               b"Subject: hi\r\n" + BODY)
        head, body = self.headers_and_body(message)
        self.assertEqual(body, BODY)
        self.assertIn(b"From: Alice Example <relay@smarthost.example>\r\n", head)
        # Reply-To carries the original value verbatim, folding included (still valid).
        self.assertIn(b"Reply-To:  Alice\r\n\tExample\r\n  <alice@client.example>\r\n", head)
        self.assertNotIn(b"from:", head)

    def test_encoded_word_name_kept_verbatim(self):
        name = b"=?UTF-8?B?w4lsb8Ovc2U=?="
        message = self.rewrite(b"From: " + name + b" <e@client.example>\r\n" + BODY)
        self.assertIn(b"From: " + name + b" <relay@smarthost.example>\r\n", wire(message))

    def test_long_display_name_is_folded(self):
        name = b'"' + b" ".join([b"Verylongname"] * 20) + b'"'
        message = self.rewrite(b"From: " + name + b" <a@client.example>\r\n" + BODY)
        head, body = self.headers_and_body(message)
        self.assertEqual(body, BODY)
        from_field = head[:head.index(b"\r\nReply-To:") + 2]
        self.assertTrue(all(len(line) <= 78 for line in from_field.split(b"\r\n")))
        self.assertEqual(unfold(from_field), b"From: " + name + b" <relay@smarthost.example>\r\n")

    def test_existing_reply_to_kept(self):
        content = (b"From: Alice <alice@client.example>\r\n"
                   b"Reply-To: list@client.example\r\n" + BODY)
        message = self.rewrite(content)
        self.assertEqual(wire(message), b"From: Alice <relay@smarthost.example>\r\n"
                                        b"Reply-To: list@client.example\r\n" + BODY)

    def test_message_without_from_gets_one(self):
        message = self.rewrite(b"Subject: no from\r\n" + BODY)
        self.assertEqual(wire(message),
                         b"Subject: no from\r\nFrom: relay@smarthost.example\r\n" + BODY)

    def test_duplicate_from_fields_collapse_to_one(self):
        message = self.rewrite(b"From: a@client.example\r\nSubject: x\r\n"
                               b"From: b@client.example\r\n" + BODY)
        head, _ = self.headers_and_body(message)
        from_lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"from:")]
        self.assertEqual(from_lines, [b"From: relay@smarthost.example"])
        self.assertNotIn(b"b@client.example", head)

    async def test_body_untouched_byte_for_byte(self):
        body = BODY + (b".dots\r\n" + bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"")
                       + b"\r\n") * 3000
        original = b"From: Alice <alice@client.example>\r\nSubject: big\r\n" + body
        # Large enough to be rewritten in a thread.
        await send_whole(self.rewriter, outbound(original))
        message = self.inner.messages[-1]
        self.assertTrue(wire(message).endswith(body))
        # The body is read from the spool, not copied into the prefix.
        self.assertEqual(message.content_offset, original.index(b"\r\n\r\n") + 2)
        self.assertLess(len(message.prefix), 200)

    async def test_a_large_header_is_rewritten_in_the_bundles_threads(self):
        """Not in the global reactor's pool: in the threads the bundle lends."""
        threads = ThreadPool(minthreads=0, maxthreads=1, name="lent-to-the-rewriter")
        threads.start()
        self.addCleanup(threads.stop)
        rewriter = RelayFromRewriter(self.inner, RELAY_FROM,
                                     resources=resources(threads=threads))
        ran_in: list[str] = []
        rewrite = rewriter.rewrite

        def recorded(message):
            ran_in.append(threading.current_thread().name)
            return rewrite(message)
        rewriter.rewrite = recorded
        small = b"From: Alice <alice@client.example>\r\n" + BODY
        await send_whole(rewriter, outbound(small))
        big = small + b"x" * 300_000 + b"\r\n"
        await send_whole(rewriter, outbound(big))
        self.assertEqual(len(ran_in), 2)
        self.assertNotIn("lent-to-the-rewriter", ran_in[0])  # a small one inline
        self.assertIn("lent-to-the-rewriter", ran_in[1])

    def test_esmtpfa_prefix_stays_on_top(self):
        received = b"Received: from client by esmtpfa; id urn:uuid:1\r\n"
        message = self.rewrite(b"From: alice@client.example\r\n" + BODY, prefix=received)
        self.assertTrue(wire(message).startswith(received + b"From: relay@smarthost.example"))

    def test_existing_content_offset(self):
        junk = b"JUNK BEFORE THE CONTENT"
        message = self.rewrite(junk + b"From: alice@client.example\r\n" + BODY,
                               offset=len(junk))
        self.assertEqual(wire(message), b"From: relay@smarthost.example\r\n"
                                        b"Reply-To: alice@client.example\r\n" + BODY)

    def test_headers_only_message(self):
        message = self.rewrite(b"From: alice@client.example\r\nSubject: x\r\n")
        self.assertEqual(wire(message), b"From: relay@smarthost.example\r\n"
                                        b"Reply-To: alice@client.example\r\nSubject: x\r\n")

    def test_body_without_blank_line_gets_one(self):
        message = self.rewrite(b"From: alice@client.example\r\nthis is not a header\r\n")
        self.assertEqual(wire(message), b"From: relay@smarthost.example\r\n"
                                        b"Reply-To: alice@client.example\r\n"
                                        b"\r\nthis is not a header\r\n")

    def test_smtputf8_when_relay_from_needs_it(self):
        rewriter = RelayFromRewriter(self.inner, "rélay@smarthost.example", resources=resources())
        self.successResultOf(Deferred.fromCoroutine(
            send_whole(rewriter, outbound(b"From: a@b.example\r\n" + BODY))))
        self.assertTrue(self.inner.messages[-1].envelope.smtputf8)

    async def test_oversized_header_section_refused(self):
        content = b"From: a@b.example\r\n" + b"X-Filler: " + b"y" * 900 + b"\r\n"
        content = content * (HEADER_LIMIT // len(content) + 2) + BODY
        with self.assertRaises(RelayError) as caught:
            await send_whole(self.rewriter, outbound(content))
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced),
                         (552, "5.3.4"))
        self.assertEqual(caught.exception.reason, REJECTED)
        self.assertEqual(self.inner.messages, [])

    def test_invalid_relay_from(self):
        for bad in ("", "no-at-sign", "a@b\r\nX: y", "<a@b>", "a b@c"):
            self.assertRaises(ValueError, RelayFromRewriter, self.inner, bad,
                              resources=resources())

    def test_description_and_close(self):
        self.assertIn(RELAY_FROM, self.rewriter.description)
        self.successResultOf(self.rewriter.close())


class DisplayNameTests(unittest.TestCase):
    timeout = 20

    def test_forms(self):
        cases = {
            b'"Doe, Jane" <j@x>': b'"Doe, Jane"',
            b"Jane Doe <j@x>": b"Jane Doe",
            b"  Jane   Doe  <j@x>": b"Jane Doe",
            b"j@x": None,
            b"j@x (Jane)": None,
            b"<j@x>": None,
            b'"a <b>" <j@x>': b'"a <b>"',
            b'"q\\"uote" <j@x>': b'"q\\"uote"',
            b"(comment <x>) Jane <j@x>": b"(comment <x>) Jane",
            b"a@x, Bob <b@y>": None,
        }
        for value, expected in cases.items():
            self.assertEqual(display_name(value), expected, value)

    def test_unfold(self):
        self.assertEqual(unfold(b"a\r\n b\r\n\tc"), b"a b\tc")


class EndToEndTests(unittest.TestCase):
    timeout = 20

    async def test_into_maildir_byte_for_byte(self):
        path = self.mktemp()
        maildir = MaildirRelay(path, reactor=reactor)
        rewriter = RelayFromRewriter(maildir, RELAY_FROM, resources=resources())
        self.addCleanup(rewriter.close)
        await send_whole(rewriter, outbound(b"From: Alice <alice@client.example>\r\n" + BODY))
        [name] = os.listdir(os.path.join(path, "new"))
        with open(os.path.join(path, "new", name), "rb") as f:
            self.assertEqual(f.read(), b"From: Alice <relay@smarthost.example>\r\n"
                                       b"Reply-To: Alice <alice@client.example>\r\n" + BODY)
