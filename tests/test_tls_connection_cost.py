"""What a STARTTLS connection costs the relay beyond its cryptography
(docs/performance.md, "The cost of a STARTTLS connection").

Applications and printers open a connection per message, most of them with STARTTLS: the
work done per connection is paid per message.  Each test holds one piece of it, against
the real relay (``RelayFixture``) or a real loopback connection, with real TLS clients:

* the SSL context is built when the certificates are loaded, never per connection;
* after the first STARTTLS, no connection computes ``zope.interface`` declarations again;
* a reply written after STARTTLS is encrypted and sent inside ``write()``, in the same
  reactor turn, as on a plain connection (no timed call per reply, no second ``send``);
* a client that opens a connection per message resumes its TLS 1.3 session through
  STARTTLS (``openssl s_client -sess_out``, then ``-sess_in``).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import time

from OpenSSL import SSL
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial import unittest
from zope.interface import declarations

from esmtpfa.common import internals
from esmtpfa.common.certificates import CertificatePair, CertificateSources, CertificateStore
from esmtpfa.common.servertls import TLSPolicy
from esmtpfa.common.transport import write_through
from tests.support.certs import CertificateAuthority
from tests.support.relayfixture import RelayFixture

SESSIONS = 6


class RelayConnectionTests(unittest.TestCase):
    """Through the relay's own STARTTLS (``--plain`` listener), real ``ssl`` clients."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self):
        self.fixture = RelayFixture(self.mktemp(), relay=False)
        yield self.fixture.start()
        self.addCleanup(self.fixture.stop)

    def sessions(self, count: int) -> list[int]:
        """``count`` connections: EHLO, STARTTLS, EHLO, QUIT; the QUIT codes.  After each
        a full garbage collection, as a busy relay has every few connections: what only
        the closed connections held is gone (``zope.interface`` caches weakly)."""
        codes = []
        for _ in range(count):
            client = self.fixture.secure_session()
            codes.append(client.command("QUIT")[0])
            client.is_closed()
            client.close()
            time.sleep(0.05)  # the relay's side of the close
            gc.collect()
        return codes

    @defer.inlineCallbacks
    def test_context_is_built_once_not_per_connection(self):
        built = []
        original = SSL.Context.__init__

        def counted(context, *args, **kwargs):
            built.append(1)
            original(context, *args, **kwargs)

        self.patch(SSL.Context, "__init__", counted)
        yield self.start()
        at_start = len(built)
        self.assertGreater(at_start, 0, "the patch should see the contexts of the start")
        codes = yield self.fixture.run(self.sessions, SESSIONS)
        self.assertEqual(codes, [221] * SESSIONS)
        self.assertEqual(len(built), at_start, "an SSL context was built per connection")

    @defer.inlineCallbacks
    def test_no_interface_declarations_computed_per_connection(self):
        yield self.start()
        codes = yield self.fixture.run(self.sessions, 1)  # the first computes them
        self.assertEqual(codes, [221])
        computed = []
        original = declarations.ProvidesClass

        def counted(*interfaces):
            computed.append(interfaces)
            return original(*interfaces)

        self.patch(declarations, "ProvidesClass", counted)
        codes = yield self.fixture.run(self.sessions, SESSIONS)
        self.assertEqual(codes, [221] * SESSIONS)
        self.assertEqual(computed, [], "declarations computed again on later connections")

    @defer.inlineCallbacks
    def test_tls13_session_resumes_through_starttls(self):
        yield self.start()
        sessions = os.path.join(self.fixture.directory, "session.pem")

        def s_client(*extra: str) -> str:
            result = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{self.fixture.plain_port}",
                 "-starttls", "smtp", "-tls1_3", "-CAfile", self.fixture.ca.cert_path,
                 "-servername", "relay.test", "-ign_eof", *extra],
                input=b"QUIT\r\n", capture_output=True, timeout=20, check=False)
            return result.stdout.decode("utf-8", "replace")

        def twice() -> tuple[str, str]:
            return s_client("-sess_out", sessions), s_client("-sess_in", sessions)

        first, second = yield self.fixture.run(twice)
        self.assertIn("221", first)
        self.assertIn("New, TLSv1.3", first)
        self.assertIn("221", second)
        self.assertIn("Reused, TLSv1.3", second)


class UpgradingServer(Protocol):
    """Greets, upgrades on ``STARTTLS``, then answers each TLS read with ``250 ok`` and
    notes whether the ciphertext was already in the peer's socket when ``write()``
    returned."""

    def __init__(self, tls, peer: list[socket.socket], seen: list[bool]):
        self.tls, self.peer, self.seen = tls, peer, seen

    def connectionMade(self) -> None:
        self.transport.write(b"220 ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.transport.TLS:
            self.transport.write(b"220 go ahead\r\n")
            self.transport.startTLS(self.tls)
            return
        self.transport.write(b"250 ok\r\n")
        try:
            waiting = self.peer[0].recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            waiting = b""
        self.seen.append(bool(waiting))


class WritesAfterStartTLSTests(unittest.TestCase):
    """The SMTP server gathers the replies to one read into one write; after STARTTLS
    that write must leave as it does without TLS: at once."""

    timeout = 30

    def setUp(self):
        ca = CertificateAuthority(self.mktemp())
        leaf = ca.issue("relay.test")
        self.store = CertificateStore(
            CertificateSources(CertificatePair(leaf.cert_path, leaf.key_path)), TLSPolicy())

    async def receive(self, sock: socket.socket, deadline: float) -> bytes:
        while time.monotonic() < deadline:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await task.deferLater(reactor, 0.01, lambda: None)
                continue
            if not data:
                raise ConnectionError("closed")
            return data
        raise TimeoutError("nothing arrived")

    async def test_reply_after_starttls_leaves_inside_write(self):
        peer: list[socket.socket] = []
        seen: list[bool] = []
        port = write_through(reactor).listenTCP(
            0, Factory.forProtocol(lambda: UpgradingServer(self.store.tls, peer, seen)),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        raw.settimeout(None)  # blocking, so that MSG_DONTWAIT answers at once
        self.addCleanup(raw.close)
        peer.append(raw)
        deadline = time.monotonic() + 15
        self.assertEqual(await self.receive(raw, deadline), b"220 ready\r\n")
        raw.sendall(b"STARTTLS\r\n")
        self.assertEqual(await self.receive(raw, deadline), b"220 go ahead\r\n")

        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        while True:
            try:
                client.do_handshake()
                break
            except SSL.WantReadError:
                try:
                    raw.sendall(client.bio_read(1 << 16))
                except SSL.WantReadError:
                    pass
                client.bio_write(await self.receive(raw, deadline))
        try:
            raw.sendall(client.bio_read(1 << 16))  # the client's Finished
        except SSL.WantReadError:
            pass
        await task.deferLater(reactor, 0.2, lambda: None)  # the session tickets, read
        try:
            client.bio_write(raw.recv(1 << 16, socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass

        client.send(b"NOOP\r\n")
        raw.sendall(client.bio_read(1 << 16))
        client.bio_write(await self.receive(raw, deadline))
        reply = b""
        while not reply.endswith(b"\r\n"):
            try:
                reply += client.recv(1 << 16)
            except SSL.WantReadError:
                client.bio_write(await self.receive(raw, deadline))
        self.assertEqual(reply, b"250 ok\r\n")
        self.assertEqual(seen, [True], "the reply waited for a later reactor turn")


class InternalsCheckTests(unittest.TestCase):
    """``internals.check()`` names the Twisted internal the write change relies on, when
    an upgrade changes it (simulated by patching Twisted as such an upgrade would)."""

    def test_a_tls_layer_without_its_aggregator(self):
        self.patch(TLSMemoryBIOFactory, "protocol", TLSMemoryBIOProtocol)
        error = self.assertRaises(internals.TwistedChanged, internals.check)
        self.assertIn("the STARTTLS layer no longer aggregates its writes in _aggregator",
                      str(error))
