"""The ``Resources`` bundle (esmtpfa.common.resources; docs/architecture.md,
"Resources"): built once over a reactor, its threads living as long as that reactor."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from esmtpfa.common.resources import BLOCKING_THREADS, LastGood, Resources


class RecordingReactor(Clock):
    """A Clock that remembers what is asked of it at startup and shutdown."""

    def __init__(self):
        super().__init__()
        self.when_running: list = []
        self.triggers: list = []

    def callWhenRunning(self, function, *args, **kwargs):
        self.when_running.append(function)

    def addSystemEventTrigger(self, phase, event, function, *args, **kwargs):
        self.triggers.append((phase, event, function))


class BuildTests(unittest.TestCase):
    def test_threads_start_with_the_reactor_and_stop_at_its_shutdown(self):
        reactor = RecordingReactor()
        lent = Resources.build(reactor)
        self.assertFalse(lent.threads.started)
        self.assertEqual(lent.threads.max, BLOCKING_THREADS)
        [start] = reactor.when_running
        start()
        self.assertTrue(lent.threads.started)
        self.assertEqual([(phase, event) for phase, event, _ in reactor.triggers],
                         [("during", "shutdown")])
        reactor.triggers[0][2]()
        self.assertFalse(lent.threads.started)

    def test_the_clock_is_the_reactor_unless_given(self):
        reactor, clock = RecordingReactor(), Clock()
        self.assertIs(Resources.build(reactor).clock, reactor)
        self.assertIs(Resources.build(reactor, clock=clock).clock, clock)

    def test_each_bundle_has_its_own_jwks_cache(self):
        reactor = RecordingReactor()
        first, second = Resources.build(reactor), Resources.build(reactor)
        first.jwks.put("https://idp.test/jwks", "keys", 1.0)
        self.assertEqual(first.jwks.get("https://idp.test/jwks"), ("keys", 1.0))
        self.assertIsNone(second.jwks.get("https://idp.test/jwks"))
        self.assertIsInstance(second.jwks, LastGood)
