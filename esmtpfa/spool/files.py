"""The embedded spool: message files on the local disk, the queue's state in SQLite.

Layout of the spool directory (docs/spool.md)::

    queue.sqlite (+ -wal, -shm)   the state: one row per message, one per recipient,
                                  and the content of small messages
    tmp/<name>                    content being written (never read)
    msg/<2 hex>/<name>            content of every larger queued or held message
    owners/<owner>.lock           one per open FileSpool, flock'd for its lifetime

Content of at most ``INLINE_LIMIT`` octets is a row of ``contents``: stored in the same
unit of work as the message's rows, it is durable at the batch's one commit, and a
batch of small messages costs one fsync in all.  Larger content gets a file.

A content file's ``<name>`` is ``<hex>.<owner>``: the message id's 32 hex digits (random
ones for an id that is not a ``urn:uuid:``), so an operator finds the file of a message;
the two first digits pick one of 256 subdirectories (100,000 queued messages are ~400
names per directory, not one directory of 100,000).  The owner part says whose store
made it: a file no row names is removed only when its writer is dead (a live writer may
be between its rename and its commit).

**Durability** (docs/spool.md, "The guarantee"): for a file, ``store`` writes the content to
``tmp/`` (``O_EXCL``), fsyncs it, renames it into ``msg/``, fsyncs that directory (and
``msg/`` when the subdirectory is new), and only then inserts the rows and commits
(``journal_mode=WAL``, ``synchronous=FULL``: the commit is an fsync of the WAL).  A crash
between the rename and the commit leaves an orphan file, removed by the next ``start``.
Finishing a message deletes the rows first and the file after the commit, for the same
reason.  ``started`` and ``settle`` fire only after their commit (settlements, and claims
that record no start, commit without the fsync: docs/spool.md, "What a power loss
costs").

**One writer connection, batches in the given thread pool.**  SQLite lets one writer at a
time into a database (WAL: readers never block it, writers take turns), so several writer
connections in one process would only queue on SQLite's lock, each paying its own fsync.
Instead every write of this process goes through one ``GroupCommitter``: the units of
work that arrive while a transaction commits wait in its queue and go into the next
transaction together (group commit: one fsync of the WAL for up to ``max_batch`` stores,
starts, settlements and claims).  A batch is one job in the caller's thread pool, at most
one at a time, so the writer connection is used by one thread at a time; no thread of our
own is started and the pool's size and life stay the caller's.  Reads (``list``,
``show``, ``stats``, the byte total) take a connection from a small pool of reader
connections in whichever pool thread runs them; WAL gives each a consistent snapshot.

**Several processes** (``--workers N``, the queue tool while the relay runs) open the same
directory.  SQLite serializes their transactions (``BEGIN IMMEDIATE``, a busy timeout); a
message handed out by ``claim`` carries ``claimed_by = <owner>`` and nobody else attempts
it until it is settled.  Liveness is an ``flock`` each FileSpool holds on its
``owners/<owner>.lock`` for its lifetime, never a PID: whoever can take that lock knows its
owner is dead (the kernel releases it with the process).  Recovery (``start``, and every
``recovery_interval`` seconds within ``claim``) holds the dead owner's lock while it fixes
the owner's claims: recipients ``STARTED`` become ``UNKNOWN`` and their message is held
(the upstream may have it: docs/spool.md, "States"); a message without one is simply due
again.  ``claim_lease`` is a last resort against a live owner that never settles.

**Admin commands on a message being delivered** (claimed by a live owner): ``hold``,
``release``, ``delete`` and ``requeue(id)`` refuse with ``CONFLICT`` ("being delivered, try
again"): the attempt in flight settles it, and an operator's change must not be undone by
that settlement or undo it.  ``flush`` and ``requeue()`` leave such messages out.  A claim
whose owner is dead is recovered first, then the command applies.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import math
import operator
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from esmtpfa.common.durable import fsync_directory, publish, unlink_quietly
from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope
from esmtpfa.common.probe import IProbe
from esmtpfa.spool.interfaces import (
    IContent,
    IQueueAdmin,
    ISpool,
    MessageState,
    Phase,
    QueuedMessage,
    QueueSummary,
    Recipient,
    Settlement,
    SpoolEntry,
    SpoolError,
    SpoolErrorKind,
    SpoolStats,
    probe_counts,
)

log = logger("esmtpfa.spool.files")

T = TypeVar("T")

DATABASE = "queue.sqlite"
#: ``PRAGMA user_version`` of the schema below; an older one is brought up to it at
#: ``start`` (version 1 lacked ``contents``), a newer one is refused.
SCHEMA_VERSION = 2
#: Content of at most this many octets is kept in the index (``contents``), not in a file
#: of its own: one commit, one fsync of the WAL for a whole batch of stores, makes
#: content and state durable together, where a file costs two fsyncs of its own (the
#: file, its directory) for each message.  Most submitted mail (alerts, notifications,
#: replies) is a few kilobytes; a scan or an attachment goes to a file, so that the WAL
#: and the memory of a claim stay small (docs/spool.md, "Where content is kept").
INLINE_LIMIT = 64 * 1024
#: ``messages.content`` of a message whose content is in ``contents``: no file is named
#: by it (the orphan scan only looks for file names).
INLINE = ""
#: Units of work committed in one transaction at most (stores, starts, settlements...).
MAX_BATCH = 256
#: WAL frames (pages written) between two checkpoints, which SQLite runs inside the
#: commit that crosses the mark, in the committer's ``COMMIT``.  Every claim, start and
#: settlement rewrites the same few pages (the index's B-trees), so a checkpoint copies
#: what the WAL holds of them once, however often they changed since the last one: at
#: SQLite's default of 1,000 a busy queue copied them and fsync'd the database ten times
#: as often, and its draining commits waited behind that (docs/performance.md,
#: "Checkpoints, ten times fewer").  At 4 KiB a page, the WAL holds about 40 MiB.
CHECKPOINT_FRAMES = 10_000
#: Once a checkpoint lets the WAL start over, a file grown past this is cut back to it:
#: a reader that held an old snapshot (a long ``esmtpfa-queue list``) may have made it
#: grow past ``CHECKPOINT_FRAMES``, and the disk it took is given back.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: How long a writer waits for another process's transaction (milliseconds).
BUSY_TIMEOUT_MS = 10_000
#: How often ``claim`` looks for claims of dead owners (seconds).
RECOVERY_INTERVAL = 30.0
#: How often the byte total is read again from SQLite (other processes store too).
TOTALS_INTERVAL = 5.0
#: ``accepting`` says no when less room than this is left (under the cap, above the
#: free-disk floor): no message is smaller (our Received header alone is ~200 octets).
MESSAGE_ROOM = 1024
#: Seconds a free-disk reading serves the stores that follow it (less what they store).
FREE_DISK_AGE = 0.1
#: ``show`` reads at most this much of the header section.
HEADER_LIMIT = 64 * 1024
#: Chunks of ``IContent.read_from``.
READ_CHUNK = 64 * 1024
#: A contended owner lock (a recovery holding it for a moment) is tried this often.
LOCK_ATTEMPTS = 50

DEAD_OWNER_REASON = ("the relay stopped while delivering: the upstream may have it "
                     "(outcome unknown)")
LEASE_REASON = ("the delivery attempt did not settle within the claim lease: the upstream "
                "may have it (outcome unknown)")
CLOSED_REASON = DEAD_OWNER_REASON

_RECEIVED = operator.itemgetter(5)
_HEX = re.compile(r"[0-9a-f]+\Z")
_OWNER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}\Z")

#: The state, as docs/spool.md describes it ("States").  Written so a reader can map
#: every column to a field of ``SpoolEntry``, ``QueuedMessage`` or ``QueueSummary``.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id             TEXT PRIMARY KEY,
        state          TEXT NOT NULL CHECK (state IN ('queued', 'held')),
        sender         TEXT NOT NULL,
        body           TEXT,
        smtputf8       INTEGER NOT NULL,
        requiretls     INTEGER NOT NULL,
        declared_size  INTEGER,
        identity       TEXT NOT NULL,
        ending         TEXT NOT NULL,
        received       REAL NOT NULL,
        size           INTEGER NOT NULL,
        connection_id  TEXT NOT NULL,
        content        TEXT NOT NULL,
        attempts       INTEGER NOT NULL DEFAULT 0,
        next_attempt   REAL NOT NULL,
        lifetime_start REAL NOT NULL,
        hold_reason    TEXT,
        last_reply     TEXT,
        claimed_by     TEXT,
        claimed_at     REAL
    )""",
    # The content of small messages (``INLINE_LIMIT``), kept apart from ``messages`` so
    # that the scans of the queue (claim, list) do not read it.
    """CREATE TABLE IF NOT EXISTS contents (
        message_id TEXT PRIMARY KEY,
        data       BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS recipients (
        message_id TEXT NOT NULL,
        position   INTEGER NOT NULL,
        address    TEXT NOT NULL,
        state      TEXT NOT NULL,
        reply      TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (message_id, position)
    ) WITHOUT ROWID""",
    # claim: the identities with claimable messages, and each one's oldest due first.
    """CREATE INDEX IF NOT EXISTS messages_due ON messages (identity, next_attempt)
        WHERE state = 'queued' AND claimed_by IS NULL""",
    # recovery: whose claims are there, and which are older than the lease.
    """CREATE INDEX IF NOT EXISTS messages_claimed ON messages (claimed_by, claimed_at)
        WHERE claimed_by IS NOT NULL""",
    # list (oldest first), stats (oldest), the byte total (size, without the table).
    "CREATE INDEX IF NOT EXISTS messages_received ON messages (received, size)",
)

INSERT_MESSAGE = (
    "INSERT INTO messages (id, state, sender, body, smtputf8, requiretls, declared_size, "
    "identity, ending, received, size, connection_id, content, attempts, next_attempt, "
    "lifetime_start) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)")
INSERT_CONTENT = "INSERT INTO contents (message_id, data) VALUES (?, ?)"
INSERT_RECIPIENT = ("INSERT INTO recipients (message_id, position, address, state, reply) "
                    "VALUES (?, ?, ?, 'pending', '')")

MESSAGE_COLUMNS = (
    "id, state, sender, body, smtputf8, requiretls, declared_size, identity, ending, "
    "received, size, connection_id, content, attempts, next_attempt, lifetime_start, "
    "hold_reason, last_reply, claimed_by, claimed_at")

#: Every identity with a claimable message and its oldest ``next_attempt``: a loose
#: index scan over ``messages_due`` (two index seeks per identity, whatever its backlog).
DUE_IDENTITIES = """
    WITH RECURSIVE identities(identity) AS (
        SELECT MIN(identity) FROM messages
            WHERE state = 'queued' AND claimed_by IS NULL
        UNION ALL
        SELECT (SELECT MIN(identity) FROM messages
                    WHERE state = 'queued' AND claimed_by IS NULL
                    AND identity > identities.identity)
            FROM identities WHERE identities.identity IS NOT NULL
    )
    SELECT identity,
           (SELECT MIN(next_attempt) FROM messages
                WHERE state = 'queued' AND claimed_by IS NULL
                AND identity = identities.identity)
    FROM identities WHERE identity IS NOT NULL"""
DUE_OF_IDENTITY = """
    SELECT id FROM messages
        WHERE state = 'queued' AND claimed_by IS NULL AND identity = ? AND next_attempt <= ?
        ORDER BY next_attempt LIMIT ? OFFSET ?"""


def message_row(entry: SpoolEntry, content: str, size: int, now: float) -> tuple[Any, ...]:
    """The ``INSERT_MESSAGE`` parameters of a stored message: due at once, lifetime from
    its acceptance."""
    envelope = entry.envelope
    return (entry.id, envelope.mail_from, envelope.body, int(envelope.smtputf8),
            int(envelope.requiretls), envelope.declared_size, entry.identity, entry.ending,
            entry.received, size, entry.connection_id, content, now, entry.received)


def recipient_rows(entry: SpoolEntry) -> list[tuple[Any, ...]]:
    return [(entry.id, position, address)
            for position, address in enumerate(entry.envelope.recipients)]


def default_owner() -> str:
    """``<host>.<pid>.<random>``: unique per FileSpool, readable in the queue's claims."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname() or "localhost")[:60]
    return f"{host}.{os.getpid()}.{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ClaimToken:
    """``QueuedMessage.token`` of this backend: whose claim, from when, and the content:
    a file's name, or ``INLINE`` and the octets themselves (read with the claim, so
    that delivering needs no read of its own)."""

    owner: str
    claimed_at: float
    content: str
    data: bytes | None = field(default=None, repr=False)


# -- content files ------------------------------------------------------------------------


@implementer(IContent)
class ContentFile:
    """A stored message's content, read with ``pread`` so that each ``read_from``
    iterator keeps its own position (as ``message.MessageSpool`` does)."""

    def __init__(self, fd: int, size: int):
        self._fd: int | None = fd
        self.size = size

    def read_from(self, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        position = offset
        while position < self.size:
            if self._fd is None:
                raise ValueError("read from a closed content file")
            chunk = os.pread(self._fd, min(chunk_size, self.size - position), position)
            if not chunk:
                break
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@implementer(IContent)
class InlineContent:
    """Content kept in the index, already in memory: ``read_from`` never blocks."""

    def __init__(self, data: bytes):
        self._data: memoryview | None = memoryview(data)
        self.size = len(data)

    def read_from(self, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        position = offset
        while position < self.size:
            if self._data is None:
                raise ValueError("read from closed content")
            chunk = bytes(self._data[position:position + chunk_size])
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        self._data = None


def header_section(data: bytes) -> bytes:
    """The header section of ``data`` (up to and without the blank line)."""
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return b""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not ends:
        return data
    end = min(ends)
    return data[:end + (2 if data.startswith(b"\r\n", end) else 1)]


class ContentFiles:
    """The files under ``tmp/`` and ``msg/``: written durably, read, removed."""

    def __init__(self, path: str, owner: str):
        self.path = path
        self.owner = owner
        self.tmp = os.path.join(path, "tmp")
        self.msg = os.path.join(path, "msg")
        self._known: set[str] = set()  # msg/ subdirectories known to be durable

    def create_directories(self) -> None:
        for directory in (self.path, self.tmp, self.msg):
            _make_directory(directory)

    def new_name(self, message_id: str) -> str:
        digits = message_id[len("urn:uuid:"):].replace("-", "").lower() \
            if message_id.startswith("urn:uuid:") else ""
        if len(digits) != 32 or not _HEX.match(digits):
            digits = secrets.token_hex(16)
        return f"{digits}.{self.owner}"

    def location(self, name: str) -> str:
        return os.path.join(self.msg, name[:2], name)

    def write(self, name: str, chunks: Iterable[bytes]) -> int:
        """tmp/ (O_EXCL) → write → fsync → into msg/xx/ → fsync msg/xx/.  Returns
        the octets written; on any failure nothing is left behind, and a file already
        there (a message stored twice under one id) is never replaced."""
        tmp = os.path.join(self.tmp, name)
        final = self.location(name)
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                        size += written
                os.fsync(fd)
            finally:
                os.close(fd)
            directory = self._subdirectory(name)
            publish(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        try:
            fsync_directory(directory)
        except BaseException:
            unlink_quietly(final)
            raise
        return size

    def open(self, name: str) -> ContentFile:
        fd = os.open(self.location(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return ContentFile(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    def headers(self, name: str, limit: int = HEADER_LIMIT) -> bytes:
        """The header section (up to and without the blank line), at most ``limit``."""
        with open(self.location(name), "rb") as f:
            return header_section(f.read(limit))

    def remove(self, name: str) -> None:
        unlink_quietly(self.location(name))

    def leftovers(self) -> Iterator[tuple[str, str]]:
        """(name, path) of every file under msg/ and tmp/."""
        for directory in (self.tmp, *self._subdirectories()):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                yield name, os.path.join(directory, name)

    def _subdirectories(self) -> list[str]:
        try:
            return [os.path.join(self.msg, sub) for sub in sorted(os.listdir(self.msg))]
        except FileNotFoundError:
            return []

    def _subdirectory(self, name: str) -> str:
        """msg/xx/, made (and msg/ fsync'd) when missing: a new directory is durable only
        once its parent is.  Each thread that meets a directory for the first time
        fsyncs the parent itself, so that none relies on another's fsync in flight."""
        directory = os.path.join(self.msg, name[:2])
        if directory not in self._known:
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            fsync_directory(self.msg)
            self._known.add(directory)
        return directory


# -- owners -------------------------------------------------------------------------------


class HeldLock:
    """An flock'd ``owners/<owner>.lock``: ours for our lifetime, or a dead owner's
    while its claims are recovered."""

    def __init__(self, path: str, fd: int | None):
        self.path = path
        self._fd: int | None = fd

    def remove(self) -> None:
        """Unlink the file while still holding its lock (an owner starting under the same
        name sees its file replaced and makes a new one: ``OwnerLocks.acquire``)."""
        if self._fd is not None:
            unlink_quietly(self.path)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock


class OwnerLocks:
    """The ``owners/`` directory: who is alive, without trusting PIDs.

    An owner is alive while its lock file exists and is flock'd.  A lock file that can be
    locked by us belongs to a dead process (the kernel drops an flock with its holder);
    one that does not exist belongs to an owner that never started or was buried.
    """

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, owner: str) -> str:
        return os.path.join(self.directory, f"{owner}.lock")

    def acquire(self, owner: str) -> HeldLock:
        """Our own lock, for the FileSpool's lifetime; ``SpoolError(OPEN)`` when a live
        process already is ``owner``."""
        _make_directory(self.directory)
        path = self.path(owner)
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.02)  # alive, or a recovery holds it for a moment
                continue
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return HeldLock(path, fd)
            os.close(fd)  # a recovery buried the file we opened: make a new one
        raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.OPEN,
                         f"another process is spool owner {owner!r}")

    def take_if_dead(self, owner: str) -> HeldLock | None:
        """The dead owner's lock (held: nobody can become ``owner`` meanwhile), or None
        when it is alive.  An owner without a lock file is dead (nothing to hold).

        Asked inside the write transaction that recovers the claims, the answer cannot
        go stale: a live owner took its lock before it committed any claim, and one
        starting now can claim nothing before that transaction ends."""
        path = self.path(owner)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return HeldLock(path, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return HeldLock(path, fd)

    def is_alive(self, owner: str) -> bool:
        held = self.take_if_dead(owner)
        if held is None:
            return True
        held.release()
        return False

    def owners(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [name[:-len(".lock")] for name in names if name.endswith(".lock")]


# -- the writer ---------------------------------------------------------------------------


class Transaction:
    """One batch's transaction as a unit of work sees it: the connection, and what to
    do once it committed (``after_commit``) or in any case (``always``)."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection
        self._after: list[Callable[[], None]] = []
        self._always: list[Callable[[], None]] = []

    def execute(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.connection.execute(sql, tuple(parameters))

    def after_commit(self, action: Callable[[], None]) -> None:
        self._after.append(action)

    def always(self, action: Callable[[], None]) -> None:
        self._always.append(action)

    def mark(self) -> int:
        return len(self._after)

    def forget_after(self, mark: int) -> None:
        """A unit was rolled back: what it planned after the commit does not happen."""
        del self._after[mark:]

    def finish(self, committed: bool) -> None:
        actions = (self._after if committed else []) + self._always
        self._after, self._always = [], []
        for action in actions:
            try:
                action()
            except Exception as error:  # the commit stands; an orphan is cleaned later
                log.warn("spool clean-up after commit failed: {error}", error=str(error))


Work = Callable[[Transaction], Any]


class _Committer(Enum):
    """What the committer is doing (``GroupCommitter._phase``)."""

    IDLE = "idle"              # nothing queued
    SCHEDULED = "scheduled"    # a batch runs at the reactor's next turn
    OPENING = "opening"        # the connection is being opened in the pool
    LOCKED = "locked"          # another process writes: the batch is tried again later
    COMMITTING = "committing"  # a batch's COMMIT runs in the pool


class GroupCommitter:
    """Every write of one FileSpool, serialized through one SQLite connection, the writes
    that arrive while a commit runs committed together in the next one.

    ``submit`` queues a unit of work (a function of a ``Transaction``) and returns a
    Deferred fired after the commit.  At most one batch is in progress at a time: it
    takes up to ``max_batch`` units, runs each in a SAVEPOINT (a failing unit is rolled
    back and fails alone) and commits them with one ``COMMIT``: one fsync of the WAL for
    the whole batch.

    A batch's statements run in the reactor's thread, its ``COMMIT`` in the thread pool.
    The ``COMMIT`` is the one call that waits for the disk (the WAL's fsync, and the
    checkpoints SQLite runs when the WAL has grown); every other statement is a few
    microseconds of work on pages in memory.  Run from a pool thread, each of those
    statements, and each row read, handed the GIL to the busy reactor and waited to get
    it back, so that a claim of 15 messages took 3 ms where it needs 0.5 ms, and every
    start waited behind it (docs/performance.md, "The committer's statements in the
    reactor's thread").  The reactor never waits for another process's write lock: the
    connection's busy timeout is zero, and a batch whose ``BEGIN`` finds the database
    locked is tried again after a pause that doubles, for ``busy_timeout`` seconds in
    all, as SQLite's own busy handler would (``--workers``, the queue tool).

    Only a batch with a *durable* unit pays that fsync (``synchronous=FULL``); one of
    bookkeeping units alone commits with ``synchronous=NORMAL``, which in WAL mode writes
    the same frames without the fsync.  The WAL is appended in order, so the next
    durable commit's fsync makes every earlier frame durable too, and only an operating
    system crash (never a process crash: the frames are in the page cache) can lose the
    bookkeeping of the last moments before it (docs/spool.md, "What a power loss
    costs").
    """

    #: The first pause after a locked ``BEGIN``, and the longest (seconds).
    LOCKED_FIRST_PAUSE = 0.001
    LOCKED_LONGEST_PAUSE = 0.1

    def __init__(self, reactor: Any, threadpool: ThreadPool,
                 connect: Callable[[], sqlite3.Connection], max_batch: int = MAX_BATCH,
                 busy_timeout: float = BUSY_TIMEOUT_MS / 1000):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._reactor = reactor
        self._pool = threadpool
        self._connect = connect
        self.max_batch = max_batch
        self.busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self._queue: deque[tuple[Work, Deferred[Any], bool]] = deque()
        self._phase = _Committer.IDLE
        self._locked_since: float | None = None  # the first locked BEGIN of this batch
        self._pause = self.LOCKED_FIRST_PAUSE
        self._synchronous = "FULL"  # what the connection is set to (FileSpool._connect)
        self._idle: list[Deferred[None]] = []
        #: Transactions committed, the units of work in them, and the most in one
        #: (metrics; the tests check the batching with them).
        self.commits = 0
        self.units = 0
        self.largest_batch = 0

    def submit(self, work: Work, durable: bool = True) -> Deferred[Any]:
        """``work`` committed, fsync'd unless ``durable`` is false (bookkeeping that a
        crash of the machine may lose: see the class).  It runs at the reactor's next
        turn at the earliest, never inside this call: the units submitted in one turn
        share a batch."""
        d: Deferred[Any] = Deferred()
        self._queue.append((work, d, durable))
        if self._phase is _Committer.IDLE:
            self._phase = _Committer.SCHEDULED
            self._reactor.callLater(0, self._next)
        return d

    def idle(self) -> Deferred[None]:
        """Fires once nothing is queued or running."""
        if self._phase is _Committer.IDLE:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def close(self) -> None:
        """In a pool thread, once idle."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def commit(self, connection: sqlite3.Connection) -> None:
        """The one durable step of a batch (its own method: the tests watch it)."""
        connection.execute("COMMIT")

    # -- one batch: its statements here, its COMMIT in the pool -----------------------

    def _next(self) -> None:
        """The next batch: its statements now, its COMMIT in the pool."""
        if not self._queue:
            self._phase = _Committer.IDLE
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)
            return
        if self._connection is None:
            self._phase = _Committer.OPENING
            opening = deferToThreadPool(self._reactor, self._pool, self._open)
            opening.addCallbacks(self._opened, self._not_opened)
            return
        batch = self._take_batch()
        works = [work for work, _, _ in batch]
        waiters = [waiter for _, waiter, _ in batch]
        durable = any(durable for _, _, durable in batch)
        try:
            began = self._begin(durable)
        except Exception:
            self._finished([(False, Failure())] * len(batch), waiters)
            return
        if not began:  # another process holds the write lock: try again
            self._queue.extendleft(reversed(batch))
            self._wait_for_the_lock()
            return
        transaction = Transaction(self._connection)
        outcomes = self._run(transaction, works)
        if not self._connection.in_transaction:  # rolled back already: nothing to commit
            self._finished(outcomes, waiters)
            return
        self._phase = _Committer.COMMITTING
        committed = deferToThreadPool(self._reactor, self._pool, self._commit, transaction,
                                      outcomes)
        committed.addBoth(self._finished, waiters)

    def _take_batch(self) -> list[tuple[Work, Deferred[Any], bool]]:
        count = min(len(self._queue), self.max_batch)
        return [self._queue.popleft() for _ in range(count)]

    def _open(self) -> sqlite3.Connection:
        """In the pool: opening may wait for locks (the schema, WAL recovery)."""
        connection = self._connect()
        try:
            connection.execute("PRAGMA busy_timeout = 0")  # see the class
        except BaseException:
            connection.close()
            raise
        return connection

    def _opened(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._synchronous = "FULL"
        self._next()

    def _not_opened(self, failure: Failure) -> None:
        """The batch that needed the connection fails with it; the next one tries
        again."""
        batch = self._take_batch()
        self._finished([(False, failure)] * len(batch), [waiter for _, waiter, _ in batch])

    def _begin(self, durable: bool) -> bool:
        """BEGIN IMMEDIATE (the write lock), or False while another process holds it."""
        connection = self._connection
        assert connection is not None
        synchronous = "FULL" if durable else "NORMAL"
        if synchronous != self._synchronous:  # only between transactions
            connection.execute(f"PRAGMA synchronous = {synchronous}")
            self._synchronous = synchronous
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if (getattr(error, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_BUSY:
                raise
            now = self._reactor.seconds()
            if self._locked_since is None:
                self._locked_since = now
            if now - self._locked_since < self.busy_timeout:
                return False
            self._locked_since, self._pause = None, self.LOCKED_FIRST_PAUSE
            raise  # locked for the whole busy timeout: this batch fails
        self._locked_since, self._pause = None, self.LOCKED_FIRST_PAUSE
        return True

    def _wait_for_the_lock(self) -> None:
        self._phase = _Committer.LOCKED
        self._reactor.callLater(self._pause, self._next)
        self._pause = min(self._pause * 2, self.LOCKED_LONGEST_PAUSE)

    def _run(self, transaction: Transaction, works: list[Work]) -> list[tuple[bool, Any]]:
        """Every unit, each in its SAVEPOINT.  A failure that a SAVEPOINT cannot contain
        (SQLite rolled the whole transaction back) fails them all."""
        try:
            if len(works) == 1:
                # Alone, a unit needs no SAVEPOINT: if it fails, rolling the whole
                # transaction back undoes that unit and nothing else.
                try:
                    return [(True, works[0](transaction))]
                except Exception:
                    return _abandon(transaction, 1)
            return [self._unit(transaction, work) for work in works]
        except Exception:
            return _abandon(transaction, len(works))

    def _unit(self, transaction: Transaction, work: Work) -> tuple[bool, Any]:
        connection = transaction.connection
        mark = transaction.mark()
        connection.execute("SAVEPOINT unit")
        try:
            result = work(transaction)
        except Exception:
            failure = Failure()
            if not connection.in_transaction:  # SQLite rolled the whole batch back
                failure.raiseException()
            connection.execute("ROLLBACK TO unit")
            connection.execute("RELEASE unit")
            transaction.forget_after(mark)
            return False, failure
        connection.execute("RELEASE unit")
        return True, result

    def _commit(self, transaction: Transaction, outcomes: list[tuple[bool, Any]]
                ) -> list[tuple[bool, Any]]:
        """In the pool: the batch's COMMIT, then what its units asked for after it."""
        try:
            self.commit(transaction.connection)
        except Exception:
            return _abandon(transaction, len(outcomes))
        self.commits += 1
        self.units += len(outcomes)
        self.largest_batch = max(self.largest_batch, len(outcomes))
        transaction.finish(committed=True)
        return outcomes

    def _finished(self, outcomes: Any, waiters: list[Deferred[Any]]) -> None:
        if isinstance(outcomes, Failure):  # the COMMIT's job itself could not run
            outcomes = [(False, outcomes)] * len(waiters)
            if self._connection is not None and self._connection.in_transaction:
                _rollback_quietly(self._connection)  # else no batch could BEGIN again
        for (ok, value), waiter in zip(outcomes, waiters, strict=True):
            if ok:
                waiter.callback(value)
            else:
                waiter.errback(value)
        self._next()


class ReaderConnections:
    """Connections for reads, used by one thread at a time, kept for the next read."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]):
        self._connect = connect
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect()
            with self._lock:
                self._all.append(connection)
        try:
            yield connection
        finally:
            if connection.in_transaction:
                _rollback_quietly(connection)
            with self._lock:
                self._idle.append(connection)

    def close(self) -> None:
        with self._lock:
            connections, self._all, self._idle = self._all, [], []
        for connection in connections:
            connection.close()


# -- the queue's state --------------------------------------------------------------------


@dataclass
class Removed:
    """What a unit of work took out of the spool: the byte total goes down."""

    bytes: int = 0
    count: int = 0


class QueueState:
    """The SQL of each operation, run inside a ``Transaction`` (writes) or on a reader
    connection (reads).  Knows the owner, the clock, and how to tell a dead owner."""

    def __init__(self, owner: str, owners: OwnerLocks, files: ContentFiles,
                 clock: Callable[[], float], claim_lease: float, recovery_interval: float):
        self.owner = owner
        self.owners = owners
        self.files = files
        self.clock = clock
        self.claim_lease = claim_lease
        self.recovery_interval = recovery_interval
        self.last_recovery = -math.inf

    # schema

    def create(self, tx: Transaction) -> None:
        version = tx.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.OPEN,
                             f"the spool's schema is version {version}, this relay "
                             f"knows version {SCHEMA_VERSION}")
        for statement in SCHEMA:
            tx.execute(statement)
        tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # store

    def insert(self, tx: Transaction, entry: SpoolEntry, content: str, size: int) -> None:
        tx.execute(INSERT_MESSAGE, message_row(entry, content, size, self.clock()))
        tx.connection.executemany(INSERT_RECIPIENT, recipient_rows(entry))

    def insert_inline(self, tx: Transaction, entry: SpoolEntry, data: bytes) -> None:
        """Rows and content in one unit: durable at the batch's one commit."""
        self.insert(tx, entry, INLINE, len(data))
        tx.execute(INSERT_CONTENT, (entry.id, data))

    def claim_stored(self, tx: Transaction, entry: SpoolEntry, content: str, size: int,
                     data: bytes | None) -> QueuedMessage:
        """The message just inserted, claimed by us in the same unit: what ``claim``
        would hand out for it, built from what is in hand rather than read back."""
        now = self.clock()
        tx.execute("UPDATE messages SET claimed_by = ?, claimed_at = ? WHERE id = ?",
                   (self.owner, now, entry.id))
        if entry.size != size:
            entry = replace(entry, size=size)
        return QueuedMessage(entry, tuple(Recipient(a) for a in entry.envelope.recipients),
                             attempts=0, lifetime_start=entry.received,
                             token=ClaimToken(self.owner, now, content, data))

    # claim

    def claim(self, tx: Transaction, limit: int, busy: frozenset[str],
              fill: bool = False, start: bool = False) -> list[QueuedMessage]:
        now = self.clock()
        if now - self.last_recovery >= self.recovery_interval:
            self.recover(tx)
        picked = self._pick_fairly(tx, limit, now, lambda identity: identity not in busy)
        if fill and busy and len(picked) < limit:
            picked += self._pick_fairly(tx, limit - len(picked), now, busy.__contains__)
        if not picked:
            return []
        marks = ", ".join("?" * len(picked))
        tx.execute(f"UPDATE messages SET claimed_by = ?, claimed_at = ? "
                   f"WHERE id IN ({marks})", (self.owner, now, *picked))
        queued = self._queued(tx, picked)
        if start:  # what ``started`` would write, for every one of them at once
            tx.execute(f"UPDATE recipients SET state = 'started' "
                       f"WHERE message_id IN ({marks}) AND state = 'pending'", picked)
        return queued

    def _pick_fairly(self, tx: Transaction, limit: int, now: float,
                     eligible: Callable[[str], bool]) -> list[str]:
        """Round-robin over the ``eligible`` identities with due messages, the one with
        the oldest due message first, oldest first within each: an identity's backlog
        never starves another's single message (docs/spool.md, "Fairness")."""
        due = sorted((first, identity) for identity, first in tx.execute(DUE_IDENTITIES)
                     if first is not None and first <= now and eligible(identity))
        # Beyond ``limit`` identities, none would get a message in the first round.
        identities = [identity for _, identity in due[:limit]]
        if not identities:
            return []
        share = -(-limit // len(identities))
        cursors = [_DueCursor(tx, identity, now, share) for identity in identities]
        picked: list[str] = []
        while cursors and len(picked) < limit:
            still: list[_DueCursor] = []
            for cursor in cursors:
                if len(picked) == limit:
                    break
                message_id = cursor.next(limit - len(picked))
                if message_id is not None:
                    picked.append(message_id)
                    still.append(cursor)
            cursors = still
        return picked

    def _queued(self, tx: Transaction, message_ids: list[str]) -> list[QueuedMessage]:
        """The claimed messages, in the order of ``message_ids``: two queries for all
        of them (rows with their inline content, and the recipients), not three each."""
        marks = ", ".join("?" * len(message_ids))
        recipients: dict[str, list[Recipient]] = {}
        for of, address, state, reply in tx.execute(
                f"SELECT message_id, address, state, reply FROM recipients "
                f"WHERE message_id IN ({marks}) ORDER BY message_id, position",
                message_ids):
            recipients.setdefault(of, []).append(Recipient(address, state, reply))
        rows = {row[0]: row for row in tx.execute(
            f"SELECT {MESSAGE_COLUMNS}, data FROM messages LEFT JOIN contents "
            f"ON contents.message_id = messages.id WHERE id IN ({marks})", message_ids)}
        queued = []
        for message_id in message_ids:
            row = rows[message_id]
            held = tuple(recipients.get(message_id, ()))
            entry = SpoolEntry(
                id=row[0],
                envelope=Envelope(row[2], tuple(r.address for r in held), row[3],
                                  bool(row[4]), bool(row[5]), row[6]),
                identity=row[7], ending=row[8], received=row[9], size=row[10],
                connection_id=row[11])
            data = row[20] if row[12] == INLINE else None
            queued.append(QueuedMessage(
                entry, held, attempts=row[13], lifetime_start=row[15],
                token=ClaimToken(row[18], row[19], row[12], data)))
        return queued

    # started, settle

    def _check_claim(self, tx: Transaction, message: QueuedMessage, phase: str,
                     allow_released: bool) -> tuple[int, str] | None:
        """The message's (size, content) if this attempt may still write to it."""
        token = _token(message)
        row = tx.execute("SELECT claimed_by, claimed_at, size, content FROM messages "
                         "WHERE id = ?", (message.entry.id,)).fetchone()
        if row is None:
            return None
        claimed_by, claimed_at, size, content = row
        ours = claimed_by == token.owner and claimed_at == token.claimed_at
        if ours or (allow_released and claimed_by is None):
            return size, content
        raise SpoolError(SpoolErrorKind.CONFLICT, phase,
                         f"{message.entry.id}: the claim was lost (recovered after the "
                         f"claim lease, or by an operator)")

    def started(self, tx: Transaction, message: QueuedMessage,
                recipients: tuple[str, ...]) -> None:
        # The dot may leave only while the claim is still ours: a claim lost to the lease
        # may already be another process's attempt.
        if self._check_claim(tx, message, Phase.START, allow_released=False) is None:
            raise SpoolError(SpoolErrorKind.NOT_FOUND, Phase.START,
                             f"{message.entry.id}: no such message")
        # Only a pending recipient starts: a delivered one must never become unknown
        # (a release would then send it again).
        tx.connection.executemany(
            "UPDATE recipients SET state = 'started' WHERE message_id = ? AND address = ? "
            "AND state IN ('pending', 'started')",
            [(message.entry.id, address) for address in recipients])

    def settle(self, tx: Transaction, message: QueuedMessage,
               settlement: Settlement) -> Removed:
        """Apply the outcome; a claim released meanwhile (lease, recovery) still takes
        it: it is the best knowledge there is of those recipients."""
        message_id = message.entry.id
        found = self._check_claim(tx, message, Phase.SETTLE, allow_released=True)
        finished = settlement.retry_at is None and settlement.hold is None
        if found is None:
            if finished:
                return Removed()
            raise SpoolError(SpoolErrorKind.NOT_FOUND, Phase.SETTLE,
                             f"{message_id}: no such message")
        size, content = found
        if finished:
            self.forget(tx, message_id, content)
            return Removed(size, 1)
        tx.connection.executemany(
            "UPDATE recipients SET state = ?, reply = ? "
            "WHERE message_id = ? AND address = ?",
            [(r.state, r.reply, message_id, r.address) for r in settlement.recipients])
        replies = [r.reply for r in settlement.recipients if r.reply]
        last_reply = replies[-1] if replies else None
        if settlement.hold is not None:
            tx.execute("UPDATE messages SET state = 'held', hold_reason = ?, "
                       "attempts = attempts + 1, last_reply = COALESCE(?, last_reply), "
                       "claimed_by = NULL, claimed_at = NULL WHERE id = ?",
                       (settlement.hold, last_reply, message_id))
        else:
            tx.execute("UPDATE messages SET state = 'queued', hold_reason = NULL, "
                       "next_attempt = ?, attempts = attempts + 1, "
                       "last_reply = COALESCE(?, last_reply), "
                       "claimed_by = NULL, claimed_at = NULL WHERE id = ?",
                       (settlement.retry_at, last_reply, message_id))
        return Removed()

    def forget(self, tx: Transaction, message_id: str, content: str) -> None:
        """Rows first, the file once they are committed: a crash in between leaves an
        orphan file (removed at the next start), never a row without its content."""
        tx.execute("DELETE FROM recipients WHERE message_id = ?", (message_id,))
        tx.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        if content == INLINE:
            tx.execute("DELETE FROM contents WHERE message_id = ?", (message_id,))
        else:
            tx.after_commit(lambda: self.files.remove(content))

    # recovery

    def recover(self, tx: Transaction, *, at_start: bool = False) -> int:
        """Fix the claims of dead owners (and those past the lease); returns how many
        messages it touched.  At start our own name's claims are a previous life's."""
        now = self.clock()
        self.last_recovery = now
        touched = 0
        claimants = [row[0] for row in tx.execute(
            "SELECT DISTINCT claimed_by FROM messages WHERE claimed_by IS NOT NULL")]
        for claimant in claimants:
            if claimant == self.owner:
                if at_start:
                    touched += self._recover_claims(tx, "claimed_by = ?", (claimant,),
                                                    DEAD_OWNER_REASON)
                continue
            if self._bury(tx, claimant):
                touched += self._recover_claims(tx, "claimed_by = ?", (claimant,),
                                                DEAD_OWNER_REASON)
        for owner in self.owners.owners():  # lock files of dead owners without claims
            if owner != self.owner and owner not in claimants:
                self._bury(tx, owner)
        if self.claim_lease > 0:
            touched += self._recover_claims(
                tx, "claimed_by IS NOT NULL AND claimed_at < ?", (now - self.claim_lease,),
                LEASE_REASON)
        return touched

    def _bury(self, tx: Transaction, owner: str) -> bool:
        """Whether ``owner`` is dead; its lock is held until the transaction ends and its
        file removed once it committed."""
        held = self.owners.take_if_dead(owner)
        if held is None:
            return False
        tx.after_commit(held.remove)
        tx.always(held.release)
        return True

    def _recover_claims(self, tx: Transaction, where: str, parameters: tuple[Any, ...],
                        reason: str) -> int:
        """The claims ``where`` selects end: a message with a recipient ``STARTED`` is
        held with it ``UNKNOWN`` (never sent again on our own), the others are due."""
        held = [row[0] for row in tx.execute(
            f"SELECT id FROM messages WHERE {where} AND EXISTS (SELECT 1 FROM recipients "
            "WHERE message_id = messages.id AND state = 'started')", parameters)]
        for message_id in held:
            tx.execute("UPDATE recipients SET state = 'unknown', reply = ? "
                       "WHERE message_id = ? AND state = 'started'", (reason, message_id))
            tx.execute("UPDATE messages SET state = 'held', hold_reason = ?, "
                       "claimed_by = NULL, claimed_at = NULL WHERE id = ?",
                       (reason, message_id))
            log.warn("spool message held: message={message_id} reason={reason}",
                     message_id=message_id, reason=reason)
        released = tx.execute(f"UPDATE messages SET claimed_by = NULL, claimed_at = NULL "
                              f"WHERE {where}", parameters).rowcount
        return len(held) + released

    def release_own(self, tx: Transaction, unbegun: Iterable[tuple[str, float]] = ()
                    ) -> int:
        """At close: our claims end (as a dead owner's would, at once).  Those in
        ``unbegun`` (id, claimed at) were claimed with their start recorded, but no
        attempt began: nothing was sent, so their recipients are pending again first,
        and they are due rather than held."""
        tx.connection.executemany(
            "UPDATE recipients SET state = 'pending' WHERE message_id = ? "
            "AND state = 'started' AND EXISTS (SELECT 1 FROM messages "
            "WHERE id = ? AND claimed_by = ? AND claimed_at = ?)",
            [(message_id, message_id, self.owner, claimed_at)
             for message_id, claimed_at in unbegun])
        return self._recover_claims(tx, "claimed_by = ?", (self.owner,), CLOSED_REASON)

    # admin

    def _admin_row(self, tx: Transaction, message_id: str) -> tuple[str, str]:
        """(state, content) of a message an operator may change now."""
        row = tx.execute("SELECT state, claimed_by, content FROM messages WHERE id = ?",
                         (message_id,)).fetchone()
        if row is None:
            raise SpoolError(SpoolErrorKind.NOT_FOUND, Phase.ADMIN,
                             f"{message_id}: no such message")
        state, claimed_by, content = row
        if claimed_by is not None:
            if claimed_by == self.owner or not self._bury(tx, claimed_by):
                raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                                 f"{message_id}: being delivered, try again")
            self._recover_claims(tx, "claimed_by = ?", (claimed_by,), DEAD_OWNER_REASON)
            state = tx.execute("SELECT state FROM messages WHERE id = ?",
                               (message_id,)).fetchone()[0]
        return state, content

    def hold(self, tx: Transaction, message_id: str, reason: str) -> None:
        state, _ = self._admin_row(tx, message_id)
        if state != MessageState.QUEUED:
            raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                             f"{message_id}: already held")
        tx.execute("UPDATE messages SET state = 'held', hold_reason = ? WHERE id = ?",
                   (reason, message_id))

    def release(self, tx: Transaction, message_id: str) -> None:
        state, _ = self._admin_row(tx, message_id)
        if state != MessageState.HELD:
            raise SpoolError(SpoolErrorKind.CONFLICT, Phase.ADMIN,
                             f"{message_id}: not held")
        self._release(tx, message_id, self.clock(), reset_attempts=False)

    def _release(self, tx: Transaction, message_id: str, now: float,
                 reset_attempts: bool) -> None:
        tx.execute("UPDATE recipients SET state = 'pending' "
                   "WHERE message_id = ? AND state != 'delivered'", (message_id,))
        tx.execute("UPDATE messages SET state = 'queued', hold_reason = NULL, "
                   "next_attempt = ?, lifetime_start = ?"
                   + (", attempts = 0" if reset_attempts else "") + " WHERE id = ?",
                   (now, now, message_id))

    def delete(self, tx: Transaction, message_id: str) -> Removed:
        _, content = self._admin_row(tx, message_id)
        size = tx.execute("SELECT size FROM messages WHERE id = ?",
                          (message_id,)).fetchone()[0]
        self.forget(tx, message_id, content)
        return Removed(size, 1)

    def requeue(self, tx: Transaction, message_id: str | None) -> int:
        now = self.clock()
        if message_id is not None:
            state, _ = self._admin_row(tx, message_id)
            if state == MessageState.HELD:
                self._release(tx, message_id, now, reset_attempts=True)
            else:
                tx.execute("UPDATE messages SET next_attempt = ?, lifetime_start = ?, "
                           "attempts = 0 WHERE id = ?", (now, now, message_id))
            return 1
        # Every message nobody is delivering.  A dead owner's claims are left to the
        # recovery: a recipient it started is held as unknown for the operator to check,
        # not sent again behind the operator's back.
        tx.execute("UPDATE recipients SET state = 'pending' WHERE state != 'delivered' "
                   "AND message_id IN (SELECT id FROM messages "
                   "WHERE state = 'held' AND claimed_by IS NULL)")
        return tx.execute("UPDATE messages SET state = 'queued', hold_reason = NULL, "
                          "next_attempt = ?, lifetime_start = ?, attempts = 0 "
                          "WHERE claimed_by IS NULL", (now, now)).rowcount

    def flush(self, tx: Transaction) -> int:
        now = self.clock()
        return tx.execute("UPDATE messages SET next_attempt = MIN(next_attempt, ?) "
                          "WHERE state = 'queued' AND claimed_by IS NULL", (now,)).rowcount

    # reads

    @staticmethod
    def summaries(connection: sqlite3.Connection,
                  message_id: str | None = None) -> list[QueueSummary]:
        """Oldest first.  One pass over the recipients (in key order, no sort) and one
        over the messages (in table order, sorted here: rows come nearly in arrival
        order, which Python's sort takes in linear time, and a walk of the ``received``
        index would cost a table lookup per message).  No join."""
        parameters: tuple[str, ...] = ()
        recipients_sql = messages_sql = ""
        if message_id is not None:
            recipients_sql, messages_sql = "WHERE message_id = ?", "WHERE id = ?"
            parameters = (message_id,)
        # Every object made here lives until the list is returned: the cyclic
        # collector, run again and again as they pile up, would find nothing to free
        # (a quarter of the time of a 100,000-message list).
        with _collection_paused():
            recipients: dict[str, list[Recipient]] = {}
            connection.execute("BEGIN")  # one snapshot for both queries
            try:
                for of, address, state, reply in connection.execute(
                        "SELECT message_id, address, state, reply FROM recipients "
                        f"{recipients_sql} ORDER BY message_id, position", parameters):
                    found = recipients.get(of)
                    if found is None:
                        recipients[of] = [Recipient(address, state, reply)]
                    else:
                        found.append(Recipient(address, state, reply))
                rows = connection.execute(
                    "SELECT id, state, sender, identity, size, received, attempts, "
                    f"next_attempt, hold_reason, last_reply FROM messages {messages_sql}",
                    parameters).fetchall()
            finally:
                connection.execute("COMMIT")
            rows.sort(key=_RECEIVED)
            held = MessageState.HELD
            return [QueueSummary(id, state, sender, tuple(recipients.get(id, ())), identity,
                                 size, received, attempts,
                                 None if state == held else next_attempt, hold_reason,
                                 last_reply)
                    for (id, state, sender, identity, size, received, attempts,
                         next_attempt, hold_reason, last_reply) in rows]

    @staticmethod
    def stats(connection: sqlite3.Connection) -> SpoolStats:
        counts = {state: 0 for state in MessageState.ALL}
        total = 0
        for state, count, size in connection.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM messages "
                "GROUP BY state"):
            counts[state] = count
            total += size
        oldest = connection.execute("SELECT MIN(received) FROM messages").fetchone()[0]
        return SpoolStats(counts, total, oldest)

    @staticmethod
    def total_bytes(connection: sqlite3.Connection) -> int:
        return connection.execute(
            "SELECT COALESCE(SUM(size), 0) FROM messages INDEXED BY messages_received"
        ).fetchone()[0]


class _DueCursor:
    """One identity's due messages, oldest first, fetched a share at a time."""

    def __init__(self, tx: Transaction, identity: str, now: float, share: int):
        self._tx = tx
        self._identity = identity
        self._now = now
        self._share = share
        self._buffer: deque[str] = deque()
        self._fetched = 0
        self._exhausted = False

    def next(self, wanted: int) -> str | None:
        if not self._buffer and not self._exhausted:
            count = self._share if not self._fetched else wanted
            rows = self._tx.execute(DUE_OF_IDENTITY,
                                    (self._identity, self._now, count, self._fetched))
            self._buffer.extend(row[0] for row in rows)
            fetched = len(self._buffer)
            self._fetched += fetched
            self._exhausted = fetched < count
        return self._buffer.popleft() if self._buffer else None


# -- the spool ----------------------------------------------------------------------------


def _when_open(phase: str) -> Callable[[Callable[..., Deferred[Any]]],
                                      Callable[..., Deferred[Any]]]:
    """A FileSpool method runs once the spool is open: at once when it is, after the
    opening when it is being opened (a service may listen before the few milliseconds of
    ``start`` are over: the first message then waits rather than hearing 451), and
    never once it is closing or closed (``SpoolError(UNAVAILABLE)``)."""
    def decorate(method: Callable[..., Deferred[Any]]) -> Callable[..., Deferred[Any]]:
        @functools.wraps(method)
        def when_open(self: "FileSpool", *args: Any, **kwargs: Any) -> Deferred[Any]:
            if self._status == "open":
                return method(self, *args, **kwargs)
            if self._status == "opening":
                return self._after_opening().addCallback(
                    lambda _: when_open(self, *args, **kwargs))
            return fail(SpoolError(SpoolErrorKind.UNAVAILABLE, phase,
                                   f"the spool is {_status_text(self._status)}"))
        return when_open
    return decorate


@implementer(ISpool, IQueueAdmin, IProbe)
class FileSpool:
    """The queue on the local disk: ``ISpool`` for the relay, ``IQueueAdmin`` for the
    queue tool (which opens it the same way, under an owner of its own).

    Every method is called from the reactor thread and answers with a Deferred; the
    blocking work runs in ``threadpool`` (started and stopped by the caller).  A call
    made while ``start`` runs waits for it; one made once ``close`` began fails.

    Beyond the interfaces: ``owner`` (the name in ``claimed_by`` and ``owners/``: by
    default ``<host>.<pid>.<random>``), ``recover()`` (look for dead owners now),
    ``committer`` (its ``commits``, ``units`` and ``largest_batch`` say how well
    writes are grouped), and the keyword arguments ``recovery_interval``, ``max_batch``,
    ``inline_limit`` and ``clock`` (wall-clock time, for the tests of the lease).
    """

    def __init__(self, path: str, reactor: Any, threadpool: ThreadPool, *, max_bytes: int,
                 min_free_bytes: int, owner: str | None = None, claim_lease: float = 900.0,
                 recovery_interval: float = RECOVERY_INTERVAL, max_batch: int = MAX_BATCH,
                 clock: Callable[[], float] = time.time, clean_orphans: bool = True,
                 inline_limit: int = INLINE_LIMIT):
        self.path = os.path.abspath(path)
        #: Whether ``start`` removes orphaned content files: the relay's job; the queue
        #: tool leaves it to the relay (on 100,000 messages it is half a second).
        self._clean_orphans = clean_orphans
        self.owner = owner if owner is not None else default_owner()
        if not _OWNER.match(self.owner):
            raise ValueError(f"spool owner {self.owner!r}: letters, digits, '.', '_', "
                             f"'-' only (it names a file)")
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        #: Content up to this size is stored in the index, larger in a file (0: always
        #: a file).
        self.inline_limit = inline_limit
        self._reactor = reactor
        self._pool = threadpool
        self._clock = clock
        self._files = ContentFiles(self.path, self.owner)
        self._owners = OwnerLocks(os.path.join(self.path, "owners"))
        self._state = QueueState(self.owner, self._owners, self._files, clock, claim_lease,
                                 recovery_interval)
        self.committer = GroupCommitter(reactor, threadpool, self._connect, max_batch)
        self._readers = ReaderConnections(self._connect)
        self._lock: HeldLock | None = None
        self._status = "new"  # → "opening" → "open" → "closing" → "closed"
        self._in_flight = 0
        self._idle: list[Deferred[None]] = []
        self._opening: list[Deferred[None]] = []  # calls made while it opens
        #: Claimed with their start recorded, no attempt begun yet: id → claimed at.
        self._unbegun: dict[str, float] = {}
        # Accounting for ``accepting``: bytes as last read from SQLite plus our own
        # changes since, stores in flight, and the free disk as last seen.
        self._bytes = 0
        self._reserved = 0
        self._free: int | None = None
        self._free_read_at = -math.inf  # time.monotonic() of the last statvfs
        self._stored_since_free = 0  # octets stored since (pool threads; an estimate)
        self._refreshing = False
        self._refreshed_at = -math.inf

    @classmethod
    def open_for_admin(cls, path: str, reactor: Any, threadpool: ThreadPool,
                       owner: str | None = None) -> "FileSpool":
        """The queue tool's spool: stores nothing (its caps are zero), and leaves the
        orphaned files to the relay's start."""
        return cls(path, reactor, threadpool, max_bytes=0, min_free_bytes=0, owner=owner,
                   clean_orphans=False)

    @property
    def description(self) -> str:
        return f"file spool {self.path} (owner {self.owner})"

    # -- lifecycle

    def start(self) -> Deferred[None]:
        if self._status != "new":
            return fail(SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.OPEN,
                                   f"spool already {self._status}"))
        self._status = "opening"
        d = deferToThreadPool(self._reactor, self._pool, self._open_directory)
        d.addCallback(lambda _: self.committer.submit(self._state.create))
        d.addCallback(lambda _: self.committer.submit(
            lambda tx: self._state.recover(tx, at_start=True)))
        if self._clean_orphans:
            d.addCallback(lambda _: deferToThreadPool(self._reactor, self._pool,
                                                      self._remove_orphans))
        d.addCallback(lambda _: deferToThreadPool(self._reactor, self._pool,
                                                  self._read_totals))

        def opened(totals: tuple[int, int]) -> None:
            self._bytes, self._free = totals
            self._refreshed_at = self._clock()
            if self._status == "opening":  # not closed meanwhile
                self._status = "open"
            self._opening_done()

        def failed(failure: Failure) -> Deferred[None]:
            self._status = "closed"
            self._opening_done()
            return deferToThreadPool(self._reactor, self._pool, self._close_storage) \
                .addBoth(lambda _: _as_spool_error(failure, Phase.OPEN))
        return self._track(d.addCallbacks(opened, failed))

    def close(self) -> Deferred[None]:
        """Wait for the work in flight, end our claims (a message with a recipient
        ``STARTED`` is held: the attempt cannot settle any more), drop the lock."""
        if self._status in ("closing", "closed"):
            return succeed(None)
        was_open = self._status == "open"
        self._status = "closing"
        d = self._wait_idle()
        if was_open:
            d.addCallback(lambda _: self.committer.submit(
                lambda tx: self._state.release_own(tx, list(self._unbegun.items()))))
            d.addErrback(lambda f: log.failure("ending this owner's claims failed", f))
        d.addCallback(lambda _: self.committer.idle())
        d.addCallback(lambda _: deferToThreadPool(self._reactor, self._pool,
                                                  self._close_storage))

        def closed(_: Any) -> None:
            self._status = "closed"
        return d.addBoth(closed)

    def _open_directory(self) -> None:
        self._files.create_directories()
        self._lock = self._owners.acquire(self.owner)

    def _close_storage(self) -> None:
        self.committer.close()
        self._readers.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.remove()
            lock.release()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(os.path.join(self.path, DATABASE),
                                     timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_FRAMES}")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _remove_orphans(self) -> int:
        """Content no row names, and stale tmp files, of dead owners (or ours, from a
        previous life): a store that crashed before its commit.

        In this order: list the files, decide which writers are dead, and only then read
        the names the rows hold.  A writer found dead commits nothing more, so a file of
        its that no row names now never will be named; a live writer's file may be
        between its rename and its commit, and is left alone."""
        leftovers = list(self._files.leftovers())
        dead: dict[str, bool] = {}
        for name, _ in leftovers:
            writer = name.partition(".")[2]
            if writer not in dead:
                dead[writer] = writer == self.owner or not _OWNER.match(writer) \
                    or not self._owners.is_alive(writer)
        with self._readers.connection() as connection:
            named = {row[0] for row in connection.execute("SELECT content FROM messages")}
        removed = 0
        for name, path in leftovers:
            if name not in named and dead[name.partition(".")[2]]:
                unlink_quietly(path)
                removed += 1
        if removed:
            log.info("spool removed {count} orphaned content file(s) in {path}",
                     count=removed, path=self.path)
        return removed

    # -- accounting

    def _read_totals(self) -> tuple[int, int]:
        with self._readers.connection() as connection:
            total = QueueState.total_bytes(connection)
        return total, self._free_disk()

    def _free_disk(self) -> int:
        stats = os.statvfs(self.path)
        free = stats.f_bavail * stats.f_frsize
        self._free = free
        self._free_read_at = time.monotonic()
        self._stored_since_free = 0
        return free

    def _recent_free_disk(self) -> int:
        """The free disk as read at most ``FREE_DISK_AGE`` ago, less what was stored
        since: a store in a batch does not need a ``statvfs`` of its own."""
        if self._free is None or time.monotonic() - self._free_read_at > FREE_DISK_AGE:
            return self._free_disk()
        return self._free - self._stored_since_free

    def _maybe_refresh(self) -> None:
        """Read the byte total again now and then, off the reactor: other processes
        store and deliver too.  Our own changes made while it is read are counted on
        top (an overcount until the next refresh, never an undercount)."""
        if self._refreshing or self._status != "open":
            return
        if self._clock() - self._refreshed_at < TOTALS_INTERVAL:
            return
        self._refreshing = True
        before = self._bytes

        def read(totals: tuple[int, int]) -> None:
            self._bytes = totals[0] + max(self._bytes - before, 0)
            self._refreshed_at = self._clock()

        def done(result: Any) -> None:
            self._refreshing = False
            if isinstance(result, Failure):
                log.warn("reading the spool's byte total failed: {error}",
                         error=result.getErrorMessage())
        d = deferToThreadPool(self._reactor, self._pool, self._read_totals)
        self._track(d.addCallback(read).addBoth(done))

    def accepting(self) -> SpoolError | None:
        """Room for a small message (``MESSAGE_ROOM``) under the cap and above the
        free-disk floor.  While the spool opens, by what is known already (the cap):
        a store made meanwhile waits for the opening (``_when_open``)."""
        if self._status not in ("open", "opening"):
            return SpoolError(SpoolErrorKind.UNAVAILABLE, Phase.STORE,
                              f"the spool is {_status_text(self._status)}")
        self._maybe_refresh()
        held = self._bytes + self._reserved
        if self.max_bytes - held < MESSAGE_ROOM:
            return SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                              f"the spool is full: {held} of {self.max_bytes} bytes")
        if self._free is not None and self._free - MESSAGE_ROOM < self.min_free_bytes:
            return SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                              f"free disk space is {self._free} bytes, at the floor of "
                              f"{self.min_free_bytes}")
        return None

    # -- ISpool

    @_when_open(Phase.STORE)
    def store(self, entry: SpoolEntry, chunks: Iterator[bytes],
              claim: bool = False) -> Deferred[QueuedMessage | None]:
        self._maybe_refresh()
        after = self._bytes + self._reserved + entry.size
        if after > self.max_bytes:
            return fail(SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                                   f"the spool is full: {after} bytes would pass its cap "
                                   f"of {self.max_bytes}"))
        reserved = max(entry.size, 0)
        self._reserved += reserved
        if 0 <= entry.size <= self.inline_limit:
            d = self.committer.submit(
                lambda tx: self._insert_inline(tx, entry, chunks, claim))
            d.addCallback(self._stored)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._write_content, entry,
                                  chunks)
            d.addCallback(self._insert, entry, claim)

        def unreserve(result: Any) -> Any:
            self._reserved -= reserved
            return result
        return self._track(d.addBoth(unreserve).addErrback(_as_spool_error, Phase.STORE))

    def _check_free_disk(self, entry: SpoolEntry) -> None:
        """In the pool: refuse what would take the disk below its floor."""
        free = self._recent_free_disk()
        self._stored_since_free += max(entry.size, 0)
        if free - entry.size < self.min_free_bytes:
            raise SpoolError(SpoolErrorKind.FULL, Phase.STORE,
                             f"free disk space is {free} bytes: {entry.size} more would "
                             f"pass the floor of {self.min_free_bytes}")

    def _insert_inline(self, tx: Transaction, entry: SpoolEntry, chunks: Iterator[bytes],
                       claim: bool) -> tuple[int, QueuedMessage | None]:
        """In the committer's batch: content and rows, durable at its commit."""
        self._check_free_disk(entry)
        data = b"".join(chunks)
        self._state.insert_inline(tx, entry, data)
        claimed = self._state.claim_stored(tx, entry, INLINE, len(data), data) \
            if claim else None
        return len(data), claimed

    def _stored(self, stored: tuple[int, QueuedMessage | None]) -> QueuedMessage | None:
        size, claimed = stored
        self._bytes += size
        return claimed

    def _write_content(self, entry: SpoolEntry, chunks: Iterator[bytes]) -> tuple[str, int]:
        """In the pool: the free-disk floor, then the durable file."""
        self._check_free_disk(entry)
        name = self._files.new_name(entry.id)
        return name, self._files.write(name, chunks)

    def _insert(self, written: tuple[str, int], entry: SpoolEntry,
                claim: bool) -> Deferred[QueuedMessage | None]:
        name, size = written

        def insert(tx: Transaction) -> tuple[int, QueuedMessage | None]:
            self._state.insert(tx, entry, name, size)
            claimed = self._state.claim_stored(tx, entry, name, size, None) \
                if claim else None
            return size, claimed
        d = self.committer.submit(insert)

        def not_stored(failure: Failure) -> Deferred[Any]:
            removed = deferToThreadPool(self._reactor, self._pool, self._files.remove, name)
            return removed.addBoth(lambda _: failure)
        return d.addCallbacks(self._stored, not_stored)

    @_when_open(Phase.CLAIM)
    def claim(self, limit: int, busy: frozenset = frozenset(), fill: bool = False,
              start: bool = False) -> Deferred[list[QueuedMessage]]:
        if limit <= 0:
            return succeed([])
        busy = frozenset(busy)
        # Not fsync'd without ``start``: a claim lost with the machine only leaves its
        # messages due.  With it, the claim holds the starts, durable as ``started``'s.
        d = self._write(Phase.CLAIM,
                        lambda tx: self._state.claim(tx, limit, busy, fill, start),
                        durable=start)
        return d.addCallback(self._note_unbegun) if start else d

    def _note_unbegun(self, messages: list[QueuedMessage]) -> list[QueuedMessage]:
        for message in messages:
            self._unbegun[message.entry.id] = _token(message).claimed_at
        return messages

    @_when_open(Phase.CLAIM)
    def content(self, message: QueuedMessage) -> Deferred[IContent]:
        token = _token(message)
        if token.content == INLINE and token.data is not None:
            return succeed(InlineContent(token.data))
        return self._read(Phase.CLAIM, self._files.open, token.content)

    @_when_open(Phase.START)
    def started(self, message: QueuedMessage,
                recipients: tuple[str, ...]) -> Deferred[None]:
        recipients = tuple(recipients)
        if self._started_by_claim(message, recipients):
            return succeed(None)
        return self._write(Phase.START,
                           lambda tx: self._state.started(tx, message, recipients))

    @_when_open(Phase.SETTLE)
    def settle(self, message: QueuedMessage, settlement: Settlement) -> Deferred[None]:
        # Not fsync'd: a settlement lost with the machine leaves its message started, so
        # it is held, never sent again (docs/spool.md, "What a power loss costs").
        self._unbegun.pop(message.entry.id, None)
        d = self._write(Phase.SETTLE,
                        lambda tx: self._state.settle(tx, message, settlement),
                        durable=False)
        return d.addCallback(self._removed)

    def _started_by_claim(self, message: QueuedMessage, recipients: tuple[str, ...]
                          ) -> bool:
        """Whether the claim recorded this start already, and the claim is still ours:
        it is younger than half the claim lease, and no process recovers a claim before
        the lease has passed (``QueueState.recover``).  An older one is written and
        checked as any other start, so that a claim lost meanwhile is never sent."""
        claimed_at = self._unbegun.pop(message.entry.id, None)
        token = message.token
        if claimed_at is None or not isinstance(token, ClaimToken) \
                or claimed_at != token.claimed_at:  # not this claim's start
            return False
        lease = self._state.claim_lease
        if lease > 0 and self._clock() - claimed_at >= lease / 2:
            return False
        return set(recipients) <= set(message.pending)

    def watch(self, callback: Callable[[], None]) -> None:
        """Nothing to tell: a message stored here is kicked to the runner by the store
        itself, and the runner's poll finds other processes' within a second.  Open or
        not, there is nothing to do (nor a Deferred to fail)."""

    #: For ``--check-connect`` (``esmtpfa.common.probe``).
    probe_subject = "spool"

    def probe(self):
        """Its counts, once started (``probe_counts``)."""
        return probe_counts(self)

    def stats(self) -> Deferred[SpoolStats]:
        return self._read(Phase.ADMIN, self._with_reader, QueueState.stats)

    @_when_open(Phase.CLAIM)
    def recover(self) -> Deferred[int]:
        """Look for dead owners' claims now (``claim`` does every ``recovery_interval``);
        fires with how many messages were held or made due again."""
        return self._write(Phase.CLAIM, self._state.recover)

    # -- IQueueAdmin

    @_when_open(Phase.ADMIN)
    def list(self) -> Deferred[list[QueueSummary]]:
        return self._read(Phase.ADMIN, self._with_reader, QueueState.summaries)

    @_when_open(Phase.ADMIN)
    def show(self, message_id: str) -> Deferred[tuple[QueueSummary, bytes]]:
        return self._read(Phase.ADMIN, self._show, message_id)

    def _show(self, message_id: str) -> tuple[QueueSummary, bytes]:
        with self._readers.connection() as connection:
            found = QueueState.summaries(connection, message_id)
            row = connection.execute(
                "SELECT content, substr(data, 1, ?) FROM messages LEFT JOIN contents "
                "ON contents.message_id = messages.id WHERE id = ?",
                (HEADER_LIMIT, message_id)).fetchone()
        if not found or row is None:
            raise SpoolError(SpoolErrorKind.NOT_FOUND, Phase.ADMIN,
                             f"{message_id}: no such message")
        if row[0] == INLINE:
            return found[0], header_section(row[1] or b"")
        try:
            headers = self._files.headers(row[0])
        except FileNotFoundError:  # deleted between the query and the read
            raise SpoolError(SpoolErrorKind.NOT_FOUND, Phase.ADMIN,
                             f"{message_id}: no such message") from None
        return found[0], headers

    @_when_open(Phase.ADMIN)
    def flush(self) -> Deferred[int]:
        return self._write(Phase.ADMIN, self._state.flush)

    @_when_open(Phase.ADMIN)
    def hold(self, message_id: str, reason: str = "held by an operator") -> Deferred[None]:
        return self._write(Phase.ADMIN, lambda tx: self._state.hold(tx, message_id, reason))

    @_when_open(Phase.ADMIN)
    def release(self, message_id: str) -> Deferred[None]:
        return self._write(Phase.ADMIN, lambda tx: self._state.release(tx, message_id))

    @_when_open(Phase.ADMIN)
    def delete(self, message_id: str) -> Deferred[None]:
        d = self._write(Phase.ADMIN, lambda tx: self._state.delete(tx, message_id))
        return d.addCallback(self._removed)

    @_when_open(Phase.ADMIN)
    def requeue(self, message_id: str | None = None) -> Deferred[int]:
        return self._write(Phase.ADMIN, lambda tx: self._state.requeue(tx, message_id))

    # -- plumbing

    def _removed(self, removed: Removed) -> None:
        self._bytes = max(self._bytes - removed.bytes, 0)

    def _after_opening(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._opening.append(d)
        return d

    def _opening_done(self) -> None:
        waiters, self._opening = self._opening, []
        for waiter in waiters:
            waiter.callback(None)

    def _with_reader(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with self._readers.connection() as connection:
            return query(connection)

    def _read(self, phase: str, function: Callable[..., T], *args: Any) -> Deferred[T]:
        d = deferToThreadPool(self._reactor, self._pool, function, *args)
        return self._track(d.addErrback(_as_spool_error, phase))

    def _write(self, phase: str, work: Work, durable: bool = True) -> Deferred[Any]:
        return self._track(self.committer.submit(work, durable).addErrback(
            _as_spool_error, phase))

    def _track(self, d: Deferred[T]) -> Deferred[T]:
        """Count the work in flight, so that ``close`` can wait for it."""
        self._in_flight += 1

        def done(result: Any) -> Any:
            self._in_flight -= 1
            if not self._in_flight:
                waiters, self._idle = self._idle, []
                for waiter in waiters:
                    waiter.callback(None)
            return result
        return d.addBoth(done)

    def _wait_idle(self) -> Deferred[None]:
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


def _status_text(status: str) -> str:
    return "not open" if status == "new" else status


def _token(message: QueuedMessage) -> ClaimToken:
    token = message.token
    if not isinstance(token, ClaimToken):
        raise SpoolError(SpoolErrorKind.CONFLICT, Phase.CLAIM,
                         f"{message.entry.id}: not claimed from a file spool")
    return token


def _as_spool_error(failure: Failure, phase: str) -> Failure:
    if failure.check(SpoolError):
        return failure
    error = failure.value
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        detail = f"no space left on device ({error.filename or 'spool'})"
    else:
        detail = f"{type(error).__name__}: {error}"
    return Failure(SpoolError(SpoolErrorKind.UNAVAILABLE, phase, detail))


@contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile (left as it was found, when another
    thread paused it too)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_directory(path: str) -> None:
    """Make ``path`` (and its parents) durably: each new directory's parent is fsync'd."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _make_directory(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    fsync_directory(parent or ".")


def _abandon(transaction: Transaction, units: int) -> list[tuple[bool, Any]]:
    """Inside an ``except``: the batch is rolled back, and each of its ``units`` fails
    with the error being handled."""
    failure = Failure()
    _rollback_quietly(transaction.connection)
    transaction.finish(committed=False)
    return [(False, failure)] * units


def _rollback_quietly(connection: sqlite3.Connection) -> None:
    try:
        connection.execute("ROLLBACK")
    except sqlite3.Error:
        pass


