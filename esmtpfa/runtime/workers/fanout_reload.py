"""Reloads for all workers: the supervisor watches, every worker applies (docs/workers.md).

The supervisor runs the same reload sources as a single process (``esmtpfa.config.reload``: the
file watch, SIGHUP, the config service poller), with ``FanOutReloader`` in place of the
reloader, so the config service is polled once per relay however many workers there are.
Each worker then applies the document with its own ``ProviderReloader`` (providers hold
connections, caches and threads of their own process), in a thread, within the same
bounds, so a bad document is refused by every worker with the same log line and metric
as in a single process.

* A changed **file** is announced by path: every worker reads it.
* A **config service** document is written by the supervisor to a private snapshot file
  (mode 0600 in a directory only it can enter), which the workers read; a worker that
  starts later (a restart) is given the latest snapshot before it serves.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from twisted.internet import defer, threads

from esmtpfa.common.errors import ConfigError
from esmtpfa.common.logs import logger
from esmtpfa.config.documents import DEFAULT_LIMITS, DocumentLimits
from esmtpfa.config.reload import APPLIED, FILE, REFUSED, UNCHANGED
from esmtpfa.runtime.workers.control import CERTIFICATES_RELOAD, RELOAD, RELOAD_FAILED, Call

log = logger("esmtpfa.workers")

#: Seconds a worker may take to apply a document (it parses and builds in a thread).
APPLY_TIMEOUT = 60.0


class FanOutReloader:
    """Duck-types ``ProviderReloader`` for the reload sources; ``workers()`` gives the
    control channels of the workers running now."""

    def __init__(self, workers: Callable[[], list], reactor: Any, *,
                 path: str | None = None, limits: DocumentLimits = DEFAULT_LIMITS):
        self._workers = workers
        self._reactor = reactor
        self._path = path
        self._limits = limits
        self._lock = defer.DeferredLock()
        self._directory: str | None = None
        #: The last config service document, for workers that start after it came.
        self.snapshot: tuple[str, str] | None = None  # (path, source)

    @property
    def limits(self) -> DocumentLimits:
        return self._limits

    def remember_applied(self, document: bytes) -> None:
        """The workers read the startup file themselves: nothing to remember here."""

    def load(self, read: Callable[[], bytes], source: str, kind: str,
             force: bool = False) -> defer.Deferred:
        """Tell every worker; fires with APPLIED if any applied it, REFUSED if any refused
        it, else UNCHANGED.  One document at a time, in order."""
        return self._lock.run(lambda: defer.ensureDeferred(
            self._load(read, source, kind, force)))

    async def _load(self, read: Callable[[], bytes], source: str, kind: str,
                    force: bool) -> str:
        if kind == FILE:
            path = self._path or source
        else:
            try:
                path = await threads.deferToThreadPool(
                    self._reactor, self._reactor.getThreadPool(), self._write_snapshot, read)
            except ConfigError as error:
                await self._tell_all(RELOAD_FAILED, kind=kind, source=source,
                                     reason=str(error))
                return REFUSED
            previous, self.snapshot = self.snapshot, (path, source)
            if previous is not None:  # only ever read while it was the latest
                self._reactor.callInThread(_remove, previous[0])
        outcomes = await self._tell_all(RELOAD, path=path, source=source, kind=kind,
                                        force=force)
        for outcome in (APPLIED, REFUSED):
            if outcome in outcomes:
                return outcome
        return UNCHANGED

    async def _tell_all(self, call: Call, **args: Any) -> list:
        calls = [channel.call(call, timeout=APPLY_TIMEOUT, **args)
                 for channel in self._workers()]
        results = await defer.DeferredList(calls, consumeErrors=True)
        outcomes = []
        for ok, result in results:
            if ok:
                outcomes.append(result)
            else:
                log.warn("a worker did not apply the provider configuration: {why}",
                         why=result.getErrorMessage())
        return outcomes

    def _write_snapshot(self, read: Callable[[], bytes]) -> str:
        """In a thread: the document, to a private file the workers read."""
        document = read()
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="esmtpfa-config-")  # mode 0700
        fd, path = tempfile.mkstemp(dir=self._directory, suffix=".snapshot")  # 0600
        with os.fdopen(fd, "wb") as out:
            out.write(document)
        return path

    def reload_certificates(self) -> defer.Deferred:
        """SIGHUP: every worker reads its TLS certificates again (each logs what it
        loaded or refused, as a single process does)."""
        calls = [channel.call(CERTIFICATES_RELOAD, timeout=APPLY_TIMEOUT)
                 for channel in self._workers()]

        def told(results: list) -> None:
            for ok, result in results:
                if not ok:
                    log.warn("a worker did not reload its TLS certificates: {why}",
                             why=result.getErrorMessage())
        return defer.DeferredList(calls, consumeErrors=True).addCallback(told)

    def catch_up(self, channel: Any) -> defer.Deferred:
        """A worker that just started: give it the latest config service document."""
        if self.snapshot is None:
            return defer.succeed(UNCHANGED)
        path, source = self.snapshot
        return channel.call(RELOAD, timeout=APPLY_TIMEOUT, path=path, source=source,
                            kind="service", force=False)

    def stop(self) -> defer.Deferred:
        if self._directory is not None:
            directory, self._directory = self._directory, None
            for name in os.listdir(directory):
                _remove(os.path.join(directory, name))
            try:
                os.rmdir(directory)
            except OSError:
                pass
        return defer.succeed(None)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["APPLY_TIMEOUT", "FanOutReloader"]
