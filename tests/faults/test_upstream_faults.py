"""Scenario B: an upstream that misbehaves, behind a running relay with a pool of one.

For each misbehaviour of ``tests.support.misbehaving`` one message, with its own
Message-ID, goes through a fresh client session.  What the client must notice:

* a ``4xx`` reply (the upstream never accepted the message, so never ``250``), and,
  when the fault came after the final dot, one that says a duplicate is possible;
* the reply within the relay's per-message deadline (plus a grace for a loaded machine),
  never attempts × ``--relay-timeout`` (RFC 5321 §4.5.3.2 gives the client
  five minutes for RCPT and ten for the final dot, and the test shrinks those);

and what the upstream must have seen: the content at most once for that client attempt
(garbage, a 2 MB line or mixed codes after the dot got three copies).  Then an
ordinary message on a new session must get ``250`` and arrive exactly once: the one
pooled connection was not left stalled or poisoned by the fault.
"""

from __future__ import annotations

from twisted.internet import reactor, threads
from twisted.trial import unittest

from tests.faults.harness import RunningRelay, message, new_message_id, send_fresh
from tests.support import misbehaving as m

#: The per-message deadlines across failover attempts (docs/fault-suite.md).
DEADLINE = 4.0
RELAY_ARGS = ("--relay-rcpt-deadline", str(DEADLINE), "--relay-data-deadline", str(DEADLINE),
              "--relay-pool-size", "1", "--relay-connect-timeout", "3",
              "--relay-timeout", "3", "--relay-data-timeout", "3")
#: Time a loaded two-core machine may add to a deadline before the client hears it.
GRACE = 3.0


class UpstreamFaultTests(unittest.TestCase):
    timeout = 60

    async def check_fault(self, behaviour: str) -> None:
        upstream = m.MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=RELAY_ARGS)
        self.addCleanup(relay.stop)
        await relay.start()

        faulty = new_message_id(behaviour, 1)
        started = reactor.seconds()
        code, text = await threads.deferToThread(
            send_fresh, relay.smtp_port, faulty, message(faulty),
            sender=f"{behaviour}@faults.test")
        waited = reactor.seconds() - started
        copies, accepted = upstream.copies(faulty), upstream.accepted(faulty)

        ordinary = new_message_id("after-" + behaviour, 2)
        after = await threads.deferToThread(send_fresh, relay.smtp_port, ordinary,
                                            message(ordinary))
        seen = (f"{behaviour}: client heard {code} {text!r} after {waited:.1f} s; upstream "
                f"got {copies} copies, accepted {accepted}; then an ordinary message got "
                f"{after[0]} {after[1]!r}")

        self.assertEqual(accepted, 0, seen)
        self.assertTrue(400 <= code < 500, seen)
        self.assertLessEqual(copies, 1, seen)
        if behaviour in m.AFTER_THE_DOT and behaviour != m.REPLY_421_EOM:
            self.assertIn("duplicate", text.lower(), seen)
        self.assertLessEqual(waited, DEADLINE + GRACE, seen)
        self.assertEqual(after[0], 250, seen)
        self.assertEqual((upstream.copies(ordinary), upstream.accepted(ordinary)), (1, 1),
                         seen)

    def test_stall_at_rcpt(self):
        return self.check_fault(m.STALL_RCPT)

    def test_never_answers_data(self):
        """One bounded wait, not attempts × --relay-timeout."""
        return self.check_fault(m.STALL_DATA)

    def test_stall_after_the_final_dot(self):
        return self.check_fault(m.STALL_EOM)

    def test_close_after_the_final_dot(self):
        return self.check_fault(m.CLOSE_EOM)

    def test_binary_garbage_after_the_final_dot(self):
        return self.check_fault(m.GARBAGE_EOM)

    def test_two_megabyte_line_after_the_final_dot(self):
        return self.check_fault(m.LONG_LINE_EOM)

    def test_mixed_codes_after_the_final_dot(self):
        return self.check_fault(m.MIXED_EOM)

    def test_421_to_mail(self):
        return self.check_fault(m.REPLY_421_MAIL)

    def test_421_after_the_final_dot(self):
        return self.check_fault(m.REPLY_421_EOM)


class AcceptingUpstreamTests(unittest.TestCase):
    """The control: the same upstream, behaving, takes every message exactly once."""

    timeout = 60

    async def test_accepts_normally(self):
        upstream = m.MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=RELAY_ARGS)
        self.addCleanup(relay.stop)
        await relay.start()
        ids = [new_message_id("accept", n) for n in range(5)]
        for message_id in ids:
            code, text = await threads.deferToThread(
                send_fresh, relay.smtp_port, message_id, message(message_id),
                sender=f"{m.ACCEPT}@faults.test")
            self.assertEqual(code, 250, text)
        self.assertEqual([upstream.accepted(i) for i in ids], [1] * len(ids))
        self.assertEqual(upstream.connections, 1, "the pooled connection was not reused")
