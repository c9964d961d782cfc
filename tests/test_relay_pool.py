"""Connection reuse, per-recipient transactions, replays, failover and the circuit breaker,
against recording upstreams on loopback (real TCP, scripted faults).

The end-to-end versions of the faults (client → esmtpfa → smtp-sink) are in
``test_relay_faults``.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from esmtpfa.common.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from esmtpfa.common.message import Envelope
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import REJECTED, UNAVAILABLE, RelayError
from esmtpfa.relay.pool import ClientShares, ShareTicket
from esmtpfa.relay.protocol import Extensions, parse_limits
from esmtpfa.relay.settings import PoolSettings, parse_upstream_addresses
from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings, UpstreamTransaction
from tests.support.builders import outbound
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.relaying import send_whole
from tests.support.resources import resources
from tests.support.upstream import CLOSE, END_OF_DATA, STALL, RecordingUpstream

CONTENT = b"From: alice@example.com\r\nSubject: pooled\r\n\r\nHello.\r\n"
NO_PIPELINING = ("SIZE 52428800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
#: Larger than the loopback socket buffers: still being written when the upstream drops
#: the connection.  (A message that fits in them has had its final dot handed to the
#: kernel: then a lost connection means "maybe delivered", never replayed.)
BIG = (b"x" * 78 + b"\r\n") * 100_000


@dataclass
class Outcome:
    """What our SMTP client would have been told: one reply per RCPT, then DATA's."""
    rcpts: list[Reply]
    data: Reply | None
    error: RelayError | None = None

    @property
    def codes(self) -> list[int]:
        return [r.code for r in self.rcpts] + ([self.data.code] if self.data else [])


class PoolTestCase(unittest.TestCase):
    timeout = 30

    def upstream(self, **kwargs) -> RecordingUpstream:
        upstream = RecordingUpstream(**kwargs).start()
        self.addCleanup(upstream.stop)
        return upstream

    def relay(self, *upstreams: RecordingUpstream | int, pool: PoolSettings | None = None,
              **settings) -> SMTPRelay:
        options = dict(helo_name="relay.test", starttls="none", connect_timeout=5.0,
                       command_timeout=2.0, data_timeout=4.0)
        options.update(settings)
        relay = SMTPRelay([UpstreamSettings("127.0.0.1", u if isinstance(u, int) else u.port,
                                            **options) for u in upstreams],
                          pool=pool or PoolSettings(idle_timeout=5.0, breaker_cooldown=60.0),
                          resources=resources())
        self.addCleanup(relay.close)
        return relay

    async def transact(self, relay: SMTPRelay, rcpts=("bob@example.com",),
                       content: bytes = CONTENT, pipelined: bool = False,
                       **envelope) -> Outcome:
        """The SMTP server's use of the relay: MAIL, each RCPT, then the content.
        ``pipelined``: the client sent DATA right behind its last RCPT."""
        transaction = await relay.begin(Envelope("alice@example.com", (), **envelope),
                                        "urn:uuid:msg", "urn:uuid:conn")
        verdicts, accepted = [], []
        for i, rcpt in enumerate(rcpts):
            data_follows = pipelined and i == len(rcpts) - 1
            try:
                verdicts.append(await transaction.addRecipient(rcpt, data_follows))
                accepted.append(rcpt)
            except RelayError as error:
                verdicts.append(error.reply)
        if not accepted:
            transaction.abort()
            return Outcome(verdicts, None)
        try:
            reply = await transaction.send(outbound(content, rcpts=tuple(accepted), **envelope))
        except RelayError as error:
            return Outcome(verdicts, error.reply, error)
        return Outcome(verdicts, reply)


class ReuseTests(PoolTestCase):

    async def test_one_connection_for_several_messages_with_rset_between(self):
        upstream = self.upstream()
        relay = self.relay(upstream)
        for _ in range(3):
            self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(upstream.connection_count, 1)
        self.assertEqual(len(upstream.accepted), 3)
        verbs = upstream.sessions[0].verbs()
        self.assertEqual(verbs.count("EHLO"), 1)
        self.assertEqual(verbs.count("RSET"), 2)  # before the 2nd and the 3rd message
        self.assertEqual(upstream.sessions[0].transactions, 3)

    async def test_rset_mail_and_rcpt_in_one_flight(self):
        upstream = self.upstream()
        relay = self.relay(upstream)
        await self.transact(relay)
        await self.transact(relay)
        commands = upstream.sessions[0].commands
        second = [c for c in commands if c.line[:4] in (b"RSET", b"MAIL", b"RCPT")][-3:]
        self.assertEqual([c.line[:4] for c in second], [b"RSET", b"MAIL", b"RCPT"])
        self.assertEqual(len({c.packet for c in second}), 1)

    async def test_without_pipelining_one_command_at_a_time(self):
        upstream = self.upstream(extensions=NO_PIPELINING)
        relay = self.relay(upstream)
        await self.transact(relay)
        await self.transact(relay)
        waits = [c.replies_before for c in upstream.sessions[0].commands]
        self.assertEqual(waits, sorted(set(waits)), "a command was sent before its turn")
        self.assertEqual(len(upstream.accepted), 2)

    async def test_idle_connection_closed_after_the_idle_timeout(self):
        upstream = self.upstream()
        relay = self.relay(upstream, pool=PoolSettings(idle_timeout=0.3))
        await self.transact(relay)
        await deferLater(reactor, 0.8, lambda: None)
        self.assertTrue(upstream.sessions[0].closed)
        self.assertEqual(upstream.sessions[0].verbs()[-1], "QUIT")
        await self.transact(relay)
        self.assertEqual(upstream.connection_count, 2)

    async def test_mailmax_retires_the_connection(self):
        upstream = self.upstream(extensions=("PIPELINING", "LIMITS MAILMAX=2 RCPTMAX=50"))
        relay = self.relay(upstream)
        for _ in range(5):
            self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(upstream.connection_count, 3)  # 2 + 2 + 1
        self.assertEqual([s.verbs().count("MAIL") for s in upstream.sessions], [2, 2, 1])

    async def test_connection_closed_by_the_upstream_while_idle(self):
        upstream = self.upstream()
        relay = self.relay(upstream)
        await self.transact(relay)
        [protocol] = list(upstream._protocols)
        protocol.transport.loseConnection()  # e.g. the upstream's own idle timeout
        await upstream.whenIdle()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(upstream.connection_count, 2)
        self.assertEqual(len(upstream.accepted), 2)

    async def test_dead_pooled_connection_is_replaced_without_failing_the_message(self):
        # The upstream dropped the connection but we have not noticed yet: the RSET/MAIL
        # of the next message meets a dead (or closing: 421) connection.
        for fault in (CLOSE, "421 4.4.2 upstream.test Error: timeout exceeded"):
            upstream = self.upstream(script=lambda index, verb, line, fault=fault:
                                     fault if index == 0 and verb == "RSET" else None)
            relay = self.relay(upstream)
            await self.transact(relay)
            outcome = await self.transact(relay)
            self.assertEqual(outcome.codes, [250, 250])
            self.assertEqual(upstream.connection_count, 2)
            self.assertEqual(len(upstream.accepted), 2)
            # A stale pooled connection says nothing about the upstream's health.
            self.assertEqual(relay.upstreams[0].breaker.consecutive, 0)

    async def test_upstream_restart_between_two_pooled_messages(self):
        first = self.upstream()
        port = first.port
        relay = self.relay(first)
        await self.transact(relay)
        await first.stop()
        second = RecordingUpstream().start(port)
        self.addCleanup(second.stop)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(len(first.accepted) + len(second.accepted), 2)

    async def test_pool_size_bounds_connections(self):
        upstream = self.upstream()
        relay = self.relay(upstream, pool=PoolSettings(size=2))
        transactions = [await relay.begin(Envelope("a@example.com", ()), f"m{i}", "c")
                        for i in range(3)]
        await transactions[0].addRecipient("bob@example.com")
        await transactions[1].addRecipient("bob@example.com")
        waiting = transactions[2].addRecipient("bob@example.com")  # no free connection
        await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(waiting.called)
        self.assertEqual(upstream.connection_count, 2)
        transactions[0].abort()  # frees one: the third transaction gets it (after RSET)
        self.assertEqual((await waiting).code, 250)
        for t in transactions[1:]:
            t.abort()
        self.assertEqual(upstream.connection_count, 2)


class PerRecipientTests(PoolTestCase):

    async def test_each_rcpt_gets_the_upstreams_verdict(self):
        upstream = self.upstream(rcpt_replies={
            "later@example.com": "451 4.2.1 Mailbox busy, try later",
            "nobody@example.com": "550 5.1.1 No such user"})
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=(
            "bob@example.com", "later@example.com", "nobody@example.com", "carol@example.com"))
        self.assertEqual(outcome.codes, [250, 451, 550, 250, 250])
        self.assertEqual(outcome.rcpts[1].enhanced, "4.2.1")
        self.assertEqual(outcome.rcpts[2].enhanced, "5.1.1")
        self.assertIn("No such user", outcome.rcpts[2].text)
        [received] = upstream.accepted
        self.assertEqual(received.rcpts, ["bob@example.com", "carol@example.com"])

    async def test_sender_refused_is_every_recipients_answer(self):
        upstream = self.upstream(replies={"MAIL": "553 5.7.1 Sender not allowed"})
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com"))
        self.assertEqual([(r.code, r.enhanced) for r in outcome.rcpts],
                         [(553, "5.7.1"), (553, "5.7.1")])
        self.assertEqual(upstream.sessions[0].verbs().count("MAIL"), 1)
        self.assertEqual(upstream.messages, [])

    async def test_mail_and_first_rcpt_in_one_flight(self):
        upstream = self.upstream()
        relay = self.relay(upstream)
        await self.transact(relay, rcpts=("a@example.com", "b@example.com"))
        commands = [c for c in upstream.sessions[0].commands if c.line[:4] in (b"MAIL", b"RCPT")]
        self.assertEqual(commands[0].packet, commands[1].packet)
        self.assertNotEqual(commands[1].packet, commands[2].packet)  # asked when named

    async def test_data_and_end_of_data_verdicts_pass_through(self):
        for kwargs, expected in ((dict(replies={"DATA": "554 5.7.1 No thanks"}), (554, "5.7.1")),
                                 (dict(eom_reply="452 4.3.1 Insufficient storage"),
                                  (452, "4.3.1"))):
            upstream = self.upstream(**kwargs)
            outcome = await self.transact(self.relay(upstream))
            self.assertEqual((outcome.data.code, outcome.data.enhanced), expected)
            self.assertEqual(outcome.error.reason, REJECTED)
            self.assertEqual(upstream.accepted, [])

    async def test_rcptmax(self):
        upstream = self.upstream(extensions=("PIPELINING", "LIMITS RCPTMAX=2"))
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@x.example", "b@x.example", "c@x.example"))
        self.assertEqual(outcome.codes, [250, 250, 452, 250])
        self.assertEqual(outcome.rcpts[2].enhanced, "4.5.3")
        self.assertEqual(upstream.sessions[0].verbs().count("RCPT"), 2)
        self.assertEqual(upstream.accepted[0].rcpts, ["a@x.example", "b@x.example"])

    async def test_capabilities_checked_before_anything_is_sent(self):
        upstream = self.upstream(extensions=("PIPELINING", "SIZE 1000"))
        relay = self.relay(upstream)
        cases = [(dict(declared_size=5000), (552, "5.3.4")), (dict(smtputf8=True), (550, "5.6.7")),
                 (dict(requiretls=True), (550, "5.7.30"))]
        for envelope, expected in cases:
            outcome = await self.transact(relay, **envelope)
            self.assertEqual((outcome.rcpts[0].code, outcome.rcpts[0].enhanced), expected)
            self.assertTrue(outcome.rcpts[0].is_permanent)
        # Once the upstream's SIZE is known, a larger declared size is refused at MAIL.
        with self.assertRaises(RelayError) as caught:
            await relay.begin(Envelope("alice@example.com", (), declared_size=5000), "m", "c")
        self.assertEqual(caught.exception.reply.code, 552)
        self.assertEqual(upstream.messages, [])
        self.assertNotIn("MAIL", [v for s in upstream.sessions for v in s.verbs()])

    async def test_8bit_content_to_a_7bit_upstream_refused_before_data(self):
        upstream = self.upstream(extensions=("PIPELINING",))
        relay = self.relay(upstream)
        outcome = await self.transact(relay, content=CONTENT + "Grüße\r\n".encode(),
                                      body="8BITMIME")
        self.assertEqual((outcome.data.code, outcome.data.enhanced), (554, "5.6.3"))
        self.assertNotIn("DATA", upstream.sessions[0].verbs())
        outcome = await self.transact(relay, body="8BITMIME")  # declared, but 7-bit: fine
        self.assertEqual(outcome.codes, [250, 250])

    async def test_too_big_for_the_upstream_refused_before_data(self):
        upstream = self.upstream(extensions=("PIPELINING", "SIZE 200"))
        relay = self.relay(upstream)
        outcome = await self.transact(relay, content=CONTENT + b"x" * 300 + b"\r\n")
        self.assertEqual((outcome.data.code, outcome.data.enhanced), (552, "5.3.4"))
        self.assertNotIn("DATA", upstream.sessions[0].verbs())


class EarlyDataTests(PoolTestCase):
    """The client pipelined DATA behind its last RCPT (``data_follows``): DATA goes upstream
    in the same flight, and every way out of the upstream's data phase is safe."""

    def packets(self, session) -> list[list[str]]:
        """The session's transaction commands, grouped by the packet they arrived in."""
        groups: dict[int, list[str]] = {}
        for command in session.commands:
            verb = command.line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper()
            if verb in ("RSET", "MAIL", "RCPT", "DATA"):
                groups.setdefault(command.packet, []).append(verb)
        return list(groups.values())

    async def assertDroppedInData(self, upstream: RecordingUpstream, relay: SMTPRelay):
        """The first connection was dropped right after DATA, with nothing delivered, and
        the next message goes through on a new one."""
        await upstream.whenIdle()
        self.assertTrue(upstream.sessions[0].closed)
        self.assertTrue(upstream.sessions[0].raw.endswith(b"DATA\r\n"))
        self.assertEqual(upstream.messages, [])
        outcome = await self.transact(relay, pipelined=True)
        self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(upstream.connection_count, 2)

    async def test_mail_rcpt_and_data_in_one_flight_then_rset_and_reuse(self):
        upstream = self.upstream()
        relay = self.relay(upstream)
        for _ in range(2):
            outcome = await self.transact(relay, pipelined=True)
            self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(self.packets(upstream.sessions[0]),
                         [["MAIL", "RCPT", "DATA"], ["RSET", "MAIL", "RCPT", "DATA"]])
        self.assertEqual(len(upstream.accepted), 2)
        self.assertEqual(upstream.connection_count, 1)

    async def test_several_recipients_data_goes_with_the_last(self):
        upstream = self.upstream(rcpt_replies={"b@example.com": "550 5.1.1 No such user"})
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com"),
                                      pipelined=True)
        self.assertEqual(outcome.codes, [250, 550, 250])
        self.assertEqual(self.packets(upstream.sessions[0]),
                         [["MAIL", "RCPT"], ["RCPT", "DATA"]])
        [received] = upstream.accepted
        self.assertEqual(received.rcpts, ["a@example.com"])

    async def test_only_recipient_refused_keeps_the_connection(self):
        # The upstream refuses the early DATA itself (no valid recipients): nothing to
        # undo, and the connection serves the next message after RSET.
        upstream = self.upstream(rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"})
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("nobody@example.com",), pipelined=True)
        self.assertEqual(outcome.codes, [550])
        outcome = await self.transact(relay, pipelined=True)
        self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(upstream.connection_count, 1)
        self.assertEqual(len(upstream.accepted), 1)

    async def test_354_without_any_recipient_drops_the_connection(self):
        # A broken upstream enters DATA though it refused every recipient: only a dropped
        # connection ends that safely ("." would be an empty message).
        upstream = self.upstream(rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"},
                                 replies={"DATA": "354 go ahead"}, fault_sessions=1)
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("nobody@example.com",), pipelined=True)
        self.assertEqual(outcome.codes, [550])
        await self.assertDroppedInData(upstream, relay)

    async def test_client_gives_up_after_the_early_354(self):
        # RSET, refused content or a lost client after DATA went upstream: the upstream
        # connection is dropped, never sent a command (it would be content) nor a dot.
        upstream = self.upstream()
        relay = self.relay(upstream)
        transaction = await relay.begin(Envelope("alice@example.com", ()), "m", "c")
        await transaction.addRecipient("bob@example.com", data_follows=True)
        transaction.abort()
        await self.assertDroppedInData(upstream, relay)

    async def test_too_big_after_the_early_354(self):
        upstream = self.upstream(extensions=("PIPELINING", "SIZE 200"))
        relay = self.relay(upstream)
        outcome = await self.transact(relay, content=CONTENT + b"x" * 300 + b"\r\n",
                                      pipelined=True)
        self.assertEqual((outcome.data.code, outcome.data.enhanced), (552, "5.3.4"))
        await upstream.whenIdle()
        self.assertEqual(upstream.messages, [])
        self.assertNotIn(b"xxxx", upstream.raw)

    async def test_early_data_refused_transiently_fails_over(self):
        first = self.upstream(replies={"DATA": "451 4.3.0 Try later"})
        second = self.upstream()
        relay = self.relay(first, second)
        outcome = await self.transact(relay, pipelined=True)
        self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(first.messages, [])
        self.assertEqual(len(second.accepted), 1)

    async def test_early_data_refused_permanently_is_the_answer(self):
        upstream = self.upstream(replies={"DATA": "554 5.7.1 No thanks"})
        relay = self.relay(upstream)
        outcome = await self.transact(relay, pipelined=True)
        self.assertEqual((outcome.data.code, outcome.data.enhanced), (554, "5.7.1"))
        self.assertEqual(upstream.accepted, [])

    async def test_pooled_connection_dead_at_the_early_flight(self):
        # The upstream restarted while the connection was idle: the first flight fails,
        # a fresh connection takes MAIL, RCPT and DATA, the message is delivered once.
        upstream = self.upstream()
        relay = self.relay(upstream)
        self.assertEqual((await self.transact(relay, pipelined=True)).codes, [250, 250])
        port = upstream.port
        await upstream.stop()
        restarted = RecordingUpstream().start(port)
        self.addCleanup(restarted.stop)
        outcome = await self.transact(relay, pipelined=True)
        self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(len(restarted.accepted), 1)


class ReplayTests(PoolTestCase):
    """The connection held since MAIL dies before the final dot."""

    async def test_lost_before_data_replays_on_a_new_connection(self):
        upstream = self.upstream(replies={"DATA": CLOSE}, fault_sessions=1)
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com"))
        self.assertEqual(outcome.codes, [250, 250, 250])
        self.assertEqual(upstream.connection_count, 2)
        [received] = upstream.accepted
        self.assertEqual(received.rcpts, ["a@example.com", "b@example.com"])
        replay = upstream.sessions[1].commands
        group = [c for c in replay if c.line[:4] in (b"MAIL", b"RCPT")]
        self.assertEqual(len({c.packet for c in group}), 1)  # MAIL + RCPTs in one flight

    async def test_lost_during_data_replays(self):
        upstream = self.upstream(close_after_data_bytes=100, fault_sessions=1)
        relay = self.relay(upstream)
        big = CONTENT + BIG
        outcome = await self.transact(relay, content=big)
        self.assertEqual(outcome.codes, [250, 250])
        [received] = upstream.accepted
        self.assertEqual(received.data, big)

    async def test_lost_during_data_every_time(self):
        upstream = self.upstream(close_after_data_bytes=100)
        relay = self.relay(upstream)
        outcome = await self.transact(relay, content=CONTENT + BIG)
        self.assertEqual((outcome.data.code, outcome.data.enhanced), (451, "4.4.2"))
        self.assertEqual(outcome.error.reason, UNAVAILABLE)
        self.assertEqual(upstream.accepted, [])
        self.assertEqual(upstream.connection_count, 3)  # the first try and two replays

    async def test_changed_verdict_on_replay_answers_451_and_delivers_nothing(self):
        def script(index, verb, line):
            if index == 0 and verb == "DATA":
                return CLOSE
            if index > 0 and verb == "RCPT" and b"b@example.com" in line:
                return "550 5.1.1 Gone since"
            return None
        upstream = self.upstream(script=script)
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com"))
        self.assertEqual(outcome.codes, [250, 250, 451])  # never 250 for a lost recipient
        self.assertEqual(outcome.data.enhanced, "4.4.2")
        self.assertEqual(upstream.messages, [])
        self.assertIn("b@example.com", outcome.error.detail)

    async def test_lost_at_rcpt_replays_the_earlier_recipients(self):
        def script(index, verb, line):
            return CLOSE if index == 0 and verb == "RCPT" and b"c@" in line else None
        upstream = self.upstream(script=script)
        relay = self.relay(upstream)
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com",
                                                     "c@example.com"))
        self.assertEqual(outcome.codes, [250, 250, 250, 250])
        self.assertEqual(upstream.accepted[0].rcpts,
                         ["a@example.com", "b@example.com", "c@example.com"])

    async def test_stall_at_rcpt_times_out_and_replays(self):
        def script(index, verb, line):
            return STALL if index == 0 and verb == "RCPT" and b"b@" in line else None
        upstream = self.upstream(script=script)
        relay = self.relay(upstream, command_timeout=0.5)
        started = reactor.seconds()
        outcome = await self.transact(relay, rcpts=("a@example.com", "b@example.com"))
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(outcome.codes, [250, 250, 250])
        self.assertEqual(upstream.accepted[0].rcpts, ["a@example.com", "b@example.com"])

    async def test_stall_at_mail_is_451_in_bounded_time(self):
        upstream = self.upstream(stall_at="MAIL")
        relay = self.relay(upstream, command_timeout=0.5)
        started = reactor.seconds()
        outcome = await self.transact(relay)
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual((outcome.rcpts[0].code, outcome.rcpts[0].enhanced), (451, "4.4.2"))
        self.assertEqual(upstream.messages, [])

    async def test_no_replay_after_the_final_dot(self):
        for fault in (dict(eom_reply=CLOSE), dict(stall_at=END_OF_DATA)):
            upstream = self.upstream(**fault)
            relay = self.relay(upstream, data_timeout=0.5)
            outcome = await self.transact(relay)
            self.assertEqual((outcome.data.code, outcome.data.enhanced), (451, "4.4.2"))
            self.assertIn("duplicate", outcome.data.text)
            self.assertEqual(len(upstream.messages), 1)  # it got there once; never twice
            self.assertEqual(upstream.connection_count, 1)


class FailoverTests(PoolTestCase):

    async def test_first_upstream_down(self):
        second = self.upstream()
        relay = self.relay(free_port(), second)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(len(second.accepted), 1)

    async def test_421_at_greeting_fails_over(self):
        first = self.upstream(greeting="421 4.3.2 upstream.test Service not available")
        second = self.upstream()
        relay = self.relay(first, second)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual((len(first.messages), len(second.accepted)), (0, 1))

    async def test_421_at_greeting_single_upstream_is_451(self):
        upstream = self.upstream(greeting="421 4.3.2 upstream.test Service not available")
        outcome = await self.transact(self.relay(upstream))
        self.assertEqual(outcome.rcpts[0].code, 451)
        self.assertTrue(outcome.rcpts[0].enhanced.startswith("4."))

    async def test_wrong_certificate_name_fails_over(self):
        ca = CertificateAuthority(self.mktemp())
        first = self.upstream(tls=ca.issue("other.test", filename="other"))
        second = self.upstream(tls=ca.issue("upstream.test", filename="upstream"))
        relay = self.relay(first, second, starttls="required", server_name="upstream.test",
                           ca_cert=ca.cert_path)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(first.sessions[0].verbs(), ["EHLO", "STARTTLS"])
        self.assertTrue(second.accepted[0].tls)

    async def test_4xx_to_mail_fails_over_5xx_does_not(self):
        first = self.upstream(replies={"MAIL": "451 4.3.0 Local problem"})
        second = self.upstream()
        self.assertEqual((await self.transact(self.relay(first, second))).codes, [250, 250])
        self.assertEqual(len(second.accepted), 1)
        first = self.upstream(replies={"MAIL": "550 5.7.1 Sender refused"})
        second = self.upstream()
        outcome = await self.transact(self.relay(first, second))
        self.assertEqual((outcome.rcpts[0].code, outcome.rcpts[0].enhanced), (550, "5.7.1"))
        self.assertEqual(second.connection_count, 0)

    async def test_4xx_at_end_of_data_tries_the_next_upstream(self):
        first = self.upstream(eom_reply="451 4.3.0 Queue write error")
        second = self.upstream()
        outcome = await self.transact(self.relay(first, second),
                                      rcpts=("a@example.com", "b@example.com"))
        self.assertEqual(outcome.codes, [250, 250, 250])
        self.assertEqual(first.accepted, [])
        self.assertEqual(second.accepted[0].rcpts, ["a@example.com", "b@example.com"])

    async def test_all_down_is_451_with_every_reason(self):
        relay = self.relay(free_port(), free_port())
        outcome = await self.transact(relay)
        self.assertEqual((outcome.rcpts[0].code, outcome.rcpts[0].enhanced), (451, "4.4.1"))

    async def test_breaker_skips_a_dead_upstream_until_it_recovers(self):
        port = free_port()
        second = self.upstream()
        relay = self.relay(port, second, pool=PoolSettings(breaker_failures=2,
                                                           breaker_cooldown=0.5))
        errors = []
        relay.observers.append(errors.append)
        for _ in range(4):
            self.assertEqual((await self.transact(relay)).codes, [250, 250])
        breaker = relay.upstreams[0].breaker
        self.assertEqual(breaker.state, OPEN)
        connect_failures = [e for e in errors if e.command == "connect"]
        self.assertEqual(len(connect_failures), 2)  # then skipped, not tried again
        self.assertTrue(all(e.transient and e.upstream.endswith(f":{port}")
                            for e in connect_failures))
        # The first upstream comes back; after the cooldown one trial closes the breaker.
        first = RecordingUpstream().start(port)
        self.addCleanup(first.stop)
        await deferLater(reactor, 0.6, lambda: None)
        self.assertEqual((await self.transact(relay)).codes, [250, 250])
        self.assertEqual(breaker.state, CLOSED)
        self.assertEqual(len(first.accepted), 1)

    async def test_every_breaker_open_refuses_at_mail(self):
        relay = self.relay(free_port(), pool=PoolSettings(breaker_failures=1,
                                                          breaker_cooldown=60))
        await self.transact(relay)
        with self.assertRaises(RelayError) as caught:
            await relay.begin(Envelope("a@example.com", ()), "m", "c")
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced),
                         (451, "4.4.1"))

    async def test_every_recipient_fails_over_too(self):
        second = self.upstream()
        relay = self.relay(free_port(), second)
        reply = await send_whole(relay, outbound(CONTENT, rcpts=("a@example.com", "b@example.com")))
        self.assertEqual(reply.code, 250)
        self.assertEqual(second.accepted[0].rcpts, ["a@example.com", "b@example.com"])


class CleanUpFailureTests(PoolTestCase):

    async def test_the_caller_is_answered_when_ending_the_transaction_fails(self):
        """A bug in the clean-up after the final reply (here: giving the session back)
        is logged, and the caller still hears the upstream's reply: it waited for it
        with its deadline already cleared, so nothing else would ever answer it."""
        upstream = self.upstream()
        relay = self.relay(upstream)

        def broken(self: object, reusable: bool) -> None:
            raise RuntimeError("clean-up bug")
        self.patch(UpstreamTransaction, "_end", broken)
        outcome = await self.transact(relay)
        self.assertEqual(outcome.codes, [250, 250])
        self.assertEqual(len(upstream.accepted), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ClientSharesTests(unittest.TestCase):
    """The fair share's queue, as transactions use it: a waiter served runs on at once,
    and may give its ticket back before the one who served it has finished."""

    def test_waiters_that_give_back_at_once_are_each_served_once(self):
        shares = ClientShares(cap=1)
        holder = shares.try_acquire(("identity a",))
        assert holder is not None
        served: list[str] = []

        def refused_at_once(ticket: ShareTicket, name: str) -> None:
            served.append(name)  # e.g. every upstream's breaker is open: no session
            ticket.release()
        for name in ("first", "second", "third"):
            shares.acquire(("identity a",), paced=True).addCallback(refused_at_once, name)
        holder.release()  # raised ValueError when a nested give-back served the queue
        self.assertEqual(served, ["first", "second", "third"])
        self.assertEqual((shares.held("identity a"), shares.borrowed), (0, 0))
        again = shares.try_acquire(("identity a",))
        self.assertIsNotNone(again)  # nothing leaked: the share is whole again


class BreakerTests(unittest.TestCase):

    def test_states(self):
        from twisted.internet.task import Clock
        clock = Clock()
        changes = []
        breaker = CircuitBreaker(2, 10.0, clock, lambda old, new: changes.append(new))
        self.assertTrue(breaker.allow())
        breaker.failure()
        self.assertEqual(breaker.state, CLOSED)
        breaker.failure()
        self.assertEqual(breaker.state, OPEN)
        self.assertFalse(breaker.allow())
        self.assertTrue(breaker.open_now())
        clock.advance(10)
        self.assertTrue(breaker.allow())      # the one trial
        self.assertEqual(breaker.state, HALF_OPEN)
        self.assertFalse(breaker.allow())     # only one at a time
        breaker.failure()                     # the trial failed: open again
        self.assertEqual(breaker.state, OPEN)
        clock.advance(10)
        self.assertTrue(breaker.allow())
        breaker.success()
        self.assertEqual(breaker.state, CLOSED)
        self.assertEqual(changes, [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED])


class ParsingTests(unittest.TestCase):

    def test_upstream_addresses(self):
        self.assertEqual(parse_upstream_addresses("a.example, b.example:587,[::1]:2525,"
                                                  "192.0.2.1,[2001:db8::1],::1", 25),
                         [("a.example", 25), ("b.example", 587), ("::1", 2525),
                          ("192.0.2.1", 25), ("2001:db8::1", 25)] + [("::1", 25)])
        for bad in ("", "a,,b", "a:0", "a:99999", "a:x", "[::1", "[notv6]:25", "a b",
                    "a,a:25", "1:2:zz"):
            self.assertRaises(ValueError, parse_upstream_addresses, bad, 25)

    def test_ip_literals_connect_without_a_resolver(self):
        self.assertEqual(UpstreamSettings("127.0.0.1").ip_version, 4)
        self.assertEqual(UpstreamSettings("::1").ip_version, 6)
        self.assertIsNone(UpstreamSettings("smtp.example.com").ip_version)

    def test_limits(self):
        self.assertEqual(parse_limits("RCPTMAX=20 MAILMAX=5"), {"RCPTMAX": "20", "MAILMAX": "5"})
        self.assertEqual(parse_limits("RCPTMAX=20 RCPTMAX=5"), {})   # duplicate: ignored
        self.assertEqual(parse_limits("RCPTMAX"), {})                 # syntax: ignored
        ext = Extensions({"LIMITS": "MAILMAX=0 RCPTMAX=1234567"})
        self.assertEqual((ext.mailmax, ext.rcptmax), (None, None))   # bad values ignored
        ext = Extensions({"LIMITS": "mailmax=3 rcptmax=2 RCPTDOMAINMAX=1"})
        self.assertEqual((ext.mailmax, ext.rcptmax), (3, 2))
        self.assertEqual(Extensions({}).mailmax, None)

    def test_pool_settings(self):
        self.assertRaises(ValueError, PoolSettings, size=0)
        self.assertRaises(ValueError, PoolSettings, idle_timeout=0)
        self.assertRaises(ValueError, PoolSettings, breaker_failures=0)

