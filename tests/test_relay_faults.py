"""The upstream faults, end to end: an SMTP client → esmtpfa (the whole
``RelayService``) → Postfix's ``smtp-sink`` (or the recording upstream where smtp-sink
cannot misbehave the right way).

For each fault: what the client is told, and that every message the client got a 250 for
is at the upstream exactly once (the sink dumps each accepted message to a file; esmtpfa's
Received header carries the message id of the 250).
"""

from __future__ import annotations

import re
import socket

from twisted.internet import reactor, threads
from twisted.trial import unittest

from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.sink import SmtpSink
from tests.support.upstream import RecordingUpstream

CONTENT = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: fault\r\n\r\nHello.\r\n"
_ID = re.compile(r"Message accepted as (urn:uuid:[0-9a-f-]+)")


class Client:
    """A blocking SMTP client session through esmtpfa (runs in a thread)."""

    def __init__(self, fixture: RelayFixture):
        self.session = fixture.secure_session()
        code, _ = self.session.auth_plain(USER, PASSWORD)
        assert code == 235, code

    def send(self, rcpts=("bob@example.net",), content: bytes = CONTENT,
             pipelined: bool = True):
        """Pipelined like a real client: MAIL, RCPTs and DATA in one write; or, without
        ``pipelined``, one command at a time (DATA then reaches the upstream on its own)."""
        lines = ["MAIL FROM:<alice@example.com>"] + [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
        if pipelined:
            self.session.send("".join(line + "\r\n" for line in lines).encode())
            replies = [self.session.reply() for _ in lines]
        else:
            replies = [self.session.command(line) for line in lines]
        if replies[-1][0] == 354:
            self.session.send(content + b".\r\n")
            replies.append(self.session.reply())
        return replies

    def quit(self):
        self.session.command("QUIT")
        self.session.close()


class FaultTestCase(unittest.TestCase):
    timeout = 60

    async def sink(self, *flags: str, port: int | None = None) -> SmtpSink:
        sink = SmtpSink(None, *flags, port=port)
        self.addCleanup(sink.close)
        await sink.start()
        return sink

    async def fixture(self, *upstreams, extra: tuple[str, ...] = ()) -> RelayFixture:
        addresses = ",".join(f"127.0.0.1:{u if isinstance(u, int) else u.port}"
                             for u in upstreams)
        fixture = RelayFixture(self.mktemp(), "--relay-addr", addresses,
                               "--relay-starttls", "none", "--relay-timeout", "1",
                               "--relay-data-timeout", "2", *extra, relay=False)
        self.addCleanup(fixture.stop)
        await fixture.start()
        return fixture

    def session(self, fixture: RelayFixture, script):
        def in_thread():
            client = Client(fixture)
            try:
                return script(client)
            finally:
                client.quit()
        return fixture.run(in_thread)

    def acknowledged(self, *replies) -> list[str]:
        ids = []
        for reply in replies:
            match = _ID.search(reply[1]) if reply[0] == 250 else None
            if match:
                ids.append(match.group(1))
        return ids

    def assertAllThere(self, sinks, ids: list[str]) -> None:
        """Every acknowledged message is at an upstream, exactly once."""
        contents = [m.content for s in sinks for m in s.messages()]
        for message_id in ids:
            found = sum(f"id {message_id};".encode() in c for c in contents)
            self.assertEqual(found, 1, f"{message_id} found {found} times at the upstream")


class HealthyTests(FaultTestCase):

    async def test_many_messages_with_and_without_pipelining(self):
        for flags in ((), ("-p",)):
            sink = await self.sink(*flags)
            fixture = await self.fixture(sink)

            def script(client):
                return [client.send(("bob@example.net", "carol@example.net"))
                        for _ in range(10)]
            results = await self.session(fixture, script)
            self.assertTrue(all([r[0] for r in replies] == [250, 250, 250, 354, 250]
                                for replies in results))
            ids = self.acknowledged(*(replies[-1] for replies in results))
            self.assertEqual(len(ids), 10)
            self.assertAllThere([sink], ids)
            self.assertEqual(sink.messages()[0].rcpts, ["bob@example.net", "carol@example.net"])
            # One upstream session carried all ten (MAIL, RSET in between).
            self.assertEqual(fixture.service.relay.upstreams[0].pool.opened, 1)


    async def test_pipelined_replies_leave_together(self):
        # RFC 2920 §3.2: MAIL's reply is held while the RCPT waits for the upstream, so the
        # client gets MAIL, RCPT and DATA replies in one packet; and Nagle is off on our
        # side, so a reply never waits for the client's delayed ACK.
        sink = await self.sink()
        fixture = await self.fixture(sink)

        def script(client):
            session = client.session
            session.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"DATA\r\n")
            first = session.sock.recv(65536)
            session._buffer += first
            replies = [session.reply() for _ in range(3)]
            session.send(CONTENT + b".\r\n")
            replies.append(session.reply())
            nodelay = threads.blockingCallFromThread(reactor, lambda: [
                s.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for f in fixture.service.smtp_factories for s in f.sessions])
            return first, replies, nodelay
        first, replies, nodelay = await self.session(fixture, script)
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 250])
        self.assertEqual(first.count(b"\r\n"), 3, first)
        self.assertEqual(len(nodelay), 1)
        self.assertTrue(nodelay[0])


class FaultTests(FaultTestCase):

    async def test_upstream_closes_during_data(self):
        # smtp-sink -q DATA drops the connection on DATA, every time.  A client that sent
        # DATA on its own has its transaction replayed on new connections, then given up;
        # one that pipelined DATA (it went upstream with the RCPT) hears it at the RCPT.
        # Either way the client keeps its message.
        sink = await self.sink("-q", "DATA")
        fixture = await self.fixture(sink)
        stepwise, pipelined = await self.session(fixture, lambda c: [
            c.send(pipelined=False), c.send()])
        self.assertEqual([r[0] for r in stepwise], [250, 250, 354, 451])
        self.assertTrue(stepwise[-1][1].startswith("4.4.2"))
        self.assertEqual([r[0] for r in pipelined], [250, 451, 554])
        self.assertTrue(pipelined[1][1].startswith("4.4.2"))
        self.assertEqual(sink.messages(), [])

    async def test_upstream_closes_during_data_once(self):
        # The first connection dies in the middle of the content; the replay on a new one
        # delivers the message, once.
        upstream = RecordingUpstream(close_after_data_bytes=1000, fault_sessions=1)
        fixture = RelayFixture(self.mktemp(), "--relay-starttls", "none", upstream=upstream)
        self.addCleanup(fixture.stop)
        await fixture.start()
        big = CONTENT + (b"x" * 78 + b"\r\n") * 100_000
        [replies] = await self.session(fixture, lambda c: [c.send(content=big)])
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 250])
        [received] = upstream.accepted
        self.assertIn(self.acknowledged(replies[-1])[0].encode(), received.data)
        self.assertEqual(upstream.connection_count, 2)

    async def test_421_at_greeting(self):
        sink = await self.sink("-Q", "CONNECT")
        fixture = await self.fixture(sink)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        # MAIL is accepted locally; the upstream's refusal answers the RCPT; no DATA.
        self.assertEqual([r[0] for r in replies], [250, 451, 554])
        self.assertTrue(replies[1][1].startswith("4."))
        self.assertEqual(sink.messages(), [])

    async def test_451_to_rcpt(self):
        sink = await self.sink("-r", "RCPT", "-b", "451 4.2.1 Mailbox busy, try later")
        fixture = await self.fixture(sink)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual([r[0] for r in replies], [250, 451, 554])
        self.assertTrue(replies[1][1].startswith("4.2.1"), replies[1])
        self.assertIn("Mailbox busy", replies[1][1])
        self.assertEqual(sink.messages(), [])

    async def test_stall_past_the_timeout(self):
        # smtp-sink -w 5: five seconds before answering DATA, our timeout is one.
        sink = await self.sink("-w", "5")
        fixture = await self.fixture(sink)
        started = fixture.service.reactor.seconds()
        stepwise, pipelined = await self.session(fixture, lambda c: [
            c.send(pipelined=False), c.send()])
        elapsed = fixture.service.reactor.seconds() - started
        self.assertEqual([r[0] for r in stepwise], [250, 250, 354, 451])
        self.assertEqual([r[0] for r in pipelined], [250, 451, 554])
        self.assertLess(elapsed, 15)  # at most three tries of one second per message
        self.assertEqual(sink.messages(), [])

    async def test_stall_after_the_final_dot(self):
        # The upstream has the whole message and does not answer: 451 "a duplicate is
        # possible" (the client retries), never a 250, never a silent loss.
        sink = await self.sink("-W", ".:5")
        fixture = await self.fixture(sink)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 451])
        self.assertIn("duplicate", replies[-1][1])
        await sink.stop()  # it answers after its delay, before it exits
        self.assertEqual(len(sink.messages()), 1)  # there once: not lost, not resent

    async def test_upstream_restarts_between_two_pooled_messages(self):
        sink = await self.sink()
        fixture = await self.fixture(sink)
        first = await self.session(fixture, lambda c: [c.send()])
        await sink.stop()
        restarted = await self.sink(port=sink.port)
        second = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual([r[0] for r in second[0]], [250, 250, 354, 250])
        ids = self.acknowledged(first[0][-1], second[0][-1])
        self.assertEqual(len(ids), 2)
        self.assertAllThere([sink, restarted], ids)

    async def test_certificate_for_the_wrong_name(self):
        ca = CertificateAuthority(self.mktemp())
        upstream = RecordingUpstream(tls=ca.issue("someone-else.test", filename="wrong"))
        fixture = RelayFixture(self.mktemp(), "--relay-starttls", "required",
                               "--relay-tls-ca-cert", ca.cert_path,
                               "--relay-tls-server-name", "upstream.test", upstream=upstream)
        self.addCleanup(fixture.stop)
        await fixture.start()
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual([r[0] for r in replies], [250, 451, 554])
        self.assertTrue(replies[1][1].startswith("4.4.2"))
        self.assertEqual(upstream.messages, [])
        self.assertNotIn("MAIL", [v for s in upstream.sessions for v in s.verbs()])

    async def test_first_of_two_upstreams_down(self):
        sink = await self.sink()
        fixture = await self.fixture(free_port(), sink)
        results = await self.session(fixture, lambda c: [c.send() for _ in range(5)])
        self.assertTrue(all(r[-1][0] == 250 for r in results))
        self.assertAllThere([sink], self.acknowledged(*(r[-1] for r in results)))
        first = fixture.service.relay.upstreams[0]
        self.assertEqual(first.breaker.state, "open")  # skipped after three failures

    async def test_first_of_two_upstreams_answers_421(self):
        bad = await self.sink("-Q", "CONNECT")
        good = await self.sink()
        fixture = await self.fixture(bad, good)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 250])
        self.assertAllThere([good], self.acknowledged(replies[-1]))
        self.assertEqual(bad.messages(), [])



class EarlyDataTests(FaultTestCase):
    """A client that pipelines DATA behind its RCPT has DATA relayed in the same upstream
    flight (one round trip less per message); every way the client can then fail to
    deliver content leaves nothing at the upstream."""

    async def recording(self, *extra: str) -> tuple[RelayFixture, RecordingUpstream]:
        upstream = RecordingUpstream()
        fixture = RelayFixture(self.mktemp(), "--relay-starttls", "none", *extra,
                               upstream=upstream)
        self.addCleanup(fixture.stop)
        await fixture.start()
        return fixture, upstream

    def flights(self, upstream: RecordingUpstream) -> list[list[str]]:
        groups: dict[tuple[int, int], list[str]] = {}
        for session in upstream.sessions:
            for command in session.commands:
                verb = command.line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper()
                if verb in ("RSET", "MAIL", "RCPT", "DATA"):
                    groups.setdefault((session.index, command.packet), []).append(verb)
        return list(groups.values())

    async def test_pipelined_data_travels_with_the_rcpt(self):
        fixture, upstream = await self.recording()
        pipelined, stepwise = await self.session(fixture, lambda c: [
            c.send(), c.send(pipelined=False)])
        self.assertEqual([r[0] for r in pipelined], [250, 250, 354, 250])
        self.assertEqual([r[0] for r in stepwise], [250, 250, 354, 250])
        self.assertEqual(self.flights(upstream), [
            ["MAIL", "RCPT", "DATA"],          # the pipelining client: one flight
            ["RSET", "MAIL", "RCPT"], ["DATA"]])  # the other: DATA when it comes
        self.assertEqual(len(upstream.accepted), 2)

    async def test_content_refused_after_the_early_354(self):
        # Too big for our own limit: the client hears 552; the upstream, already waiting
        # for content, gets none (its connection is dropped: a "." would deliver an empty
        # message).  The next message goes through.
        fixture, upstream = await self.recording("--max-message-size", "2000")
        big = CONTENT + (b"x" * 76 + b"\r\n") * 40
        refused, accepted = await self.session(fixture, lambda c: [
            c.send(content=big), c.send()])
        self.assertEqual([r[0] for r in refused], [250, 250, 354, 552])
        self.assertEqual([r[0] for r in accepted], [250, 250, 354, 250])
        [received] = upstream.accepted
        self.assertNotIn(b"xxxx", upstream.raw)
        self.assertTrue(upstream.sessions[0].closed)
        self.assertTrue(upstream.sessions[0].raw.endswith(b"DATA\r\n"))
        self.assertEqual(upstream.connection_count, 2)

    async def test_client_vanishes_after_the_early_354(self):
        fixture, upstream = await self.recording()

        def script():
            client = Client(fixture)
            client.session.send(b"MAIL FROM:<alice@example.com>\r\n"
                                b"RCPT TO:<bob@example.net>\r\nDATA\r\n")
            codes = [client.session.reply()[0] for _ in range(3)]
            client.session.send(CONTENT)  # no final dot: the client is gone
            client.session.close()
            return codes
        self.assertEqual(await fixture.run(script), [250, 250, 354])
        await upstream.whenIdle()
        self.assertEqual(upstream.messages, [])
        self.assertTrue(upstream.sessions[0].closed)
        self.assertNotIn(b"Hello.", upstream.raw)
