"""MaildirRelay: the local sink used when no upstream is configured."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from esmtpfa.relay.interfaces import UNAVAILABLE, IRelay, RelayError
from esmtpfa.relay.maildir import MaildirRelay, UniqueNames
from tests.support.builders import outbound

CONTENT = b"From: alice@example.com\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


#: Small: the spool goes to disk, so delivery from the on-disk spool is exercised too.
SMALL_SPOOL = 64


class MaildirTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.path = os.path.join(self.mktemp(), "Maildir")  # parent missing too
        self.relay = MaildirRelay(self.path, reactor=reactor)
        self.addCleanup(self.relay.close)

    def listing(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.path, sub)))

    def test_provides_irelay(self):
        self.assertTrue(IRelay.providedBy(self.relay))
        self.assertIn(self.path, self.relay.description)

    async def test_delivers_exact_bytes_into_new(self):
        prefix = b"Received: from client by esmtpfa; id urn:uuid:1\r\n"
        reply = await self.relay.deliver(outbound(CONTENT, prefix=prefix, memory_limit=SMALL_SPOOL))
        [name] = self.listing("new")
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertIn(name, reply.text)
        with open(os.path.join(self.path, "new", name), "rb") as f:
            self.assertEqual(f.read(), prefix + CONTENT)  # CRLF kept, no dot-stuffing
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("cur"), [])

    async def test_content_offset_respected(self):
        await self.relay.deliver(outbound(b"IGNORED\r\n" + CONTENT, prefix=b"X-New: 1\r\n",
                                          offset=len(b"IGNORED\r\n"), memory_limit=SMALL_SPOOL))
        [name] = self.listing("new")
        with open(os.path.join(self.path, "new", name), "rb") as f:
            self.assertEqual(f.read(), b"X-New: 1\r\n" + CONTENT)

    async def test_unique_names_for_concurrent_deliveries(self):
        replies = await gatherResults([
            self.relay.deliver(outbound(CONTENT, memory_limit=SMALL_SPOOL)) for _ in range(50)])
        names = self.listing("new")
        self.assertEqual(len(names), 50)
        self.assertEqual(len({r.text for r in replies}), 50)
        self.assertEqual(self.listing("tmp"), [])

    async def test_missing_subdirectories_created(self):
        os.makedirs(os.path.join(self.path, "new"))
        await self.relay.deliver(outbound(CONTENT, memory_limit=SMALL_SPOOL))
        self.assertEqual(len(self.listing("new")), 1)
        self.assertTrue(os.path.isdir(os.path.join(self.path, "cur")))
        self.assertTrue(os.path.isdir(os.path.join(self.path, "tmp")))

    async def test_large_message(self):
        content = CONTENT + b"x" * 78 + b"\r\n" * 40_000
        await self.relay.deliver(outbound(content, memory_limit=SMALL_SPOOL))
        [name] = self.listing("new")
        self.assertEqual(os.path.getsize(os.path.join(self.path, "new", name)), len(content))

    async def test_disk_error_is_transient(self):
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file where the Maildir's parent should be")
        relay = MaildirRelay(os.path.join(blocker, "Maildir"), reactor=reactor)
        self.addCleanup(relay.close)
        try:
            await relay.deliver(outbound(CONTENT, memory_limit=SMALL_SPOOL))
        except RelayError as error:
            self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.0"))
            self.assertEqual(error.reason, UNAVAILABLE)
        else:
            self.fail("delivery into an impossible path succeeded")

    async def test_close_refuses_new_deliveries(self):
        await self.relay.close()
        with self.assertRaises(RelayError) as caught:
            await self.relay.deliver(outbound(CONTENT, memory_limit=SMALL_SPOOL))
        self.assertEqual(caught.exception.reply.code, 451)


class UniqueNameTests(unittest.TestCase):
    timeout = 20

    def test_shape_and_escaping(self):
        names = UniqueNames("host/with:odd")
        first, second = names.next(), names.next()
        self.assertNotEqual(first, second)
        self.assertTrue(first.endswith(r".host\057with\072odd"))
        self.assertRegex(first, r"^\d+\.M\d+P\d+Q1\.")
        self.assertNotIn("/", first)
