"""Scenario C: hostile clients against a running relay while a well-behaved one sends.

The attackers (``tests.support.hostile``) come from loopback addresses other than the
well-behaved client's 127.0.0.1, and the tricklers log in as another identity, as they
would in production.  What the tests assert is what users and operators notice:

* the well-behaved client is served: its messages get ``250`` within ``SERVED`` seconds
  (after silent TLS sockets filled every connection slot, within the handshake timeout
  plus ``GRACE``) and reach the upstream exactly once;
* the relay ends every hostile connection within its deadline plus ``GRACE``: a TLS
  handshake that never starts, a byte every two seconds in DATA or in a command line, a
  client that never reads;
* a client that never reads is stopped by back-pressure: the relay takes a bounded
  amount from it, and its resident memory stays under ``harness.RSS_LIMIT_MIB``;
* a flood over the per-address limit is refused at once, with a bounded log.

Short timeouts come from flags so that each scenario ends in seconds.
"""

from __future__ import annotations

from twisted.internet import reactor, task, threads

from tests.faults.harness import ATTACKER, RunningRelay, ScenarioCase, keep_sending
from tests.support import hostile
from tests.support.misbehaving import MisbehavingUpstream

IDLE_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 2.0
COMMAND_TIMEOUT = 4.0
MIN_DATA_RATE = 1000  # octets per second during DATA
RELAY_ARGS = ("--idle-timeout", str(IDLE_TIMEOUT),
              "--tls-handshake-timeout", str(HANDSHAKE_TIMEOUT),
              "--command-timeout", str(COMMAND_TIMEOUT),
              "--min-data-rate", str(MIN_DATA_RATE), "--relay-connect-timeout", "5",
              "--relay-timeout", "5", "--relay-data-timeout", "10",
              "--max-connections-per-ip", "1000")
#: What a loaded two-core machine may add to a deadline before a connection is gone.
GRACE = 4.0
#: Longest a well-behaved client's whole session (connect to final reply) may take.
SERVED = 10.0
PIPELINE_SECONDS = 8.0
PIPELINE_LIMIT = 512 * 2 ** 20   # the test's own bound on what each pipeliner writes
#: What the relay may take in from one client that never reads: loopback socket buffers
#: (a few MiB each way with autotuning) plus the relay's own allowance.
BACK_PRESSURE_MIB = 32
#: Log octets per refused connection: repeated refusals collapse into summaries.
LOG_PER_REFUSAL = 100


class HostileClientTests(ScenarioCase):

    async def start(self, *args: str):
        upstream = MisbehavingUpstream()
        return await super().start(upstream, *RELAY_ARGS, *args), upstream

    def well_behaved(self, relay: RunningRelay, label: str, duration: float):
        return threads.deferToThread(keep_sending, relay.smtp_port, label, duration,
                                     timeout=SERVED + 5)

    def assert_served(self, attempts, upstream: MisbehavingUpstream, since: float = 0.0):
        """Every message from ``since`` seconds on got 250 within SERVED seconds and
        reached the upstream exactly once."""
        late = [a for a in attempts if a.at >= since]
        self.assertTrue(late, "the well-behaved client sent nothing")
        bad = [(a.code, a.text, round(a.at, 1), round(a.took, 1)) for a in late
               if a.code != 250 or a.took > SERVED]
        self.assertEqual(bad, [], f"{len(bad)} of {len(late)} well-behaved messages not "
                                  f"served in time (code, text, at, took)")
        self.assertEqual([upstream.accepted(a.message_id) for a in late], [1] * len(late))

    def assert_closed_within(self, crowd: hostile.Crowd, seconds: float, what: str):
        connected = crowd.connected()
        self.assertTrue(connected, f"no {what} connection was made")
        slow = [c for c in connected if c.closed_at is None or
                c.closed_at - c.connected_at > seconds]
        self.assertEqual(len(slow), 0, f"{len(slow)} of {len(connected)} {what} connections "
                                       f"were still open {seconds:g} s after connecting")

    async def test_silent_tls_sockets_end_at_the_handshake_timeout(self):
        """200 sockets on the implicit-TLS port that never send a ClientHello, from 200
        addresses, while at most 150 connections are allowed: they may fill every slot,
        but only until the handshake timeout."""
        relay, upstream = await self.start("--max-connections", "150")
        crowd = self.crowd(lambda: hostile.Silent(reactor))
        crowd.connect(relay.tls_port, 200, hostile.sources(200))
        await crowd.settle()
        bound = max(HANDSHAKE_TIMEOUT, IDLE_TIMEOUT) + GRACE
        attempts = await self.well_behaved(relay, "beside-silent-tls", bound + 3)
        await crowd.wait_closed(1.0)

        served = [a.at for a in attempts if a.code == 250]
        self.assertTrue(served and served[0] <= bound,
                        f"first message served at {served[:1]}, bound {bound:g} s; "
                        f"{len(crowd.still_open())} silent sockets still open; replies: "
                        f"{sorted({(a.code, a.text) for a in attempts})}")
        self.assert_served(attempts, upstream, since=served[0])
        self.assert_closed_within(crowd, bound, "silent TLS")
        self.assert_memory_bounded()

    async def test_tricklers_are_cut_and_do_not_starve_the_pool(self):
        """20 clients of one identity (from 20 addresses) trickle DATA one byte every 2 s,
        5 more trickle a command line: with a pool of 20 they held every upstream
        session and everyone else got 451 4.4.5; and each byte reset the
        idle timer for ever."""
        relay, upstream = await self.start("--relay-pool-size", "20")
        in_data = self.crowd(lambda: hostile.Trickler(
            reactor, user=ATTACKER[0], password=ATTACKER[1], in_data=True))
        in_command = self.crowd(lambda: hostile.Trickler(
            reactor, user=ATTACKER[0], password=ATTACKER[1], in_data=False))
        in_data.connect(relay.smtp_port, 20, hostile.sources(20, first=300))
        in_command.connect(relay.smtp_port, 5, hostile.sources(5, first=400))
        await in_data.settle()
        await in_command.settle()
        await self.wait_until(lambda: all(c.trickling or c.unexpected or not c.is_open
                                          for c in in_data.clients + in_command.clients))
        started = [c for c in in_data.clients if c.trickling]
        bound = max(IDLE_TIMEOUT, COMMAND_TIMEOUT) + 2 + GRACE
        attempts = await self.well_behaved(relay, "beside-tricklers", bound)
        await in_data.wait_closed(2.0)
        await in_command.wait_closed(2.0)

        # The relay may refuse some at RCPT (a fair share of the pool per identity) with
        # a 4xx; enough must have got as far as DATA for the attack to be real.
        refusals = {bytes(c.unexpected[:4]) for c in in_data.clients if c.unexpected}
        self.assertTrue(refusals <= {b"451 ", b"452 ", b"421 "}, refusals)
        self.assertGreaterEqual(len(started), 5, f"too few tricklers reached DATA: {refusals}")
        self.assert_served(attempts, upstream)
        self.assert_closed_within(in_data, bound, "DATA trickler")
        self.assert_closed_within(in_command, bound, "command-line trickler")
        self.assertEqual([t for t in upstream.transactions if t.complete and
                          t.sender == "trickler@example.com"], [],
                         "a trickled message must never be delivered")
        self.assert_memory_bounded()

    async def test_clients_that_never_read_meet_back_pressure(self):
        """3 clients pipeline NOOP/RSET and never read a reply: 3 of them took the relay
        from 54 MB to 528 MB in 30 s.  Each may make the relay take in only
        a bounded amount (the kernel's socket buffers and a small allowance), and then
        its stalled connection ends by the idle deadline."""
        relay, upstream = await self.start()
        crowd = self.crowd(lambda: hostile.Pipeliner(reactor, limit=PIPELINE_LIMIT))
        crowd.connect(relay.smtp_port, 3, hostile.sources(3, first=500))
        attempts = await self.well_behaved(relay, "beside-pipeliners", PIPELINE_SECONDS)
        taken = [c.sent for c in crowd.clients]
        await crowd.wait_closed(IDLE_TIMEOUT + GRACE)

        self.assert_served(attempts, upstream)
        self.assert_memory_bounded()
        self.assertTrue(all(sent < BACK_PRESSURE_MIB * 2 ** 20 for sent in taken),
                        f"the relay took {[round(s / 2 ** 20) for s in taken]} MiB from "
                        f"clients that never read (bound {BACK_PRESSURE_MIB} MiB each)")
        self.assertEqual(len(crowd.still_open()), 0,
                         f"a client that never reads is never cut (it wrote "
                         f"{[round(s / 2 ** 20) for s in taken]} MiB)")

    async def test_connection_flood_over_the_limit(self):
        """400 connections at once from one address over a limit of 20 per address: the
        rest are refused at once, the well-behaved client is not affected, the admitted
        silent ones end at the idle timeout, and refusals do not flood the log."""
        relay, upstream = await self.start("--max-connections", "100",
                                           "--max-connections-per-ip", "20")
        log_before = len(relay.log)
        crowd = self.crowd(lambda: hostile.Silent(reactor))
        good = self.well_behaved(relay, "beside-flood", IDLE_TIMEOUT + GRACE)
        crowd.connect(relay.smtp_port, 400, "127.0.3.2")
        await crowd.settle()
        attempts = await good
        await crowd.wait_closed(IDLE_TIMEOUT + GRACE)

        connected = crowd.connected()
        refused = crowd.refused()
        self.assertGreaterEqual(
            len(refused), len(connected) - 20,
            f"{len(connected)} connected ({len([c for c in crowd.clients if c.failed])} "
            f"failed to connect), {len(refused)} refused with 421, "
            f"{len(crowd.still_open())} still open; others received "
            f"{sorted({bytes(c.received[:40]) for c in connected if not c.refused})[:5]}")
        slow_refusals = [c for c in refused
                         if c.closed_at is None or c.closed_at - c.connected_at > GRACE]
        self.assertEqual(slow_refusals, [], "a refused connection must be closed at once")
        self.assert_served(attempts, upstream)
        self.assert_closed_within(crowd, IDLE_TIMEOUT + GRACE, "flooding")
        self.assert_memory_bounded()
        logged = len(relay.log) - log_before
        self.assertLess(logged, LOG_PER_REFUSAL * len(refused) + 20_000,
                        f"{logged} bytes of log for {len(refused)} refused connections")

    async def wait_until(self, condition, timeout: float = 10.0) -> None:
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline and not condition():
            await task.deferLater(reactor, 0.1, lambda: None)
