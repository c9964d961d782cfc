"""PROXY protocol v1 and v2 on the SMTP listeners, behind a real HAProxy.

esmtpfa runs in-process (``RelayFixture``) with ``--proxy-protocol`` and HAProxy's own
address (127.0.0.1) as the only trusted source; HAProxy (Debian ``haproxy``, a private
configuration on loopback ports) forwards to it with ``send-proxy`` and ``send-proxy-v2``.
Clients connect to HAProxy from addresses of their own (127.0.0.5, 127.0.0.6, ...), and
esmtpfa must see those: in the ``Received`` header the upstream gets, and in the
per-address connection limit.  Whatever reaches esmtpfa without a usable header from a
trusted proxy is closed without a single reply byte.
"""

from __future__ import annotations

import socket
import struct
import time

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from esmtpfa.runtime.tap import Options
from tests.support.haproxy import PROBE_SOURCE, HAProxy
from tests.support.logcapture import observe_logs
from tests.support.rawsmtp import RawSMTP
from tests.support.relayfixture import PASSWORD, USER, RelayFixture

#: The twelve octets a PROXY v2 header starts with (the protocol's specification, 2.2).
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Also the time esmtpfa waits for a PROXY header (and for each TLS handshake).
HEADER_TIMEOUT = 1.5
MESSAGE = (b"From: <carol@example.com>\r\nTo: <dave@example.net>\r\n"
           b"Subject: through a load balancer\r\n\r\nHello.\r\n")


def v2_header(source: str, port: int, destination: str = "127.0.0.1",
              destination_port: int = 25) -> bytes:
    """A PROXY v2 header for TCP over IPv4 (command PROXY)."""
    addresses = (socket.inet_aton(source) + socket.inet_aton(destination)
                 + struct.pack("!HH", port, destination_port))
    return PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


def closed_silently(sock: socket.socket, wait: float = 10.0) -> bytes:
    """Everything the server sent before it closed the connection (a reset counts as a
    close); a server that keeps it open past ``wait`` fails the test."""
    sock.settimeout(wait)
    received = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received
    finally:
        sock.close()


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))


class ProxyProtocolTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.events = observe_logs(self)
        self.relay = RelayFixture(
            self.mktemp(), "--proxy-protocol", "--proxy-protocol-trusted", "127.0.0.1/32",
            "--max-connections-per-ip", "1", "--max-auth-failures-per-ip", "2",
            "--tls-handshake-timeout", str(HEADER_TIMEOUT))
        yield self.relay.start()
        self.addCleanup(self.relay.stop)
        self.haproxy = HAProxy(self.mktemp(), {
            "v1": (self.relay.plain_port, "send-proxy"),
            "v2": (self.relay.plain_port, "send-proxy-v2"),
            "tls": (self.relay.tls_port, "send-proxy-v2"),
        })
        yield self.haproxy.start()
        self.addCleanup(self.haproxy.stop)

    # -- through HAProxy ----------------------------------------------------------------

    def submit(self, client: RawSMTP, tls: bool = False) -> None:
        """Log in and send MESSAGE on ``client`` (STARTTLS first unless ``tls``)."""
        assert client.greeting[0] == 220, client.greeting
        client.command("EHLO client.example")
        if not tls:
            code, _ = client.starttls(self.relay.client_context(), "relay.test")
            assert code == 220, code
            client.command("EHLO client.example")
            # The handshake's deadline ended with the handshake: esmtpfa heard of it
            # through the PROXY layer (else this session would be aborted now).
            time.sleep(HEADER_TIMEOUT + 0.5)
        assert client.auth_plain(USER, PASSWORD)[0] == 235
        code, text = client.send_message(MESSAGE, "carol@example.com", ["dave@example.net"])
        assert code == 250, (code, text)
        client.command("QUIT")
        client.close()

    def received_header(self) -> bytes:
        accepted = self.relay.upstream.accepted
        self.assertEqual(len(accepted), 1)
        return accepted[0].data.split(b"\r\n", 1)[0]

    @defer.inlineCallbacks
    def assert_client_seen(self, route: str, source: str, tls: bool = False):
        def session():
            context = self.relay.client_context() if tls else None
            self.submit(RawSMTP("127.0.0.1", self.haproxy.ports[route], source=source,
                                tls=context, server_hostname="relay.test"), tls=tls)
        yield self.relay.run(session)
        header = self.received_header()
        self.assertIn(f"([{source}])".encode(), header)
        self.assertNotIn(b"[127.0.0.1]", header)
        # The log names it too (HAProxy's readiness probes come from PROBE_SOURCE).
        connects = [e["log_text"].split(" connect from [")[1].split("]")[0]
                    for e in self.events if " connect from [" in e.get("log_text", "")]
        self.assertEqual([peer for peer in connects if peer != PROBE_SOURCE], [source])

    def test_send_proxy_v1_names_the_client(self):
        """The Received header at the upstream names the client, not HAProxy."""
        return self.assert_client_seen("v1", "127.0.0.5")

    def test_send_proxy_v2_names_the_client(self):
        return self.assert_client_seen("v2", "127.0.0.5")

    def test_implicit_tls_behind_send_proxy_v2(self):
        """Port 465: the header comes before the TLS handshake."""
        return self.assert_client_seen("tls", "127.0.0.7", tls=True)

    @defer.inlineCallbacks
    def test_per_address_limit_counts_the_proxied_client(self):
        """--max-connections-per-ip 1: a second connection from 127.0.0.5 is refused,
        one from 127.0.0.6 is not, although HAProxy makes all three."""
        def sessions():
            first = RawSMTP("127.0.0.1", self.haproxy.ports["v1"], source="127.0.0.5")
            second = RawSMTP("127.0.0.1", self.haproxy.ports["v2"], source="127.0.0.5")
            third = RawSMTP("127.0.0.1", self.haproxy.ports["v1"], source="127.0.0.6")
            try:
                return first.greeting, second.greeting, third.greeting
            finally:
                for client in (first, second, third):
                    client.close()
        first, second, third = yield self.relay.run(sessions)
        self.assertEqual(first[0], 220)
        self.assertEqual(second[0], 421)
        self.assertIn("Too many connections", second[1])
        self.assertEqual(third[0], 220)

    @defer.inlineCallbacks
    def test_login_throttle_counts_the_proxied_client(self):
        """--max-auth-failures-per-ip 2: after two failures from 127.0.0.5 its logins are
        refused (454), while 127.0.0.6, through the same HAProxy, logs in."""
        def login(source: str, *passwords: str) -> list[int]:
            client = RawSMTP("127.0.0.1", self.haproxy.ports["v2"], source=source)
            try:
                client.command("EHLO client.example")
                assert client.starttls(self.relay.client_context(), "relay.test")[0] == 220
                client.command("EHLO client.example")
                return [client.auth_plain(USER, password)[0] for password in passwords]
            finally:
                client.close()

        def attempts():
            return (login("127.0.0.5", "wrong", "wrong", PASSWORD),
                    login("127.0.0.6", PASSWORD))
        attacker, other = yield self.relay.run(attempts)
        self.assertEqual(attacker, [535, 535, 454])
        self.assertEqual(other, [235])

    # -- straight to esmtpfa -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_no_header_is_closed_without_a_reply(self):
        """From the trusted address itself: a client that speaks SMTP (or TLS) first,
        and one that says nothing (closed at the header deadline)."""
        def attempts():
            talker = connect(self.relay.plain_port, "127.0.0.1")
            talker.sendall(b"EHLO client.example\r\n")
            tls = connect(self.relay.tls_port, "127.0.0.1")
            tls.sendall(b"\x16\x03\x01\x00\x05hello")
            silent = connect(self.relay.plain_port, "127.0.0.1")
            started = time.monotonic()
            results = [closed_silently(talker), closed_silently(tls),
                       closed_silently(silent)]
            return results, time.monotonic() - started
        results, waited = yield self.relay.run(attempts)
        self.assertEqual(results, [b"", b"", b""])
        self.assertLess(waited, HEADER_TIMEOUT + 5)

    @defer.inlineCallbacks
    def test_commands_in_the_same_packet_as_the_header_are_answered(self):
        """A client's first bytes may arrive with the header: nothing is lost."""
        def session():
            sock = connect(self.relay.plain_port, "127.0.0.1")
            sock.sendall(b"PROXY TCP4 127.0.0.8 127.0.0.1 40000 25\r\nEHLO client.example\r\n"
                         b"QUIT\r\n")
            return closed_silently(sock)
        replies = (yield self.relay.run(session)).split(b"\r\n")
        self.assertTrue(replies[0].startswith(b"220 relay.test"), replies)
        self.assertIn(b"250-relay.test", replies[1])
        self.assertTrue(replies[-2].startswith(b"221"), replies)

    @defer.inlineCallbacks
    def test_header_from_an_untrusted_source_is_closed_without_a_reply(self):
        def attempts():
            v1 = connect(self.relay.plain_port, "127.0.0.9")
            v1.sendall(b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\nEHLO client.example\r\n")
            v2 = connect(self.relay.tls_port, "127.0.0.9")
            v2.sendall(v2_header("127.0.0.5", 40000))
            return [closed_silently(v1), closed_silently(v2)]
        self.assertEqual((yield self.relay.run(attempts)), [b"", b""])
        self.assertEqual(self.relay.upstream.accepted, [])

    @defer.inlineCallbacks
    def test_malformed_header_is_closed_without_a_reply(self):
        malformed = [
            b"PROXY TCP4 127.0.0.5\r\n",                         # addresses missing
            b"PROXY TCP4 mail.example 127.0.0.1 40000 25\r\n",    # not an address
            b"PROXY TCP4 127.0.0.5 127.0.0.1 seventy 25\r\n",     # not a port
            b"PROXY TCP4 127.0.0.5 127.0.0.1 " + b"4" * 100 + b"\r\n",  # over 107 octets
            PROXY_V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        ] * 4

        def attempts():
            results = []
            for header in malformed:
                sock = connect(self.relay.plain_port, "127.0.0.1")
                sock.sendall(header + b"EHLO client.example\r\n")
                results.append(closed_silently(sock))
            return results
        self.assertEqual((yield self.relay.run(attempts)), [b""] * len(malformed))
        # Logged, but 20 closes make one full line (then a summary), not 20.
        lines = [e for e in self.events
                 if "closed a connection from" in e.get("log_text", "")]
        self.assertEqual(len(lines), 1, [e.get("log_text") for e in lines])
        self.assertIn("malformed PROXY header", lines[0]["log_text"])


class OptionsTests(unittest.TestCase):
    def test_proxy_protocol_needs_trusted_networks(self):
        options = Options(environ={"SMTP_PROXY_PROTOCOL": "true"})
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["--plain"])
        self.assertIn("--proxy-protocol-trusted", str(raised.exception))

    def test_trusted_networks_from_the_environment(self):
        options = Options(environ={"SMTP_PROXY_PROTOCOL": "true",
                                   "SMTP_PROXY_PROTOCOL_TRUSTED": "10.0.0.0/8, fd00::/8"})
        options.parseOptions(["--plain"])
        self.assertEqual([str(n) for n in options["proxy-protocol-trusted"]],
                         ["10.0.0.0/8", "fd00::/8"])
        with self.assertRaises(usage.UsageError):
            Options(environ={"SMTP_PROXY_PROTOCOL_TRUSTED": "10.0.0.1/8"}).parseOptions([])


class HeaderReaderTests(unittest.TestCase):
    """A header may arrive in pieces; what follows it belongs to the session."""

    def setUp(self):
        from esmtpfa.smtp import proxy  # here: on the code before it, each test fails alone
        self.proxy = proxy

    def feed_in_pieces(self, header: bytes, after: bytes):
        """Byte by byte, the last byte of the header arriving with ``after``."""
        reader = self.proxy.HeaderReader()
        for i in range(len(header) - 1):
            self.assertIsNone(reader.feed(header[i:i + 1]), header[:i + 1])
        return reader.feed(header[-1:] + after)

    def test_v1_in_pieces(self):
        header = self.feed_in_pieces(
            b"PROXY TCP6 2001:db8:0:0::5 2001:db8::1 40000 25\r\n", b"EHLO")
        self.assertIsInstance(header, self.proxy.Header)
        self.assertEqual((header.source.host, header.source.port), ("2001:db8::5", 40000))
        self.assertEqual(header.rest, b"EHLO")

    def test_v2_in_pieces(self):
        header = self.feed_in_pieces(v2_header("192.0.2.5", 40000), b"\x16\x03")
        self.assertIsInstance(header, self.proxy.Header)
        self.assertEqual((header.source.host, header.source.port), ("192.0.2.5", 40000))
        self.assertEqual(header.rest, b"\x16\x03")

    def test_unix_and_udp_do_not_name_an_smtp_client(self):
        unix = PROXY_V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
        udp = v2_header("192.0.2.5", 40000).replace(b"\x21\x11", b"\x21\x12", 1)
        for header in (unix, udp):
            problem = self.proxy.HeaderReader().feed(header)
            self.assertIsInstance(problem, self.proxy.HeaderProblem)
            self.assertEqual(problem.kind, "unusable PROXY header")
