"""The shared state (``--state-url``) through a Redis restart, a stalled Redis and a dead
one (docs/shared-state.md, "When Redis restarts" and "When Redis is slow or down").

* Redis restarted empty: relays that cached the identity digest key and relays that
  never had it still count under one key, whichever asks first: one budget.
* Redis stopped (SIGSTOP: it accepts and never answers) or killed: under the default
  ``--state-failure open`` the per-address login throttle and the message rate still
  refuse, from this process's own counts; each decision waits at most the state timeout
  and, once the breaker is open, not at all; the log says so once per transition, the
  ``state_degraded`` gauge says so; when Redis answers again, the counts go back to it.
* The breaker's state machine, driven by ``Clock``.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from esmtpfa.auth.sendingrates import Limit, Rates
from esmtpfa.limits.guard import (
    FailurePolicy,
    GuardedLoginLedger,
    GuardedRateLedger,
    StateRefusedRate,
)
from esmtpfa.limits.interfaces import Exceeded, StateUnavailable
from esmtpfa.limits.ledgers import LocalLoginLedger, RateLimiter
from esmtpfa.limits.rates import Reservation
from esmtpfa.limits.redis import RedisLoginLedger, RedisRateLedger, RedisState
from esmtpfa.limits.resp import RedisClient, RedisURL
from esmtpfa.limits.state_breaker import CLOSED, HALF_OPEN, OPEN, StateBreaker
from esmtpfa.web.metrics import RelayMetrics
from tests.faults.harness import RunningRelay, message, new_message_id, send_fresh
from tests.support.logcapture import observe_logs
from tests.support.misbehaving import MisbehavingUpstream
from tests.support.redis import RedisServer
from tests.test_state_redis import failed_login

IDENTITY = "office\0alice"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def gauge(metrics: RelayMetrics, name: str = "esmtpfa_state_degraded") -> float | None:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def said(events: list[dict], text: str) -> list[dict]:
    return [e for e in events if text in e.get("log_template", "")]


class RedisCase(unittest.TestCase):
    timeout = 60

    async def start_redis(self) -> RedisServer:
        server = RedisServer()
        self.addCleanup(server.stop)
        await server.start()
        return server

    def client(self, url: str, timeout: float = 2.0) -> RedisClient:
        client = RedisClient(RedisURL.parse(url), reactor, timeout=timeout)
        self.addCleanup(client.close)
        return client

    def keys(self, server: RedisServer, pattern: str) -> list[bytes]:
        return [key for key in server.command("KEYS", pattern).split(b"\r\n")
                if key.startswith(b"esmtpfa:")]


# -- a restart ------------------------------------------------------------------------------

class RestartTests(RedisCase):
    """Two relays (two ``RedisState``s, as two processes have), one Redis restarted
    empty between their uses: one budget, one set of keys."""

    LIMIT = Limit(4, 3600.0)

    async def after_restart(self, fresh_first: bool):
        server = await self.start_redis()
        old = RedisState(self.client(server.url))
        old_rates, old_login = RedisRateLedger(old), RedisLoginLedger(old, 100, 3, 600)
        await old_rates.take(IDENTITY, "messages", self.LIMIT, 1)   # caches the digest key
        stored = server.command("GET", "esmtpfa:digest-key")
        await server.restart()
        self.assertEqual(self.keys(server, "*"), [])   # empty
        # A relay (or worker) that never used Redis before: it makes its key now.
        fresh = RedisState(self.client(server.url))
        fresh_rates, fresh_login = RedisRateLedger(fresh), RedisLoginLedger(fresh, 100, 3, 600)
        order = [(fresh_rates, fresh_login), (old_rates, old_login)]
        if not fresh_first:
            order.reverse()
        sent = 0
        for attempt in range(10):
            rates, _ = order[attempt % 2]
            try:
                await rates.take(IDENTITY, "messages", self.LIMIT, 1)
            except Exceeded:
                continue
            await rates.give(IDENTITY, "messages", self.LIMIT, 1, True)
            sent += 1
        self.assertEqual(sent, 4)   # one budget of 4/1h, not one per relay
        # failed logins against one identity from both relays: under attack after 3,
        # so the 4th is answered late (the count reaches the throttle's delay)
        counts = []
        for attempt in range(4):
            _, login = order[attempt % 2]
            counts += await login.failed(f"192.0.2.{attempt}", [IDENTITY])
        self.assertEqual(counts, [1, 2, 3, 4])
        counters = [k for k in self.keys(server, "esmtpfa:rate:messages:*")
                    if not k.endswith(b":held")]
        self.assertEqual(len(counters), 1, counters)
        self.assertEqual(len(self.keys(server, "esmtpfa:login:id:*")), 1)
        return server, stored

    async def test_a_relay_that_survived_puts_its_key_back(self):
        server, stored = await self.after_restart(fresh_first=False)
        # the key every relay counted under before the restart, so any counts that a
        # replica (or a failover) still holds keep counting
        self.assertEqual(server.command("GET", "esmtpfa:digest-key"), stored)

    async def test_a_new_relay_first_and_the_survivor_adopts_its_key(self):
        server, stored = await self.after_restart(fresh_first=True)
        self.assertNotEqual(server.command("GET", "esmtpfa:digest-key"), stored)


# -- stalled, dead, back ----------------------------------------------------------------------

class DegradedTests(RedisCase):
    """Guarded ledgers as ``ledgers_from_settings`` builds them (default breaker), over a
    real Redis that stops answering and then answers again."""

    timeout = 90
    STATE_TIMEOUT = 0.3
    PER_ADDRESS = 3
    MESSAGES = Limit(2, 3600.0)

    async def ledgers(self):
        server = await self.start_redis()
        metrics = RelayMetrics("esmtpfa")
        state = RedisState(self.client(server.url, timeout=self.STATE_TIMEOUT))
        policy = FailurePolicy("open", reactor, observer=metrics, timeout=self.STATE_TIMEOUT)
        self.addCleanup(policy.stop)
        login = GuardedLoginLedger(RedisLoginLedger(state, self.PER_ADDRESS, 5, 600), policy)
        rates = GuardedRateLedger(RedisRateLedger(state), policy)
        # Redis works, and has counted a failure of this address already.
        await login.failed("192.0.2.50", [])
        return server, metrics, policy, login, rates

    async def timed(self, d: defer.Deferred, took: list[float]):
        started = time.monotonic()
        try:
            return await d
        finally:
            took.append(time.monotonic() - started)

    async def limits_hold(self, login, rates) -> list[float]:
        """Failed logins from one address until it is refused, and messages until the
        rate refuses; every decision timed."""
        took: list[float] = []
        refusals = []
        for _ in range(6):
            why = await self.timed(login.refusal("192.0.2.60", [IDENTITY]), took)
            refusals.append(why)
            if why is None:
                await self.timed(login.failed("192.0.2.60", [IDENTITY]), took)
        self.assertEqual(refusals[:3], [None] * 3)
        self.assertEqual(refusals[3:], ["too many failed logins from this address"] * 3)
        sent = []
        for _ in range(4):
            reservation = Reservation(rates, IDENTITY, Rates(messages=self.MESSAGES))
            try:
                await self.timed(reservation.message(), took)
            except Exceeded:
                sent.append(False)
                continue
            reservation.commit()
            sent.append(True)
        self.assertEqual(sent, [True, True, False, False])
        return took

    async def recovers(self, server, metrics, policy, login, events):
        """Once Redis answers, within the breaker's cool-down (5 s) and a probe, the
        counts go to Redis again, and the log and the gauge say so once."""
        deadline = time.monotonic() + 15
        while True:
            await login.failed("192.0.2.70", [])
            if self.keys(server, "esmtpfa:login:addr:192.0.2.70"):
                break
            self.assertLess(time.monotonic(), deadline, "never went back to Redis")
            await sleep(0.2)
        self.assertEqual(gauge(metrics), 0.0)
        self.assertEqual(len(said(events, "is degraded")), 1)
        self.assertEqual(len(said(events, "answers again")), 1)

    async def test_a_stalled_redis_keeps_the_limits_and_bounds_each_decision(self):
        server, metrics, policy, login, rates = await self.ledgers()
        events = observe_logs(self)
        server.pause()
        started = time.monotonic()
        took = await self.limits_hold(login, rates)
        total = time.monotonic() - started
        # no decision waits more than the state timeout (and some slack for a loaded
        # machine); the breaker opened after three, so the rest did not wait at all
        self.assertLess(max(took), self.STATE_TIMEOUT + 0.4, took)
        self.assertLess(total, 3 * self.STATE_TIMEOUT + 1.0, took)
        self.assertEqual(len([t for t in took if t >= self.STATE_TIMEOUT * 0.9]), 3, took)
        self.assertEqual(gauge(metrics), 1.0)
        self.assertEqual(len(said(events, "is degraded")), 1)   # once, not per call
        server.resume()
        await self.recovers(server, metrics, policy, login, events)

    async def test_a_dead_redis_keeps_the_limits(self):
        server, metrics, policy, login, rates = await self.ledgers()
        events = observe_logs(self)
        await server.kill()
        took = await self.limits_hold(login, rates)
        self.assertLess(max(took), self.STATE_TIMEOUT + 0.4, took)
        self.assertEqual(gauge(metrics), 1.0)
        await server.restart()
        await self.recovers(server, metrics, policy, login, events)


class StalledRelayTests(RedisCase):
    """A real relay (``twistd``), its Redis stopped: the rate and the login throttle
    still refuse, and a message costs at most a few state timeouts once, not some on
    every message."""

    timeout = 120

    async def test_limits_and_latency_with_a_stopped_redis(self):
        server = await self.start_redis()
        upstream = MisbehavingUpstream().start()
        self.addCleanup(upstream.stop)
        relay = RunningRelay(self.mktemp(), upstream_port=upstream.port, args=[
            "--rate-messages", "2/1h", "--max-auth-failures-per-ip", "3",
            "--state-timeout", "0.3"], env={"STATE_URL": server.url})
        self.addCleanup(relay.stop)
        await relay.start()
        server.pause()
        codes, took = [], []
        for n in range(4):
            message_id = new_message_id("stopped", n)
            started = time.monotonic()
            code, _ = await threads.deferToThread(
                send_fresh, relay.smtp_port, message_id, message(message_id))
            took.append(time.monotonic() - started)
            codes.append(code)
        self.assertEqual(codes, [250, 250, 451, 451])
        # the first message pays for the breaker's three timeouts, the others nothing
        self.assertLess(took[0], 3 * 0.3 + 1.5, took)
        self.assertLess(max(took[1:]), 1.0, took)
        logins = [await threads.deferToThread(failed_login, relay.smtp_port, "127.0.0.8")
                  for _ in range(5)]
        self.assertEqual(logins, [535, 535, 535, 454, 454])
        self.assertEqual(relay.log.count("is degraded ("), 1, relay.log)


# -- the breaker and the policy, with Clock ---------------------------------------------------

class BreakerTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.changes: list[tuple[bool, str]] = []
        self.breaker = StateBreaker(self.clock, failures=3, cooldown=5.0,
                                    on_change=lambda d, why: self.changes.append((d, why)))

    def test_opens_after_consecutive_failures_only(self):
        b = self.breaker
        for _ in range(2):
            self.assertTrue(b.allow())
            b.failure("timeout")
        b.success()   # an answer resets the run
        for _ in range(2):
            b.failure("timeout")
        self.assertEqual((b.state, self.changes), (CLOSED, []))
        b.failure("refused")
        self.assertEqual((b.state, self.changes), (OPEN, [(True, "refused")]))
        self.assertEqual(b.degraded_since, 0.0)
        self.assertFalse(b.allow())

    def test_one_probe_after_the_cool_down(self):
        b = self.breaker
        for _ in range(3):
            b.failure("x")
        self.clock.advance(4.9)
        self.assertFalse(b.allow())
        self.clock.advance(0.1)
        self.assertTrue(b.allow())     # the probe
        self.assertEqual(b.state, HALF_OPEN)
        self.assertFalse(b.allow())    # the others go around it
        b.failure("still")              # a failed probe: another cool-down, no new change
        self.assertEqual((b.state, len(self.changes)), (OPEN, 1))
        self.clock.advance(4.0)
        self.assertFalse(b.allow())
        self.clock.advance(1.0)
        self.assertTrue(b.allow())
        b.release()                   # the probe's caller went away: another may probe
        self.assertTrue(b.allow())
        b.success()
        self.assertEqual((b.state, b.degraded, b.degraded_since), (CLOSED, False, None))
        self.assertEqual(self.changes, [(True, "x"), (False, "answered")])
        self.assertTrue(b.allow())

    def test_bad_settings(self):
        for kwargs in ({"failures": 0}, {"cooldown": 0}):
            self.assertRaises(ValueError, StateBreaker, self.clock, **kwargs)


class _Store:
    """A ledger whose answers the test decides: ``answer`` (a value), or a failure, or
    silence (a Deferred that never fires)."""

    per_address, per_identity, window = 2, 5, 600.0

    def __init__(self):
        self.mode = "fail"
        self.calls: list[str] = []

    def _answer(self, name, value):
        self.calls.append(name)
        if self.mode == "fail":
            return defer.fail(StateUnavailable("connection refused"))
        if self.mode == "silent":
            return defer.Deferred()
        return defer.succeed(value)

    def refusal(self, address, identities):
        return self._answer("refusal", None)

    def failed(self, address, identities):
        return self._answer("failed", [1])

    def succeeded(self, address, identity):
        return self._answer("succeeded", None)

    def take(self, key, kind, limit, n):
        return self._answer("take", None)

    def give(self, key, kind, limit, n, count):
        return self._answer("give", None)


class PolicyTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.metrics = RelayMetrics("esmtpfa")
        self.events = observe_logs(self)
        self.store = _Store()

    def policy(self, kind="open") -> FailurePolicy:
        policy = FailurePolicy(kind, self.clock, observer=self.metrics, timeout=0.5,
                               store="Redis at redis://h:6379/0")
        self.addCleanup(policy.stop)
        return policy

    def test_a_silent_store_costs_three_deadlines_then_none(self):
        login = GuardedLoginLedger(self.store, self.policy())
        self.store.mode = "silent"
        answers = [login.refusal("192.0.2.1", []) for _ in range(3)]
        self.clock.advance(0.5)
        self.assertEqual([self.successResultOf(a) for a in answers], [None] * 3)
        # degraded: answered at once, without asking the store
        for _ in range(10):
            self.assertIsNone(self.successResultOf(login.refusal("192.0.2.1", [])))
        self.assertEqual(len(self.store.calls), 3)
        self.assertEqual(gauge(self.metrics), 1.0)

    def test_the_local_counts_refuse_while_degraded_and_redis_decides_after(self):
        policy = self.policy()
        login = GuardedLoginLedger(self.store, policy)
        self.assertIsInstance(login.fallback, LocalLoginLedger)
        for _ in range(2):
            self.assertIsNone(self.successResultOf(login.refusal("192.0.2.1", [])))
            self.assertEqual(self.successResultOf(login.failed("192.0.2.1", [])), [])
        self.assertEqual(self.successResultOf(login.refusal("192.0.2.1", [])),
                         "too many failed logins from this address")
        self.assertTrue(policy.degraded)
        self.store.mode = "answer"
        self.clock.advance(5.0)
        self.assertIsNone(self.successResultOf(login.refusal("192.0.2.1", [])))  # the probe
        self.assertFalse(policy.degraded)
        self.assertEqual(gauge(self.metrics), 0.0)
        # one line each way, however many calls went without the store
        self.assertEqual(len(said(self.events, "is degraded")), 1)
        self.assertEqual(len(said(self.events, "answers again")), 1)
        blips = said(self.events, "shared state unavailable for")
        self.assertLessEqual(len(blips), 2)

    def test_a_reservation_taken_here_is_settled_here(self):
        policy = self.policy()
        local = RateLimiter(self.clock)
        rates = GuardedRateLedger(self.store, policy, fallback=local)
        limit = Limit(5, 3600.0)
        for _ in range(3):   # taken here: Redis fails, then the breaker opens
            self.successResultOf(rates.take("k", "recipients", limit, 1))
        self.assertEqual(local._counters[("k", "recipients")].reserved, 3)
        self.store.mode = "answer"
        self.clock.advance(5.0)
        self.successResultOf(rates.take("k", "recipients", limit, 1))  # Redis again
        self.assertFalse(policy.degraded)
        self.store.calls.clear()
        # the transaction ends: three places go back here, the fourth to Redis, which
        # is never asked to settle what it does not hold
        self.successResultOf(rates.give("k", "recipients", limit, 4, True))
        self.assertEqual(self.store.calls, ["give"])
        counter = local._counters[("k", "recipients")]
        self.assertEqual((counter.reserved, counter.current), (0, 3))
        self.successResultOf(rates.give("k", "recipients", limit, 1, False))
        self.assertEqual(self.store.calls, ["give", "give"])

    def test_closed_refuses_at_once_while_degraded(self):
        rates = GuardedRateLedger(self.store, self.policy("closed"))
        for _ in range(3):
            self.failureResultOf(rates.take("k", "messages", Limit(1, 60.0), 1),
                                 StateRefusedRate)
        self.failureResultOf(rates.take("k", "messages", Limit(1, 60.0), 1),
                             StateRefusedRate)
        self.assertEqual(len(self.store.calls), 3)
        self.assertIsNone(rates.fallback)
