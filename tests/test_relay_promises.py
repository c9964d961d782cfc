"""The relay's promises, each against a real upstream behind the whole RelayService.

What a client notices: the replies it gets, and what reached the upstream, how many times.
Every test here failed before the fix it names (docs/delivery-guarantee.md says why each
rule holds).
"""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from esmtpfa.relay.rewrite import RelayFromRewriter
from tests.support.builders import outbound
from tests.support.relayfixture import RelayFixture
from tests.support.relaying import CapturingRelay, send_whole
from tests.support.resources import resources
from tests.support.upstream import END_OF_DATA, RAW, RecordingUpstream
from tests.test_relay_faults import CONTENT, Client, FaultTestCase

#: Ways an upstream can answer the final dot that are neither "accepted" nor "refused".
GARBAGE_AFTER_THE_DOT = {
    "binary garbage": RAW + "\x00\xff\xfe\x80garbage\r\n",
    "a 2 MB line": RAW + "2" * (2 * 1024 * 1024) + "\r\n",
    "mixed codes": RAW + "250-ok\r\n550 5.7.1 changed its mind\r\n",
    "a positive non-250": "251 2.1.5 odd but positive",
}


class PromiseTestCase(FaultTestCase):
    async def relay_to(self, upstream: RecordingUpstream, *flags: str) -> RelayFixture:
        """The whole relay in front of ``upstream``, over a cleartext hop."""
        fixture = RelayFixture(self.mktemp(), "--relay-starttls", "none", *flags,
                               upstream=upstream)
        self.addCleanup(fixture.stop)
        await fixture.start()
        return fixture


class PoolAfterStreamingTests(PromiseTestCase):
    """A message streamed through the producer left it registered on a
    cleartext connection; the next message on that pooled connection failed (451 4.3.0)
    and the slot was never freed (451 4.4.5 for everybody after)."""

    async def test_large_messages_one_pooled_cleartext_connection(self):
        sink = await self.sink()
        fixture = await self.fixture(sink, extra=("--relay-pool-size", "1"))
        big = CONTENT + (b"y" * 78 + b"\r\n") * 1300  # about 100 KB: several batches
        results = await self.session(fixture, lambda c: [
            c.send(content=big, pipelined=False) for _ in range(4)])
        self.assertEqual([r[-1][0] for r in results], [250] * 4, results)
        self.assertAllThere([sink], self.acknowledged(*(r[-1] for r in results)))
        self.assertEqual(fixture.service.relay.upstreams[0].pool.opened, 1)

    async def test_a_protocol_violation_never_goes_back_to_the_pool(self):
        # The upstream answers MAIL with a positive reply that is not 250: the session is
        # out of step.  It must be dropped, not handed to the next message.
        mails = []

        def script(session, verb, line):
            if verb == "MAIL":
                mails.append(session)
                if len(mails) == 1:
                    return "252 2.1.0 odd"  # once: a reused session would then work
            return None
        upstream = RecordingUpstream(script=script)
        fixture = await self.relay_to(upstream, "--relay-pool-size", "1")
        [first] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(first[1][0], 451, first)
        [second] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(second[-1][0], 250, second)
        # The second message ran on a new connection; the odd one was dropped.
        self.assertEqual(upstream.connection_count, 2)
        self.assertTrue(upstream.sessions[0].closed)
        self.assertEqual(len(upstream.accepted), 1)


class NoDuplicatesTests(PromiseTestCase):
    """After the final dot the outcome is unknown; the relay never sends the
    message again (it did, three times per client attempt)."""

    async def test_garbage_after_the_dot_is_one_copy_and_a_451(self):
        for name, answer in GARBAGE_AFTER_THE_DOT.items():
            upstream = RecordingUpstream(
                script=lambda session, verb, line, answer=answer:
                answer if verb == END_OF_DATA else None)
            fixture = await self.relay_to(upstream, "--relay-timeout", "2")
            stepwise, pipelined = await self.session(fixture, lambda c: [
                c.send(pipelined=False), c.send()])
            for replies in (stepwise, pipelined):
                self.assertEqual(replies[-1][0], 451, (name, replies))
                self.assertIn("duplicate", replies[-1][1], name)
            # One copy per client attempt: two attempts, two copies, never more.
            self.assertEqual(len(upstream.messages), 2, name)
            await fixture.stop()

    async def test_two_upstreams_no_copy_to_the_second(self):
        first = RecordingUpstream(script=lambda s, verb, line:
                                  RAW + "\x00\x01\r\n" if verb == END_OF_DATA else None)
        second = RecordingUpstream()
        first.start(), second.start()
        self.addCleanup(first.stop)
        self.addCleanup(second.stop)
        fixture = await self.fixture(first, second)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(replies[-1][0], 451)
        self.assertEqual(len(first.messages), 1)
        self.assertEqual(second.messages, [])


class DeadlineTests(PromiseTestCase):
    """An upstream that accepts RCPT and never answers DATA kept the client
    waiting attempts × --relay-timeout (900 s by default), past its own patience."""

    async def test_data_never_answered(self):
        upstream = RecordingUpstream(stall_at="DATA")
        fixture = await self.relay_to(upstream, "--relay-timeout", "3",
                                      "--relay-data-deadline", "2")
        started = reactor.seconds()
        [replies] = await self.session(fixture, lambda c: [c.send(pipelined=False)])
        elapsed = reactor.seconds() - started
        self.assertEqual(replies[-1][0], 451, replies)
        self.assertTrue(replies[-1][1].startswith("4.4.7"), replies)
        self.assertNotIn("duplicate", replies[-1][1])
        # One deadline, not one timeout per attempt: 3 attempts × 3 s would be 9 s.
        self.assertLess(elapsed, 8)
        self.assertEqual(upstream.messages, [])

    async def test_silence_after_the_dot_says_duplicate_possible(self):
        upstream = RecordingUpstream(stall_at=END_OF_DATA)
        fixture = await self.relay_to(upstream, "--relay-data-timeout", "30",
                                      "--relay-data-deadline", "2")
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(replies[-1][0], 451, replies)
        self.assertTrue(replies[-1][1].startswith("4.4.7"), replies)
        self.assertIn("duplicate", replies[-1][1])
        self.assertEqual(len(upstream.messages), 1)
        # The next message goes through on a new connection.
        [again] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(len(upstream.messages), 2)
        self.assertTrue(upstream.sessions[0].closed)


class FairShareTests(PromiseTestCase):
    """A session in DATA holds a pooled upstream connection; one client that
    trickles DATA on many connections could hold them all."""

    async def test_one_client_cannot_hold_every_connection(self):
        upstream = RecordingUpstream()
        fixture = await self.relay_to(upstream, "--relay-pool-size", "2",
                                      "--relay-connect-timeout", "1")

        def script():
            # Alice opens two transactions and never finishes their content.
            holders = []
            for _ in range(2):
                client = Client(fixture)
                client.session.send(b"MAIL FROM:<alice@example.com>\r\n"
                                    b"RCPT TO:<bob@example.net>\r\n")
                holders.append((client, [client.session.reply() for _ in range(2)]))
            # The printer, another identity from another address, is still served.
            other = _printer(fixture)
            printer = other.send()
            other.quit()
            for client, _ in holders:
                client.session.close()
            return [replies for _, replies in holders], printer

        holders, printer = await fixture.run(script)
        self.assertEqual([r[0] for r in holders[0]], [250, 250])
        # Alice's second transaction waited for her own share, then heard 451 4.4.5.
        self.assertEqual(holders[1][1][0], 451, holders)
        self.assertTrue(holders[1][1][1].startswith("4.4.5"), holders)
        self.assertEqual([r[0] for r in printer], [250, 250, 354, 250])


class FirstRecipientTests(PromiseTestCase):
    """A first recipient the relay's own address check refuses made every
    later, valid recipient of the transaction get 553 naming the first one."""

    async def test_later_recipients_get_their_own_verdict(self):
        upstream = RecordingUpstream()
        fixture = await self.relay_to(upstream)
        [replies] = await self.session(fixture, lambda c: [
            c.send(rcpts=('"x>y"@example.net', "bob@example.net"))])
        codes = [r[0] for r in replies]
        self.assertEqual(codes[:3], [250, 553, 250], replies)
        self.assertNotIn("x>y", replies[2][1])
        self.assertEqual(replies[-1][0], 250)
        self.assertEqual(upstream.accepted[0].rcpts, ["bob@example.net"])


class _WhereRewritten(RelayFromRewriter):
    def rewrite(self, message):
        self.threads = getattr(self, "threads", []) + [threading.current_thread()]
        return super().rewrite(message)


class RewriteOffTheReactorTests(unittest.TestCase):
    """With --relay-from, a message with about 1 MB of folded header lines
    froze the reactor for seconds: the header was parsed in the reactor thread, with a
    copy per continuation line."""

    timeout = 30

    async def test_big_header_is_parsed_in_a_thread_and_kept_whole(self):
        inner = CapturingRelay()
        rewriter = _WhereRewritten(inner, "relay@smarthost.example", resources=resources())
        folded = b"X-Long: start\r\n" + b" continued\r\n" * 80_000
        content = b"From: Alice <alice@client.example>\r\n" + folded + b"\r\nbody\r\n"
        message = outbound(content, "a@client.example", ("b@example.net",))
        ticks = []
        ticker = reactor.callLater(0, ticks.append, 1)
        reply = await send_whole(rewriter, message)
        self.assertEqual(reply.code, 250)
        self.assertIsNot(rewriter.threads[0], threading.main_thread())
        [out] = inner.messages
        wire = b"".join(out.chunks())
        self.assertIn(folded, wire)
        self.assertTrue(wire.startswith(b"From: Alice <relay@smarthost.example>\r\n"))
        self.assertTrue(ticks or not ticker.active())


class ReadinessTests(PromiseTestCase):
    """/readyz is about this replica, never the shared upstream (docs/metrics.md,
    "Health"): a probe opens no upstream connection, and an open breaker or a full pool
    is said by /status and the metrics, not by taking every replica out of rotation."""

    async def readyz(self, fixture: RelayFixture):
        from tests.support.webclient import request
        return await request("GET", f"http://127.0.0.1:{fixture.metrics_port}/readyz")

    async def test_probes_cost_the_upstream_nothing_while_mail_flows(self):
        upstream = RecordingUpstream()
        fixture = await self.relay_to(upstream)
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(replies[-1][0], 250)
        before = upstream.connection_count
        for _ in range(10):
            response = await self.readyz(fixture)
            self.assertEqual(response.code, 200, response.body)
        self.assertEqual(upstream.connection_count, before)
        self.assertNotIn("upstream", response.json()["checks"])

    async def status(self, fixture: RelayFixture) -> dict:
        from tests.support.webclient import request
        response = await request("GET", f"http://127.0.0.1:{fixture.metrics_port}/status")
        self.assertEqual(response.code, 200, response.body)
        [upstream] = response.json()["upstreams"].values()
        return upstream

    async def test_every_breaker_open_is_still_ready_and_status_says_so(self):
        sink = await self.sink()
        fixture = await self.fixture(sink, extra=("--relay-breaker-failures", "1",
                                                  "--relay-breaker-cooldown", "60"))
        await sink.stop()
        [replies] = await self.session(fixture, lambda c: [c.send()])
        self.assertEqual(replies[1][0], 451)
        response = await self.readyz(fixture)
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual((await self.status(fixture))["breaker"]["state"], "open")

    async def test_exhausted_pool_is_still_ready_and_status_says_so(self):
        upstream = RecordingUpstream()
        fixture = await self.relay_to(upstream, "--relay-pool-size", "1",
                                      "--relay-connect-timeout", "5")
        holder = await fixture.run(lambda: Client(fixture))
        waiter = await fixture.run(lambda: _printer(fixture))
        await fixture.run(lambda: holder.session.send(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"))
        await fixture.run(lambda: [holder.session.reply() for _ in range(2)])
        # The printer's RCPT waits for the only connection.
        await fixture.run(lambda: waiter.session.send(
            b"MAIL FROM:<printer@example.com>\r\nRCPT TO:<bob@example.net>\r\n"))
        for _ in range(50):
            pool = fixture.service.relay.upstreams[0].pool
            if pool.exhausted:
                break
            await _sleep(0.05)
        response = await self.readyz(fixture)
        self.assertEqual(response.code, 200, response.body)
        pool = (await self.status(fixture))["pool"]
        self.assertEqual((pool["busy"], pool["waiting"]), (1, 1))
        await fixture.run(holder.session.close)
        await fixture.run(waiter.session.close)


def _printer(fixture: RelayFixture) -> Client:
    """A second client: another address (127.0.0.2), another identity."""
    session = fixture.connect(source="127.0.0.2")
    session.command("EHLO printer.example")
    session.starttls(fixture.client_context(), server_hostname="relay.test")
    session.command("EHLO printer.example")
    assert session.auth_plain("printers", "printer1:p:with:colons")[0] == 235
    client = Client.__new__(Client)
    client.session = session
    return client


def _sleep(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ClientSharesTests(unittest.TestCase):
    """The share per client, without sockets: who waits, who passes, who is served."""

    def test_a_client_over_its_share_waits_and_never_blocks_others(self):
        from esmtpfa.relay.pool import ClientShares
        shares = ClientShares(cap=1)
        alice = ("address 10.0.0.1", "identity office/alice")
        bob = ("address 10.0.0.2", "identity office/bob")
        first = self.successResultOf(shares.acquire(alice))
        waiting = shares.acquire(alice)
        self.assertNoResult(waiting)
        # Bob arrives after her waiter and is served at once: she waits for her own.
        bob_ticket = self.successResultOf(shares.acquire(bob))
        first.release()
        second = self.successResultOf(waiting)
        # A release acts once; a cancelled waiter leaves the queue.
        first.release()
        self.assertEqual(shares.held("identity office/alice"), 1)
        cancelled = shares.acquire(alice)
        cancelled.cancel()
        self.failureResultOf(cancelled)
        second.release()
        bob_ticket.release()
        self.assertEqual((shares.held(alice[0]), shares.held(bob[1])), (0, 0))

    def test_a_paced_sender_borrows_what_nobody_wants_and_live_clients_come_first(self):
        """docs/delivery-guarantee.md, "Fair use of the upstream connections": the queue
        runner may use the connections no live client wants, never a live client's."""
        from esmtpfa.relay.pool import ClientShares
        shares = ClientShares(cap=2, room=4)
        runner = ("spool runner", "identity p/batch")
        own = [self.successResultOf(shares.acquire(runner, paced=True)) for _ in range(2)]
        borrowed = [self.successResultOf(shares.acquire(runner, paced=True))
                    for _ in range(2)]
        self.assertEqual((shares.held("spool runner"), shares.borrowed), (2, 2))
        # The room is used up: the runner waits for it ...
        fifth = shares.acquire(runner, paced=True)
        self.assertNoResult(fifth)
        # ... while a live client, under its own share, is served at once.
        alice = ("address 10.0.0.1", "identity office/alice")
        live = [self.successResultOf(shares.acquire(alice)) for _ in range(2)]
        # Borrowed tickets going back make room only once the live tickets fit in it.
        borrowed[0].release()
        self.assertNoResult(fifth)
        borrowed[1].release()
        self.assertNoResult(fifth)   # 2 of the runner's own + 2 live: the room is full
        live[0].release()
        ticket = self.successResultOf(fifth)
        self.assertTrue(ticket.borrowed)
        for t in own + [ticket, live[1]]:
            t.release()
        self.assertEqual((shares.held("spool runner"), shares.borrowed,
                          shares.held(alice[0])), (0, 0, 0))

    def test_a_live_client_never_borrows(self):
        from esmtpfa.relay.pool import ClientShares
        shares = ClientShares(cap=1, room=10)
        alice = ("address 10.0.0.1", "identity office/alice")
        first = self.successResultOf(shares.acquire(alice))
        second = shares.acquire(alice)
        self.assertNoResult(second)   # nine connections free, and still only her share
        first.release()
        self.assertFalse(self.successResultOf(second).borrowed)

    def test_one_address_many_identities_share_the_address(self):
        from esmtpfa.relay.pool import ClientShares
        shares = ClientShares(cap=2)
        nat = "address 192.0.2.7"
        tickets = [self.successResultOf(shares.acquire((nat, f"identity p/u{i}")))
                   for i in range(2)]
        third = shares.acquire((nat, "identity p/u3"))
        self.assertNoResult(third)
        tickets[0].release()
        self.successResultOf(third)
