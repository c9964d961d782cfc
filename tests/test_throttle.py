"""Failed-login throttling: windows, bounds, and who may reset what (with a Clock)."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from esmtpfa.auth.throttle import AuthThrottle, FailureWindow


class FailureWindowTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.window = FailureWindow(limit=3, window=60, clock=self.clock)

    def test_blocks_at_the_limit_and_forgets_after_the_window(self):
        for _ in range(2):
            self.window.failed("a")
        self.assertFalse(self.window.blocked("a"))
        self.window.failed("a")
        self.assertTrue(self.window.blocked("a"))
        self.assertFalse(self.window.blocked("b"))
        self.clock.advance(61)
        self.assertFalse(self.window.blocked("a"))
        self.assertEqual(len(self.window), 0)

    def test_sliding_not_fixed(self):
        self.window.failed("a")
        self.clock.advance(40)
        self.window.failed("a")
        self.window.failed("a")
        self.clock.advance(30)  # the first failure is now outside the window
        self.assertFalse(self.window.blocked("a"))

    def test_memory_is_bounded(self):
        window = FailureWindow(limit=1, window=60, clock=self.clock, max_keys=100)
        for i in range(1000):
            window.failed(f"user{i}")
        self.assertEqual(len(window), 100)
        self.assertTrue(window.blocked("user999"))
        self.assertFalse(window.blocked("user0"))


class AuthThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.throttle = AuthThrottle(per_address=5, per_username=3, window=600,
                                     clock=self.clock)

    def test_username_attacked_from_many_addresses(self):
        for i in range(3):
            self.throttle.failed(f"10.0.0.{i}", "Alice")
        self.assertFalse(self.throttle.allows("10.0.0.99", "alice"))
        self.assertTrue(self.throttle.allows("10.0.0.99", "bob"))

    def test_one_address_guessing_many_usernames(self):
        for i in range(5):
            self.throttle.failed("192.0.2.7", f"user{i}")
        self.assertFalse(self.throttle.allows("192.0.2.7", "fresh-user"))

    def test_success_clears_the_username_not_the_address(self):
        for i in range(2):
            self.throttle.failed("192.0.2.7", "alice")
        self.throttle.succeeded("192.0.2.7", "alice")
        self.throttle.failed("192.0.2.7", "alice")
        self.assertTrue(self.throttle.allows("192.0.2.8", "alice"))
        for i in range(2):
            self.throttle.failed("192.0.2.7", "mallory")
        self.assertFalse(self.throttle.allows("192.0.2.7", "anyone"))
