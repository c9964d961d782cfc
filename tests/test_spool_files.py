"""FileSpool: the embedded spool (message files plus SQLite), on real files.

Each test has its own directory and its own started thread pool; several processes are
real processes (a small script run with this interpreter), killed with SIGKILL where the
test is about a crash.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from esmtpfa.common.message import Envelope
from esmtpfa.spool import files
from esmtpfa.spool.files import FileSpool
from esmtpfa.spool.interfaces import (
    IContent,
    IQueueAdmin,
    ISpool,
    MessageState,
    Phase,
    QueuedMessage,
    Recipient,
    RecipientState,
    Settlement,
    SpoolEntry,
    SpoolError,
    SpoolErrorKind,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONTENT = (b"Received: from client by esmtpfa; id urn:uuid:1\r\n"
           b"From: alice@example.com\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n")
HEADERS = CONTENT[:CONTENT.index(b"\r\n\r\n") + 2]

_ids = iter(range(1, 10**9))


def entry(recipients: tuple[str, ...] = ("bob@example.org",), identity: str = "p/alice",
          size: int | None = None, message_id: str | None = None,
          content: bytes = CONTENT) -> SpoolEntry:
    return SpoolEntry(
        id=message_id or f"urn:uuid:test-{next(_ids)}",
        envelope=Envelope("alice@example.com", recipients, "8BITMIME", True, False, 1234),
        identity=identity, ending="bounce", received=time.time(),
        size=len(content) if size is None else size, connection_id="urn:uuid:conn")


def chunked(data: bytes, size: int = 7) -> Any:
    return iter([data[i:i + size] for i in range(0, len(data), size)])


def bulk_insert(path: str, count: int, identity: str, first_due: float,
                prefix: str = "bulk", size: int = 1000) -> list[str]:
    """Rows straight into SQLite (no content files: these tests never read them), in one
    transaction: a 100,000-message backlog in about a second."""
    connection = sqlite3.connect(os.path.join(path, files.DATABASE), isolation_level=None,
                                 timeout=10)
    ids = []
    try:
        connection.execute("BEGIN IMMEDIATE")
        messages, recipients = [], []
        for i in range(count):
            queued = SpoolEntry(f"urn:uuid:{prefix}-{i:06d}",
                                Envelope("alice@example.com", ("bob@example.org",)),
                                identity, "bounce", first_due + i, size)
            messages.append(files.message_row(queued, f"{i:024x}.bulk", size,
                                              first_due + i))
            recipients.extend(files.recipient_rows(queued))
            ids.append(queued.id)
        connection.executemany(files.INSERT_MESSAGE, messages)
        connection.executemany(files.INSERT_RECIPIENT, recipients)
        connection.execute("COMMIT")
    finally:
        connection.close()
    return ids


def listing(directory: str) -> list[str]:
    found: list[str] = []
    for base, _, names in os.walk(directory):
        found.extend(os.path.relpath(os.path.join(base, name), directory) for name in names)
    return sorted(found)


class SpoolTestCase(unittest.TestCase):
    timeout = 60
    #: Where these tests' content goes: 0 puts every message in a file of its own (the
    #: path of large messages); the subclasses named Inline… keep it in the index.
    inline_limit = 0

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "spool")
        self.pool = ThreadPool(minthreads=0, maxthreads=6, name="test-spool")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def open(self, **options: Any) -> FileSpool:
        options.setdefault("max_bytes", 10**9)
        options.setdefault("min_free_bytes", 0)
        options.setdefault("inline_limit", self.inline_limit)
        spool = FileSpool(self.path, reactor, self.pool, **options)
        self.addCleanup(spool.close)
        await spool.start()
        return spool

    async def failure(self, d: Deferred[Any], kind: str, phase: str) -> SpoolError:
        try:
            await d
        except SpoolError as error:
            self.assertEqual((error.kind, error.phase), (kind, phase), str(error))
            return error
        self.fail(f"no SpoolError({kind}, {phase})")

    async def deliver_one(self, spool: FileSpool) -> None:
        """A message stored, claimed, started and settled as delivered to its one
        recipient: finished, so the spool forgets it."""
        await spool.store(entry(), iter([CONTENT]))
        [message] = await spool.claim(1)
        await spool.started(message, message.pending)
        await spool.settle(message, Settlement(
            (Recipient("bob@example.org", RecipientState.DELIVERED, "250 ok"),)))

    def slow_commits(self, spool: FileSpool, seconds: float) -> None:
        """A slow disk: each commit takes ``seconds`` more, so the units that arrive
        meanwhile queue up for the next one."""
        real_commit = spool.committer.commit

        def slow_commit(connection: sqlite3.Connection) -> None:
            time.sleep(seconds)
            real_commit(connection)
        self.patch(spool.committer, "commit", slow_commit)

    def content_files(self) -> list[str]:
        return listing(os.path.join(self.path, "msg"))

    def tmp_files(self) -> list[str]:
        return listing(os.path.join(self.path, "tmp"))

    async def summary(self, spool: FileSpool, message_id: str) -> Any:
        return (await spool.show(message_id))[0]

    async def held_after_a_crash(self, crashed: FileSpool, message_id: str) -> FileSpool:
        """``crashed`` dies without closing its spool; the next owner to open it finds
        ``message_id`` held, its recipient's outcome unknown."""
        assert crashed._lock is not None
        crashed._lock.release()  # as the kernel does for a dead process
        crashed._status = "closed"  # ...which never closed its spool
        survivor = await self.open(owner="survivor")
        summary = await self.summary(survivor, message_id)
        self.assertEqual(summary.state, MessageState.HELD)
        self.assertEqual([r.state for r in summary.recipients], [RecipientState.UNKNOWN])
        return survivor


class RoundTripTests(SpoolTestCase):
    """store → claim → started → settle, for each outcome."""

    async def test_provides_the_interfaces(self) -> None:
        spool = await self.open()
        self.assertTrue(ISpool.providedBy(spool))
        self.assertTrue(IQueueAdmin.providedBy(spool))
        self.assertIn(self.path, spool.description)
        self.assertIsNone(spool.accepting())

    async def test_not_open(self) -> None:
        spool = FileSpool(self.path, reactor, self.pool, max_bytes=100, min_free_bytes=0)
        self.assertEqual(spool.accepting().kind, SpoolErrorKind.UNAVAILABLE)
        await self.failure(spool.store(entry(), iter([CONTENT])),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        await self.failure(spool.claim(1), SpoolErrorKind.UNAVAILABLE, Phase.CLAIM)

    async def test_calls_made_while_opening_wait_for_it(self) -> None:
        spool = FileSpool(self.path, reactor, self.pool, max_bytes=10**9, min_free_bytes=0)
        self.addCleanup(spool.close)
        opening = spool.start()
        self.assertIsNone(spool.accepting())
        stored = entry()
        await spool.store(stored, iter([CONTENT]))
        await opening
        self.assertEqual([s.id for s in await spool.list()], [stored.id])

    async def test_calls_made_while_a_failing_opening_fail(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("a file where the spool directory should be")
        spool = FileSpool(self.path, reactor, self.pool, max_bytes=10**9, min_free_bytes=0)
        opening = spool.start()
        stored = spool.store(entry(), iter([CONTENT]))
        await self.failure(opening, SpoolErrorKind.UNAVAILABLE, Phase.OPEN)
        await self.failure(stored, SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertEqual(spool.accepting().kind, SpoolErrorKind.UNAVAILABLE)
        await spool.close()

    async def test_watching_a_closed_spool_leaves_nothing_behind(self) -> None:
        """``watch`` has nothing to tell on a file spool, open or closed: no Deferred,
        so none that fails unseen ("Unhandled error in Deferred" in the log)."""
        spool = await self.open()
        await spool.close()
        self.assertIsNone(spool.watch(lambda: None))

    async def test_store_then_claim_hands_back_the_entry(self) -> None:
        spool = await self.open()
        stored = entry(("bob@example.org", "carol@example.net"))
        await spool.store(stored, chunked(CONTENT))
        [message] = await spool.claim(10)
        self.assertIsInstance(message, QueuedMessage)
        self.assertEqual(message.entry, stored)
        self.assertEqual(message.recipients, (Recipient("bob@example.org"),
                                              Recipient("carol@example.net")))
        self.assertEqual(message.pending, ("bob@example.org", "carol@example.net"))
        self.assertEqual((message.attempts, message.lifetime_start), (0, stored.received))
        self.assertEqual(await spool.claim(10), [])  # claimed: nobody gets it again

    async def test_content_reads_back_byte_for_byte(self) -> None:
        spool = await self.open()
        big = CONTENT + b"x" * 78 + b"\r\n" * 100_000
        await spool.store(entry(content=big), chunked(big, 4096))
        [message] = await spool.claim(1)
        content = await spool.content(message)
        self.assertTrue(IContent.providedBy(content))
        self.assertEqual(content.size, len(big))
        self.assertEqual(b"".join(content.read_from()), big)
        self.assertEqual(b"".join(content.read_from(10, 1000)), big[10:])
        first = content.read_from(0, 5)
        self.assertEqual(next(first), big[:5])
        self.assertEqual(next(content.read_from(5, 5)), big[5:10])  # its own position
        self.assertEqual(next(first), big[5:10])
        content.close()
        content.close()

    async def test_settle_finished_forgets_the_message_and_its_file(self) -> None:
        spool = await self.open()
        await self.deliver_one(spool)
        self.assertEqual(await spool.list(), [])
        self.assertEqual(self.content_files(), [])
        stats = await spool.stats()
        self.assertEqual((stats.messages, stats.bytes, stats.oldest_received),
                         ({MessageState.QUEUED: 0, MessageState.HELD: 0}, 0, None))

    async def test_settle_retry(self) -> None:
        spool = await self.open()
        stored = entry(("a@example.org", "b@example.org"))
        await spool.store(stored, iter([CONTENT]))
        [message] = await spool.claim(1)
        await spool.started(message, ("a@example.org", "b@example.org"))
        retry_at = time.time() + 3600
        await spool.settle(message, Settlement(
            (Recipient("a@example.org", RecipientState.DELIVERED, "250 2.0.0 ok"),
             Recipient("b@example.org", RecipientState.PENDING, "451 4.3.0 later")),
            retry_at=retry_at))
        summary = await self.summary(spool, stored.id)
        self.assertEqual((summary.state, summary.attempts, summary.next_attempt,
                          summary.last_reply),
                         (MessageState.QUEUED, 1, retry_at, "451 4.3.0 later"))
        self.assertEqual([(r.state, r.reply) for r in summary.recipients],
                         [(RecipientState.DELIVERED, "250 2.0.0 ok"),
                          (RecipientState.PENDING, "451 4.3.0 later")])
        self.assertEqual(await spool.claim(1), [])  # not due before retry_at
        self.assertEqual(await spool.flush(), 1)
        [again] = await spool.claim(1)
        self.assertEqual((again.attempts, again.pending), (1, ("b@example.org",)))
        await spool.started(again, ("a@example.org", "b@example.org"))
        summary = await self.summary(spool, stored.id)
        self.assertEqual([r.state for r in summary.recipients],  # delivered stays so
                         [RecipientState.DELIVERED, RecipientState.STARTED])

    async def test_settle_hold(self) -> None:
        spool = await self.open()
        stored = entry()
        await spool.store(stored, iter([CONTENT]))
        [message] = await spool.claim(1)
        await spool.settle(message, Settlement(
            (Recipient("bob@example.org", RecipientState.FAILED, "550 no"),),
            hold="expired: kept for an operator"))
        summary = await self.summary(spool, stored.id)
        self.assertEqual((summary.state, summary.hold_reason, summary.next_attempt),
                         (MessageState.HELD, "expired: kept for an operator", None))
        self.assertEqual(await spool.flush(), 0)
        self.assertEqual(await spool.claim(1), [])
        stats = await spool.stats()
        self.assertEqual(stats.messages, {MessageState.QUEUED: 0, MessageState.HELD: 1})
        self.assertEqual(stats.bytes, len(CONTENT))

    async def test_claim_limit_and_oldest_due_first(self) -> None:
        spool = await self.open()
        stored = [entry() for _ in range(5)]
        for each in stored:
            await spool.store(each, iter([CONTENT]))
        first = await spool.claim(3)
        second = await spool.claim(3)
        self.assertEqual([m.entry.id for m in first + second], [e.id for e in stored])
        self.assertEqual(await spool.claim(0), [])


class InlineRoundTripTests(RoundTripTests):
    """The same round trips, with the content kept in the index (the default for
    messages up to ``INLINE_LIMIT``; the 200 KB one of ``test_content_reads_back…``
    still goes to a file)."""

    inline_limit = files.INLINE_LIMIT


class InlineContentTests(SpoolTestCase):
    """Small messages: content and rows in one unit of work, one commit for a batch."""

    inline_limit = files.INLINE_LIMIT

    def rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """What another process reading the database sees (committed rows only)."""
        connection = sqlite3.connect(os.path.join(self.path, files.DATABASE), timeout=10)
        try:
            return connection.execute(sql, parameters).fetchall()
        finally:
            connection.close()

    async def test_durable_at_the_commit_without_a_file(self) -> None:
        spool = await self.open()
        events: list[str] = []
        real_fsync, real_commit = os.fsync, spool.committer.commit

        def fsync(fd: int) -> None:
            events.append("fsync")
            real_fsync(fd)

        def commit(connection: sqlite3.Connection) -> None:
            real_commit(connection)
            events.append("committed")
        self.patch(os, "fsync", fsync)
        self.patch(spool.committer, "commit", commit)
        stored = entry()
        d = spool.store(stored, chunked(CONTENT))
        d.addCallback(lambda _: events.append("stored"))
        await d
        # No file and no fsync of ours: the commit (the WAL's fsync) is the durable step,
        # and the client's 250 waits for it.
        self.assertEqual(events, ["committed", "stored"])
        self.assertEqual(self.content_files() + self.tmp_files(), [])
        self.assertEqual(self.rows("SELECT data FROM contents WHERE message_id = ?",
                                   (stored.id,)), [(CONTENT,)])

    async def test_a_batch_of_stores_is_one_commit(self) -> None:
        spool = await self.open()
        self.slow_commits(spool, 0.02)
        await spool.store(entry(), iter([CONTENT]))  # the first has a commit to itself
        before = spool.committer.commits
        await gatherResults([spool.store(entry(), iter([CONTENT])) for _ in range(40)])
        self.assertLessEqual(spool.committer.commits - before, 3)
        self.assertEqual(self.content_files(), [])

    async def test_larger_content_goes_to_a_file(self) -> None:
        spool = await self.open(inline_limit=len(CONTENT))
        small, large = entry(), entry(content=CONTENT + b"x\r\n")
        await spool.store(small, iter([CONTENT]))
        await spool.store(large, iter([CONTENT + b"x\r\n"]))
        self.assertEqual(len(self.content_files()), 1)
        self.assertEqual(self.rows("SELECT message_id FROM contents"), [(small.id,)])
        for message in await spool.claim(2):
            content = await spool.content(message)
            self.addCleanup(content.close)
            expected = CONTENT if message.entry.id == small.id else CONTENT + b"x\r\n"
            self.assertEqual(b"".join(content.read_from(0, 10)), expected)

    async def test_finished_messages_leave_no_content(self) -> None:
        spool = await self.open()
        await self.deliver_one(spool)
        self.assertEqual(self.rows("SELECT COUNT(*) FROM contents"), [(0,)])
        stored = entry()
        await spool.store(stored, iter([CONTENT]))
        await spool.delete(stored.id)
        self.assertEqual(self.rows("SELECT COUNT(*) FROM contents"), [(0,)])

    async def test_a_message_id_stored_twice_keeps_the_first(self) -> None:
        spool = await self.open()
        message_id = "urn:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
        await spool.store(entry(message_id=message_id), iter([CONTENT]))
        await self.failure(spool.store(entry(message_id=message_id, content=b"other\r\n"),
                                       iter([b"other\r\n"])),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        [message] = await spool.claim(1)
        content = await spool.content(message)
        self.assertEqual(b"".join(content.read_from()), CONTENT)

    async def test_the_free_disk_floor(self) -> None:
        spool = await self.open(min_free_bytes=10**18)
        await self.failure(spool.store(entry(), iter([CONTENT])),
                           SpoolErrorKind.FULL, Phase.STORE)
        self.assertEqual(self.rows("SELECT COUNT(*) FROM messages"), [(0,)])

    async def test_show_reads_the_headers_from_the_index(self) -> None:
        spool = await self.open()
        stored = entry()
        await spool.store(stored, iter([CONTENT]))
        summary, headers = await spool.show(stored.id)
        self.assertEqual((summary.id, headers), (stored.id, HEADERS))

    async def test_a_version_1_spool_is_upgraded(self) -> None:
        """A spool written by the relay before content could be kept in the index."""
        spool = await self.open(inline_limit=0)
        kept = entry()
        await spool.store(kept, iter([CONTENT]))
        await spool.close()
        connection = sqlite3.connect(os.path.join(self.path, files.DATABASE),
                                     isolation_level=None)
        connection.execute("DROP TABLE contents")
        connection.execute("PRAGMA user_version = 1")
        connection.close()
        spool = await self.open()
        await spool.store(entry(), iter([CONTENT]))
        claimed = await spool.claim(2)
        self.assertEqual(len(claimed), 2)
        for message in claimed:
            content = await spool.content(message)
            self.addCleanup(content.close)
            self.assertEqual(b"".join(content.read_from()), CONTENT)
        self.assertEqual(self.rows("PRAGMA user_version"), [(files.SCHEMA_VERSION,)])

    async def test_a_newer_spool_is_refused(self) -> None:
        spool = await self.open()
        await spool.close()
        connection = sqlite3.connect(os.path.join(self.path, files.DATABASE),
                                     isolation_level=None)
        connection.execute(f"PRAGMA user_version = {files.SCHEMA_VERSION + 1}")
        connection.close()
        newer = FileSpool(self.path, reactor, self.pool, max_bytes=10**9, min_free_bytes=0)
        error = await self.failure(newer.start(), SpoolErrorKind.UNAVAILABLE, Phase.OPEN)
        self.assertIn(f"version {files.SCHEMA_VERSION + 1}", str(error))


class DurabilityTests(SpoolTestCase):
    """docs/spool.md, "The guarantee": file, directory, commit, then the answer."""

    async def test_fsyncs_then_commit_then_the_deferred(self) -> None:
        spool = await self.open()
        events: list[str] = []
        real_fsync, real_commit = os.fsync, spool.committer.commit

        def fsync(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                where = os.readlink(f"/proc/self/fd/{fd}")
                events.append("fsync " + os.path.relpath(where, self.path))
            else:
                events.append("fsync file")
            real_fsync(fd)

        def commit(connection: sqlite3.Connection) -> None:
            events.append(f"commit ({len(self.content_files())} in msg/)")
            real_commit(connection)
            events.append("committed")
        self.patch(os, "fsync", fsync)
        self.patch(spool.committer, "commit", commit)
        for count in (1, 2):  # a new msg/ subdirectory, then maybe a known one
            before = set(self.content_files())
            del events[:]
            d = spool.store(entry(), iter([CONTENT]))
            d.addCallback(lambda _: events.append("fired"))
            await d
            [new] = set(self.content_files()) - before
            self.assertEqual(events[0], "fsync file")
            # The file was in msg/ (renamed and its directory fsync'd) before the commit.
            self.assertEqual(events[-4:], [f"fsync msg/{os.path.dirname(new)}",
                                           f"commit ({count} in msg/)", "committed",
                                           "fired"])
            self.assertTrue(all(e in ("fsync msg", f"fsync msg/{os.path.dirname(new)}")
                                for e in events[1:-3]), events)
        self.assertEqual(self.tmp_files(), [])

    async def test_started_and_settle_fire_after_their_commit(self) -> None:
        spool = await self.open()
        await spool.store(entry(), iter([CONTENT]))
        [message] = await spool.claim(1)
        events: list[str] = []
        real_commit = spool.committer.commit

        def commit(connection: sqlite3.Connection) -> None:
            real_commit(connection)
            events.append("committed")
        self.patch(spool.committer, "commit", commit)
        d = spool.started(message, message.pending)
        d.addCallback(lambda _: events.append("started"))
        await d
        d = spool.settle(message, Settlement(retry_at=time.time() + 60))
        d.addCallback(lambda _: events.append("settled"))
        await d
        self.assertEqual(events, ["committed", "started", "committed", "settled"])

    async def test_only_stores_and_starts_pay_the_fsync(self) -> None:
        """docs/spool.md, "What a power loss costs": claims and settlements are
        bookkeeping committed without the WAL's fsync; a store and a start never are."""
        spool = await self.open()
        modes: list[tuple[str, int]] = []
        real_commit = spool.committer.commit
        names = {0: "OFF", 1: "NORMAL", 2: "FULL"}

        def commit(connection: sqlite3.Connection) -> None:
            mode = connection.execute("PRAGMA synchronous").fetchone()[0]
            modes.append(names[mode])
            real_commit(connection)
        self.patch(spool.committer, "commit", commit)
        await spool.store(entry(), iter([CONTENT]))
        [message] = await spool.claim(1)
        await spool.started(message, message.pending)
        await spool.settle(message, Settlement(retry_at=time.time() + 60))
        [message] = await spool.claim(1, frozenset()) or [None]  # not due: nothing
        await spool.store(entry(), iter([CONTENT]))
        self.assertEqual(modes, ["FULL", "NORMAL", "FULL", "NORMAL", "NORMAL", "FULL"])

    async def test_schema_is_wal_and_synchronous_full(self) -> None:
        spool = await self.open()
        connection = spool._connect()
        try:
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(connection.execute("PRAGMA synchronous").fetchone()[0], 2)
            self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0],
                             files.SCHEMA_VERSION)
        finally:
            connection.close()

    async def test_concurrent_stores_share_commits(self) -> None:
        """Group commit: the stores that arrive while a commit runs go in the next one."""
        spool = await self.open()
        self.slow_commits(spool, 0.02)
        before, units = spool.committer.commits, spool.committer.units
        count = 40
        await gatherResults([spool.store(entry(), iter([CONTENT])) for _ in range(count)])
        commits = spool.committer.commits - before
        self.assertEqual(spool.committer.units - units, count)
        self.assertLess(commits, count // 2)
        self.assertEqual(len(await spool.list()), count)

    async def test_batches_are_bounded(self) -> None:
        spool = await self.open(max_batch=3)
        self.slow_commits(spool, 0.01)
        before = spool.committer.commits
        await gatherResults([spool.store(entry(), iter([CONTENT])) for _ in range(12)])
        self.assertEqual(spool.committer.largest_batch, 3)
        self.assertGreaterEqual(spool.committer.commits - before, 4)

    async def test_one_failing_unit_does_not_fail_its_batch(self) -> None:
        spool = await self.open()
        duplicate = entry()
        await spool.store(duplicate, iter([CONTENT]))
        results = await gatherResults([
            spool.store(entry(), iter([CONTENT])),
            spool.store(duplicate, iter([CONTENT])).addErrback(lambda f: f.value),
            spool.store(entry(), iter([CONTENT]))])
        self.assertIsNone(results[0])
        self.assertIsInstance(results[1], SpoolError)
        self.assertEqual(results[1].kind, SpoolErrorKind.UNAVAILABLE)
        self.assertIsNone(results[2])
        self.assertEqual(len(await spool.list()), 3)
        self.assertEqual(len(self.content_files()), 3)  # the duplicate's file is gone


class CommitterTests(SpoolTestCase):
    """GroupCommitter: a batch's statements in the reactor's thread, its COMMIT in the
    pool, and another process's write lock waited for without blocking the reactor."""

    def hold_the_write_lock(self) -> sqlite3.Connection:
        """Another writer (as a worker or the queue tool would be) in a transaction."""
        other = sqlite3.connect(os.path.join(self.path, files.DATABASE),
                                isolation_level=None, timeout=0)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        return other

    async def test_statements_in_the_reactor_thread_the_commit_in_the_pool(self) -> None:
        spool = await self.open()
        threads_seen: dict[str, str] = {}
        real_commit = spool.committer.commit

        def commit(connection: sqlite3.Connection) -> None:
            threads_seen["commit"] = threading.current_thread().name
            real_commit(connection)
        self.patch(spool.committer, "commit", commit)

        def unit(tx: files.Transaction) -> int:
            threads_seen["unit"] = threading.current_thread().name
            return tx.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self.assertEqual(await spool.committer.submit(unit), 0)
        self.assertEqual(threads_seen["unit"], threading.main_thread().name)
        self.assertNotEqual(threads_seen["commit"], threading.main_thread().name)

    async def test_units_submitted_in_one_turn_share_a_batch(self) -> None:
        spool = await self.open()
        before = spool.committer.commits
        await gatherResults([spool.committer.submit(lambda tx: None) for _ in range(6)])
        self.assertEqual(spool.committer.commits - before, 1)

    async def test_a_locked_database_is_waited_for_while_the_reactor_runs(self) -> None:
        spool = await self.open()
        other = self.hold_the_write_lock()
        outcome: list[Any] = []
        stored = spool.store(entry(), iter([CONTENT]))
        stored.addBoth(lambda result: outcome.append(result) or result)
        turns = 0
        for _ in range(20):  # 20 turns of the reactor, 10 ms apart, while locked
            await deferLater(reactor, 0.01, lambda: None)
            turns += 1
        self.assertEqual(turns, 20)
        self.assertEqual(outcome, [])  # waiting for the lock, neither stored nor failed
        other.execute("COMMIT")
        await stored
        self.assertEqual(len(await spool.list()), 1)

    async def test_a_lock_held_past_the_busy_timeout_fails_the_batch(self) -> None:
        spool = await self.open()
        spool.committer.busy_timeout = 0.2
        other = self.hold_the_write_lock()
        started = time.monotonic()
        await self.failure(spool.store(entry(), iter([CONTENT])),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        other.execute("ROLLBACK")
        await spool.store(entry(), iter([CONTENT]))  # the next batch takes the lock
        self.assertEqual(len(await spool.list()), 1)


class CapacityAndFailureTests(SpoolTestCase):

    async def test_full_by_max_bytes(self) -> None:
        big = CONTENT + b"x" * 3000 + b"\r\n"
        spool = await self.open(max_bytes=2 * len(big) + 100)
        await spool.store(entry(content=big), iter([big]))
        self.assertIsNone(spool.accepting())
        await spool.store(entry(content=big), iter([big]))
        refused = spool.accepting()  # 100 octets left: no message fits
        self.assertEqual(refused.kind, SpoolErrorKind.FULL)
        self.assertIn("full", refused.detail)
        error = await self.failure(spool.store(entry(content=big), iter([big])),
                                   SpoolErrorKind.FULL, Phase.STORE)
        self.assertEqual(error.reply.code, 452)
        self.assertEqual(len(self.content_files()), 2)
        self.assertEqual(self.tmp_files(), [])
        [message, _] = await spool.claim(2)
        await spool.settle(message, Settlement())  # room again
        self.assertIsNone(spool.accepting())
        await spool.store(entry(content=big), iter([big]))

    async def test_a_tiny_cap_refuses_at_once(self) -> None:
        spool = FileSpool(self.path, reactor, self.pool, max_bytes=1, min_free_bytes=0)
        self.addCleanup(spool.close)
        opening = spool.start()
        self.assertEqual(spool.accepting().kind, SpoolErrorKind.FULL)  # known at once
        await opening
        self.assertIn("full", spool.accepting().detail)

    async def test_full_by_free_disk_floor(self) -> None:
        spool = await self.open(min_free_bytes=2**62)  # more than any disk has
        refused = spool.accepting()
        self.assertEqual(refused.kind, SpoolErrorKind.FULL)
        self.assertIn("free", refused.detail)
        await self.failure(spool.store(entry(), iter([CONTENT])),
                           SpoolErrorKind.FULL, Phase.STORE)
        self.assertEqual(self.content_files() + self.tmp_files(), [])
        self.assertEqual(await spool.list(), [])

    async def test_disk_error_leaves_nothing_behind(self) -> None:
        spool = await self.open()
        real_write = os.write
        calls = []

        def write(fd: int, data: Any) -> int:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # the reactor's waker, a pipe
                return real_write(fd, data)
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(28, "No space left on device")
            return real_write(fd, data)
        self.patch(os, "write", write)
        error = await self.failure(spool.store(entry(), chunked(CONTENT)),
                                   SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertIn("no space", error.detail)
        self.assertEqual(error.reply.code, 451)
        self.assertEqual(self.content_files() + self.tmp_files(), [])
        self.assertEqual(await spool.list(), [])

    async def test_a_message_id_stored_twice_keeps_the_first(self) -> None:
        spool = await self.open()
        message_id = "urn:uuid:0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d"
        await spool.store(entry(message_id=message_id), iter([CONTENT]))
        [name] = self.content_files()
        self.assertTrue(name.startswith("0a/0a1b2c3d4e5f4a6b8c7d8e9f0a1b2c3d."), name)
        await self.failure(spool.store(entry(message_id=message_id, content=b"other\r\n"),
                                       iter([b"other\r\n"])),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertEqual(self.content_files(), [name])
        self.assertEqual(self.tmp_files(), [])
        [message] = await spool.claim(1)
        content = await spool.content(message)
        self.addCleanup(content.close)
        self.assertEqual(b"".join(content.read_from()), CONTENT)

    async def test_broken_content_source_leaves_nothing_behind(self) -> None:
        spool = await self.open()

        def chunks() -> Any:
            yield CONTENT[:10]
            raise ValueError("the client's spool broke")
        await self.failure(spool.store(entry(), chunks()),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertEqual(self.content_files() + self.tmp_files(), [])

    async def test_failed_commit_removes_the_content(self) -> None:
        spool = await self.open()
        real_commit = spool.committer.commit
        failures = [sqlite3.OperationalError("disk I/O error")]

        def commit(connection: sqlite3.Connection) -> None:
            if failures:
                raise failures.pop()
            real_commit(connection)
        self.patch(spool.committer, "commit", commit)
        await self.failure(spool.store(entry(), iter([CONTENT])),
                           SpoolErrorKind.UNAVAILABLE, Phase.STORE)
        self.assertEqual(self.content_files() + self.tmp_files(), [])
        self.assertEqual(await spool.list(), [])
        await spool.store(entry(), iter([CONTENT]))  # the connection is usable again
        self.assertEqual(len(await spool.list()), 1)

    async def test_orphans_removed_at_start(self) -> None:
        spool = await self.open(owner="first")
        kept = entry()
        await spool.store(kept, iter([CONTENT]))
        [kept_file] = self.content_files()
        await spool.close()
        live = FileSpool(self.path, reactor, self.pool, max_bytes=10**9, min_free_bytes=0,
                         owner="live")
        self.addCleanup(live.close)
        await live.start()
        planted = {
            "msg/ab/ab0000000000000000000000.dead": True,   # crashed before its commit
            "tmp/cd0000000000000000000000.dead": True,      # crashed while writing
            "msg/ef/ef0000000000000000000000.first": True,  # a dead owner (closed)
            "msg/12/120000000000000000000000.live": False,  # alive: maybe mid-store
        }
        for name in planted:
            os.makedirs(os.path.dirname(os.path.join(self.path, name)), exist_ok=True)
            with open(os.path.join(self.path, name), "wb") as f:
                f.write(b"x")
        await self.open(owner="second")
        remaining = set(listing(self.path))
        for name, removed in planted.items():
            self.assertEqual(name not in remaining, removed, name)
        self.assertIn(os.path.join("msg", kept_file), remaining)


class OwnerTests(SpoolTestCase):
    """Claims of several owners on one directory, and what a dead owner leaves."""

    async def test_two_spools_never_claim_the_same_message(self) -> None:
        first = await self.open(owner="one")
        second = await self.open(owner="two")
        await gatherResults([first.store(entry(identity=f"p/u{i % 4}"), iter([CONTENT]))
                             for i in range(60)])
        claimed: list[str] = []
        for _ in range(20):
            batches = await gatherResults([first.claim(4), second.claim(4)])
            claimed.extend(m.entry.id for batch in batches for m in batch)
            if not any(batches):
                break
        self.assertEqual(len(claimed), 60)
        self.assertEqual(len(set(claimed)), 60)

    async def test_an_owner_name_in_use_is_refused(self) -> None:
        await self.open(owner="same")
        other = FileSpool(self.path, reactor, self.pool, max_bytes=1, min_free_bytes=0,
                          owner="same")
        self.patch(files, "LOCK_ATTEMPTS", 2)
        await self.failure(other.start(), SpoolErrorKind.UNAVAILABLE, Phase.OPEN)
        self.assertRaises(ValueError, FileSpool, self.path, reactor, self.pool,
                          max_bytes=1, min_free_bytes=0, owner="../escape")

    async def test_close_releases_claims_and_holds_started_ones(self) -> None:
        first = await self.open(owner="closing")
        waiting, started = entry(), entry()
        await first.store(waiting, iter([CONTENT]))
        await first.store(started, iter([CONTENT]))
        messages = {m.entry.id: m for m in await first.claim(2)}
        await first.started(messages[started.id], messages[started.id].pending)
        await first.close()
        self.assertFalse(os.path.exists(os.path.join(self.path, "owners", "closing.lock")))
        await self.failure(first.claim(1), SpoolErrorKind.UNAVAILABLE, Phase.CLAIM)
        second = await self.open(owner="after")
        self.assertEqual([m.entry.id for m in await second.claim(5)], [waiting.id])
        held = await self.summary(second, started.id)
        self.assertEqual(held.state, MessageState.HELD)
        self.assertIn("outcome unknown", held.hold_reason)
        self.assertEqual([r.state for r in held.recipients], [RecipientState.UNKNOWN])

    async def test_recovery_at_start_after_a_crash(self) -> None:
        crashed = await self.open(owner="crashed")
        stored = entry()
        await crashed.store(stored, iter([CONTENT]))
        [message] = await crashed.claim(1)
        await crashed.started(message, message.pending)
        await self.held_after_a_crash(crashed, stored.id)
        self.assertFalse(os.path.exists(os.path.join(self.path, "owners", "crashed.lock")))

    async def test_the_lease_ends_a_claim_that_never_settles(self) -> None:
        now = [1_000_000.0]
        stuck = await self.open(owner="stuck", claim_lease=60, clock=lambda: now[0])
        other = await self.open(owner="other", claim_lease=60, clock=lambda: now[0])
        plain, started = entry(), entry()
        await stuck.store(plain, iter([CONTENT]))
        await stuck.store(started, iter([CONTENT]))
        messages = {m.entry.id: m for m in await stuck.claim(2)}
        await stuck.started(messages[started.id], messages[started.id].pending)
        self.assertEqual(await other.recover(), 0)  # alive, within the lease
        now[0] += 61
        self.assertEqual(await other.recover(), 2)
        [again] = await other.claim(5)
        self.assertEqual(again.entry.id, plain.id)
        # The stuck attempt lost its claim: the dot must not leave now.
        await self.failure(stuck.started(messages[plain.id], messages[plain.id].pending),
                           SpoolErrorKind.CONFLICT, Phase.START)
        # Nor may its verdict remove what is now another attempt's.
        await self.failure(stuck.settle(messages[plain.id], Settlement(
            (Recipient("bob@example.org", RecipientState.DELIVERED, "250 ok"),))),
            SpoolErrorKind.CONFLICT, Phase.SETTLE)
        self.assertEqual((await self.summary(other, plain.id)).state, MessageState.QUEUED)
        summary = await self.summary(other, started.id)
        self.assertEqual(summary.state, MessageState.HELD)
        self.assertIn("lease", summary.hold_reason)


class ClaimStartTests(SpoolTestCase):
    """``claim(start=True)``: the queue runner's claim records the start of what it
    claims, in its one commit (docs/spool.md, "The duplicate window")."""

    def commits(self, spool: FileSpool) -> list[str]:
        """The synchronous mode of each commit from now on."""
        modes: list[str] = []
        real_commit = spool.committer.commit
        names = {0: "OFF", 1: "NORMAL", 2: "FULL"}

        def commit(connection: sqlite3.Connection) -> None:
            modes.append(names[connection.execute("PRAGMA synchronous").fetchone()[0]])
            real_commit(connection)
        self.patch(spool.committer, "commit", commit)
        return modes

    async def test_the_claim_records_the_start_durably_and_started_writes_nothing(
            self) -> None:
        spool = await self.open()
        stored = entry(("bob@example.org", "carol@example.org"))
        await spool.store(stored, iter([CONTENT]))
        modes = self.commits(spool)
        [message] = await spool.claim(1, start=True)
        self.assertEqual(modes, ["FULL"])  # fsync'd: the dot may follow it
        self.assertEqual(message.pending, ("bob@example.org", "carol@example.org"))
        summary = await self.summary(spool, stored.id)
        self.assertEqual([r.state for r in summary.recipients], [RecipientState.STARTED] * 2)
        await spool.started(message, message.pending)
        self.assertEqual(modes, ["FULL"])  # no commit of its own
        await spool.settle(message, Settlement(
            (Recipient("bob@example.org", RecipientState.DELIVERED, "250 ok"),
             Recipient("carol@example.org", RecipientState.PENDING, "451 later")),
            retry_at=time.time() + 60))
        summary = await self.summary(spool, stored.id)
        self.assertEqual([r.state for r in summary.recipients],
                         [RecipientState.DELIVERED, RecipientState.PENDING])

    async def test_a_crash_holds_what_was_claimed_with_its_start(self) -> None:
        """Whether the attempt began is not on disk: after a crash each is held."""
        crashed = await self.open(owner="crashed")
        stored = entry()
        await crashed.store(stored, iter([CONTENT]))
        await crashed.claim(1, start=True)
        await self.held_after_a_crash(crashed, stored.id)

    async def test_a_stop_makes_the_unbegun_due_and_holds_the_begun(self) -> None:
        first = await self.open(owner="closing")
        waiting, begun = entry(), entry()
        await first.store(waiting, iter([CONTENT]))
        await first.store(begun, iter([CONTENT]))
        messages = {m.entry.id: m for m in await first.claim(2, start=True)}
        await first.started(messages[begun.id], messages[begun.id].pending)
        await first.close()
        second = await self.open(owner="after")
        [again] = await second.claim(5)
        self.assertEqual(again.entry.id, waiting.id)
        self.assertEqual(again.pending, waiting.envelope.recipients)
        held = await self.summary(second, begun.id)
        self.assertEqual(held.state, MessageState.HELD)
        self.assertEqual([r.state for r in held.recipients], [RecipientState.UNKNOWN])

    async def test_a_claim_past_half_its_lease_is_checked_at_the_start(self) -> None:
        """The claim may have been lost to the lease by then: the start is written and
        the claim checked, as without ``start``, so the dot never leaves for a message
        another process may be attempting."""
        now = [1_000_000.0]
        stuck = await self.open(owner="stuck", claim_lease=60, clock=lambda: now[0])
        other = await self.open(owner="other", claim_lease=60, clock=lambda: now[0])
        young, old = entry(), entry()
        await stuck.store(young, iter([CONTENT]))
        await stuck.store(old, iter([CONTENT]))
        messages = {m.entry.id: m for m in await stuck.claim(2, start=True)}
        modes = self.commits(stuck)
        now[0] += 29
        await stuck.started(messages[young.id], messages[young.id].pending)
        self.assertEqual(modes, [])  # younger than half the lease: ours for sure
        now[0] += 32
        self.assertEqual(await other.recover(), 2)  # past the lease: both held
        await self.failure(stuck.started(messages[old.id], messages[old.id].pending),
                           SpoolErrorKind.CONFLICT, Phase.START)
        self.assertEqual((await self.summary(other, old.id)).state, MessageState.HELD)


CHILD = textwrap.dedent("""
    import sys
    from twisted.internet import defer, task, threads
    from twisted.python.threadpool import ThreadPool
    from esmtpfa.spool.files import FileSpool
    from esmtpfa.spool.interfaces import Settlement

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    async def main(reactor, path, owner, mode):
        pool = ThreadPool(0, 4, name="child-spool")
        pool.start()
        spool = FileSpool(path, reactor, pool, max_bytes=10**9, min_free_bytes=0,
                          owner=owner)
        await spool.start()
        say("ready")
        if mode == "loop":
            await threads.deferToThread(sys.stdin.readline)
            empty = 0
            for _ in range(2000):
                messages = await spool.claim(5)
                if not messages:
                    empty += 1
                    if empty >= 5:
                        break
                    await task.deferLater(reactor, 0.01, lambda: None)
                    continue
                empty = 0
                for message in messages:
                    say("claimed " + message.entry.id)
                    await spool.settle(message, Settlement())
            await spool.close()
            pool.stop()
            say("done")
            return
        [message] = await spool.claim(1)
        if mode == "started":
            await spool.started(message, message.pending)
        say(mode + " " + message.entry.id)
        await defer.Deferred()  # until killed

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
""")


class ProcessTests(SpoolTestCase):
    """A real second process on the same directory."""

    def spawn(self, owner: str, mode: str) -> subprocess.Popen[str]:
        environment = dict(os.environ, PYTHONPATH=ROOT)
        child = subprocess.Popen([sys.executable, "-c", CHILD, self.path, owner, mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=environment)

        def reap() -> None:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=10)
        self.addCleanup(reap)
        return child

    async def line(self, child: subprocess.Popen[str], timeout: float = 20) -> str:
        d = threads.deferToThread(child.stdout.readline)  # type: ignore[union-attr]
        d.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: child.kill())
        text = await d
        if not text:
            self.fail(f"the child ended: {child.stderr.read()}")  # type: ignore[union-attr]
        return text.strip()

    async def kill(self, child: subprocess.Popen[str]) -> None:
        os.kill(child.pid, signal.SIGKILL)
        await threads.deferToThread(child.wait, 10)

    async def test_a_second_process_never_claims_what_we_claimed(self) -> None:
        spool = await self.open(owner="parent")
        count = 300
        await gatherResults([spool.store(entry(identity=f"p/u{i % 3}"), iter([CONTENT]))
                             for i in range(count)])
        child = self.spawn("child", "loop")
        self.assertEqual(await self.line(child), "ready")
        child.stdin.write("go\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        ours: list[str] = []
        for _ in range(count):
            messages = await spool.claim(3)
            if not messages:
                break
            for message in messages:
                ours.append(message.entry.id)
                await spool.settle(message, Settlement())
        output, errors = await threads.deferToThread(child.communicate, None, 30)
        self.assertEqual(child.returncode, 0, errors)
        lines = output.split()
        self.assertEqual(lines[-1], "done")
        theirs = [word for word in lines if word.startswith("urn:")]
        self.assertEqual(set(ours) & set(theirs), set())
        self.assertEqual(len(ours) + len(theirs), count)
        self.assertEqual(await spool.list(), [])

    async def test_a_killed_owner_after_started_leaves_the_message_held(self) -> None:
        spool = await self.open(owner="parent")
        stored = entry(("a@example.org", "b@example.org"))
        await spool.store(stored, iter([CONTENT]))
        child = self.spawn("doomed", "started")
        self.assertEqual(await self.line(child), "ready")
        self.assertEqual(await self.line(child), f"started {stored.id}")
        self.assertEqual(await spool.recover(), 0)  # alive: left alone
        self.assertEqual(await spool.claim(1), [])
        await self.kill(child)
        self.assertEqual(await spool.recover(), 1)
        summary = await self.summary(spool, stored.id)
        self.assertEqual(summary.state, MessageState.HELD)
        self.assertIn("outcome unknown", summary.hold_reason)
        self.assertEqual([r.state for r in summary.recipients],
                         [RecipientState.UNKNOWN, RecipientState.UNKNOWN])
        self.assertEqual(await spool.claim(1), [])  # never retried on our own
        self.assertFalse(os.path.exists(os.path.join(self.path, "owners", "doomed.lock")))

    async def claimed_by_a_killed_owner(self, **options: Any) -> tuple[Any, SpoolEntry]:
        """A spool and a message that a child process claimed and then died with."""
        spool = await self.open(owner="parent", **options)
        stored = entry()
        await spool.store(stored, iter([CONTENT]))
        child = self.spawn("doomed", "claimed")
        self.assertEqual(await self.line(child), "ready")
        self.assertEqual(await self.line(child), f"claimed {stored.id}")
        await self.kill(child)
        return spool, stored

    async def test_a_killed_owner_before_started_leaves_the_message_due(self) -> None:
        spool, stored = await self.claimed_by_a_killed_owner()
        self.assertEqual(await spool.recover(), 1)
        [message] = await spool.claim(1)
        self.assertEqual((message.entry.id, message.pending),
                         (stored.id, stored.envelope.recipients))

    async def test_claim_recovers_dead_owners_by_itself(self) -> None:
        spool, stored = await self.claimed_by_a_killed_owner(recovery_interval=0)
        [message] = await spool.claim(1)
        self.assertEqual(message.entry.id, stored.id)


class FairnessTests(SpoolTestCase):
    """docs/spool.md, "Fairness": a backlog never starves another identity."""

    async def test_round_robin_over_identities(self) -> None:
        spool = await self.open()
        now = time.time()
        bulk_insert(self.path, 100, "p/a", now - 1000, prefix="a")
        bulk_insert(self.path, 100, "p/b", now - 900, prefix="b")
        bulk_insert(self.path, 1, "p/c", now - 10, prefix="c")
        claimed = await spool.claim(9)
        identities = [m.entry.identity for m in claimed]
        self.assertEqual(identities.count("p/c"), 1)
        self.assertEqual((identities.count("p/a"), identities.count("p/b")), (4, 4))
        self.assertEqual(identities[:3], ["p/a", "p/b", "p/c"])  # oldest due first
        a_ids = [m.entry.id for m in claimed if m.entry.identity == "p/a"]
        self.assertEqual(a_ids, [f"urn:uuid:a-{i:06d}" for i in range(4)])
        # With c exhausted the rest is shared between a and b.
        rest = [m.entry.identity for m in await spool.claim(10)]
        self.assertEqual((rest.count("p/a"), rest.count("p/b")), (5, 5))

    async def test_busy_identities_are_skipped(self) -> None:
        spool = await self.open()
        now = time.time()
        bulk_insert(self.path, 50, "p/a", now - 1000, prefix="a")
        bulk_insert(self.path, 2, "p/b", now - 10, prefix="b")
        claimed = await spool.claim(10, frozenset({"p/a"}))
        self.assertEqual([m.entry.identity for m in claimed], ["p/b", "p/b"])
        self.assertEqual(await spool.claim(10, frozenset({"p/a", "p/b"})), [])

    async def test_fill_gives_busy_identities_what_nobody_else_takes(self) -> None:
        """One claim, as the runner makes it: the others first, then the busy ones."""
        spool = await self.open()
        now = time.time()
        bulk_insert(self.path, 50, "p/a", now - 1000, prefix="a")
        bulk_insert(self.path, 2, "p/b", now - 10, prefix="b")
        before = spool.committer.commits
        claimed = await spool.claim(5, frozenset({"p/a"}), fill=True)
        self.assertEqual([m.entry.identity for m in claimed],
                         ["p/b", "p/b", "p/a", "p/a", "p/a"])
        self.assertEqual(spool.committer.commits - before, 1)

    async def test_not_yet_due_is_not_claimed(self) -> None:
        spool = await self.open()
        bulk_insert(self.path, 5, "p/later", time.time() + 3600, prefix="later")
        self.assertEqual(await spool.claim(10), [])


class LargeQueueTests(SpoolTestCase):
    """100,000 queued messages: what an operator and the runner notice."""

    timeout = 120

    async def test_claim_and_list_with_a_hundred_thousand_messages(self) -> None:
        spool = await self.open()
        now = time.time()
        await threads.deferToThread(bulk_insert, self.path, 100_000, "p/newsletter",
                                    now - 200_000)
        bulk_insert(self.path, 1, "p/single", now - 1, prefix="single")
        started = time.perf_counter()
        claimed = await spool.claim(20)
        elapsed = time.perf_counter() - started
        self.assertEqual(len(claimed), 20)
        self.assertIn("p/single", [m.entry.identity for m in claimed])  # not starved
        self.assertLess(elapsed, 0.5)  # a few ms on an idle machine
        for _ in range(5):  # steady state
            started = time.perf_counter()
            await spool.claim(20)
            self.assertLess(time.perf_counter() - started, 0.5)

        cpu, wall = time.process_time(), time.perf_counter()
        summaries = await spool.list()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        self.assertEqual(len(summaries), 100_001)
        received = [s.received for s in summaries]
        self.assertEqual(received, sorted(received))
        # Our own cost (this process's CPU) is what the bound is about; the wall clock
        # also counts whatever else shares the machine with the test.
        self.assertLess(cpu, 2.0)
        self.assertLess(wall, 6.0)
        stats = await spool.stats()
        self.assertEqual(stats.messages[MessageState.QUEUED], 100_001)
        self.assertEqual(stats.oldest_received, now - 200_000)


class WALTests(SpoolTestCase):
    """The WAL's disk: a checkpoint every ``CHECKPOINT_FRAMES`` frames, and a file cut
    back to ``WAL_SIZE_LIMIT`` once it may start over (both scaled down here)."""

    inline_limit = files.INLINE_LIMIT

    async def test_a_wal_grown_behind_a_long_reader_is_cut_back(self) -> None:
        self.patch(files, "CHECKPOINT_FRAMES", 20)
        self.patch(files, "WAL_SIZE_LIMIT", 256 * 1024)
        spool = await self.open()
        wal = os.path.join(self.path, files.DATABASE + "-wal")
        content = CONTENT + b"x" * 8000  # a few pages each

        async def store(count: int) -> None:
            for _ in range(count):  # a commit each
                await spool.store(entry(content=content), iter([content]))

        # A reader that holds its snapshot (a long listing): no checkpoint gets past it.
        reader = sqlite3.connect(os.path.join(self.path, files.DATABASE),
                                 isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()
        await store(60)
        self.assertGreater(os.path.getsize(wal), 256 * 1024)
        reader.execute("COMMIT")
        await store(30)
        self.assertLessEqual(os.path.getsize(wal), 256 * 1024)
        self.assertEqual((await spool.stats()).messages[MessageState.QUEUED], 90)


class AdminTests(SpoolTestCase):
    """IQueueAdmin: the queue tool's commands and their errors."""

    async def stored(self, spool: FileSpool, **options: Any) -> SpoolEntry:
        each = entry(**options)
        await spool.store(each, iter([options.get("content", CONTENT)]))
        return each

    async def test_list_and_show(self) -> None:
        spool = await self.open()
        first = await self.stored(spool)
        second = await self.stored(spool, recipients=("x@example.org", "y@example.org"))
        summaries = await spool.list()
        self.assertEqual([s.id for s in summaries], [first.id, second.id])
        summary, headers = await spool.show(second.id)
        self.assertEqual(summary, summaries[1])
        self.assertEqual((summary.state, summary.sender, summary.identity, summary.size,
                          summary.attempts, summary.hold_reason, summary.last_reply),
                         (MessageState.QUEUED, "alice@example.com", "p/alice",
                          len(CONTENT), 0, None, None))
        self.assertEqual(summary.recipients, (Recipient("x@example.org"),
                                              Recipient("y@example.org")))
        self.assertEqual(headers, HEADERS)

    async def test_show_bounds_the_header_section(self) -> None:
        spool = await self.open()
        endless = b"X-Long: " + b"a" * 200_000 + b"\r\n\r\nbody\r\n"
        stored = await self.stored(spool, content=endless)
        _, headers = await spool.show(stored.id)
        self.assertEqual(headers, endless[:files.HEADER_LIMIT])
        no_headers = await self.stored(spool, content=b"\r\nbody only\r\n")
        self.assertEqual((await spool.show(no_headers.id))[1], b"")

    async def test_unknown_ids(self) -> None:
        spool = await self.open()
        for d in (spool.show("urn:uuid:nope"), spool.hold("urn:uuid:nope"),
                  spool.release("urn:uuid:nope"), spool.delete("urn:uuid:nope"),
                  spool.requeue("urn:uuid:nope")):
            await self.failure(d, SpoolErrorKind.NOT_FOUND, Phase.ADMIN)

    async def test_hold_and_release(self) -> None:
        spool = await self.open()
        stored = await self.stored(spool, recipients=("a@x.org", "b@x.org", "c@x.org"))
        await self.failure(spool.release(stored.id), SpoolErrorKind.CONFLICT, Phase.ADMIN)
        await spool.hold(stored.id, "looks like spam")
        await self.failure(spool.hold(stored.id), SpoolErrorKind.CONFLICT, Phase.ADMIN)
        self.assertEqual((await self.summary(spool, stored.id)).hold_reason,
                         "looks like spam")
        self.assertEqual(await spool.claim(5), [])
        await spool.release(stored.id)
        [message] = await spool.claim(5)
        # Now an attempt: one delivered, one failed, one unknown; then held again.
        await spool.settle(message, Settlement(
            (Recipient("a@x.org", RecipientState.DELIVERED, "250"),
             Recipient("b@x.org", RecipientState.FAILED, "550"),
             Recipient("c@x.org", RecipientState.UNKNOWN, "timeout after the dot")),
            hold="outcome unknown"))
        before = time.time()
        await spool.release(stored.id)
        summary = await self.summary(spool, stored.id)
        self.assertEqual((summary.state, summary.hold_reason, summary.attempts),
                         (MessageState.QUEUED, None, 1))
        self.assertGreaterEqual(summary.next_attempt, before)
        self.assertEqual([r.state for r in summary.recipients],
                         [RecipientState.DELIVERED, RecipientState.PENDING,
                          RecipientState.PENDING])
        [again] = await spool.claim(5)
        self.assertGreaterEqual(again.lifetime_start, before)
        self.assertEqual(again.pending, ("b@x.org", "c@x.org"))

    async def test_delete(self) -> None:
        spool = await self.open()
        queued = await self.stored(spool)
        held = await self.stored(spool)
        await spool.hold(held.id)
        await spool.delete(queued.id)
        await spool.delete(held.id)
        self.assertEqual(await spool.list(), [])
        self.assertEqual(self.content_files(), [])
        self.assertEqual((await spool.stats()).bytes, 0)
        await self.failure(spool.delete(queued.id), SpoolErrorKind.NOT_FOUND, Phase.ADMIN)

    async def test_flush(self) -> None:
        spool = await self.open()
        later, held = await self.stored(spool), await self.stored(spool)
        messages = {m.entry.id: m for m in await spool.claim(2)}
        await spool.settle(messages[later.id], Settlement(retry_at=time.time() + 3600))
        await spool.settle(messages[held.id], Settlement(hold="kept"))
        self.assertEqual(await spool.claim(2), [])
        self.assertEqual(await spool.flush(), 1)
        self.assertEqual([m.entry.id for m in await spool.claim(2)], [later.id])

    async def test_requeue(self) -> None:
        spool = await self.open()
        retried, held, claimed = (await self.stored(spool), await self.stored(spool),
                                  await self.stored(spool))
        messages = {m.entry.id: m for m in await spool.claim(3)}
        await spool.settle(messages[retried.id], Settlement(
            (Recipient("bob@example.org", RecipientState.PENDING, "451"),),
            retry_at=time.time() + 3600))
        await spool.settle(messages[held.id], Settlement(
            (Recipient("bob@example.org", RecipientState.UNKNOWN, "lost"),),
            hold="unknown"))
        before = time.time()
        self.assertEqual(await spool.requeue(), 2)  # the one being delivered is left alone
        for each in (retried, held):
            summary = await self.summary(spool, each.id)
            self.assertEqual((summary.state, summary.attempts), (MessageState.QUEUED, 0))
            self.assertGreaterEqual(summary.next_attempt, before)
            self.assertEqual([r.state for r in summary.recipients],
                             [RecipientState.PENDING])
        self.assertEqual(await spool.requeue(retried.id), 1)
        again = {m.entry.id: m for m in await spool.claim(5)}
        self.assertEqual(set(again), {retried.id, held.id})
        self.assertGreaterEqual(again[held.id].lifetime_start, before)
        await spool.settle(messages[claimed.id], Settlement())

    async def test_a_message_being_delivered_is_left_alone(self) -> None:
        relay = await self.open(owner="relay")
        tool = await self.open(owner="tool")
        stored = await self.stored(relay)
        [message] = await relay.claim(1)
        await relay.started(message, message.pending)
        for d in (tool.hold(stored.id), tool.delete(stored.id), tool.requeue(stored.id),
                  relay.hold(stored.id)):
            error = await self.failure(d, SpoolErrorKind.CONFLICT, Phase.ADMIN)
            self.assertIn("being delivered", error.detail)
        self.assertEqual(await tool.flush(), 0)
        await relay.settle(message, Settlement(
            (Recipient("bob@example.org", RecipientState.DELIVERED, "250"),)))
        self.assertEqual(await tool.list(), [])

    async def test_a_dead_owners_claim_is_recovered_before_the_command(self) -> None:
        crashed = await self.open(owner="crashed")
        stored = await self.stored(crashed)
        await crashed.claim(1)
        assert crashed._lock is not None
        crashed._lock.release()
        crashed._status = "closed"
        tool = await self.open(owner="tool", recovery_interval=3600)
        await tool.hold(stored.id, "operator")
        summary = await self.summary(tool, stored.id)
        self.assertEqual((summary.state, summary.hold_reason),
                         (MessageState.HELD, "operator"))

    async def test_the_admin_constructor(self) -> None:
        await self.open()
        tool = FileSpool.open_for_admin(self.path, reactor, self.pool)
        self.addCleanup(tool.close)
        await tool.start()
        self.assertEqual(tool.accepting().kind, SpoolErrorKind.FULL)
        self.assertEqual(await tool.list(), [])

