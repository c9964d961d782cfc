"""Sending rates per identity: windows driven by a ``Clock``."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from esmtpfa.auth.sendingrates import Limit, Rates, RateSyntaxError
from esmtpfa.limits.interfaces import Exceeded
from esmtpfa.limits.ledgers import RateLimiter
from esmtpfa.limits.rates import Reservation


class ParseTests(unittest.TestCase):
    def test_limits(self):
        self.assertEqual(Limit.parse("100/1h"), Limit(100, 3600.0))
        self.assertEqual(Limit.parse("3/m"), Limit(3, 60.0))
        self.assertEqual(Limit.parse(" 1000 / 1d "), Limit(1000, 86400.0))
        self.assertEqual(str(Limit.parse("100/60m")), "100/1h")
        for bad in ("100", "100/1w", "x/1h", "100/0h", "", "-1/1h"):
            self.assertRaises(RateSyntaxError, Limit.parse, bad)

    def test_rates_from_config_and_from_attribute_strings(self):
        both = Rates(Limit(100, 3600.0), Limit(1000, 86400.0))
        self.assertEqual(Rates.parse({"messages": "100/1h", "recipients": "1000/1d"}), both)
        self.assertEqual(Rates.parse("messages=100/1h, recipients=1000/1d"), both)
        self.assertEqual(Rates.parse("{messages: 100/1h, recipients: 1000/1d}"), both)
        self.assertEqual(Rates.parse({"messages": "5/1m"}), Rates(Limit(5, 60.0), None))
        self.assertRaises(RateSyntaxError, Rates.parse, {"mesages": "5/1m"})
        self.assertRaises(RateSyntaxError, Rates.parse, "lots")
        self.assertRaises(RateSyntaxError, Rates.parse, 5)

    def test_own_limits_win_over_defaults(self):
        default = Rates(Limit(10, 60.0), Limit(100, 60.0))
        own = Rates(messages=Limit(50, 60.0))
        self.assertEqual(own.or_else(default), Rates(Limit(50, 60.0), Limit(100, 60.0)))


def settled(d):
    """The answer of an in-process ledger, which is there at once: the result, or the
    failure raised."""
    results: list = []
    d.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class LimiterTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.limiter = RateLimiter(self.clock)
        self.rates = Rates(messages=Limit(3, 60.0), recipients=Limit(5, 60.0))

    def send(self, key="corp/alice", recipients=1, accepted=True):
        reservation = Reservation(self.limiter, key, self.rates)
        settled(reservation.message())
        for _ in range(recipients):
            settled(reservation.recipient())
        (reservation.commit if accepted else reservation.release)()

    def test_three_per_minute_then_refused_until_the_window_rolls(self):
        for _ in range(3):
            self.send()
        with self.assertRaises(Exceeded) as caught:
            self.send()
        self.assertEqual(caught.exception.kind, "messages")
        self.assertGreaterEqual(caught.exception.retry_after, 1)
        self.assertLessEqual(caught.exception.retry_after, 120)
        self.clock.advance(120)  # two windows later nothing of the old ones counts
        self.send()

    def test_another_identity_has_its_own_budget(self):
        for _ in range(3):
            self.send("corp/alice")
        self.send("corp/bob")
        self.send("other/alice")

    def test_only_accepted_messages_count(self):
        for _ in range(10):
            self.send(accepted=False)
        for _ in range(3):
            self.send()
        self.assertRaises(Exceeded, self.send)

    def test_parallel_transactions_cannot_overshoot(self):
        held = [Reservation(self.limiter, "corp/alice", self.rates) for _ in range(3)]
        for reservation in held:
            settled(reservation.message())
        late = Reservation(self.limiter, "corp/alice", self.rates)
        self.assertRaises(Exceeded, lambda: settled(late.message()))
        held[0].release()  # one of them failed: its place is free again
        settled(late.message())

    def test_recipient_budget(self):
        reservation = Reservation(self.limiter, "corp/alice", self.rates)
        settled(reservation.message())
        for _ in range(5):
            settled(reservation.recipient())
        with self.assertRaises(Exceeded) as caught:
            settled(reservation.recipient())
        self.assertEqual(caught.exception.kind, "recipients")
        reservation.commit()
        self.assertRaises(Exceeded, self.send, recipients=1)

    def test_settling_twice_counts_once(self):
        reservation = Reservation(self.limiter, "corp/alice", self.rates)
        settled(reservation.message())
        reservation.commit()
        reservation.commit()
        reservation.release()
        self.send()
        self.send()
        self.assertRaises(Exceeded, self.send)

    def test_the_rolling_estimate_decays(self):
        for _ in range(3):
            self.send()
        self.clock.advance(60)  # a new window: the old one still weighs fully
        self.assertRaises(Exceeded, self.send)
        self.clock.advance(30)  # half of it left inside the rolling minute: 1.5 counted
        self.send()
        self.assertRaises(Exceeded, self.send)

    def test_unlimited_rates_never_refuse(self):
        reservation = Reservation(self.limiter, "corp/alice", Rates())
        for _ in range(1000):
            settled(reservation.message())
            settled(reservation.recipient())
        reservation.commit()
        self.assertEqual(len(self.limiter), 0)

    def test_memory_is_bounded(self):
        limiter = RateLimiter(self.clock, max_keys=100)
        for n in range(1000):
            reservation = Reservation(limiter, f"p/user{n}", self.rates)
            settled(reservation.message())
            reservation.commit()
        self.assertLessEqual(len(limiter), 100)


class SynchronousTwinTests(unittest.TestCase):
    """Every in-process ledger answers at once through ``<method>_now`` what its
    Deferred method fires with (``esmtpfa.limits.ledgers``); the workers' supervisor
    counts for all its workers through the twins."""

    def setUp(self):
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock)
        self.limit = Limit(2, 60.0)

    def test_the_three_in_process_ledgers_have_one_shape(self):
        from zope.interface.verify import verifyObject

        from esmtpfa.limits.interfaces import (
            ILocalConnectionLedger,
            ILocalLoginLedger,
            ILocalRateLedger,
        )
        from esmtpfa.limits.ledgers import ConnectionLimits, LocalLoginLedger
        self.assertTrue(verifyObject(ILocalRateLedger, self.limiter))
        self.assertTrue(verifyObject(ILocalLoginLedger,
                                     LocalLoginLedger(3, 2, 60.0, self.clock)))
        self.assertTrue(verifyObject(ILocalConnectionLedger, ConnectionLimits(2, 1)))

    def test_take_now_reserves_then_answers_the_refusal_as_a_value(self):
        self.assertIsNone(self.limiter.take_now("corp\0alice", "messages", self.limit, 1))
        self.assertIsNone(self.limiter.take_now("corp\0alice", "messages", self.limit, 1))
        refused = self.limiter.take_now("corp\0alice", "messages", self.limit, 1)
        self.assertIsInstance(refused, Exceeded)
        self.assertEqual((refused.kind, refused.limit, refused.retry_after),
                         ("messages", self.limit, 60.0))
        # The Deferred method answers the same, and the refusal reserved nothing.
        failure = self.failureResultOf(
            self.limiter.take("corp\0alice", "messages", self.limit, 1), Exceeded)
        self.assertEqual(failure.value.retry_after, 60.0)
        self.assertIsNone(self.limiter.take_now("corp\0bob", "messages", self.limit, 2))

    def test_give_now_settles_what_was_reserved(self):
        for _ in range(2):
            self.limiter.take_now("corp\0alice", "messages", self.limit, 1)
        self.limiter.give_now("corp\0alice", "messages", self.limit, 1, False)  # given back
        self.assertIsNone(self.limiter.take_now("corp\0alice", "messages", self.limit, 1))
        self.limiter.give_now("corp\0alice", "messages", self.limit, 2, True)  # they count
        self.assertIsNotNone(self.limiter.take_now("corp\0alice", "messages", self.limit, 1))
        self.clock.advance(120)  # two windows on: nothing left of them
        self.assertIsNone(self.limiter.take_now("corp\0alice", "messages", self.limit, 2))

    def test_the_supervisor_counts_through_the_twin(self):
        """A worker's ``rate.take`` is answered from ``take_now``: the supervisor never
        digs the answer out of a Deferred (one that has not fired would be lost)."""
        from esmtpfa.limits.ledgers import ConnectionLimits, LocalLoginLedger
        from esmtpfa.runtime.workers.counts import SharedLimits

        class TwinsOnly(RateLimiter):
            def take(self, *args):
                raise AssertionError("the supervisor asked take(), not take_now()")

            def give(self, *args):
                raise AssertionError("the supervisor asked give(), not give_now()")

        limits = SharedLimits(login=LocalLoginLedger(3, 2, 60.0, self.clock),
                              rates=TwinsOnly(self.clock),
                              connections={"smtp": ConnectionLimits(2, 1)})
        account = limits.for_worker(1)
        self.assertIsNone(account.rate_take("corp\0alice", "messages", 1, 60.0, 1))
        self.assertEqual(account.rate_take("corp\0alice", "messages", 1, 60.0, 1),
                         {"retry_after": 60.0})
        account.rate_give("corp\0alice", "messages", 1, 60.0, 1, False)
        self.assertIsNone(account.rate_take("corp\0alice", "messages", 1, 60.0, 1))
        account.close()  # gives the held reservation back through give_now
        self.assertIsNone(account.rate_take("corp\0alice", "messages", 1, 60.0, 1))
