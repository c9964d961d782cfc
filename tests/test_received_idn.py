"""A client's non-ASCII EHLO name in the Received header (RFC 5321 §4.4, RFC 6531).

``EHLO münchen.example`` is accepted, but the name is written into the trace header of
a message that is not SMTPUTF8 as its A-labels (``xn--mnchen-3ya.example``): such a
message may go on to an upstream that offers neither SMTPUTF8 nor 8BITMIME, and a raw
UTF-8 header there is not allowed.  The end-to-end test checks what arrives at such an
upstream: Postfix's smtp-sink started without 8BITMIME, behind a real ``twistd``.
"""

from __future__ import annotations

from twisted.internet import threads
from twisted.trial import unittest

from esmtpfa.common.context import ConnectionContext
from esmtpfa.delivery.received import received_header, safe_client_name
from tests.faults.harness import CLIENT, RunningRelay
from tests.support.rawsmtp import RawSMTP
from tests.support.sink import SmtpSink

A_LABELS = "xn--mnchen-3ya.example"


def header(helo: str, smtputf8: bool) -> str:
    context = ConnectionContext(connection_id="c", protocol="smtp", peer_host="192.0.2.1",
                                helo=helo)
    return received_header(context, "relay.test", "urn:uuid:1", authenticated=True,
                           smtputf8=smtputf8).decode("utf-8")


class ReceivedNameTests(unittest.TestCase):

    def test_u_labels_become_a_labels_unless_the_message_is_smtputf8(self):
        ascii_header = header("münchen.example", smtputf8=False)
        self.assertTrue(ascii_header.isascii(), ascii_header)
        self.assertIn(f"from {A_LABELS} ([192.0.2.1])", ascii_header)
        # The same client, an SMTPUTF8 message: the name as presented (RFC 6531 §3.7.3).
        utf8_header = header("münchen.example", smtputf8=True)
        self.assertIn("from münchen.example ([192.0.2.1])", utf8_header)
        self.assertIn("with UTF8SMTPA", utf8_header)

    def test_names_idna_cannot_encode_are_reduced(self):
        for name in ("☃.example", "-bad-.münchen"):
            reduced = safe_client_name(name)
            self.assertRegex(reduced, r"^[A-Za-z0-9._-]+$")

    def test_ascii_names_are_untouched(self):
        for name in ("client.example", A_LABELS, "[192.0.2.7]", "mail.example."):
            self.assertEqual(safe_client_name(name), name)


def send_with_helo(port: int, helo: str) -> tuple[int, str]:
    """A raw client: EHLO with ``helo`` as UTF-8 bytes, AUTH, one ASCII message."""
    client = RawSMTP("127.0.0.1", port)
    try:
        code, text = client.command(f"EHLO {helo}".encode())
        if code != 250:
            return code, text
        user, password = CLIENT
        code, text = client.auth_plain(user, password)
        if code != 235:
            return code, text
        for command in ("MAIL FROM:<carol@example.com>", "RCPT TO:<dave@example.net>",
                        "DATA"):
            code, text = client.command(command)
            if code not in (250, 354):
                return code, f"{command}: {text}"
        client.send(b"From: <carol@example.com>\r\nTo: <dave@example.net>\r\n"
                    b"Subject: idn helo\r\n\r\nhello\r\n.\r\n")
        return client.reply()
    finally:
        client.close()


class ReceivedAtASevenBitUpstreamTests(unittest.TestCase):
    timeout = 60

    async def test_the_header_that_arrives_is_ascii(self):
        sink = SmtpSink(None, "-8")  # no 8BITMIME (smtp-sink has no SMTPUTF8)
        self.addCleanup(sink.close)
        await sink.start()
        relay = RunningRelay(self.mktemp(), upstream_port=sink.port)
        self.addCleanup(relay.stop)
        await relay.start()
        code, text = await threads.deferToThread(send_with_helo, relay.smtp_port,
                                                 "münchen.example")
        self.assertEqual(code, 250, text + relay.log[-3000:])
        [message] = sink.messages()
        received = message.content.split(b"\n\t", 1)[0]
        self.assertEqual(received, b"Received: from " + A_LABELS.encode() + b" ([127.0.0.1])")
        head = message.content.split(b"\n\n", 1)[0]
        self.assertTrue(head.isascii(), head)
