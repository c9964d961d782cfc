"""The parts of ``--workers`` that need no process: the control channel, the merged
metrics, and what the supervisor gives back for a worker that died (docs/workers.md)."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from esmtpfa.auth.sendingrates import Limit
from esmtpfa.limits.interfaces import Exceeded, StateUnavailable
from esmtpfa.limits.ledgers import ConnectionLimits, LocalLoginLedger, RateLimiter
from esmtpfa.runtime.workers.control import (
    CALL_TIMEOUT,
    CALLS,
    CONN_RECALL,
    CONN_RELEASE,
    CONN_TAKE,
    INT,
    MAX_FRAME,
    NONE,
    PING,
    RATE_TAKE,
    STR,
    BadCall,
    Call,
    ControlChannel,
    ControlLost,
    ControlTimeout,
    RemoteError,
    table,
)
from esmtpfa.runtime.workers.counts import (
    HTTP,
    LEASE_BATCH,
    LEASE_IDLE,
    SMTP,
    RemoteConnections,
    RemoteRateLedger,
    SharedLimits,
)
from esmtpfa.runtime.workers.merged_metrics import RetiredCounts, merge, snapshot
from esmtpfa.web.metrics import render
from tests.support.logcapture import observe_logs


class ClockReactor(Clock):
    """A ``Clock`` that can also hand out the real reactor's thread pool."""

    def getThreadPool(self):
        return reactor.getThreadPool()


# The channel itself is tested with calls of its own, declared as the relay's are.
ADD = Call("add", (("a", INT), ("b", INT)), answer=INT)
LATER = Call("later", answer=STR)
BROKEN = Call("broken", answer=INT)
SLOW = Call("slow", answer=STR + NONE)
TELL = Call("tell", (("what", STR),), notice=True)
BIG = Call("big", answer=STR)
TEST_CALLS = table([ADD, LATER, BROKEN, SLOW, TELL, BIG])


def pair(left_handlers=None, right_handlers=None, clock=None, calls=CALLS):
    """Two channels connected back to back through in-memory transports."""
    clock = clock or ClockReactor()
    left = ControlChannel(left_handlers or {}, clock, name="left", calls=calls)
    right = ControlChannel(right_handlers or {}, clock, name="right", calls=calls)
    left_t, right_t = StringTransport(), StringTransport()
    left.makeConnection(left_t)
    right.makeConnection(right_t)

    def pump():
        for _ in range(10):
            moved = False
            for src, dst in ((left_t, right), (right_t, left)):
                data = src.value()
                if data:
                    src.clear()
                    dst.dataReceived(data)
                    moved = True
            if not moved:
                return
    return left, right, pump, clock


class ControlChannelTests(unittest.TestCase):
    def test_a_call_is_answered(self):
        left, right, pump, _ = pair(right_handlers={ADD: lambda a, b: a + b},
                                    calls=TEST_CALLS)
        d = left.call(ADD, a=2, b=3)
        pump()
        self.assertEqual(self.successResultOf(d), 5)

    def test_a_deferred_answer_and_a_remote_error(self):
        waiting = defer.Deferred()
        left, right, pump, _ = pair(right_handlers={
            LATER: lambda: waiting, BROKEN: lambda: 1 / 0}, calls=TEST_CALLS)
        later, broken = left.call(LATER), left.call(BROKEN)
        pump()
        self.failureResultOf(broken, RemoteError)
        self.assertNoResult(later)
        waiting.callback("done")
        pump()
        self.assertEqual(self.successResultOf(later), "done")
        self.flushLoggedErrors(ZeroDivisionError)

    def test_an_unanswered_call_times_out_and_its_late_answer_is_dropped(self):
        waiting = defer.Deferred()
        left, right, pump, clock = pair(right_handlers={SLOW: lambda: waiting},
                                        calls=TEST_CALLS)
        d = left.call(SLOW, timeout=2.0)
        pump()
        clock.advance(2.0)
        self.failureResultOf(d, ControlTimeout)
        waiting.callback("late")
        pump()  # nothing to deliver it to: no error
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_closed_channel_fails_every_waiting_call(self):
        left, right, pump, clock = pair(right_handlers={SLOW: defer.Deferred},
                                        calls=TEST_CALLS)
        d = left.call(SLOW)
        pump()
        left.connectionLost(None)
        self.failureResultOf(d, ControlLost)
        self.failureResultOf(left.call(SLOW), ControlLost)
        self.assertTrue(left.lost.called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_notices_need_no_answer(self):
        seen = []
        left, right, pump, _ = pair(right_handlers={TELL: lambda what: seen.append(what)},
                                    calls=TEST_CALLS)
        left.notify(TELL, what="hello")
        pump()
        self.assertEqual(seen, ["hello"])

    def test_a_frame_over_the_bound_closes_the_channel(self):
        channel = ControlChannel({}, ClockReactor())
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived((MAX_FRAME + 1).to_bytes(4, "big"))
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_a_big_answer_crosses_a_real_socket_pair(self):
        """A metrics snapshot can exceed what AMP allows (64 KiB per value)."""
        big = "x" * (300 * 1024)
        ours, theirs = socket.socketpair()
        left = ControlChannel({}, reactor, name="left", calls=TEST_CALLS)
        right = ControlChannel({BIG: lambda: big}, reactor, name="right", calls=TEST_CALLS)
        for sock, channel in ((ours, left), (theirs, right)):
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX,
                                          Factory.forProtocol(lambda c=channel: c))
            sock.close()
        answer = yield left.call(BIG)
        self.assertEqual(answer, big)
        left.transport.loseConnection()
        right.transport.loseConnection()
        yield defer.gatherResults([left.lost, right.lost])


def registry_with(messages: float, connections: float, reloads: float, ok: float):
    registry = CollectorRegistry()
    Counter("messages_sent", "sent", ["provider"], namespace="esmtpfa",
            registry=registry).labels("corp").inc(messages)
    Gauge("smtp_active_connections", "open", ["listener"], namespace="esmtpfa",
          registry=registry).labels("plain").set(connections)
    Counter("config_reloads", "reloads", ["source", "result"], namespace="esmtpfa",
            registry=registry).labels("file", "success").inc(reloads)
    Gauge("config_last_reload_successful", "ok", namespace="esmtpfa",
          registry=registry).set(ok)
    Histogram("auth_duration_seconds", "auth", ["provider"], namespace="esmtpfa",
              registry=registry, buckets=(0.1, 1)).labels("corp").observe(0.05)
    return snapshot(registry.collect())


class MergedMetricsTests(unittest.TestCase):
    def exposition(self, *snapshots) -> str:
        return render(merge(snapshots, "esmtpfa")).decode()

    def test_counts_add_up_and_gauges_follow_their_rule(self):
        text = self.exposition(registry_with(3, 2, 1, 1), registry_with(4, 5, 1, 0))
        self.assertIn('esmtpfa_messages_sent_total{provider="corp"} 7.0', text)
        self.assertIn('esmtpfa_smtp_active_connections{listener="plain"} 7.0', text)
        # every worker applies every reload: the highest, not the sum
        self.assertIn('esmtpfa_config_reloads_total{result="success",source="file"} 1.0',
                      text)
        # one worker that failed its last reload shows
        self.assertIn("esmtpfa_config_last_reload_successful 0.0", text)
        self.assertIn('esmtpfa_auth_duration_seconds_count{provider="corp"} 2.0', text)
        self.assertIn('esmtpfa_auth_duration_seconds_bucket{le="0.1",provider="corp"} 2.0',
                      text)

    def test_a_dead_workers_counts_are_kept(self):
        retired = RetiredCounts()
        retired.retire(registry_with(3, 2, 1, 1), "esmtpfa")
        retired.retire(registry_with(4, 9, 1, 1), "esmtpfa")
        text = self.exposition(registry_with(1, 1, 1, 1), retired.snapshot())
        self.assertIn('esmtpfa_messages_sent_total{provider="corp"} 8.0', text)
        # gauges of the dead are not kept: their connections are gone
        self.assertIn('esmtpfa_smtp_active_connections{listener="plain"} 1.0', text)
        self.assertIn('esmtpfa_config_reloads_total{result="success",source="file"} 1.0',
                      text)


class DeadWorkerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.limits = SharedLimits(
            login=LocalLoginLedger(5, 3, 600.0, self.clock),
            rates=RateLimiter(self.clock),
            connections={SMTP: ConnectionLimits(10, 2), HTTP: ConnectionLimits(10, 2)})

    def test_its_connection_slots_and_reservations_are_given_back(self):
        account = self.limits.for_worker(1)
        self.assertEqual(account.conn_take(SMTP, "192.0.2.1"), 1)
        self.assertEqual(account.conn_take(SMTP, "192.0.2.1"), 1)
        self.assertEqual(account.conn_take(SMTP, "192.0.2.1"), "per-address limit")
        self.assertIsNone(account.rate_take("corp\0alice", "messages", 1, 3600.0, 1))
        self.assertIsNotNone(account.rate_take("corp\0alice", "messages", 1, 3600.0, 1))
        account.close()
        other = self.limits.for_worker(2)
        self.assertEqual(other.conn_take(SMTP, "192.0.2.1"), 1)
        self.assertIsNone(other.rate_take("corp\0alice", "messages", 1, 3600.0, 1))

    def test_a_release_it_never_took_frees_nothing(self):
        one, two = self.limits.for_worker(1), self.limits.for_worker(2)
        self.assertEqual(one.conn_take(SMTP, "192.0.2.1"), 1)
        self.assertEqual(one.conn_take(SMTP, "192.0.2.1"), 1)
        two.conn_release(SMTP, "192.0.2.1")  # a bug in a worker must not free a slot
        self.assertEqual(two.conn_take(SMTP, "192.0.2.1"), "per-address limit")

    def test_the_worker_side_ledgers_speak_through_the_channel(self):
        account = self.limits.for_worker(1)
        left, right, pump, _ = pair(right_handlers=account.handlers())
        rates = RemoteRateLedger(left)
        limit = Limit(1, 60.0)
        first = rates.take("corp\0bob", "messages", limit, 1)
        second = rates.take("corp\0bob", "messages", limit, 1)
        pump()
        self.successResultOf(first)
        self.assertEqual(self.failureResultOf(second, Exceeded).value.kind, "messages")
        connections = RemoteConnections(left, SMTP, 10, 2, Clock())
        taken = [connections.refusal("192.0.2.9") for _ in range(3)]
        pump()
        self.assertEqual([self.successResultOf(d) for d in taken],
                         [None, None, "per-address limit"])
        connections.release("192.0.2.9")
        pump()
        self.assertEqual(self.limits.connections[SMTP].active, 1)


class LentSlotsTests(unittest.TestCase):
    """Connection slots are lent to a worker ahead of its connections while the relay is
    far from its limits, so most connections and closes ask the supervisor nothing; the
    limits stay exact: never exceeded, and never refused while another worker keeps
    an unused slot (docs/workers.md, "Connection slots lent ahead")."""

    IP = "192.0.2.7"

    def setUp(self):
        self.clock = ClockReactor()
        self.ledger = ConnectionLimits(100, 8)
        self.limits = SharedLimits(
            login=LocalLoginLedger(5, 3, 600.0, self.clock), rates=RateLimiter(self.clock),
            connections={SMTP: self.ledger, HTTP: ConnectionLimits(10, 2)})
        self.pumps = []
        self.asked = 0

    def worker(self, slot):
        """A worker's ledger, talking to its own account at the supervisor."""
        account = self.limits.for_worker(slot)
        handlers = account.handlers()
        take = handlers[CONN_TAKE]

        def counted(**args):
            self.asked += 1
            return take(**args)
        handlers[CONN_TAKE] = counted
        left, right, pump, _ = pair(right_handlers=handlers, clock=self.clock)
        account.attach(right)
        connections = RemoteConnections(left, SMTP, 100, 8, self.clock)
        left.handlers[CONN_RECALL] = lambda kind, ip: connections.recall(ip)
        self.pumps.append(pump)
        return connections

    def pump(self):
        for _ in range(5):
            for pump in self.pumps:
                pump()

    def connect(self, connections, n):
        verdicts = []
        for _ in range(n):
            d = connections.refusal(self.IP)
            self.pump()
            verdicts.append(self.successResultOf(d))
        return verdicts

    def test_one_question_for_several_connections_and_none_for_their_closes(self):
        worker = self.worker(1)
        self.assertEqual(self.connect(worker, 4), [None] * 4)
        self.assertEqual(self.asked, 1)
        self.assertEqual(self.ledger.by_ip[self.IP], 4)  # lent up to half the limit
        for _ in range(4):
            worker.release(self.IP)
        self.pump()
        self.assertEqual(self.ledger.by_ip[self.IP], 4, "freed slots are kept")
        self.assertEqual(self.connect(worker, 4), [None] * 4)
        self.assertEqual(self.asked, 1)

    def test_kept_slots_go_back_once_unused(self):
        worker = self.worker(1)
        self.connect(worker, 1)
        worker.release(self.IP)
        self.clock.advance(LEASE_IDLE)
        self.pump()
        self.assertEqual(self.ledger.by_ip[self.IP], 4, "used in this interval: kept")
        self.clock.advance(LEASE_IDLE)
        self.pump()
        self.assertEqual(self.ledger.active, 0)
        self.assertEqual(self.ledger.by_ip[self.IP], 0)

    def test_an_address_idle_for_a_sweep_is_forgotten_at_both_ends(self):
        """What the lending remembers per address stays bounded by recent clients: once
        an address's kept slots went back, neither end remembers it, and a slot its
        last connection frees goes back at once."""
        worker = self.worker(1)
        self.connect(worker, 2)  # lent 4: 2 used, 2 kept
        for _ in range(2):
            self.clock.advance(LEASE_IDLE)
            self.pump()
        self.assertEqual(self.ledger.by_ip[self.IP], 2)
        worker.release(self.IP)
        worker.release(self.IP)
        self.pump()
        self.assertEqual(self.ledger.active, 0)
        [account] = self.limits.accounts
        self.assertEqual((account.lent, account.slots), (set(), {}))

    def test_a_slot_kept_by_another_worker_never_refuses_a_client(self):
        one, two = self.worker(1), self.worker(2)
        self.assertEqual(self.connect(one, 1), [None])  # lent 4: 1 used, 3 kept
        # Past half the limit nothing more is lent; at the limit the supervisor first
        # asks worker 1 for the 3 it keeps, so worker 2 gets 7 in all, not 4.
        self.assertEqual(self.connect(two, 8), [None] * 7 + ["per-address limit"])
        self.assertEqual(self.ledger.by_ip[self.IP], 8, "never more than the limit")
        self.assertEqual(one.spare[self.IP], 0)
        one.release(self.IP)  # no longer lent ahead: the slot goes back at once
        self.pump()
        self.assertEqual(self.connect(two, 1), [None])

    def test_the_total_limit_recalls_every_address(self):
        self.ledger.total, self.ledger.per_ip = 8, 8
        one, two = self.worker(1), self.worker(2)
        self.connect(one, 1)
        self.assertEqual(self.ledger.active, 4)
        self.IP = "192.0.2.8"
        self.assertEqual(self.connect(two, 8), [None] * 7 + ["total limit"])

    def test_a_batch_is_bounded(self):
        self.ledger.total, self.ledger.per_ip = 1000, 1000
        worker = self.worker(1)
        self.connect(worker, 1)
        self.assertEqual(self.ledger.by_ip[self.IP], LEASE_BATCH)
        for _ in range(LEASE_BATCH + 3):
            self.connect(worker, 1)
        for _ in range(LEASE_BATCH * 3):
            worker.release(self.IP)
        self.pump()
        self.assertLessEqual(worker.spare[self.IP], LEASE_BATCH)


class ControlTableTests(unittest.TestCase):
    """Every call is declared once (``esmtpfa.runtime.workers.control.CALLS``); what the
    table does not declare fails with a ``BadCall`` that names the call and why, on the
    side that sends it and again on the side that answers, without a traceback."""

    def setUp(self):
        clock = Clock()
        self.limits = SharedLimits(
            login=LocalLoginLedger(5, 3, 600.0, clock), rates=RateLimiter(clock),
            connections={SMTP: ConnectionLimits(10, 2), HTTP: ConnectionLimits(10, 2)})
        self.events = observe_logs(self)

    def channels(self, worker_calls=CALLS):
        """A worker end built with ``worker_calls`` (another build's table, say) and a
        supervisor end with the relay's table and the real ``WorkerAccount``."""
        clock = ClockReactor()
        worker = ControlChannel({}, clock, name="worker", calls=worker_calls)
        supervisor = ControlChannel(self.limits.for_worker(1).handlers(), clock,
                                    name="supervisor")
        transports = StringTransport(), StringTransport()
        worker.makeConnection(transports[0])
        supervisor.makeConnection(transports[1])

        def pump():
            for _ in range(10):
                moved = False
                for src, dst in ((transports[0], supervisor), (transports[1], worker)):
                    if src.value():
                        data = src.value()
                        src.clear()
                        dst.dataReceived(data)
                        moved = True
                if not moved:
                    return
        return worker, supervisor, pump, transports[0]

    def test_a_call_missing_an_argument_never_leaves_the_sender(self):
        worker, _, _, sent = self.channels()
        d = worker.call(RATE_TAKE, key="corp\0alice", kind="messages", count=1,
                        window=60.0)
        self.assertEqual(str(self.failureResultOf(d, BadCall).value),
                         "worker: rate.take: missing argument 'n'")
        self.assertEqual(sent.value(), b"")
        d = worker.call(RATE_TAKE, key="corp\0alice", kind="messages", count="1",
                        window=60.0, n=1)
        self.assertEqual(str(self.failureResultOf(d, BadCall).value),
                         "worker: rate.take: argument 'count' must be int, not str")
        with self.assertRaises(BadCall) as raised:
            worker.notify(CONN_RELEASE, kind=SMTP)
        self.assertEqual(str(raised.exception), "worker: conn.release: missing argument 'ip'")
        self.assertEqual(str(self.failureResultOf(worker.call(CONN_RELEASE, kind=SMTP,
                                                              ip="192.0.2.1"), BadCall).value),
                         "worker: conn.release is a notice, not a call")

    def test_the_answering_side_refuses_what_its_table_does_not_declare(self):
        """A worker of another build (its own table) asks the supervisor a call it does
        not know, and one without an argument: each is refused, and said why."""
        unknown = Call("rate.forget", (("key", STR),))
        short = Call("conn.take", (("kind", STR),), answer=STR + NONE)
        worker, _, pump, _ = self.channels(worker_calls=table([unknown, short]))
        forget, take = worker.call(unknown, key="corp\0alice"), worker.call(short, kind=SMTP)
        pump()
        self.assertEqual(str(self.failureResultOf(forget, BadCall).value),
                         "supervisor: no such call: 'rate.forget'")
        self.assertEqual(str(self.failureResultOf(take, BadCall).value),
                         "supervisor: conn.take: missing argument 'ip'")
        self.assertEqual(self.limits.connections[SMTP].active, 0)  # nothing was counted
        refusals = [event for event in self.events
                    if event.get("log_template", "").startswith("{name}: refusing a call")]
        self.assertEqual([event["why"] for event in refusals],
                         ["supervisor: no such call: 'rate.forget'",
                          "supervisor: conn.take: missing argument 'ip'"])
        self.assertFalse([event for event in self.events if event.get("log_failure")])

    def test_a_declared_call_still_works_and_an_undeclared_notice_is_dropped(self):
        worker, _, pump, _ = self.channels(
            worker_calls=table([CONN_TAKE, Call("conn.forget", notice=True)]))
        worker.notify(worker.calls["conn.forget"])
        taken = worker.call(CONN_TAKE, kind=SMTP, ip="192.0.2.1")
        pump()
        self.assertEqual(self.successResultOf(taken), 1)
        self.assertEqual(self.limits.connections[SMTP].active, 1)
        self.assertIn("supervisor: no such call: 'conn.forget'",
                      [event.get("why") for event in self.events])

    def test_an_answer_of_the_wrong_type_fails_the_call(self):
        left, right, pump, _ = pair(right_handlers={ADD: lambda a, b: str(a + b)},
                                    calls=TEST_CALLS)
        d = left.call(ADD, a=2, b=3)
        pump()
        self.assertEqual(str(self.failureResultOf(d, BadCall).value),
                         "left: add: the answer must be int, not str")

    def test_a_handler_for_an_undeclared_call_is_refused_at_once(self):
        with self.assertRaises(ValueError):
            ControlChannel({Call("conn.take"): lambda: None}, Clock())  # not CALLS' own
        with self.assertRaises(ValueError):
            table([CONN_TAKE, Call("conn.take")])


class StalledCountTests(unittest.TestCase):
    """A worker's connections that wait for the supervisor's count hold a descriptor
    each, for up to the call deadline: they are bounded by the cap itself."""

    def test_no_more_connections_wait_than_the_cap_lets_in(self):
        left, right, pump, clock = pair()  # the other side never answers
        connections = RemoteConnections(left, SMTP, 3, 3, clock)
        waiting = [connections.refusal("192.0.2.1") for _ in range(3)]
        over = connections.refusal("192.0.2.2")
        self.assertIn("3 smtp connections already wait",
                      str(self.failureResultOf(over, StateUnavailable).value))
        self.assertEqual([d.called for d in waiting], [False] * 3)
        clock.advance(CALL_TIMEOUT)  # the deadline frees the places
        for d in waiting:
            self.failureResultOf(d, ControlTimeout)
        self.assertEqual(connections.waiting, 0)
        again = connections.refusal("192.0.2.2")
        self.assertFalse(again.called, "asked again once places are free")
        clock.advance(CALL_TIMEOUT)
        self.failureResultOf(again, ControlTimeout)


class WorkersOptionTests(unittest.TestCase):
    def parse(self, *args: str, environ=None):
        from esmtpfa.runtime.options import Options
        options = Options(environ=environ or {})
        options.parseOptions(list(args))
        return options

    def test_a_number_auto_or_a_clear_refusal(self):
        import os

        from twisted.python.usage import UsageError
        self.assertEqual(self.parse()["workers"], 1)
        self.assertEqual(self.parse("--workers", "3")["workers"], 3)
        self.assertEqual(self.parse("--workers", "auto")["workers"],
                         min(len(os.sched_getaffinity(0)), 64))
        self.assertEqual(self.parse(environ={"SMTP_WORKERS": "2"})["workers"], 2)
        for bad in ("0", "-1", "65", "many"):
            with self.assertRaises(UsageError) as caught:
                self.parse("--workers", bad)
            self.assertIn("--workers", str(caught.exception))

    def test_auto_keeps_to_the_containers_cpu_quota(self):
        import os

        from esmtpfa.runtime.options import usable_cpus
        cpus = len(os.sched_getaffinity(0))
        v2 = self.mktemp()
        os.makedirs(v2)
        with open(os.path.join(v2, "cpu.max"), "w") as f:
            f.write("150000 100000\n")  # 1.5 CPUs: 2 workers (rounded up)
        self.assertEqual(usable_cpus(v2), min(cpus, 2))
        with open(os.path.join(v2, "cpu.max"), "w") as f:
            f.write("max 100000\n")
        self.assertEqual(usable_cpus(v2), min(cpus, 64))
        v1 = self.mktemp()
        os.makedirs(os.path.join(v1, "cpu"))
        for name, value in (("cpu.cfs_quota_us", "100000"), ("cpu.cfs_period_us", "100000")):
            with open(os.path.join(v1, "cpu", name), "w") as f:
                f.write(value + "\n")
        self.assertEqual(usable_cpus(v1), 1)

    def test_the_arguments_are_kept_for_the_workers(self):
        options = self.parse("--workers", "2", "--port", "2525")
        self.assertEqual(options.arguments, ["--workers", "2", "--port", "2525"])


class StubProcess:
    """A worker process as the slot sees it: the signals it was sent."""

    def __init__(self):
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class HeartbeatTests(unittest.TestCase):
    """The supervisor pings every ``HEARTBEAT`` seconds and kills a worker that missed
    ``MISSED_HEARTBEATS`` answers in a row; a worker that answers late now and then, as
    a busy one does, is left alone."""

    def run_for(self, seconds: float, answering) -> list[str]:
        """Beat for ``seconds`` of a ``Clock``; the worker answers whenever
        ``answering(now)`` is true.  The signals the worker was sent."""
        from esmtpfa.runtime.workers.supervisor import HEARTBEAT, WorkerSlot
        supervisor, _, pump, clock = pair(right_handlers={PING: lambda: True})
        slot = WorkerSlot(None, 1)
        slot.running, slot.channel, slot.process = True, supervisor, StubProcess()
        step = HEARTBEAT / 10
        for tick in range(1, round(seconds / step) + 1):
            clock.advance(step)
            if tick % 10 == 0:
                slot.beat()
            if answering(clock.seconds()):
                pump()
        return slot.process.signals

    def test_a_worker_stalled_for_over_a_second_at_a_time_is_not_killed(self):
        # Its reactor runs one and a half seconds in every three.
        self.assertEqual(self.run_for(60, lambda now: now % 3 >= 1.5), [])

    def test_a_worker_silent_for_five_seconds_is_killed(self):
        from esmtpfa.runtime.workers.supervisor import HEARTBEAT, MISSED_HEARTBEATS
        self.assertEqual(HEARTBEAT * MISSED_HEARTBEATS, 5.0, "docs/workers.md says 5 s")
        self.assertEqual(self.run_for(14.9, lambda now: now < 10), [])
        self.assertEqual(self.run_for(16.5, lambda now: now < 10), ["KILL"])

    def test_a_killed_worker_is_logged_once(self):
        """Pings sent before the kill time out before its end is noticed (two lines, 5 s
        and 6 s, were seen under load): the operator reads one line per kill."""
        from twisted.logger import formatEvent

        from tests.support.logcapture import observe_logs
        events = observe_logs(self)
        signals = self.run_for(18.5, lambda now: now < 10)
        kills = [formatEvent(e) for e in events if "killing it" in formatEvent(e)]
        self.assertEqual(kills, ["worker 1 (pid None) has not answered for 5 s: killing it"])
        self.assertIn("KILL", signals)


#: A worker's counts, then its end: SIGKILL right after the increments.
COUNT_THEN_DIE = """
import os, signal
from esmtpfa.web.metrics import RelayMetrics
metrics = RelayMetrics("esmtpfa")
metrics.checked("corp", "password", "accepted", 0.05)
for _ in range(3):
    metrics.messages_sent.labels("corp").inc()
os.kill(os.getpid(), signal.SIGKILL)
"""


class CountFilesTests(unittest.TestCase):
    """A worker's counts live in files of prometheus_client's multiprocess mode, which
    the supervisor reads when the worker is gone."""

    def test_the_counts_of_a_killed_process_are_read_and_add_up_with_the_live(self):
        import os
        import subprocess
        import sys

        from esmtpfa.runtime.workers.merged_metrics import CountFiles
        from esmtpfa.web.metrics import RelayMetrics
        files = CountFiles.create()
        self.addCleanup(files.remove)
        self.assertEqual(os.stat(files.path).st_mode & 0o777, 0o700)
        child = subprocess.run([sys.executable, "-c", COUNT_THEN_DIE], check=False,
                               env=dict(os.environ, **files.environment()), timeout=60)
        self.assertEqual(child.returncode, -9)
        pid = int(next(name for name in os.listdir(files.path)
                       if name.startswith("counter_"))[len("counter_"):-len(".db")])
        dead = files.counts_of(pid)
        # A live worker's snapshot of the same counts, from an in-memory registry.
        live = RelayMetrics("esmtpfa")
        live.checked("corp", "password", "accepted", 0.05)
        for _ in range(3):
            live.messages_sent.labels("corp").inc()
        text = render(merge([snapshot(live.registry.collect()), dead], "esmtpfa")).decode()
        self.assertIn('esmtpfa_messages_sent_total{provider="corp"} 6.0', text)
        self.assertIn('esmtpfa_auth_successes_total{provider="corp"} 2.0', text)
        self.assertIn('esmtpfa_auth_duration_seconds_count{outcome="accepted",'
                      'provider="corp"} 2.0', text)
        self.assertIn('esmtpfa_auth_duration_seconds_bucket{le="0.05",outcome="accepted",'
                      'provider="corp"} 2.0', text)
        # The same series, not a second one beside each: the files name them alike.
        self.assertEqual(text.count("esmtpfa_messages_sent_total{"), 1)
        files.forget(pid)
        self.assertEqual(os.listdir(files.path), [])
        self.assertEqual(files.counts_of(pid), [])


class WorkerLogLinesTests(unittest.TestCase):
    """The supervisor passes a worker's output on a whole line at a time, and holds at
    most ``LogLines.MAX_LINE`` octets of an unfinished one (docs/workers.md)."""

    def setUp(self) -> None:
        from io import BytesIO

        from esmtpfa.runtime.workers.supervisor import LogLines
        self.sink = BytesIO()
        self.lines = LogLines(self.sink)

    def test_lines_pass_whole(self) -> None:
        self.lines.feed(b"first li")
        self.assertEqual(self.sink.getvalue(), b"")  # half a line waits
        self.lines.feed(b"ne\nsecond\nthi")
        self.assertEqual(self.sink.getvalue(), b"first line\nsecond\n")
        self.lines.close()
        self.assertEqual(self.sink.getvalue(), b"first line\nsecond\nthi\n")

    def test_a_runaway_line_is_cut_not_held(self) -> None:
        chunk = b"x" * 8192
        for _ in range(100):  # 800 KiB without a newline
            self.lines.feed(chunk)
            self.assertLessEqual(len(self.lines.partial), 64 * 1024)
        self.assertGreater(len(self.sink.getvalue()), 700 * 1024)
        self.assertTrue(self.sink.getvalue().endswith(b"\n"))
