"""TLS session resumption on the SMTP listeners (docs/workers.md, esmtpfa/common/servertls.py).

Applications and printers open a connection per message; without resumption every one
pays a full handshake.  A real ``ssl`` client connects to the implicit-TLS port, reads
the greeting (TLS 1.3 sends its tickets after the handshake), leaves, and connects again
offering the session: the second handshake must be a resumption, in TLS 1.3 and 1.2.
"""

from __future__ import annotations

import socket
import ssl

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.support.relayfixture import RelayFixture


def greet(port: int, context: ssl.SSLContext, session=None) -> tuple[bytes, object, bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="relay.test", session=session) as tls:
            greeting = tls.recv(200)
            tls.sendall(b"QUIT\r\n")
            tls.recv(200)
            return greeting, tls.session, tls.session_reused


class ResumptionTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), relay=False)
        yield self.fixture.start()
        self.addCleanup(self.fixture.stop)

    @defer.inlineCallbacks
    def resumes(self, version: ssl.TLSVersion):
        context = self.fixture.client_context()
        context.minimum_version = context.maximum_version = version

        def twice():
            first = greet(self.fixture.tls_port, context)
            second = greet(self.fixture.tls_port, context, session=first[1])
            return first, second
        first, second = yield threads.deferToThread(twice)
        self.assertTrue(first[0].startswith(b"220 "), first[0])
        self.assertFalse(first[2])
        self.assertTrue(second[0].startswith(b"220 "), second[0])
        self.assertTrue(second[2], "the second handshake should resume the first session")

    def test_tls13_sessions_resume(self):
        return self.resumes(ssl.TLSVersion.TLSv1_3)

    def test_tls12_sessions_resume(self):
        return self.resumes(ssl.TLSVersion.TLSv1_2)
