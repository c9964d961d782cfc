"""Write-through TCP transports (``esmtpfa.common.transport``) on loopback: bytes leave inside
``write()`` when nothing is queued, and the order, producers and closing behave exactly as
with Twisted's queued transports."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from esmtpfa.common.transport import write_through

BIG = bytes(range(256)) * 32 * 1024  # 8 MiB: far more than the loopback socket buffers


class Collector(Protocol):
    """The far end: gathers everything until the connection closes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(bytes(self.data))


class Sender(Protocol):
    """Runs ``script(transport)`` as soon as it is connected."""

    def __init__(self, script) -> None:
        self.script = script

    def connectionMade(self) -> None:
        self.script(self.transport)


class TransportTests(unittest.TestCase):

    def listen(self, script) -> int:
        port = write_through(reactor).listenTCP(0, Factory.forProtocol(lambda: Sender(script)),
                                                interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def collect(self, port: int) -> defer.Deferred[bytes]:
        collector = Collector()
        factory = ClientFactory.forProtocol(lambda: collector)
        reactor.connectTCP("127.0.0.1", port, factory)
        return collector.done

    def test_small_write_leaves_inside_write(self):
        seen = []

        def script(transport):
            transport.write(b"220 ready\r\n")
            # Still inside connectionMade: no reactor iteration has happened.
            seen.append(peer.recv(100, socket.MSG_DONTWAIT))
            transport.loseConnection()
        port = self.listen(script)
        peer = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(peer.close)
        d = defer.Deferred()
        reactor.callLater(0.2, d.callback, None)  # the accept and connectionMade
        return d.addCallback(lambda _: self.assertEqual(seen, [b"220 ready\r\n"]))

    async def test_order_kept_when_the_kernel_takes_only_part(self):
        def script(transport):
            transport.write(BIG)       # partly sent at once, the rest queued
            transport.write(b"END")    # must not overtake the queued rest
            transport.loseConnection()
        received = await self.collect(self.listen(script))
        self.assertEqual(len(received), len(BIG) + 3)
        self.assertTrue(received == BIG + b"END")

    async def test_pull_producer_is_driven_to_the_end(self):
        # A pull producer only hears resumeProducing when the queue drains: write-through
        # must stay out of its way or the transfer would stall after the first chunk.
        chunk = b"x" * 65536

        @implementer(IPullProducer)
        class Chunks:
            def __init__(self, transport):
                self.transport, self.left = transport, 100

            def resumeProducing(self):
                if self.left:
                    self.left -= 1
                    self.transport.write(chunk)
                else:
                    self.transport.unregisterProducer()
                    self.transport.loseConnection()

            def stopProducing(self):
                pass

        def script(transport):
            transport.registerProducer(Chunks(transport), False)
        received = await self.collect(self.listen(script))
        self.assertEqual(len(received), 100 * len(chunk))

    async def test_writes_around_lose_connection_as_twisted_does(self):
        # Twisted still sends what is written while it flushes before closing; the
        # write-through transport must not change what the peer gets.
        def script(transport):
            transport.write(b"last words\r\n")
            transport.loseConnection()
            transport.write(b"while closing\r\n")
        ours = await self.collect(self.listen(script))
        plain = reactor.listenTCP(0, Factory.forProtocol(lambda: Sender(script)),
                                  interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        theirs = await self.collect(plain.getHost().port)
        self.assertEqual(ours, theirs)
        self.assertEqual(ours, b"last words\r\nwhile closing\r\n")

    def test_other_reactors_are_left_alone(self):
        clock = Clock()
        self.assertIs(write_through(clock), clock)
