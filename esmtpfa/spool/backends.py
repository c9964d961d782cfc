"""Which spool a ``--spool-url`` names, and the service that runs it with its runner.

``file:///path`` is the embedded spool (``esmtpfa.spool.files``: this host, every worker
process sharing it); ``amqp://`` and ``amqps://`` are RabbitMQ quorum queues
(``esmtpfa.spool.amqp``), shared by replicas.  The spool's thread pool is a resource of
its own, made here and passed in, so that slow disk work never waits behind the other
pools (the Maildir's, the reactor's default one) or holds them up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.spool.interfaces import ISpool

log = logger("esmtpfa.spool")

#: Threads for the file spool's disk and SQLite work (and the runner's content reads).
SPOOL_THREADS = 4


@dataclass(frozen=True)
class SpoolSettings:
    """The ``--spool-*`` settings a backend needs."""

    url: str
    max_bytes: int
    min_free_bytes: int
    prefetch: int = 20
    #: The queue tool's view: stores nothing, leaves the relay's start-up work alone.
    admin: bool = False


def file_path(url: str) -> str | None:
    """The directory of a ``file:///path`` URL (None for another scheme)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    return os.path.abspath(unquote(parts.path))


def parse_spool_url(text: str) -> str:
    """``file:///path`` (the embedded spool) or ``amqp://`` / ``amqps://`` (RabbitMQ);
    the error never repeats the URL, which may hold a password."""
    value = text.strip()
    scheme = value.partition("://")[0].lower()
    if scheme == "file":
        if not value[len("file://"):].startswith("/"):
            raise ValueError("a file spool URL names an absolute path: file:///var/lib/...")
    elif scheme not in ("amqp", "amqps"):
        raise ValueError("expected a file:///path, amqp:// or amqps:// URL")
    return value


def check_file_spool(url: str) -> str | None:
    """A one-line problem with a file spool's directory (it must be, or be made,
    writable), or None: found at startup rather than at the first message."""
    path = file_path(url)
    if path is None:
        return None
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        return f"cannot create {path}: {error.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by this user"
    return None


def open_spool(settings: SpoolSettings, reactor: Any, threads: ThreadPool) -> ISpool:
    """The backend ``settings.url`` names (not started yet)."""
    path = file_path(settings.url)
    if path is not None:
        from esmtpfa.spool.files import FileSpool
        if settings.admin:
            return FileSpool.open_for_admin(path, reactor, threads)
        return FileSpool(path, reactor, threads, max_bytes=settings.max_bytes,
                         min_free_bytes=settings.min_free_bytes)
    from esmtpfa.spool.amqp import AMQPSpool
    # No queue-length cap from --spool-max-size: a queue's arguments cannot change once
    # declared, and the broker's own disk and memory alarms (which block publishers:
    # 451 4.3.0) or an operator's max-length-bytes policy bound it (docs/spool.md).
    return AMQPSpool(settings.url, reactor, prefetch=settings.prefetch, threads=threads)


@implementer(IProbe)
class SpoolCheck:
    """The probe of a spool this process has not opened (``--check-connect``): opens
    it as the relay does (the file spool's database, or the broker with its queues
    declared) over a small pool of its own, asks its ``probe()``, and closes it."""

    probe_subject = "spool"

    def __init__(self, url: str, reactor: Any):
        self.url = url
        self._reactor = reactor

    def probe(self) -> defer.Deferred:
        return defer.ensureDeferred(self._probe()).addErrback(ProbeResult.from_failure)

    async def _probe(self) -> ProbeResult:
        threads = ThreadPool(minthreads=0, maxthreads=2, name="esmtpfa-check-spool")
        threads.start()
        try:
            spool = open_spool(SpoolSettings(self.url, max_bytes=0, min_free_bytes=0),
                               self._reactor, threads)
            await spool.start()
            try:
                return await IProbe(spool).probe()  # every backend provides IProbe
            finally:
                await spool.close()
        finally:
            threads.stop()


class SpoolService(Service):
    """Owns the spool's thread pool, the spool and the queue runner.

    Starts the pool, then the spool (its recovery of a crashed owner's claims runs
    there), then the runner; stops in the reverse order, so the spool closes only once
    no attempt of this process is in flight."""

    name = "spool"

    def __init__(self, spool: ISpool, threads: ThreadPool, runner: Any,
                 reactor: Any, stop_timeout: float = 30.0):
        self.spool = spool
        self.threads = threads
        self.runner = runner
        self._reactor = reactor
        self._stop_timeout = stop_timeout
        self._started: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # the runner starts once the spool has opened
        if not self.threads.started:
            self.threads.start()

        def opened(_: Any) -> None:
            log.info("spool {spool} open", spool=self.spool.description)
            if self.running:
                self.runner.startService()

        def failed(failure: Any) -> None:
            log.error("the spool {spool} could not be opened: {error}; messages that "
                      "need it are refused with 451 until a restart",
                      spool=self.spool.description, error=failure.getErrorMessage())
        self._started = self.spool.start().addCallbacks(opened, failed)

    def pause(self) -> None:
        """Start no new delivery attempt (the relay is draining); the attempts in flight
        end with the relay's close, which answers every one of them."""
        self.runner.pause()

    def stopService(self) -> defer.Deferred[None]:
        """Wait (bounded) for this process's attempts, then close the spool.  An attempt
        still running then is abandoned with the process: its claim is recovered at the
        next start (docs/spool.md, "The duplicate window")."""
        super().stopService()

        def abandoned(failure: Any) -> None:
            failure.trap(defer.TimeoutError)
            log.warn("spool delivery attempts still in flight after {seconds:g} s: left "
                     "for the next start to recover", seconds=self._stop_timeout)
        d = defer.maybeDeferred(self.runner.stopService).addTimeout(
            self._stop_timeout, self._reactor).addErrback(abandoned)
        d.addBoth(lambda _: self.spool.close())
        d.addErrback(lambda f: log.failure("closing the spool failed", f))

        def stop_threads(_: Any) -> None:
            if self.threads.started:
                self.threads.stop()
        return d.addBoth(stop_threads)
