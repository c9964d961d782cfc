"""Hardening of the SMTP server: deadlines that end connections, and a
Received header that stays parseable whatever the client's EHLO name.

Real listeners on loopback (``RelayFixture``), raw sockets for hostile clients.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer
from twisted.trial import unittest

from esmtpfa.common.context import ConnectionContext
from esmtpfa.delivery.received import received_header
from tests.support.logcapture import observe_logs
from tests.support.relayfixture import RelayFixture


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closed or reset ``sock`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


class SilentTLSClientTests(unittest.TestCase):
    """1,000 silent sockets on the implicit-TLS port refused every client."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(
            self.mktemp(), "--max-connections", "1", "--tls-handshake-timeout", "1",
            "--close-grace", "1")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def test_silent_tls_client_is_cut_and_its_slot_freed(self):
        fixture = self.fixture

        def script():
            silent = socket.create_connection(("127.0.0.1", fixture.tls_port), timeout=5)
            try:
                # No ClientHello ever: only the handshake deadline can end this.
                closed = _closed_within(silent, 8.0)
            finally:
                silent.close()
            client = fixture.connect()
            return closed, client.greeting[0], client.command("QUIT")[0]

        def check(result):
            self.assertEqual(result, (True, 220, 221))
        return fixture.run(script).addCallback(check)

    def test_silence_after_starttls_is_ended(self):
        fixture = self.fixture

        def script():
            client = fixture.connect()
            client.command("EHLO client.example")
            code = client.command("STARTTLS")[0]
            # The client never starts its handshake.
            closed = _closed_within(client.sock, 8.0)
            client.sock.close()
            return code, closed
        return fixture.run(script).addCallback(self.assertEqual, (220, True))


def _trickle(sock: socket.socket, data: bytes, every: float, seconds: float) -> bytes:
    """Send ``data`` one byte every ``every`` seconds, for at most ``seconds``; return
    what the server said meanwhile (empty when it said nothing)."""
    deadline = time.monotonic() + seconds
    heard = b""
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        sock.settimeout(every)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        heard += chunk
    return heard


class SlowClientTests(unittest.TestCase):
    """A byte every few seconds reset the idle timer for ever, mid-command or mid-DATA:
    the client's clock now runs per command line and by data rate."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(
            self.mktemp(), "--idle-timeout", "30", "--command-timeout", "2",
            "--min-data-rate", "2000", "--close-grace", "1")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def session(self):
        client = self.fixture.secure_session()
        assert client.auth_plain("alice", "correct horse")[0] == 235
        return client

    def test_trickled_command_line_is_cut(self):
        def script():
            client = self.fixture.connect()
            started = time.monotonic()
            heard = _trickle(client.sock, b"EHLO a-very-long-name.example.com\r\n",
                             every=0.5, seconds=12)
            closed = client.is_closed(3)
            return heard, closed, time.monotonic() - started

        def check(result):
            heard, closed, took = result
            self.assertTrue(heard.startswith(b"421 4.4.2"), heard)
            self.assertTrue(closed)
            self.assertLess(took, 8)
        return self.fixture.run(script).addCallback(check)

    def test_trickled_data_is_cut_and_not_delivered(self):
        def script():
            client = self.session()
            client.command("MAIL FROM:<alice@example.com>")
            client.command("RCPT TO:<bob@example.net>")
            assert client.command("DATA")[0] == 354
            started = time.monotonic()
            heard = _trickle(client.sock, b"Subject: slow\r\n\r\n" + b"x" * 200,
                             every=0.5, seconds=15)
            return heard, client.is_closed(3), time.monotonic() - started

        def check(result):
            heard, closed, took = result
            self.assertTrue(heard.startswith(b"421 4.4.2"), heard)
            self.assertTrue(closed)
            self.assertLess(took, 8)
            self.assertEqual(self.fixture.upstream.messages, [])
        return self.fixture.run(script).addCallback(check)

    def test_thinking_between_commands_and_fast_data_are_not_cut(self):
        """The idle allowance (30 s) is not the command-line one (2 s), and a big
        message sent at full speed is never too slow however long it takes."""
        content = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 40_000

        def script():
            client = self.session()
            time.sleep(3)  # longer than --command-timeout, between commands
            results = [client.command("NOOP")[0]]
            time.sleep(3)
            results.append(client.send_message(content, "alice@example.com",
                                               ["bob@example.net"])[0])
            return results
        return self.fixture.run(script).addCallback(self.assertEqual, [250, 250])


class BackPressureTests(unittest.TestCase):
    """Clients that pipelined commands and never read their replies took the relay
    from 54 MB to 528 MB in 30 s."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(
            self.mktemp(), "--idle-timeout", "30", "--command-timeout", "3",
            "--close-grace", "1")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def test_relay_stops_reading_a_client_that_never_reads(self):
        fixture = self.fixture
        limit = 64 * 2 ** 20

        def script():
            greedy = socket.create_connection(("127.0.0.1", fixture.plain_port), timeout=5)
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            greedy.setblocking(False)
            burst, sent, stalled_since, cut = b"NOOP\r\n" * 10_000, 0, None, False
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline and sent < limit:
                try:
                    sent += greedy.send(burst)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    time.sleep(0.05)
                except OSError:  # reset: the relay ended the connection
                    cut = True
                    break
            # Meanwhile another client is served as usual.
            other = fixture.connect()
            served = other.command("EHLO other.example")[0]
            other.close()
            if not cut:
                cut = _closed_within(greedy, 10)
            greedy.close()
            return sent, cut, served

        def check(result):
            sent, cut, served = result
            self.assertLess(sent, 32 * 2 ** 20, "the relay kept reading")
            self.assertTrue(cut, "a client that never reads was never cut")
            self.assertEqual(served, 250)
        return fixture.run(script).addCallback(check)


class ReceivedHeaderTests(unittest.TestCase):
    """The client's EHLO name must not break the Received header (RFC 5321 §4.4,
    RFC 5322 §3.6.7: ';' separates the date)."""

    def header(self, helo: str) -> str:
        context = ConnectionContext(connection_id="c", protocol="smtp",
                                    peer_host="192.0.2.1", helo=helo)
        return received_header(context, "relay.test", "urn:uuid:1",
                               authenticated=True).decode()

    def test_valid_names_and_literals_are_kept(self):
        for helo in ("client.example", "mail-1.example.org.", "[192.0.2.7]",
                     "[IPv6:2001:db8::1]"):
            self.assertIn(f"from {helo} ([192.0.2.1])", self.header(helo))

    def test_semicolon_and_other_characters_are_replaced(self):
        for helo in ("evil;Mon, 1 Jan 2001", "a<b>c", "x\"y", "[1.2.3.4;x]", "a_b"):
            header = self.header(helo)
            self.assertEqual(header.count(";"), 1, header)
            source = header.split("\r\n", 1)[0]
            name = source.split(" ")[2]
            self.assertRegex(name, r"^[A-Za-z0-9._-]+$")
            self.assertEqual(len(name), len(helo.split(" ")[0]) if " " not in helo
                             else len(name))


class RefusalLogTests(unittest.TestCase):
    """55,000 refused connections wrote 21 MB of log: repeats collapse."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.events = observe_logs(self)
        self.fixture = RelayFixture(self.mktemp(), "--max-connections", "1")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def smtp_lines(self) -> list[str]:
        return [e.get("log_text", "") for e in self.events
                if e.get("log_namespace") == "esmtpfa.smtp"]

    @defer.inlineCallbacks
    def test_many_refusals_log_a_few_lines(self):
        fixture, refused = self.fixture, 60

        def script():
            holder = fixture.connect()
            codes = []
            for _ in range(refused):
                client = fixture.connect()
                codes.append(client.greeting[0])
                client.sock.close()
            holder.command("QUIT")
            return codes
        codes = yield fixture.run(script)
        self.assertEqual(codes, [421] * refused)
        yield self.fixture.stop()  # the listener's summary is written when it stops
        lines = self.smtp_lines()
        refusals = [line for line in lines if "refused" in line]
        self.assertEqual(len(refusals), 2, refusals)  # the first one, then one summary
        self.assertIn("total limit", refusals[0])
        self.assertIn(f"{refused - 1} more", refusals[1])
        # Only the admitted connection says connect/disconnect.
        self.assertEqual(len([line for line in lines if " connect from " in line]), 1)


class RepeatSummaryTests(unittest.TestCase):
    """``RepeatSummary`` with a ``Clock``: first in full, then one line per interval."""

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.logger import Logger

        from esmtpfa.common.logsummary import RepeatSummary
        self.events: list[dict] = []
        self.clock = Clock()
        self.summary = RepeatSummary(Logger(observer=self.events.append), "refused",
                                     interval=5.0, clock=self.clock)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]

    def test_counts_per_reason_then_quiet_window_resets(self):
        for _ in range(100):
            self.summary.record("total limit", "refused {peer}", peer="192.0.2.1")
        for _ in range(3):
            self.summary.record("per-address limit", "refused {peer}", peer="192.0.2.2")
        self.assertEqual(len(self.events), 2)  # the first of each reason
        self.clock.advance(5.0)
        self.assertEqual(len(self.events), 3)
        self.assertIn("101 more", self.texts()[2])
        self.assertEqual(self.events[2]["counts"],
                         {"total limit": 99, "per-address limit": 2})
        self.clock.advance(5.0)  # a quiet window: nothing written
        self.assertEqual(len(self.events), 3)
        self.summary.record("total limit", "refused {peer}", peer="192.0.2.3")
        self.assertEqual(len(self.events), 4)
        self.assertIn("192.0.2.3", self.texts()[3])
        self.clock.advance(5.0)
        self.assertEqual(len(self.events), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RefusedFirstRecipientTests(unittest.TestCase):
    """A first recipient the relay's own address check refuses must not refuse the
    transaction's later valid recipients."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp())
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def test_later_valid_recipient_is_accepted_and_delivered(self):
        from tests.support.relayfixture import PASSWORD, USER
        fixture = self.fixture

        def script():
            client = fixture.secure_session()
            assert client.auth_plain(USER, PASSWORD)[0] == 235
            assert client.command("MAIL FROM:<alice@example.com>")[0] == 250
            first = client.command('RCPT TO:<"x>y"@example.net>')
            second = client.command("RCPT TO:<bob@example.net>")
            assert client.command("DATA")[0] == 354
            client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
            final = client.reply()
            client.command("QUIT")
            return first[0], second, final[0]

        def check(result):
            first, second, final = result
            self.assertEqual(first, 553)
            self.assertEqual(second[0], 250, second)
            self.assertEqual(final, 250)
            self.assertEqual([m.rcpts for m in fixture.upstream.messages],
                             [["bob@example.net"]])
        return fixture.run(script).addCallback(check)


class LoginGoneTests(unittest.TestCase):
    """A login still in flight when its client disconnects is cancelled: the provider
    is not waited for, and a delay the login throttle holds for a guess ends with the
    connection instead of keeping a timer (docs/login-throttle.md)."""

    def test_disconnect_cancels_the_pending_login(self):
        import base64

        from twisted.cred.checkers import ICredentialsChecker
        from twisted.cred.portal import Portal
        from twisted.internet import task
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        from zope.interface import implementer

        from esmtpfa.auth.credentials import ISubmissionCredentials
        from esmtpfa.auth.realm import SubmissionRealm
        from esmtpfa.smtp.factory import SMTPServerFactory
        from esmtpfa.smtp.settings import ServerSettings

        cancelled = []

        @implementer(ICredentialsChecker)
        class SlowChecker:
            credentialInterfaces = (ISubmissionCredentials,)

            def requestAvatarId(self, credentials):
                return defer.Deferred(lambda d: cancelled.append(True))

        clock = task.Clock()
        factory = SMTPServerFactory(
            ServerSettings(hostname="relay.test", allow_insecure_auth=True),
            Portal(SubmissionRealm(lambda identity: None), [SlowChecker()]), reactor=clock)
        peer = IPv4Address("TCP", "127.0.0.1", 1025)
        server = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        server.makeConnection(transport)
        token = base64.b64encode(b"\0alice\0guess").decode()
        server.dataReceived(f"EHLO client.example\r\nAUTH PLAIN {token}\r\n".encode())
        self.assertEqual(cancelled, [])
        server.connectionLost(None)
        self.assertEqual(cancelled, [True])
        self.assertNotIn(b"235", transport.value())
        factory.stopFactory()
        self.assertEqual(clock.getDelayedCalls(), [])
