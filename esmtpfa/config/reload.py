"""Hot reload of the provider configuration (docs/design.md, "Configuration, reload and limits"):
file changes, SIGHUP, config service.

Every source ends in ``ProviderReloader.load``, which parses and builds the whole new
set *before* touching the live one, so a reload either swaps in a complete, valid set or
changes nothing:

* a bad file, a bad payload or a dead service keeps the last good config, logs the reason
  and counts a failure; it never exits or disturbs a session;
* unchanged providers are the *same instances* afterwards (``config.build_providers``), so
  JWKS caches, LDAP connections and HTTP pools survive, and a fallback is never listed
  twice however many reloads happen: each reload builds a fresh set, nothing is appended;
* removed providers stop authenticating at once (new logins read the new set), but are
  only stopped after ``RETIRE_GRACE`` seconds, so a login already talking to one still
  gets its answer.

Reading, hashing and parsing a document run off the reactor thread, one document at a
time, within ``documents.DocumentLimits`` (docs/config-loading.md); only building the
providers and swapping them in runs on the reactor.  The SHA-256 of the document in use
and of the last one refused are remembered, so neither is parsed again when a poll sees
it again (SIGHUP, an operator's explicit request, parses whatever is there); a refused
document is counted and logged once, then reminded at most every ``REMIND_SECONDS``.

The file is polled (stat, then a hash of the content when the stat changed or is too
recent to trust); SIGHUP reloads it at once.  The config service is polled with
``If-None-Match`` and ``If-Modified-Since`` from the last document it served, an optional
bearer token and one deadline covering the body.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from esmtpfa.auth.provider import Provider
from esmtpfa.auth.selection import ProviderDirectory
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.httpclient import new_http_client
from esmtpfa.common.logs import logger
from esmtpfa.common.observers import notify
from esmtpfa.common.resources import HTTPClientFactory, Resources
from esmtpfa.common.urls import redact_url
from esmtpfa.config.documents import (
    BYTES,
    DEFAULT_LIMITS,
    DocumentLimits,
    DocumentRefused,
    read_document,
)
from esmtpfa.config.providers import ProviderConfig, build_providers, parse_provider_document

log = logger("esmtpfa.reload")

FILE = "file"
SERVICE = "service"

#: Seconds a removed provider keeps running for the logins that already chose it.
RETIRE_GRACE = 30.0
#: A file modified this recently may change again within the same mtime tick: re-hash it.
RACY_NANOSECONDS = 2_000_000_000
#: A refusal that repeats (same document, same reason) is logged again after this long.
REMIND_SECONDS = 300.0

#: Stands for a digest when a document could not be read: its reason follows.
_UNREADABLE = "unreadable: "

#: What ``ProviderReloader.load`` did with a document.
APPLIED = "applied"      # parsed, built and swapped in
UNCHANGED = "unchanged"  # the document already applied: nothing parsed, nothing changed
REFUSED = "refused"      # refused now, or the document refused before (not parsed again)


class ReloadObserver(Protocol):
    def config_reloaded(self, source: str, ok: bool) -> None: ...


class _NoObserver:
    def config_reloaded(self, source: str, ok: bool) -> None:
        pass


#: Runs ``function(*args)`` off the reactor thread; a Deferred with its result.
ThreadRunner = Callable[..., defer.Deferred]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _short(digest: str | None) -> str:
    """A digest for a log line; a failed read's reason is logged as the reason."""
    if digest is None or digest.startswith(_UNREADABLE):
        return "the same failure"
    return f"sha256 {digest[:16]}..."


@dataclass(frozen=True)
class Examined:
    """What the parse thread made of one document; built on the reactor thread."""

    digest: str
    configs: tuple[ProviderConfig, ...] | None = None
    error: str | None = None
    seen: str | None = None  # APPLIED or REFUSED: recognised by its digest, not parsed
    parsed: bool = False     # the parser ran (what the digests exist to save)


def examine(read: Callable[[], bytes], source: str, env: dict[str, str] | None,
            limits: DocumentLimits, applied: str | None, refused: str | None,
            force: bool) -> Examined:
    """Read, hash and (unless already known) parse one document.  Thread-safe and pure
    apart from ``read``: never touches the reactor or the live providers.

    A ``read`` that fails (no file, a body over the cap) gives its reason instead of a
    digest, so the same failure is recognised, and counted, once.
    """
    data: bytes | None
    try:
        data = read()
    except ConfigError as error:
        data, reason = None, str(error)
        digest = _UNREADABLE + reason
    else:
        digest = _digest(data)
    if not force and digest == applied:
        return Examined(digest, seen=APPLIED)
    if not force and digest == refused:
        return Examined(digest, seen=REFUSED)
    if data is None:
        return Examined(digest, error=reason)
    try:
        return Examined(digest, configs=tuple(
            parse_provider_document(data, source, env, limits)), parsed=True)
    except ConfigError as error:
        oversized = isinstance(error, DocumentRefused) and error.limit == BYTES
        return Examined(digest, error=str(error), parsed=not oversized)


class ProviderReloader:
    """Turns a provider document into the live ``ProviderSet``, or keeps the old one.

    One document is examined at a time (a ``DeferredLock``), so reloads apply in the
    order they were asked for and configuration holds at most one thread.
    """

    def __init__(self, directory: ProviderDirectory, *, resources: Resources,
                 env: dict[str, str] | None = None,
                 extra: Sequence[ProviderConfig] = (),
                 observer: ReloadObserver | None = None,
                 loaded: bool = True, grace: float = RETIRE_GRACE,
                 limits: DocumentLimits = DEFAULT_LIMITS,
                 run_in_thread: ThreadRunner | None = None):
        self._directory = directory
        self._resources = resources
        self._reactor = resources.reactor
        self._env = env
        self._extra = tuple(extra)  # always appended (the --demo provider)
        self._observer = observer or _NoObserver()
        self._limits = limits
        self._run_in_thread = run_in_thread or resources.in_thread
        self._lock = defer.DeferredLock()
        self.grace = grace
        self._retiring: dict[Any, tuple[tuple[Provider, ...], Any]] = {}
        self._stopped = False
        #: Whether a configuration has been loaded at all (for /readyz).
        self.loaded = loaded
        #: SHA-256 of the document in use, and of the last one refused.
        self.applied_digest: str | None = None
        self.refused_digest: str | None = None
        #: Documents actually parsed (not recognised by their digest): what a poll costs.
        self.parsed = 0
        self._last_failure: tuple[str, str] | None = None
        self._last_failure_logged = float("-inf")
        self._refused_reason: str | None = None
        self._refused_logged = float("-inf")

    @property
    def limits(self) -> DocumentLimits:
        return self._limits

    @property
    def examining(self) -> bool:
        """Whether a document is being read, parsed or built right now."""
        return self._lock.locked

    def remember_applied(self, document: bytes) -> None:
        """The startup document (parsed before the reactor ran): not parsed again."""
        self.applied_digest = _digest(document)

    def load(self, read: Callable[[], bytes], source: str, kind: str,
             force: bool = False) -> defer.Deferred:
        """Examine ``read()`` in a thread, then build and swap it in on the reactor.

        Fires with APPLIED, UNCHANGED or REFUSED; never fails.  ``force`` (SIGHUP)
        parses and applies even a document seen before.
        """
        return self._lock.run(
            lambda: defer.ensureDeferred(self._load(read, source, kind, force)))

    async def _load(self, read: Callable[[], bytes], source: str, kind: str,
                    force: bool) -> str:
        if self._stopped:
            return UNCHANGED
        try:
            examined: Examined = await self._run_in_thread(
                examine, read, source, self._env, self._limits,
                self.applied_digest, self.refused_digest, force)
        except defer.CancelledError:
            return UNCHANGED
        except Exception:
            log.failure("provider configuration from {source}: unexpected error",
                        source=source)
            self.failed(kind, source, "unexpected error (see the traceback above)")
            return REFUSED
        if self._stopped:
            return UNCHANGED
        if examined.parsed:
            self.parsed += 1
        if examined.seen == APPLIED:
            if self._last_failure is not None:  # back to the document in use: healthy
                self._last_failure = None
                log.info("provider configuration from {source} is the one in use again",
                         source=source)
                notify(self._observer.config_reloaded, kind, True)
            return UNCHANGED
        if examined.seen == REFUSED:
            self.remind(source)
            return REFUSED
        if examined.error is not None:
            return self._refuse(examined.digest, kind, source, examined.error)
        return self._apply(examined, source, kind)

    def _apply(self, examined: Examined, source: str, kind: str) -> str:
        # Only a document that parsed reaches here (no error, not seen): it has configs.
        assert examined.configs is not None
        try:
            result = build_providers([*examined.configs, *self._extra],
                                     previous=self._directory.current,
                                     resources=self._resources)
        except ConfigError as error:
            return self._refuse(examined.digest, kind, source, str(error))
        except Exception:
            log.failure("provider configuration from {source}: unexpected error", source=source)
            return self._refuse(examined.digest, kind, source,
                                "unexpected error (see the traceback above)")
        previous = self._directory.replace(result.providers)
        self.loaded = True
        self.applied_digest = examined.digest
        # going back to the refused document later is a change: it is examined again
        self.refused_digest = self._refused_reason = None
        self._last_failure = None
        self._retire(result.removed)
        self._log_changes(source, previous, result)
        notify(self._observer.config_reloaded, kind, True)
        return APPLIED

    def _refuse(self, digest: str, kind: str, source: str, reason: str) -> str:
        self.refused_digest, self._refused_reason = digest, reason
        self._refused_logged = self._reactor.seconds()
        self.failed(kind, source, reason)
        return REFUSED

    def failed(self, kind: str, source: str, reason: str) -> None:
        """A reload that could not happen: counted, nothing changes, and logged with its
        reason -- once, then again only every ``REMIND_SECONDS`` while it repeats."""
        now = self._reactor.seconds()
        if (self._last_failure == (source, reason)
                and now - self._last_failure_logged < REMIND_SECONDS):
            log.debug("provider configuration from {source} NOT loaded (again): {reason}",
                      source=source, reason=reason)
        else:
            log.warn("provider configuration from {source} NOT loaded, keeping the last "
                     "good one: {reason}", source=source, reason=reason)
            self._last_failure, self._last_failure_logged = (source, reason), now
        notify(self._observer.config_reloaded, kind, False)

    def remind(self, source: str) -> None:
        """The source still offers the document refused before (not parsed again): a
        debug line, and a warning at most every ``REMIND_SECONDS``."""
        now = self._reactor.seconds()
        if self._refused_reason is None or now - self._refused_logged < REMIND_SECONDS:
            log.debug("{source}: the refused document again, not parsed", source=source)
            return
        self._refused_logged = now
        log.warn("provider configuration from {source} is still the refused document "
                 "({digest}), not examined again; keeping the last good one: {reason}",
                 source=source, digest=_short(self.refused_digest), reason=self._refused_reason)

    @staticmethod
    def _log_changes(source: str, previous, result) -> None:
        old = {p.meta.name for p in previous.providers}
        new = {p.meta.name for p in result.providers.providers}
        replaced = {p.meta.name for p in result.added} & old
        added = sorted(new - old)
        removed = sorted(old - new)
        kept = len(new) - len(added) - len(replaced)
        log.info("provider configuration reloaded from {source}: {count} provider(s); "
                 "added {added}, changed {changed}, removed {removed}, {kept} unchanged",
                 source=source, count=len(new), added=added or "none",
                 changed=sorted(replaced) or "none", removed=removed or "none", kept=kept)

    def _retire(self, removed: Iterable[Provider]) -> None:
        removed = tuple(removed)
        if not removed:
            return
        key = object()
        call = self._reactor.callLater(self.grace, self._stop_retired, key)
        self._retiring[key] = (removed, call)

    def _stop_retired(self, key) -> defer.Deferred:
        removed, _ = self._retiring.pop(key)
        return stop_providers(removed)

    def stop(self) -> defer.Deferred:
        """Stop every provider still waiting out its grace period (service shutdown),
        after the document being examined, if any, is done (within its deadline)."""
        self._stopped = True

        def stop_retiring(_) -> defer.Deferred:
            stops = []
            for key, (_, call) in list(self._retiring.items()):
                if call.active():
                    call.cancel()
                stops.append(self._stop_retired(key))
            return defer.DeferredList(stops).addCallback(lambda _: None)
        return self._lock.run(lambda: None).addCallback(stop_retiring)


def stop_providers(providers: Iterable[Provider]) -> defer.Deferred:
    """Stop each provider; failures are logged, never raised."""
    def logged(failure: Failure, provider: Provider) -> None:
        log.failure("stopping provider {provider} failed", failure,
                    provider=provider.meta.name)

    stops = [defer.maybeDeferred(p.stopProvider).addErrback(logged, p)
             for p in providers if hasattr(p, "stopProvider")]
    return defer.DeferredList(stops).addCallback(lambda _: None)


class FileWatcher:
    """Polls the provider file and hands changed content to the reloader.

    ``stat`` runs on the reactor (cheap, no data); reading and hashing run in the
    reloader's thread, so a large file never blocks it.
    """

    def __init__(self, path: str, reloader: ProviderReloader, *, interval: float,
                 reactor: Any):
        self.path = path
        self._reloader = reloader
        self._interval = interval
        self._read = partial(read_document, path, reloader.limits)
        self._stat = self._fingerprint()
        self._busy: defer.Deferred | None = None
        self._remember_startup_document()
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor

    def _remember_startup_document(self) -> None:
        # Built before the reactor runs, from the file the startup load just parsed.
        try:
            self._reloader.remember_applied(self._read())
        except ConfigError:
            pass  # no file at startup: the first one that appears is parsed

    def _fingerprint(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """One poll: re-read only when the stat changed or cannot be trusted yet."""
        if self._busy is not None:
            return  # the stat is compared again at the next tick
        stat = self._fingerprint()
        racy = stat is not None and time.time_ns() - stat[0] < RACY_NANOSECONDS
        if stat == self._stat and not racy:
            return
        self._stat = stat
        self._busy = self._load(force=False)

        def done(result):
            self._busy = None
            return result
        self._busy.addBoth(done)

    def reload(self) -> defer.Deferred:
        """SIGHUP: re-read and re-apply even if nothing seems to have changed; fires
        with the outcome once this reload (queued behind any other) is done."""
        self._stat = self._fingerprint()
        return self._load(force=True)

    def _load(self, force: bool) -> defer.Deferred:
        return self._reloader.load(self._read, self.path, FILE, force=force)


class ConfigServicePoller:
    """Polls ``--config-svc`` and hands new documents to the reloader.

    ``If-None-Match`` and ``If-Modified-Since`` carry the ``ETag`` and ``Last-Modified``
    of the last document the service sent, whether it loaded or was refused (a body over
    the byte cap included), so an unchanged config costs a 304 and a refused one is
    neither downloaded nor parsed again; a service without validators still costs no
    parse (the reloader knows the digests).  The deadline covers connect, headers and
    body; redirects are not followed (the bearer token must not travel to another host).
    """

    def __init__(self, url: str, reloader: ProviderReloader, *, interval: float,
                 timeout: float, token: str | None, reactor: Any,
                 http_client: HTTPClientFactory | None = None):
        """``http_client`` (``Resources.http_client``) makes the client; without it,
        one over ``reactor`` with the same hygiene (``esmtpfa.common.httpclient``)."""
        self.url = url
        self.source = redact_url(url)
        self._reloader = reloader
        self._interval = interval
        self._timeout = timeout
        self._token = token
        self._reactor = reactor
        self._client, self._pool = (http_client or partial(new_http_client, reactor))(timeout)
        self._etag: bytes | None = None
        self._last_modified: bytes | None = None
        self._refused = False  # the document the validators describe was refused
        self._inflight: defer.Deferred | None = None
        self._stopped = False
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor

    def start(self) -> None:
        self._stopped = False
        self._loop.start(self._interval, now=True)

    def stop(self) -> defer.Deferred:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._inflight is not None:
            self._inflight.cancel()
        return self._pool.closeCachedConnections()

    def poll(self) -> defer.Deferred:
        """One poll (never fails); a poll already under way is not started twice."""
        if self._inflight is not None or self._stopped:
            return defer.succeed(None)
        self._inflight = defer.ensureDeferred(self._poll())

        def done(_):
            self._inflight = None
        return self._inflight.addBoth(done)

    def _headers(self) -> dict[bytes | str, bytes | str]:
        headers: dict[bytes | str, bytes | str] = {
            "Accept": "application/json, application/yaml;q=0.9, */*;q=0.1"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag.decode("latin-1")
        if self._last_modified is not None:
            headers["If-Modified-Since"] = self._last_modified.decode("latin-1")
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _poll(self) -> None:
        from esmtpfa.common.httpclient import BodyTooLarge, describe_failure, read_body, timed_out
        limit = self._reloader.limits.max_bytes

        def body_of(response):
            def too_large(failure: Failure):
                failure.trap(BodyTooLarge)
                return response, None
            return read_body(response, limit).addCallbacks(
                lambda body: (response, body), too_large)

        d = self._client.get(self.url, headers=self._headers(), allow_redirects=False,
                             unbuffered=True, reactor=self._reactor)
        d.addCallback(body_of)
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)
        try:
            response, body = await d
        except Exception:
            if self._stopped:
                return  # cancelled by stop(): not a failed reload
            failure = Failure()
            if failure.check(defer.TimeoutError):
                reason = f"timed out after {self._timeout:g} s"
            else:
                reason = describe_failure(failure)
            self._reloader.failed(SERVICE, self.source, reason)
            return
        if response.code == 304:
            log.debug("{source}: not modified", source=self.source)
            if self._refused:
                self._reloader.remind(self.source)
            return
        if response.code != 200:
            self._reloader.failed(SERVICE, self.source, f"HTTP {response.code}")
            return
        outcome = await _shielded(self._reloader.load(
            partial(_served, body, self.source, limit), self.source, SERVICE))
        if self._stopped:
            return
        self._refused = outcome == REFUSED
        self._etag = (response.headers.getRawHeaders(b"etag") or [None])[0]
        self._last_modified = (response.headers.getRawHeaders(b"last-modified") or [None])[0]


def _served(body: bytes | None, source: str, limit: int) -> bytes:
    """The ``read`` of a document the service sent: ``None`` was a body over the cap."""
    if body is None:
        raise DocumentRefused(source, f"larger than {limit} bytes", BYTES)
    return body


def _shielded(d: defer.Deferred) -> defer.Deferred:
    """A Deferred with ``d``'s result whose cancellation leaves ``d`` running: stopping a
    poll must not cancel a parse that holds the reloader's lock (it ends by itself within
    its deadline, and ``ProviderReloader.stop`` waits for it)."""
    shield: defer.Deferred = defer.Deferred()

    def forward(result):
        if not shield.called:
            shield.callback(result)
    d.addBoth(forward)
    return shield


class _StartupSighup:
    """SIGHUP's handler from ``makeService`` until the reload service starts.

    The listeners accept connections before the reload service is started (twistd binds
    them in ``privilegedStartService``; the supervisor of ``--workers`` binds its sockets
    when it is built).  Without a handler, a SIGHUP in that window (``systemctl reload``
    or a log rotation's postrotate right after a start) would end the process: SIGHUP's
    default action.  This handler only notes the signal; ``SighupReload.install`` takes
    over and reloads once for it."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum, frame) -> None:
        self.received = True

    def install(self) -> None:
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self)

    def take(self) -> bool:
        """Whether a SIGHUP came during startup; forgets it."""
        received, self.received = self.received, False
        return received


#: Installed by ``esmtpfa.runtime.tap.makeService`` before any listener is bound.
startup_sighup = _StartupSighup()


class SighupReload:
    """Runs ``callback`` on the reactor thread whenever the process gets SIGHUP.

    The handler only schedules the work (``callFromThread`` is safe in a signal handler:
    it queues the call and wakes the reactor), so a reload never runs in the middle of
    whatever the reactor was doing.  The reactor itself only claims SIGINT, SIGTERM and
    SIGCHLD, so installing before ``reactor.run()`` (twistd calls ``startService``
    first) is safe; the previous handler is restored on ``uninstall``.  Off the main
    thread, where Python cannot set handlers, SIGHUP is not available.
    """

    def __init__(self, reactor: Any, callback: Callable[[], object]):
        self._reactor = reactor
        self._callback = callback
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if self._installed or not hasattr(signal, "SIGHUP"):
            return
        if threading.current_thread() is not threading.main_thread():
            log.warn("not on the main thread: SIGHUP will not reload the configuration")
            return
        self._previous = signal.signal(signal.SIGHUP, self._received)
        self._installed = True
        if self._previous is startup_sighup and startup_sighup.take():
            log.info("SIGHUP came during startup: reloading now")
            self._reactor.callFromThread(self._run)

    def _received(self, signum, frame) -> None:
        self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        if self._installed:
            log.info("SIGHUP: reloading the provider configuration and the TLS certificates")
            self._callback()

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None
                          else signal.SIG_DFL)
            self._installed = False


class ReloadService(Service):
    """Runs the configuration sources of one relay: the file watcher or the config
    service poller, and SIGHUP, which reloads whichever is in use at once, and calls
    each of ``also`` (the TLS certificates: ``esmtpfa.common.certificates``)."""

    name = "reload"

    def __init__(self, reloader: ProviderReloader, *, reactor: Any,
                 watcher: FileWatcher | None = None,
                 poller: ConfigServicePoller | None = None,
                 also: Sequence[Callable[[], Any]] = ()):
        self.reloader = reloader
        self.watcher = watcher
        self.poller = poller
        self.also = tuple(also)
        self._sighup = SighupReload(reactor, self.reload_now)

    def reload_now(self) -> defer.Deferred:
        """Reload from whichever source is in use; fires once that reload is done."""
        reloads = [defer.maybeDeferred(reload) for reload in self.also]
        if self.watcher is not None:
            reloads.append(self.watcher.reload())
        if self.poller is not None:
            reloads.append(self.poller.poll())
        return defer.gatherResults(reloads).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        if self.watcher is not None:
            self.watcher.start()
        if self.poller is not None:
            self.poller.start()
        self._sighup.install()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._sighup.uninstall()
        if self.watcher is not None:
            self.watcher.stop()
        stopped = self.poller.stop() if self.poller is not None else defer.succeed(None)
        return stopped.addBoth(lambda _: self.reloader.stop())


__all__ = ["APPLIED", "REFUSED", "UNCHANGED", "ConfigServicePoller", "FileWatcher",
           "ProviderReloader", "ReloadService", "SighupReload", "startup_sighup",
           "stop_providers"]
