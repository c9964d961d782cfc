"""``BODY=8BITMIME`` toward an upstream without 8BITMIME (docs/delivery-guarantee.md,
"Content the upstream cannot take").

The declaration alone is never refused (clients declare 8BITMIME for plain ASCII all
the time): ASCII content declared 8BITMIME is relayed.  8-bit content is refused with
``554 5.6.3`` at the final dot, the first moment SMTP lets a server answer after DATA's
354, and from the first 8-bit octet on the relay takes in nothing more: the rest of the
message is neither spooled nor scanned, and the upstream gets none of it.

A real ``twistd`` relay in front of Postfix's smtp-sink started without 8BITMIME; a raw
socket client; what the relay holds open in its ``TMPDIR`` (a spooled body, even
unlinked) is read from ``/proc``.
"""

from __future__ import annotations

import time

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import CLIENT, RunningRelay
from tests.support.rawsmtp import RawSMTP
from tests.support.sink import SmtpSink

#: Well past the in-memory spool (1 MiB): all of it spooled would be a file in TMPDIR.
FILLER = b"The quick brown fox jumps over the lazy dog, again and again.\r\n" * 48_000


def open_transaction(port: int) -> RawSMTP:
    """Logged in, ``MAIL ... BODY=8BITMIME``, one RCPT, DATA answered 354."""
    client = RawSMTP("127.0.0.1", port, timeout=30)
    assert client.command("EHLO client.example")[0] == 250
    assert client.auth_plain(*CLIENT)[0] == 235
    for command, expected in (("MAIL FROM:<carol@example.com> BODY=8BITMIME", 250),
                              ("RCPT TO:<dave@example.net>", 250), ("DATA", 354)):
        code, text = client.command(command)
        assert code == expected, (command, code, text)
    return client


class EightBitTowardASevenBitUpstreamTests(unittest.TestCase):
    timeout = 60

    async def start(self) -> None:
        self.sink = SmtpSink(None, "-8")
        self.addCleanup(self.sink.close)
        await self.sink.start()
        self.relay = RunningRelay(self.mktemp(), upstream_port=self.sink.port)
        self.addCleanup(self.relay.stop)
        await self.relay.start()

    async def test_ascii_declared_8bitmime_is_relayed(self):
        await self.start()

        def send() -> tuple[int, str]:
            client = open_transaction(self.relay.smtp_port)
            try:
                client.send(b"Subject: ascii\r\n\r\nplain ASCII, declared 8BITMIME\r\n.\r\n")
                return client.reply()
            finally:
                client.close()
        code, text = await threads.deferToThread(send)
        self.assertEqual(code, 250, text)
        [message] = self.sink.messages()
        self.assertIn(b"plain ASCII, declared 8BITMIME", message.content)
        self.assertNotIn("BODY=8BITMIME", message.mail_args)  # not declared upstream

    async def test_8bit_content_is_refused_and_the_rest_not_taken_in(self):
        await self.start()
        client = await threads.deferToThread(open_transaction, self.relay.smtp_port)
        self.addCleanup(client.close)
        await threads.deferToThread(
            client.send, "Subject: 8bit\r\n\r\nGrüße aus München\r\n".encode() + FILLER)
        # Let the relay read what was sent (3 MB over loopback: milliseconds).
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(self.relay.temporary_files(), [],
                         "the relay spooled content it already knew it would refuse")
        started = time.monotonic()
        code, text = await threads.deferToThread(
            lambda: (client.send(b".\r\n"), client.reply())[1])
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual((code, text.split()[0]), (554, "5.6.3"), text)
        self.assertEqual(self.sink.messages(), [])
        self.assertIn("refused: 8-bit content for an upstream without 8BITMIME",
                      self.relay.log)
