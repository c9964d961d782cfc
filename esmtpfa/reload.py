"""Hot reload of the provider configuration (SPEC §7): file changes, SIGHUP, config service.

Every source ends in ``ProviderReloader.apply``, which parses and builds the whole new
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

The file is polled (stat, then a hash of the content when the stat changed or is too
recent to trust); SIGHUP reloads it at once.  The config service is polled with
``If-None-Match``, an optional bearer token and one deadline covering the body.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Protocol, Sequence

from hyperlink import URL
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from esmtpfa.auth.selection import ProviderDirectory
from esmtpfa.config import ProviderConfig, build_providers, parse_provider_document
from esmtpfa.logs import logger
from esmtpfa.providers.base import ConfigError, Provider

log = logger("esmtpfa.reload")

FILE = "file"
SERVICE = "service"

#: Seconds a removed provider keeps running for the logins that already chose it.
RETIRE_GRACE = 30.0
#: A provider document larger than this is refused (a config is kilobytes).
MAX_DOCUMENT = 4 * 1024 * 1024
#: A file modified this recently may change again within the same mtime tick: re-hash it.
RACY_NANOSECONDS = 2_000_000_000


class ReloadObserver(Protocol):
    def config_reloaded(self, source: str, ok: bool) -> None: ...


class _NoObserver:
    def config_reloaded(self, source: str, ok: bool) -> None:
        pass


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: those may carry credentials."""
    try:
        parsed = URL.from_text(url)
    except Exception:
        return "<config service>"
    return parsed.replace(userinfo="", query=(), fragment="").to_text()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ProviderReloader:
    """Turns a provider document into the live ``ProviderSet``, or keeps the old one."""

    def __init__(self, directory: ProviderDirectory, *, reactor: Any,
                 env: dict[str, str] | None = None,
                 extra: Sequence[ProviderConfig] = (),
                 observer: ReloadObserver | None = None,
                 loaded: bool = True, grace: float = RETIRE_GRACE):
        self._directory = directory
        self._reactor = reactor
        self._env = env
        self._extra = tuple(extra)  # always appended (the --demo provider)
        self._observer = observer or _NoObserver()
        self.grace = grace
        self._retiring: dict[Any, tuple[tuple[Provider, ...], Any]] = {}
        #: Whether a configuration has been loaded at all (for /readyz).
        self.loaded = loaded

    def apply(self, document: bytes, source: str, kind: str) -> bool:
        """Parse, build and swap in ``document``; False (and nothing changed) on error."""
        try:
            configs = parse_provider_document(document, source, self._env)
            result = build_providers([*configs, *self._extra],
                                     previous=self._directory.current, reactor=self._reactor)
        except ConfigError as error:
            self.failed(kind, source, str(error))
            return False
        except Exception:
            log.failure("provider configuration from {source}: unexpected error", source=source)
            self.failed(kind, source, "unexpected error (see the traceback above)")
            return False
        previous = self._directory.replace(result.providers)
        self.loaded = True
        self._retire(result.removed)
        self._log_changes(source, previous, result)
        self._observer.config_reloaded(kind, True)
        return True

    def failed(self, kind: str, source: str, reason: str) -> None:
        """A reload that could not happen: logged with its reason, counted, nothing changes."""
        log.warn("provider configuration from {source} NOT loaded, keeping the last good "
                 "one: {reason}", source=source, reason=reason)
        self._observer.config_reloaded(kind, False)

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
        """Stop every provider still waiting out its grace period (service shutdown)."""
        stops = []
        for key, (_, call) in list(self._retiring.items()):
            if call.active():
                call.cancel()
            stops.append(self._stop_retired(key))
        return defer.DeferredList(stops).addCallback(lambda _: None)


def stop_providers(providers: Iterable[Provider]) -> defer.Deferred:
    """Stop each provider; failures are logged, never raised."""
    def logged(failure: Failure, provider: Provider) -> None:
        log.failure("stopping provider {provider} failed", failure,
                    provider=provider.meta.name)

    stops = [defer.maybeDeferred(p.stopProvider).addErrback(logged, p)
             for p in providers if hasattr(p, "stopProvider")]
    return defer.DeferredList(stops).addCallback(lambda _: None)


class FileWatcher:
    """Polls the provider file and hands changed content to the reloader."""

    MISSING = "missing"

    def __init__(self, path: str, reloader: ProviderReloader, *, interval: float,
                 reactor: Any):
        self.path = path
        self._reloader = reloader
        self._interval = interval
        self._stat = self._fingerprint()
        self._digest = self._read_digest()
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor

    def _fingerprint(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def _read_digest(self) -> str:
        try:
            with open(self.path, "rb") as f:
                return _digest(f.read(MAX_DOCUMENT + 1))
        except OSError:
            return self.MISSING

    def start(self) -> None:
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """One poll: re-read only when the stat changed or cannot be trusted yet."""
        stat = self._fingerprint()
        racy = stat is not None and time.time_ns() - stat[0] < RACY_NANOSECONDS
        if stat == self._stat and not racy:
            return
        self._stat = stat
        self._load(force=False)

    def reload(self) -> None:
        """SIGHUP: re-read and re-apply even if nothing seems to have changed."""
        self._stat = self._fingerprint()
        self._load(force=True)

    def _load(self, force: bool) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_DOCUMENT + 1)
        except OSError as error:
            if self._digest != self.MISSING or force:  # count a disappearance once
                self._digest = self.MISSING
                self._reloader.failed(FILE, self.path,
                                      f"cannot read: {error.strerror or error}")
            return
        digest = _digest(data)
        if digest == self._digest and not force:
            return
        self._digest = digest
        if len(data) > MAX_DOCUMENT:
            self._reloader.failed(FILE, self.path, f"larger than {MAX_DOCUMENT} bytes")
            return
        self._reloader.apply(data, self.path, FILE)


class ConfigServicePoller:
    """Polls ``--config-svc`` and hands new documents to the reloader.

    ``If-None-Match`` carries the ETag of the last document that loaded, so an unchanged
    config costs a 304; a document identical to the loaded one is not re-applied.  The
    deadline covers connect, headers and body; redirects are not followed (the bearer
    token must not travel to another host).
    """

    def __init__(self, url: str, reloader: ProviderReloader, *, interval: float,
                 timeout: float, token: str | None, reactor: Any):
        from esmtpfa.providers.httpcheck import new_http_client
        self.url = url
        self.source = redact_url(url)
        self._reloader = reloader
        self._interval = interval
        self._timeout = timeout
        self._token = token
        self._reactor = reactor
        self._client, self._pool = new_http_client(reactor, timeout)
        self._etag: bytes | None = None
        self._digest: str | None = None
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

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, application/yaml;q=0.9, */*;q=0.1"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag.decode("latin-1")
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _poll(self) -> None:
        from esmtpfa.providers.httpcheck import describe_failure, read_body, timed_out
        d = self._client.get(self.url, headers=self._headers(), allow_redirects=False,
                             unbuffered=True, reactor=self._reactor)
        d.addCallback(lambda response: read_body(response, MAX_DOCUMENT).addCallback(
            lambda body: (response, body)))
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
            return
        if response.code != 200:
            self._reloader.failed(SERVICE, self.source, f"HTTP {response.code}")
            return
        etag = (response.headers.getRawHeaders(b"etag") or [None])[0]
        digest = _digest(body)
        if digest == self._digest:
            self._etag = etag
            return
        if self._reloader.apply(body, self.source, SERVICE):
            self._digest, self._etag = digest, etag


class SighupReload:
    """Runs ``callback`` on the reactor thread whenever the process gets SIGHUP.

    The handler only schedules the work (``callFromThread`` is safe in a signal handler:
    it queues the call and wakes the reactor), so a reload never runs in the middle of
    whatever the reactor was doing.  The reactor itself only claims SIGINT, SIGTERM and
    SIGCHLD, so installing before ``reactor.run()`` (twistd calls ``startService``
    first) is safe; the previous handler is restored on ``uninstall``.  Off the main
    thread, where Python cannot set handlers, SIGHUP is not available.
    """

    def __init__(self, reactor: Any, callback: Callable[[], None]):
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

    def _received(self, signum, frame) -> None:
        self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        if self._installed:
            log.info("SIGHUP: reloading the provider configuration")
            self._callback()

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None
                          else signal.SIG_DFL)
            self._installed = False


class ReloadService(Service):
    """Runs the configuration sources of one relay: the file watcher or the config
    service poller, and SIGHUP, which reloads whichever is in use at once."""

    name = "reload"

    def __init__(self, reloader: ProviderReloader, *, reactor: Any,
                 watcher: FileWatcher | None = None,
                 poller: ConfigServicePoller | None = None):
        self.reloader = reloader
        self.watcher = watcher
        self.poller = poller
        self._sighup = SighupReload(reactor, self.reload_now)

    def reload_now(self) -> None:
        if self.watcher is not None:
            self.watcher.reload()
        if self.poller is not None:
            self.poller.poll()

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


__all__ = ["ConfigServicePoller", "FileWatcher", "ProviderReloader", "ReloadService",
           "SighupReload", "redact_url", "stop_providers"]
