"""The spool in RabbitMQ quorum queues (``esmtpfa.spool.amqp``), against a real broker.

Every test talks to a ``rabbitmq-server`` of its class, started on loopback ports by
``tests.support.rabbitmq`` (its own node name, data, epmd and cookie); each test uses
queues of its own (a prefix per spool).  What is checked:

* the URL: parsing, defaults, and the credentials never in a repr, a description, a log
  line (ours or pika's) or an error;
* store -> claim -> content -> started -> settle, for each outcome: done (acked), retry
  (a retry queue whose TTL dead-letters it back, after the delay), hold (the held queue);
  a wait longer than every delay parked again; a full queue refusing with ``FULL``; a
  store the broker cannot route failing with ``UNAVAILABLE``;
* fairness: a busy identity's messages wait, the limit is kept, and a window full of a
  busy identity's messages does not stall another identity;
* the crash rule: a consumer process that claimed and started a message and was
  SIGKILLed leaves it held (outcome unknown), never attempted again; ``close`` gives back
  what was never started (not held) and holds what was started and not settled; a
  message that is not ours is held;
* the queue tool: list, show, hold, release, delete, requeue, flush, and the counts;
* amqps: the broker's certificate and name are verified;
* outages: a store while the broker is down fails with ``UNAVAILABLE``; the spool
  reconnects after a restart and consumes again; a burst of stores across a broker
  crash: every store that succeeded is claimable afterwards; claims that straddle a
  restart are settled on the redelivered copies, without holding them.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from esmtpfa.common.message import Envelope
from esmtpfa.spool.amqp import (
    AMQPURL,
    DUE_SLACK,
    REDELIVERED,
    STOPPED,
    AMQPSpool,
    StoredState,
    Topology,
)
from esmtpfa.spool.interfaces import (
    IQueueAdmin,
    ISpool,
    MessageState,
    Phase,
    QueuedMessage,
    Recipient,
    Settlement,
    SpoolEntry,
    SpoolError,
    SpoolErrorKind,
)
from esmtpfa.spool.interfaces import RecipientState as R
from tests.support.certs import CertificateAuthority
from tests.support.logcapture import capture_logs
from tests.support.processes import PROJECT, Collector, child_environment
from tests.support.rabbitmq import SharedRabbitMQ
from tests.support.resources import test_threads

PASSWORD = "pw-amqp-7d1e9c-never-logged"
HEADERS = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: spooled\r\n\r\n"
CONTENT = HEADERS + b"Hello.\r\n"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def new_entry(identity: str = "local/alice", recipients=("bob@example.net",),
              size: int = len(CONTENT)) -> SpoolEntry:
    return SpoolEntry(id=f"urn:uuid:{secrets.token_hex(8)}",
                      envelope=Envelope("alice@example.com", tuple(recipients), "8BITMIME"),
                      identity=identity, ending="bounce", received=time.time(), size=size,
                      connection_id="c1")


class SpoolCase(SharedRabbitMQ, unittest.TestCase):
    """A broker for the class; spools with queues of their own, closed at the end."""

    timeout = 90
    rabbitmq_options = {"password": PASSWORD}

    def spool(self, url: str | None = None, **kwargs) -> AMQPSpool:
        kwargs.setdefault("prefix", f"t-{secrets.token_hex(4)}")
        kwargs.setdefault("retry_delays", (1, 2))
        kwargs.setdefault("reconnect_delay", (0.2, 1.0))
        kwargs.setdefault("confirm_timeout", 5.0)
        kwargs.setdefault("threads", test_threads())
        spool = AMQPSpool(url or self.rabbitmq.url, reactor, **kwargs)
        self.addCleanup(spool.close)
        return spool

    async def open_spool(self, **kwargs) -> AMQPSpool:
        spool = self.spool(**kwargs)
        await spool.start()
        return spool

    async def store(self, spool: AMQPSpool, content: bytes = CONTENT, **kwargs
                    ) -> SpoolEntry:
        entry = new_entry(size=len(content), **kwargs)
        await spool.store(entry, iter([content[:10], content[10:]]))
        return entry

    async def claim(self, spool: AMQPSpool, count: int = 1, timeout: float = 10.0,
                    busy: frozenset = frozenset(), limit: int = 100
                    ) -> list[QueuedMessage]:
        """Claim until ``count`` messages came (or ``timeout``): the consumer receives
        them asynchronously, as the runner's poll finds them."""
        found: list[QueuedMessage] = []
        deadline = reactor.seconds() + timeout
        while len(found) < count and reactor.seconds() < deadline:
            found += await spool.claim(min(limit, count - len(found)), busy)
            if len(found) < count:
                await sleep(0.05)
        return found

    async def nothing_claimable(self, spool: AMQPSpool, seconds: float) -> None:
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            got = await spool.claim(100)
            self.assertEqual(got, [], "nothing may be claimed now")
            await sleep(0.05)

    async def held(self, spool: AMQPSpool, count: int = 1, timeout: float = 10.0,
                   states=(MessageState.HELD,)):
        """The held summaries (or all, ``states=None``), once there are ``count``
        (bounded: a message the tool or a relay moves takes a moment to be back)."""
        deadline = reactor.seconds() + timeout
        while True:
            listed = [s for s in await spool.list() if states is None or s.state in states]
            if len(listed) >= count or reactor.seconds() >= deadline:
                return listed
            await sleep(0.1)

    async def stats_until(self, spool: AMQPSpool, messages: dict, timeout: float = 5.0):
        """The stats once their counts are ``messages`` (a message the queue tool read
        is back in its queue a moment after the command)."""
        deadline = reactor.seconds() + timeout
        while True:
            stats = await spool.stats()
            if stats.messages == messages or reactor.seconds() >= deadline:
                self.assertEqual(stats.messages, messages)
                return stats
            await sleep(0.05)

    async def settle_pending(self, spool: AMQPSpool, message: QueuedMessage,
                             retry_in: float = 1.0) -> None:
        await spool.settle(message, Settlement(
            (Recipient(message.pending[0], R.PENDING, "451 4.3.0 try later"),),
            retry_at=time.time() + retry_in))


# -- without a broker ----------------------------------------------------------------------

class URLTests(unittest.TestCase):

    def test_parts_and_defaults(self):
        url = AMQPURL.parse("amqps://user:p%40ss@broker.example:5999/mail%2Fspool?heartbeat=7")
        self.assertEqual((url.tls, url.host, url.port, url.vhost, url.username,
                          url.password, url.heartbeat),
                         (True, "broker.example", 5999, "mail/spool", "user", "p@ss", 7))
        plain = AMQPURL.parse("amqp://broker.example")
        self.assertEqual((plain.port, plain.vhost, plain.username, plain.password),
                         (5672, "/", "guest", "guest"))
        self.assertEqual(AMQPURL.parse("amqps://h/").port, 5671)
        self.assertEqual(AMQPURL.parse("amqp://h/%2F").vhost, "/")

    def test_the_password_is_in_no_repr_and_no_error(self):
        url = AMQPURL.parse(f"amqp://esmtpfa:{PASSWORD}@broker.example/prod")
        for text in (repr(url), str(url), url.redacted):
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn("esmtpfa:", text)
        self.assertEqual(url.redacted, "amqp://broker.example:5672/prod")
        self.assertEqual(url.scrub(f"login {PASSWORD} refused"), "login <redacted> refused")
        for bad in (f"http://u:{PASSWORD}@h/", f"amqp://u:{PASSWORD}@h:99999/",
                    f"amqp://u:{PASSWORD}@h/a/b", f"amqp://u:{PASSWORD}@h/?ssl=1",
                    f"amqp://u:{PASSWORD}@/"):
            with self.assertRaises(ValueError) as raised:
                AMQPURL.parse(bad)
            self.assertNotIn(PASSWORD, str(raised.exception))
        with self.assertRaises(SpoolError) as raised:
            AMQPSpool(f"amqp://u:{PASSWORD}@h:99999/", reactor, threads=test_threads())
        self.assertNotIn(PASSWORD, str(raised.exception))
        spool = AMQPSpool(f"amqp://u:{PASSWORD}@broker.example/", reactor, prefix="p",
                          threads=test_threads())
        for text in (spool.description, repr(spool)):
            self.assertNotIn(PASSWORD, text)
        self.assertIn("amqp://broker.example:5672/%2F", spool.description)

    def test_interfaces(self):
        spool = AMQPSpool("amqp://broker.example/", reactor, threads=test_threads())
        self.assertTrue(ISpool.providedBy(spool))
        self.assertTrue(IQueueAdmin.providedBy(spool))


class TopologyTests(unittest.TestCase):

    def test_names_and_arguments(self):
        topology = Topology("esmtpfa", (300, 15, 600), max_bytes=1000)
        declared = dict(topology.declarations())
        self.assertEqual(list(declared), ["esmtpfa.queue", "esmtpfa.retry.15s",
                                          "esmtpfa.retry.300s", "esmtpfa.retry.600s",
                                          "esmtpfa.held"])
        for arguments in declared.values():
            self.assertEqual(arguments["x-queue-type"], "quorum")
        self.assertEqual(declared["esmtpfa.queue"]["x-max-length-bytes"], 1000)
        self.assertEqual(declared["esmtpfa.queue"]["x-overflow"], "reject-publish")
        retry = declared["esmtpfa.retry.300s"]
        self.assertEqual((retry["x-message-ttl"], retry["x-dead-letter-exchange"],
                          retry["x-dead-letter-routing-key"],
                          retry["x-dead-letter-strategy"]),
                         (300000, "", "esmtpfa.queue", "at-least-once"))
        self.assertNotIn("x-max-length-bytes", dict(Topology("p").declarations())["p.queue"])

    def test_the_next_delay_up(self):
        topology = Topology("p", (15, 300, 600))
        self.assertEqual(topology.retry_for(0), "p.retry.15s")
        self.assertEqual(topology.retry_for(15.5), "p.retry.15s")  # within the slack
        self.assertEqual(topology.retry_for(17), "p.retry.300s")
        self.assertEqual(topology.retry_for(300), "p.retry.300s")
        self.assertEqual(topology.retry_for(400), "p.retry.600s")
        self.assertEqual(topology.retry_for(9000), "p.retry.600s")  # parked again later

    def test_bad_prefix_or_delays(self):
        for prefix in ("", "has space", "x" * 201):
            self.assertRaises(ValueError, Topology, prefix)
        self.assertRaises(ValueError, Topology, "p", (0,))
        self.assertRaises(ValueError, Topology, "p", (1.5,))


class StateTests(unittest.TestCase):

    def test_round_trip_and_transitions(self):
        entry = new_entry(recipients=("a@example.net", "b@example.net"))
        state = StoredState.new(entry)
        again = StoredState.decode({"esmtpfa-state": state.encode()})
        self.assertEqual(again, state)
        settled = state.settled(Settlement(
            (Recipient("a@example.net", R.DELIVERED, "250 ok"),
             Recipient("b@example.net", R.STARTED, "")), retry_at=123.0))
        self.assertEqual([r.state for r in settled.recipients], [R.DELIVERED, R.UNKNOWN])
        self.assertEqual((settled.attempts, settled.next_attempt, settled.last_reply),
                         (1, 123.0, "250 ok"))
        held = state.held(REDELIVERED)
        self.assertEqual({r.state for r in held.recipients}, {R.UNKNOWN})
        released = held.released(now=50.0, reset_attempts=True)
        self.assertEqual({r.state for r in released.recipients}, {R.PENDING})
        self.assertEqual((released.lifetime_start, released.hold_reason), (50.0, None))

    def test_not_ours(self):
        for headers in (None, {}, {"esmtpfa-state": "{"}, {"esmtpfa-state": '{"v": 9}'}):
            self.assertRaises(ValueError, StoredState.decode, headers)

    def test_a_long_state_is_shortened_to_fit_one_frame(self):
        recipients = tuple(f"user{n}@example.net" for n in range(100))
        state = StoredState.new(new_entry(recipients=recipients))
        state = state.settled(Settlement(tuple(Recipient(a, R.PENDING, "4" * 2000)
                                               for a in recipients), retry_at=1.0))
        self.assertLessEqual(len(state.encode()), 96 * 1024)


# -- with a broker -------------------------------------------------------------------------

class StoreClaimSettleTests(SpoolCase):

    async def test_store_claim_content_settle_done(self):
        spool = await self.open_spool()
        self.assertIsNone(spool.accepting())
        entry = await self.store(spool)
        [message] = await self.claim(spool)
        self.assertEqual((message.entry, message.attempts, message.pending),
                         (entry, 0, ("bob@example.net",)))
        content = await spool.content(message)
        self.assertEqual((content.size, b"".join(content.read_from(0, 7))),
                         (len(CONTENT), CONTENT))
        self.assertEqual(b"".join(content.read_from(5)), CONTENT[5:])
        content.close()
        await spool.started(message, message.pending)
        await spool.settle(message, Settlement(
            (Recipient("bob@example.net", R.DELIVERED, "250 2.0.0 ok"),)))
        await self.nothing_claimable(spool, 0.5)
        stats = await spool.stats()
        self.assertEqual(stats.messages, {MessageState.QUEUED: 0, MessageState.HELD: 0})
        self.assertIsNone(stats.bytes)
        with self.assertRaises(SpoolError) as raised:
            await spool.settle(message, Settlement())
        self.assertEqual(raised.exception.kind, SpoolErrorKind.CONFLICT)

    async def test_a_watcher_hears_of_each_message_the_broker_hands_over(self):
        """The runner is told at once (``ISpool.watch``): it claims a message when the
        broker delivers it, not at its next look a second later."""
        spool = await self.open_spool()
        arrived: list[float] = []
        spool.watch(lambda: arrived.append(reactor.seconds()))
        self.assertEqual(await spool.claim(1), [])  # starts the consumer
        await self.store(spool)
        deadline = reactor.seconds() + 10
        while not arrived:
            self.assertLess(reactor.seconds(), deadline, "no watcher was told")
            await sleep(0.01)
        self.assertEqual(len(await spool.claim(1)), 1)

    async def test_retry_waits_for_its_delay_then_comes_back(self):
        spool = await self.open_spool(retry_delays=(1, 2))
        entry = await self.store(spool, recipients=("a@example.net", "b@example.net"))
        [message] = await self.claim(spool)
        await spool.started(message, ("a@example.net",))
        settled_at = time.time()
        await spool.settle(message, Settlement(
            (Recipient("a@example.net", R.DELIVERED, "250 ok"),
             Recipient("b@example.net", R.PENDING, "451 later")),
            retry_at=settled_at + 1))
        await self.nothing_claimable(spool, 0.7)
        [again] = await self.claim(spool, timeout=5)
        self.assertGreaterEqual(time.time() - settled_at, 0.95)
        self.assertEqual(again.entry.id, entry.id)
        self.assertEqual(again.attempts, 1)
        self.assertEqual(again.pending, ("b@example.net",))
        self.assertEqual([(r.state, r.reply) for r in again.recipients],
                         [(R.DELIVERED, "250 ok"), (R.PENDING, "451 later")])
        content = await spool.content(again)
        self.assertEqual(b"".join(content.read_from()), CONTENT)

    async def test_a_wait_longer_than_every_delay_is_parked_again(self):
        spool = await self.open_spool(retry_delays=(1,))
        await self.store(spool)
        [message] = await self.claim(spool)
        settled_at = time.time()
        await self.settle_pending(spool, message, retry_in=3.0)
        # back after 1 s, not due: parked again (for 1 s: due within DUE_SLACK then)
        await self.nothing_claimable(spool, 1.6)
        [again] = await self.claim(spool, timeout=5)
        self.assertGreaterEqual(time.time() - settled_at, 3.0 - DUE_SLACK)
        self.assertEqual(again.attempts, 1)

    async def test_hold_goes_to_the_held_queue(self):
        spool = await self.open_spool()
        entry = await self.store(spool)
        [message] = await self.claim(spool)
        await spool.settle(message, Settlement(
            (Recipient("bob@example.net", R.FAILED, "550 5.1.1 no such user"),),
            hold="1 recipient(s) undeliverable"))
        await self.nothing_claimable(spool, 0.5)
        [summary] = await spool.list()
        self.assertEqual((summary.id, summary.state, summary.hold_reason, summary.attempts),
                         (entry.id, MessageState.HELD, "1 recipient(s) undeliverable", 1))
        self.assertEqual(summary.recipients[0].state, R.FAILED)
        stats = await self.stats_until(spool, {MessageState.QUEUED: 0, MessageState.HELD: 1})
        self.assertIsNone(stats.oldest_received)

    async def test_a_full_queue_refuses_with_full(self):
        """``x-max-length-bytes`` with ``reject-publish``: once the queue is over its
        limit the broker nacks, and the client hears 452."""
        spool = await self.open_spool(max_bytes=3000)
        stored = 0
        with self.assertRaises(SpoolError) as raised:
            while stored < 5:
                await self.store(spool, content=CONTENT + b"x" * 2000)
                stored += 1
        self.assertIn(stored, (1, 2))
        self.assertEqual((raised.exception.kind, raised.exception.phase),
                         (SpoolErrorKind.FULL, Phase.STORE))
        self.assertEqual(raised.exception.reply.code, 452)
        refused = spool.accepting()
        self.assertEqual(refused.kind, SpoolErrorKind.FULL)
        self.assertIn("full", refused.detail)

    async def test_other_arguments_for_an_existing_queue_are_refused_at_start(self):
        first = await self.open_spool(max_bytes=10000)
        second = self.spool(prefix=first.topology.prefix, max_bytes=20000)
        with self.assertRaises(SpoolError) as raised:
            await second.start()
        self.assertEqual(raised.exception.phase, Phase.OPEN)
        self.assertIn("exists with other arguments", str(raised.exception))

    async def test_a_spool_that_never_claims_takes_no_message(self):
        """The queue tool opens the spool as the relay does, and must not consume."""
        relay = await self.open_spool()
        stored = [await self.store(relay) for _ in range(3)]
        tool = await self.open_spool(prefix=relay.topology.prefix)
        self.assertEqual(await tool.list(), [])
        await tool.close()
        claimed = await self.claim(relay, 3)
        self.assertEqual([m.entry.id for m in claimed], [e.id for e in stored])
        self.assertEqual({m.token.redelivered for m in claimed}, {False})

    async def test_a_message_over_the_size_bound_is_refused(self):
        spool = await self.open_spool(max_message_bytes=1000)
        with self.assertRaises(SpoolError) as raised:
            await self.store(spool, content=CONTENT + b"x" * 1000)
        self.assertEqual(raised.exception.kind, SpoolErrorKind.FULL)

    async def test_a_store_the_broker_cannot_route_fails(self):
        spool = await self.open_spool()
        channel = await spool._link.channel()
        await channel.queue_delete(spool.topology.main)
        spool._link.release(channel)
        with self.assertRaises(SpoolError) as raised:
            await self.store(spool)
        self.assertEqual((raised.exception.kind, raised.exception.phase),
                         (SpoolErrorKind.UNAVAILABLE, Phase.STORE))
        self.assertIn("returned", raised.exception.detail)

    async def test_busy_identities_wait_and_the_limit_holds(self):
        spool = await self.open_spool()
        for _ in range(3):
            await self.store(spool, identity="local/alice")
        bob = await self.store(spool, identity="local/bob")
        await sleep(0.5)  # every one received
        got = await self.claim(spool, 1, busy=frozenset({"local/alice"}))
        self.assertEqual([m.entry.id for m in got], [bob.id])
        self.assertEqual(len(await spool.claim(2)), 2)
        self.assertEqual(len(await self.claim(spool, 1)), 1)

    async def test_a_window_full_of_a_busy_identity_does_not_stall_another(self):
        spool = await self.open_spool(prefetch=2)
        alice = [await self.store(spool, identity="local/alice") for _ in range(3)]
        bob = await self.store(spool, identity="local/bob")
        [got] = await self.claim(spool, 1, busy=frozenset({"local/alice"}), timeout=10)
        self.assertEqual(got.entry.id, bob.id)
        await spool.settle(got, Settlement())
        # alice's messages went back to the end of the queue: never held, never lost
        seen = []
        for _ in alice:
            [message] = await self.claim(spool)
            seen.append(message.entry.id)
            await spool.settle(message, Settlement())
        self.assertEqual(sorted(seen), sorted(e.id for e in alice))
        self.assertEqual(await spool.list(), [])

    async def test_close_gives_back_what_was_not_started_and_holds_the_rest(self):
        first = await self.open_spool()
        one = await self.store(first, recipients=("a@example.net",))
        two = await self.store(first, recipients=("b@example.net",))
        claimed = {m.entry.id: m for m in await self.claim(first, 2)}
        await first.started(claimed[two.id], ("b@example.net",))
        await first.close()
        with self.assertRaises(SpoolError):
            await first.started(claimed[one.id], ("a@example.net",))
        second = await self.open_spool(prefix=first.topology.prefix)
        [back] = await self.claim(second)
        self.assertEqual((back.entry.id, back.attempts), (one.id, 0))
        [held] = await self.held(second)
        self.assertEqual((held.id, held.hold_reason), (two.id, STOPPED))
        self.assertEqual(held.recipients[0].state, R.UNKNOWN)

    async def test_a_message_that_is_not_ours_is_held(self):
        spool = await self.open_spool()
        import pika
        await spool._link.publish(spool.topology.main, b"not mail", pika.BasicProperties(
            delivery_mode=2, message_id="foreign-1", headers={"x": "y"}))
        await self.nothing_claimable(spool, 1.0)
        [held] = await self.held(spool)
        self.assertEqual((held.id, held.state, held.size), ("foreign-1", MessageState.HELD, 8))
        self.assertIn("not an esmtpfa message", held.hold_reason)
        await spool.delete("foreign-1")
        self.assertEqual(await spool.list(), [])

    async def test_a_consumer_killed_after_starting_leaves_the_message_held(self):
        """The crash rule: a relay that may have sent the final dot and died never has
        the message sent again by another: it arrives redelivered and is held."""
        spool = await self.open_spool()
        entry = await self.store(spool)
        child = Collector()
        process = reactor.spawnProcess(
            child, sys.executable,
            [sys.executable, "-m", "tests.support.rabbitmq", "start", spool.topology.prefix],
            env=child_environment({"SPOOL_TEST_URL": self.rabbitmq.url}), path=PROJECT)
        deadline = reactor.seconds() + 20
        while "CLAIMED" not in child.text and reactor.seconds() < deadline:
            self.assertFalse(child.ended.called, child.text)
            await sleep(0.05)
        self.assertIn(f"CLAIMED {entry.id}", child.text)
        process.signalProcess("KILL")
        await child.ended
        await self.nothing_claimable(spool, 1.5)  # it arrives here, and is not handed out
        [held] = await self.held(spool)
        self.assertEqual((held.id, held.hold_reason), (entry.id, REDELIVERED))
        self.assertEqual([(r.state, r.reply) for r in held.recipients],
                         [(R.UNKNOWN, REDELIVERED)])
        await self.nothing_claimable(spool, 0.5)


class AdminTests(SpoolCase):
    """The queue tool's operations (IQueueAdmin) on held and waiting messages."""

    async def prepared(self, spool: AMQPSpool) -> tuple[SpoolEntry, SpoolEntry]:
        """One held message, one waiting a minute in a retry queue."""
        held, waiting = await self.store(spool), await self.store(spool, identity="local/w")
        for message in await self.claim(spool, 2):
            if message.entry.id == held.id:
                await spool.settle(message, Settlement(
                    (Recipient("bob@example.net", R.FAILED, "550 no"),), hold="refused"))
            else:
                await self.settle_pending(spool, message, retry_in=60)
        return held, waiting

    async def test_list_and_show(self):
        spool = await self.open_spool(retry_delays=(60,))
        held, waiting = await self.prepared(spool)
        listed = await spool.list()
        self.assertEqual([(s.id, s.state) for s in listed],
                         [(held.id, MessageState.HELD), (waiting.id, MessageState.QUEUED)])
        self.assertEqual(listed[0].hold_reason, "refused")
        self.assertIsNone(listed[0].next_attempt)
        self.assertLess(abs(listed[1].next_attempt - (time.time() + 60)), 5)
        self.assertEqual((listed[1].attempts, listed[1].last_reply, listed[1].size),
                         (1, "451 4.3.0 try later", len(CONTENT)))
        summary, headers = await spool.show(waiting.id)
        self.assertEqual((summary.id, headers), (waiting.id, HEADERS))
        with self.assertRaises(SpoolError) as raised:
            await spool.show("urn:uuid:nothing")
        self.assertEqual(raised.exception.kind, SpoolErrorKind.NOT_FOUND)
        # reading did not disturb them
        self.assertEqual(len(await self.held(spool, 2, states=None)), 2)
        await self.nothing_claimable(spool, 0.3)
        counts = await spool.counts()
        self.assertEqual(counts[spool.topology.main], 0)
        self.assertEqual(set(counts), {spool.topology.main, spool.topology.held,
                                       spool.topology.retry(60)})
        await self.stats_until(spool, {MessageState.QUEUED: 1, MessageState.HELD: 1})

    async def test_hold_release_and_delete(self):
        spool = await self.open_spool(retry_delays=(60,))
        held, waiting = await self.prepared(spool)
        await spool.hold(waiting.id, "looks like spam")
        states = {s.id: (s.state, s.hold_reason) for s in await spool.list()}
        self.assertEqual(states[waiting.id], (MessageState.HELD, "looks like spam"))
        for call, kind in ((spool.hold(waiting.id), SpoolErrorKind.CONFLICT),
                           (spool.hold("urn:uuid:none"), SpoolErrorKind.NOT_FOUND),
                           (spool.release("urn:uuid:none"), SpoolErrorKind.NOT_FOUND)):
            with self.assertRaises(SpoolError) as raised:
                await call
            self.assertEqual(raised.exception.kind, kind)
        await spool.release(held.id)
        [released] = await self.claim(spool)
        self.assertEqual((released.entry.id, released.pending, released.attempts),
                         (held.id, ("bob@example.net",), 1))
        self.assertLess(abs(released.lifetime_start - time.time()), 5)
        await spool.delete(waiting.id)
        self.assertEqual(await spool.list(), [])
        with self.assertRaises(SpoolError) as raised:
            await spool.delete(waiting.id)
        self.assertEqual(raised.exception.kind, SpoolErrorKind.NOT_FOUND)

    async def test_release_refuses_a_waiting_message(self):
        spool = await self.open_spool(retry_delays=(60,))
        _, waiting = await self.prepared(spool)
        with self.assertRaises(SpoolError) as raised:
            await spool.release(waiting.id)
        self.assertEqual(raised.exception.kind, SpoolErrorKind.CONFLICT)

    async def test_flush_makes_waiting_messages_due(self):
        spool = await self.open_spool(retry_delays=(60,))
        _, waiting = await self.prepared(spool)
        self.assertEqual(await spool.flush(), 1)
        [due] = await self.claim(spool)
        self.assertEqual((due.entry.id, due.attempts), (waiting.id, 1))
        self.assertEqual([s.state for s in await spool.list()], [MessageState.HELD])

    async def test_requeue_one_and_all(self):
        spool = await self.open_spool(retry_delays=(60,))
        held, waiting = await self.prepared(spool)
        self.assertEqual(await spool.requeue(waiting.id), 1)
        [one] = await self.claim(spool)
        self.assertEqual((one.entry.id, one.attempts), (waiting.id, 0))
        await self.settle_pending(spool, one, retry_in=60)
        self.assertEqual(await spool.requeue(), 2)
        both = await self.claim(spool, 2)
        self.assertEqual(sorted(m.entry.id for m in both), sorted([held.id, waiting.id]))
        self.assertEqual({m.attempts for m in both}, {0})
        self.assertEqual({m.pending for m in both}, {("bob@example.net",)})


class CredentialTests(SpoolCase):
    """The password never shows; amqps verifies the broker."""

    @classmethod
    def make_rabbitmq_options(cls) -> dict:
        cls.ca_directory = tempfile.mkdtemp(prefix="esmtpfa-amqp-ca-")
        ca = CertificateAuthority(cls.ca_directory)
        cls.ca_path = ca.cert_path
        return {"password": PASSWORD, "tls": ca.issue("127.0.0.1"), "ca_path": ca.cert_path}

    @classmethod
    def _release_rabbitmq(cls):
        closing = super()._release_rabbitmq()
        if cls.rabbitmq is None:  # the broker of the class is closing: its CA goes too
            shutil.rmtree(cls.ca_directory, ignore_errors=True)
        return closing

    def pika_log(self) -> list[str]:
        lines: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(self.format(record))
        handler = Keep(logging.DEBUG)
        pika_logger = logging.getLogger("pika")
        level = pika_logger.level
        pika_logger.addHandler(handler)
        pika_logger.setLevel(logging.DEBUG)
        self.addCleanup(pika_logger.setLevel, level)
        self.addCleanup(pika_logger.removeHandler, handler)
        return lines

    async def test_the_password_is_never_logged_or_shown(self):
        events = capture_logs(self)
        lines = self.pika_log()
        spool = await self.open_spool()
        await self.store(spool)
        [message] = await self.claim(spool)
        await spool.settle(message, Settlement(
            (Recipient("bob@example.net", R.PENDING, "451"),), hold="for the test"))
        await spool.list()
        await spool.close()
        wrong = "wrong-" + secrets.token_hex(6)
        refused = self.spool(url=self.rabbitmq.url_with(wrong))
        with self.assertRaises(SpoolError) as raised:
            await refused.start()
        self.assertEqual((raised.exception.kind, raised.exception.phase),
                         (SpoolErrorKind.UNAVAILABLE, Phase.OPEN))
        self.assertIn("refused the login", str(raised.exception))
        self.assertNotIn("esmtpfa-test", str(raised.exception))  # nor the user
        from twisted.logger import formatEvent
        texts = [formatEvent(e) + repr(e) for e in events] + lines + [
            str(raised.exception), spool.description, repr(spool), refused.description]
        self.assertTrue(any("connected" in t for t in texts))
        for text in texts:
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(wrong, text)

    async def test_amqps_with_the_ca(self):
        spool = await self.open_spool(url=self.rabbitmq.tls_url, tls_ca=self.ca_path)
        entry = await self.store(spool)
        [message] = await self.claim(spool)
        self.assertEqual(message.entry.id, entry.id)

    async def test_amqps_refuses_an_untrusted_certificate(self):
        spool = self.spool(url=self.rabbitmq.tls_url)  # the system store: not our CA
        with self.assertRaises(SpoolError) as raised:
            await spool.start()
        self.assertEqual(raised.exception.phase, Phase.OPEN)
        self.assertIn("TLS", str(raised.exception))
        self.assertNotIn(PASSWORD, str(raised.exception))

    async def test_amqps_refuses_a_name_the_certificate_does_not_have(self):
        url = self.rabbitmq.url_with(PASSWORD, tls=True, host="localhost")
        spool = self.spool(url=url, tls_ca=self.ca_path)  # issued for 127.0.0.1 only
        with self.assertRaises(SpoolError) as raised:
            await spool.start()
        self.assertIn("TLS", str(raised.exception))


class OutageTests(SpoolCase):
    """The broker goes away and comes back (each test restarts it)."""

    timeout = 120

    async def until_accepting(self, spool: AMQPSpool, timeout: float = 30.0) -> None:
        deadline = reactor.seconds() + timeout
        while spool.accepting() is not None:
            self.assertLess(reactor.seconds(), deadline, spool.accepting().detail)
            await sleep(0.1)

    async def test_stores_fail_while_the_broker_is_down_and_work_again_after(self):
        spool = await self.open_spool()
        await spool.claim(1)  # a consumer
        await self.rabbitmq.stop()
        refused = spool.accepting()
        self.assertEqual(refused.kind, SpoolErrorKind.UNAVAILABLE)
        self.assertIn("unreachable", refused.detail)
        self.assertNotIn(PASSWORD, refused.detail)
        with self.assertRaises(SpoolError) as raised:
            await self.store(spool)
        self.assertEqual((raised.exception.kind, raised.exception.phase),
                         (SpoolErrorKind.UNAVAILABLE, Phase.STORE))
        self.assertEqual(raised.exception.reply.code, 451)
        self.assertEqual(await spool.claim(5), [])
        await self.rabbitmq.start()
        await self.until_accepting(spool)
        entry = await self.store(spool)
        [message] = await self.claim(spool)  # consuming again
        self.assertEqual(message.entry.id, entry.id)

    async def test_a_resource_alarm_stops_accepting(self):
        """RabbitMQ blocks publishers on a memory or disk alarm (``connection.blocked``):
        the spool says so, and a store fails instead of hanging."""
        spool = await self.open_spool(confirm_timeout=2.0)
        await self.store(spool)
        output, code = await self.rabbitmq.ctl("set_vm_memory_high_watermark", "0.00001")
        self.assertEqual(code, 0, output)
        self.addCleanup(self.rabbitmq.ctl, "set_vm_memory_high_watermark", "0.4")
        with self.assertRaises(SpoolError) as raised:
            await self.store(spool)
        self.assertEqual(raised.exception.kind, SpoolErrorKind.UNAVAILABLE)
        deadline = reactor.seconds() + 10
        while spool.accepting() is None and reactor.seconds() < deadline:
            await sleep(0.1)
        refused = spool.accepting()
        self.assertEqual(refused.kind, SpoolErrorKind.UNAVAILABLE)
        self.assertIn("blocks publishers", refused.detail)
        output, code = await self.rabbitmq.ctl("set_vm_memory_high_watermark", "0.4")
        self.assertEqual(code, 0, output)
        await self.until_accepting(spool)
        await self.store(spool)

    async def test_a_burst_of_stores_across_a_broker_crash_loses_none(self):
        spool = await self.open_spool(confirm_timeout=3.0)
        stored: list[str] = []
        failed: list[str] = []

        async def one() -> None:
            entry = new_entry()
            try:
                await spool.store(entry, iter([CONTENT]))
            except SpoolError as error:
                self.assertEqual(error.kind, SpoolErrorKind.UNAVAILABLE)
                failed.append(entry.id)
            else:
                stored.append(entry.id)

        def burst(count: int) -> defer.Deferred:
            return defer.DeferredList([task.deferLater(reactor, n * 0.01, lambda: (
                defer.ensureDeferred(one()))) for n in range(count)])
        storing = burst(300)
        await sleep(1.0)  # in the middle of it
        await self.rabbitmq.kill()
        await storing
        self.assertTrue(stored and failed, (len(stored), len(failed)))
        await self.rabbitmq.start()
        await self.until_accepting(spool)
        claimed: set[str] = set()
        deadline = reactor.seconds() + 30
        while not set(stored) <= claimed and reactor.seconds() < deadline:
            for message in await spool.claim(50):
                claimed.add(message.entry.id)
                await spool.settle(message, Settlement())  # frees its prefetch slot
            await sleep(0.02)
        self.assertEqual(set(stored) - claimed, set(), "a confirmed store was lost")

    async def test_claims_across_a_restart_are_settled_on_the_redelivered_copies(self):
        spool = await self.open_spool(prefetch=3)
        entries = [await self.store(spool) for _ in range(3)]
        claimed = await self.claim(spool, 2, limit=2)
        await sleep(0.3)  # the third waits in the local buffer
        unstarted, started = claimed
        await spool.started(started, started.pending)
        await self.rabbitmq.restart()
        await self.until_accepting(spool)
        with self.assertRaises(SpoolError) as raised:
            await spool.started(unstarted, unstarted.pending)  # it went back to the queue
        self.assertEqual(raised.exception.phase, Phase.START)
        # the buffered one comes back to this process and is attempted as usual
        [third] = await self.claim(spool)
        self.assertEqual(third.entry.id, entries[2].id)
        self.assertTrue(third.token.redelivered)
        await sleep(0.5)  # the other two come back, and wait for their attempts' ends
        await self.settle_pending(spool, unstarted, retry_in=1)
        await spool.settle(started, Settlement(
            (Recipient(started.pending[0], R.DELIVERED, "250 ok"),)))
        [retried] = await self.claim(spool, timeout=5)
        self.assertEqual((retried.entry.id, retried.attempts), (unstarted.entry.id, 1))
        self.assertEqual(await spool.list(), [])
        stats = await spool.stats()
        self.assertEqual(stats.messages[MessageState.HELD], 0)
