"""``probe()`` (esmtpfa.common.probe) and the ``--check-connect`` loop over it
(esmtpfa.runtime.checkconfig.check_connect), with a ``Clock`` for the deadline.

The real back ends are probed end to end in tests/test_check_config.py; here the loop
is shown to know nothing of component types: it asks, bounds and prints."""

from __future__ import annotations

import io

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.common.probe import IProbe, IProbeGroup, ProbeResult, probes_of
from esmtpfa.providers.userpass import UserPassProvider
from esmtpfa.runtime import checkconfig


@implementer(IProbe)
class Answering:
    def __init__(self, subject: str, answer: Deferred):
        self.probe_subject = subject
        self._answer = answer

    def probe(self) -> Deferred:
        return self._answer


@implementer(IProbeGroup)
class Group:
    def __init__(self, *parts):
        self.parts = parts

    def probes(self) -> list:
        return list(self.parts)


class ProbeResultTests(unittest.TestCase):
    def test_a_failure_is_its_text_or_its_type(self):
        self.assertEqual(ProbeResult.from_failure(Failure(ValueError("bind refused"))),
                         ProbeResult(False, "bind refused"))
        self.assertEqual(ProbeResult.from_failure(Failure(ConnectionError())),
                         ProbeResult(False, "ConnectionError"))

    def test_probes_of(self):
        one = Answering("one", succeed(ProbeResult.passed("ok")))
        two = Answering("two", succeed(ProbeResult.passed("ok")))
        self.assertEqual(probes_of(one), [one])
        self.assertEqual(probes_of(Group(one, two)), [one, two])
        self.assertEqual(probes_of(None), [])
        # A provider type without a back end offers none.
        userpass = UserPassProvider.from_params(
            ProviderMeta("local", "userpass"), {"username": "u", "password": "p"})
        self.assertEqual(probes_of(userpass), [])


class CheckConnectLoopTests(unittest.TestCase):
    """One line per component, in order, each bounded by ``CONNECT_TIMEOUT`` on the
    clock it is given."""

    def test_lines_in_order_and_a_silent_back_end_times_out(self):
        clock = Clock()
        out = io.StringIO()
        report = checkconfig.Report(out)
        silent = Answering("provider 'idp' (jwt)", Deferred())
        loaded = checkconfig.Loaded(
            providers=[silent],
            relay=Group(Answering("upstream mx.test:25",
                                  succeed(ProbeResult.passed("connected, TLS, AUTH PLAIN"))),
                        Answering("upstream mx2.test:25",
                                  succeed(ProbeResult.failed("connection refused")))))
        loaded.stop = lambda: succeed(None)
        done = checkconfig.check_connect(loaded, clock, report)
        self.assertNoResult(done)
        clock.advance(checkconfig.CONNECT_TIMEOUT - 1)
        self.assertNoResult(done)
        clock.advance(1)
        self.successResultOf(done)
        self.assertEqual(out.getvalue().splitlines(), [
            "ok       upstream mx.test:25: connected, TLS, AUTH PLAIN",
            "PROBLEM  upstream mx2.test:25: connection refused",
            f"PROBLEM  provider 'idp' (jwt): no answer within "
            f"{checkconfig.CONNECT_TIMEOUT:g} s",
        ])
        self.assertEqual(len(report.problems), 2)
