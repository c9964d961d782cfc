"""The queue runner's hand-over: a message stored while the runner has a free attempt
goes straight to it, claimed in the store itself; mail already waiting in the queue is
never overtaken by it, and the hand-over never runs more than ``concurrency`` attempts.

A real file spool on disk; the relay is a stand-in whose transactions the test ends
(an upstream that takes its time), so that attempts stay in flight while it looks.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

from esmtpfa.common.logs import PLAIN_RECIPIENTS, RecipientLog
from esmtpfa.common.message import Envelope
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import IRelay, IRelayTransaction
from esmtpfa.spool.files import FileSpool
from esmtpfa.spool.interfaces import SpoolEntry
from esmtpfa.spool.modes import Spooler
from esmtpfa.spool.runner import QueueRunner

CONTENT = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
_ids = iter(range(1, 10**9))


@implementer(IRelayTransaction)
class HeldTransaction:
    """Takes every recipient; the message's final reply waits for ``finish``."""

    max_size = None

    def __init__(self, relay: "HeldRelay", message_id: str):
        self.relay = relay
        self.message_id = message_id
        self.reply: defer.Deferred[Reply] = defer.Deferred()

    def addRecipient(self, address: str, data_follows: bool = False) -> defer.Deferred:
        return defer.succeed(Reply(250, "2.1.5", "OK"))

    def send(self, message: Any) -> defer.Deferred:
        self.relay.sent.append(self)
        return self.reply

    def abort(self) -> None:
        pass

    def finish(self) -> None:
        self.reply.callback(Reply(250, "2.0.0", "taken"))


@implementer(IRelay)
class HeldRelay:
    description = "an upstream that answers when the test says so"

    def __init__(self) -> None:
        self.begun: list[str] = []
        self.sent: list[HeldTransaction] = []
        self.on_begin: Any = lambda message_id: None

    def begin(self, envelope: Envelope, message_id: str, connection_id: str,
              client: Any = (), paced: bool = False) -> defer.Deferred:
        self.begun.append(message_id)
        self.on_begin(message_id)
        return defer.succeed(HeldTransaction(self, message_id))

    def close(self) -> defer.Deferred:
        return defer.succeed(None)


class Outbound:
    """What ``Spooler.store`` reads of an accepted message."""

    def __init__(self, identity: str):
        self.id = f"urn:uuid:runner-{next(_ids)}"
        self.envelope = Envelope("a@example.com", ("b@example.org",))
        self.identity = identity
        self.size = len(CONTENT)
        self.connection_id = "urn:uuid:conn"

    def chunks(self) -> Any:
        return iter([CONTENT])


class Observer:
    def spool_accepted(self, mode: str) -> None:
        pass


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await pause(0.02)
    raise AssertionError(f"not within {timeout} s")


def globalLogPublisher_remove(events: list) -> None:
    from twisted.logger import globalLogPublisher
    globalLogPublisher.removeObserver(events.append)
    events.clear()


class HandOverTests(unittest.TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="test-runner")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.spool = FileSpool(os.path.join(self.mktemp(), "spool"), reactor, self.pool,
                               max_bytes=10**9, min_free_bytes=0)
        await self.spool.start()
        self.addCleanup(self.spool.close)
        self.relay = HeldRelay()
        self.claims = 0
        real_claim = self.spool.claim

        def counting_claim(*args: Any, **kwargs: Any) -> defer.Deferred:
            self.claims += 1
            return real_claim(*args, **kwargs)
        self.spool.claim = counting_claim  # type: ignore[method-assign]

    async def backlog(self, count: int) -> list[str]:
        """``count`` of alice's messages queued, due, before any runner starts."""
        waiting = []
        for _ in range(count):
            message = Outbound("p/alice")
            entry = SpoolEntry(message.id, message.envelope, "p/alice", "bounce",
                               time.time(), message.size, message.connection_id)
            await self.spool.store(entry, message.chunks())
            waiting.append(message.id)
        return waiting

    async def runner(self, concurrency: int = 2,
                     log_recipients: RecipientLog = PLAIN_RECIPIENTS) -> QueueRunner:
        runner = QueueRunner(self.spool, self.relay, clock=reactor, threads=self.pool,
                             hostname="relay.example", concurrency=concurrency,
                             poll_interval=3600, log_recipients=log_recipients)
        runner.startService()
        self.addCleanup(self.finish_all_then_stop, runner)
        await eventually(lambda: self.claims and not runner._claiming)  # the first poll
        self.spooler = Spooler(self.spool, runner, "bounce", Observer())
        return runner

    async def finish_all_then_stop(self, runner: QueueRunner) -> None:
        for _ in range(100):
            waiting = [t for t in self.relay.sent if not t.reply.called]
            if not waiting:
                break
            for transaction in waiting:
                transaction.finish()
            await pause(0.05)
        await runner.stopService()

    async def store(self, identity: str = "p/alice") -> str:
        message = Outbound(identity)
        await self.spooler.store(message, "spool")
        return message.id

    async def test_an_idle_runner_takes_a_stored_message_without_a_claim(self) -> None:
        await self.runner()
        claims = self.claims
        message_id = await self.store()
        await eventually(lambda: self.relay.sent)
        self.assertEqual([t.message_id for t in self.relay.sent], [message_id])
        self.assertEqual(self.claims, claims)  # no search of the queue for it
        self.relay.sent[0].finish()
        await self.spool.committer.idle()
        self.assertEqual(await self.spool.list(), [])

    async def test_the_attempt_line_shows_recipients_as_the_operator_chose(self) -> None:
        """docs/logging.md, "Recipients: a privacy choice": the spool's attempt line
        follows ``--log-recipients`` as the message line does."""
        from twisted.logger import formatEvent

        from tests.support.logcapture import capture_logs, observe_logs
        capture_logs(self)  # info lines reach the observers
        for style, key, shown, hidden in (
                ("hash", b"k", RecipientLog("hash", b"k").hashed("b@example.org"),
                 "b@example.org"),
                ("omit", b"", "'delivered': 1", "b@example.org"),
                ("plain", b"", "b@example.org", "hmac:")):
            events = observe_logs(self)
            await self.runner(log_recipients=RecipientLog(style, key))
            await self.store()
            await eventually(lambda: [t for t in self.relay.sent if not t.reply.called])
            for transaction in self.relay.sent:
                if not transaction.reply.called:
                    transaction.finish()
            await self.spool.committer.idle()
            lines = [line for line in map(formatEvent, events) if "delivery attempt" in line]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(shown, lines[0])
            self.assertNotIn(hidden, lines[0])
            globalLogPublisher_remove(events)

    async def test_no_upstream_session_waits_for_the_started_record(self) -> None:
        """The recipients are recorded as started before the upstream is asked: the
        commit's fsync never runs while a pooled upstream session sits idle between RCPT
        and DATA (docs/spool.md, "The duplicate window")."""
        await self.runner(concurrency=1)
        commit: defer.Deferred[None] = defer.Deferred()
        real_started = self.spool.started

        def started(message: Any, recipients: tuple[str, ...]) -> defer.Deferred:
            recorded = real_started(message, recipients)
            return recorded.addCallback(lambda _: commit)  # the disk takes its time
        self.spool.started = started  # type: ignore[method-assign]
        message_id = await self.store()
        await self.spool.committer.idle()
        await pause(0.1)
        self.assertEqual(self.relay.begun, [])  # no session taken while it commits
        commit.callback(None)
        await eventually(lambda: self.relay.sent)
        self.assertEqual(self.relay.begun, [message_id])

    async def test_never_more_attempts_than_the_concurrency(self) -> None:
        runner = await self.runner(concurrency=2)
        stored = [await self.store(identity) for identity in ("p/a", "p/b", "p/c", "p/d")]
        await pause(0.3)
        self.assertEqual([t.message_id for t in self.relay.sent], stored[:2])
        self.assertEqual(len(runner._in_flight), 2)
        self.relay.sent[0].finish()  # a free attempt: the queue's oldest takes it
        await eventually(lambda: len(self.relay.sent) == 3)
        self.assertEqual(self.relay.sent[2].message_id, stored[2])

    async def test_fresh_mail_never_overtakes_the_queue(self) -> None:
        """Messages already waiting (stored while every attempt was busy) go first; a
        message stored meanwhile waits its turn in the queue."""
        await self.runner(concurrency=1)
        first = await self.store()
        waiting = [await self.store("p/bob"), await self.store("p/carol")]
        self.relay.sent[0].finish()
        await eventually(lambda: len(self.relay.sent) == 2)
        fresh = await self.store("p/dave")  # an attempt may be free for an instant here
        for expected in waiting[1:] + [fresh]:
            self.relay.sent[-1].finish()
            await eventually(lambda expected=expected: self.relay.sent[-1].message_id == expected)
        self.assertEqual([t.message_id for t in self.relay.sent],
                         [first] + waiting + [fresh])

    async def test_an_ended_attempt_is_followed_without_a_claim_between(self) -> None:
        """A backlog: the runner holds ``prefetch`` messages claimed ahead, so the next
        attempt starts the moment one ends, not after a claim's commit."""
        waiting = await self.backlog(6)
        runner = await self.runner(concurrency=2)
        self.assertEqual(runner.prefetch, 1)
        await eventually(lambda: len(self.relay.sent) == 2)
        self.assertEqual(len(runner._ready), 1)  # the third, claimed ahead
        claims_at: dict[str, int] = {}
        real_started = self.spool.started

        def started(message: Any, recipients: tuple[str, ...]) -> defer.Deferred:
            claims_at.setdefault(message.entry.id, self.claims)  # the attempt begins
            return real_started(message, recipients)
        self.spool.started = started  # type: ignore[method-assign]
        claims = self.claims
        self.relay.sent[0].finish()
        await eventually(lambda: len(self.relay.sent) == 3)
        self.assertEqual(claims_at[waiting[2]], claims)  # started before any new claim
        await eventually(lambda: len(runner._ready) == 1)  # and the next claimed ahead
        self.assertEqual([t.message_id for t in self.relay.sent], waiting[:3])

    async def test_an_attempt_claimed_ahead_reaches_the_upstream_without_a_commit(
            self) -> None:
        """Its claim recorded its start: when an attempt ends, the one claimed ahead
        asks the upstream in the same turn, without waiting for a commit of its own (on
        a disk whose fsync takes milliseconds that wait bounded a drain)."""
        waiting = await self.backlog(4)
        runner = await self.runner(concurrency=1)
        await eventually(lambda: len(self.relay.sent) == 1 and len(runner._ready) == 1)
        await self.spool.committer.idle()
        commits = self.spool.committer.commits
        self.relay.sent[0].finish()
        self.assertEqual(self.relay.begun, waiting[:2])  # at once, in this turn
        self.assertEqual(self.spool.committer.commits, commits)
        await eventually(lambda: len(self.relay.sent) == 2)

    async def test_no_hand_over_while_the_queue_may_hold_due_mail(self) -> None:
        """Once a message went into the queue without an attempt (or a poll found due
        work), a free attempt goes to the queue's next claim, not to the next message
        stored: only a claim that comes back short turns the hand-over on again."""
        runner = await self.runner(concurrency=2)
        self.assertIsNotNone(runner.reserve("p/alice"))  # idle: the hand-over is on
        runner._reserved.clear()
        runner.kick()  # a message stored without an attempt: it waits in the queue
        self.assertIsNone(runner.reserve("p/bob"))
        await eventually(lambda: not runner._claiming and runner._queue_drained)
        self.assertIsNotNone(runner.reserve("p/bob"))  # the claim came back empty
        runner._reserved.clear()
        runner._poll()  # a poll: retries may have come due
        self.assertIsNone(runner.reserve("p/carol"))
        await eventually(lambda: not runner._claiming and runner._queue_drained)

    async def test_one_identity_past_its_share_goes_through_the_queue(self) -> None:
        """The hand-over respects the per-identity share: alice's third message is not
        handed over but claimed from the queue, which gives it the free attempt only
        because nobody else is waiting; bob's then is handed over."""
        runner = await self.runner(concurrency=4)  # a share of 2 each
        self.assertEqual(runner.per_identity, 2)
        claims = self.claims
        alice = [await self.store("p/alice") for _ in range(2)]
        await eventually(lambda: len(self.relay.sent) == 2)
        self.assertEqual(self.claims, claims)  # both handed over
        alice.append(await self.store("p/alice"))
        await eventually(lambda: len(self.relay.sent) == 3)
        self.assertGreater(self.claims, claims)  # the third came from the queue
        claims = self.claims
        bob = await self.store("p/bob")
        await eventually(lambda: len(self.relay.sent) == 4)
        self.assertEqual(self.claims, claims)  # handed over
        self.assertEqual([t.message_id for t in self.relay.sent], alice + [bob])

    async def test_a_failed_store_gives_the_attempt_back(self) -> None:
        runner = await self.runner(concurrency=1)
        message = Outbound("p/alice")
        message.chunks = lambda: iter([CONTENT[:5], 1 / 0])  # type: ignore[method-assign]
        try:
            await self.spooler.store(message, "spool")
        except Exception:
            pass
        else:
            self.fail("the store should have failed")
        self.assertEqual(runner._reserved, {})
        message_id = await self.store()
        await eventually(lambda: self.relay.sent)
        self.assertEqual(self.relay.sent[0].message_id, message_id)
        self.flushLoggedErrors()

    async def test_paused_before_the_store_fired_leaves_it_due(self) -> None:
        """A drain that began while the message was being stored: it is not started,
        and the spool's close makes it due again (nothing was sent)."""
        runner = await self.runner(concurrency=1)
        stored = defer.ensureDeferred(self.store())
        runner.pause()
        message_id = await stored
        await pause(0.2)
        self.assertEqual(self.relay.sent, [])
        await runner.stopService()
        await self.spool.close()
        again = FileSpool(self.spool.path, reactor, self.pool, max_bytes=10**9,
                          min_free_bytes=0)
        await again.start()
        self.addCleanup(again.close)
        [message] = await again.claim(1)
        self.assertEqual((message.entry.id, message.pending),
                         (message_id, ("b@example.org",)))

