"""Local Maildir delivery: the relay used when no upstream is configured (docs/design.md,
"The relay and the delivery guarantee").

Follows the Maildir contract (``esmtpfa.common.durable``): write the whole file under ``tmp/``
with a unique name, fsync it, then link it into ``new/`` and fsync the directory, so a
reader never sees a partial message and a crash never loses an acknowledged one.  The blocking file
work runs in a small dedicated
thread pool, never in the reactor thread.

Content is stored exactly as it would have gone upstream (esmtpfa's prefix, then the
content, undotted), **with CRLF line endings**: byte-for-byte what the client submitted is
what lands on disk, DKIM signatures (computed over CRLF canonical form) stay verifiable,
and the Maildir readers that matter (Dovecot, mutt, Thunderbird's importer) accept CRLF.
Converting to LF would make this sink a lossy mirror of the upstream path.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from esmtpfa.common.durable import fsync_directory, publish, unlink_quietly
from esmtpfa.common.logs import logger
from esmtpfa.common.message import OutboundMessage
from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import UNAVAILABLE, IRelay, RelayError, WholeMessageTransaction

log = logger("esmtpfa.relay.maildir")

SUBDIRECTORIES = ("tmp", "new", "cur")


class UniqueNames:
    """``time.M<usec>P<pid>Q<counter>.<host>``: unique per host, process and delivery.

    The counter makes names unique within one process even within one microsecond; the
    host part escapes "/" and ":" as the Maildir spec asks (``\\057``, ``\\072``).
    """

    def __init__(self, hostname: str | None = None):
        host = hostname or socket.gethostname() or "localhost"
        self._host = host.replace("/", r"\057").replace(":", r"\072")
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            sequence = next(self._counter)
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{sequence}.{self._host}"


@implementer(IRelay)
class MaildirRelay:
    """IRelay that delivers into a Maildir; fires with ``250 2.0.0 Delivered to Maildir as
    <name>``."""

    def __init__(self, path: str, *, reactor: Any, threads: int = 2,
                 hostname: str | None = None):
        # Its own pool of ``threads``: a slow disk's fsyncs must not hold the threads
        # that scan messages (``Resources.threads``), nor the other way round.
        self.path = os.path.abspath(path)
        self._reactor = reactor
        self._names = UniqueNames(hostname)
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="esmtpfa-maildir")
        self._shutdown_trigger: Any = None
        self._closed = False
        self._pending = 0
        self._idle: list[Deferred[None]] = []

    @property
    def description(self) -> str:
        return f"local Maildir {self.path} (no upstream relay configured)"

    def begin(self, envelope: Any, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred[WholeMessageTransaction]:
        """A Maildir takes every recipient: the whole message is written at the end."""
        if self._closed:
            return fail(_error(Reply(451, "4.3.2", "Relay shutting down, try again later"),
                               "relay closed"))
        return succeed(WholeMessageTransaction(self))

    def deliver(self, message: OutboundMessage) -> Deferred[Reply]:
        """Write one whole message (``WholeMessageTransaction.send`` comes here)."""
        if self._closed:
            return fail(_error(Reply(451, "4.3.2", "Relay shutting down, try again later"),
                               "relay closed"))
        self._start_pool()
        self._pending += 1
        d = deferToThreadPool(self._reactor, self._pool, self._write, message)

        def done(result: Any) -> Any:
            self._pending -= 1
            if not self._pending:
                waiters, self._idle = self._idle, []
                for waiter in waiters:
                    waiter.callback(None)
            if isinstance(result, Failure):
                error = result.value
                log.error("maildir delivery failed: message={message_id} "
                          "connection={connection_id} error={error}",
                          message_id=message.id, connection_id=message.connection_id,
                          error=str(error))
                return Failure(_error(
                    Reply(451, "4.3.0", "Local delivery failed, try again later"),
                    f"{type(error).__name__}: {error}"))
            log.info("relay accepted: message={message_id} connection={connection_id} "
                     "upstream={upstream} reply={reply}", message_id=message.id,
                     connection_id=message.connection_id, upstream=self.path,
                     reply=str(result))
            return result
        return d.addBoth(done)

    def _write(self, message: OutboundMessage) -> Reply:
        """Runs in the pool: tmp/ → fsync → link into new/ → fsync new/."""
        self._ensure_directories()
        name = self._names.next()
        tmp = os.path.join(self.path, "tmp", name)
        new = os.path.join(self.path, "new", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                for chunk in message.chunks():
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            publish(tmp, new)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_directory(os.path.join(self.path, "new"))
        return Reply(250, "2.0.0", f"Delivered to Maildir as {name}")

    def _ensure_directories(self) -> None:
        created = False
        for sub in SUBDIRECTORIES:
            directory = os.path.join(self.path, sub)
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
                created = True
        if created:
            fsync_directory(self.path)

    def _start_pool(self) -> None:
        if not self._pool.started:
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_pool)

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def close(self) -> Deferred[None]:
        """Finish the deliveries in progress, then stop the thread pool."""
        self._closed = True

        def stop(_: Any) -> None:
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            # Joining the workers blocks, but only for the file work already queued (none
            # left: every pending delivery has finished by now).
            self._stop_pool()

        idle: Deferred[None] = Deferred()
        if self._pending:
            self._idle.append(idle)
        else:
            idle.callback(None)
        return idle.addCallback(stop)


def _error(reply: Reply, detail: str) -> RelayError:
    return RelayError(reply, UNAVAILABLE, "maildir", None, detail)
