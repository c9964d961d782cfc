"""Liveness and readiness (docs/design.md §1): ``/status``, ``/healthz`` and ``/readyz``.

``/status`` and ``/healthz`` answer ``200 ok`` whenever the reactor answers at all: a
process that can serve them is alive.  ``/readyz`` says whether sending mail can work
right now: providers are loaded (or anonymous submission is allowed) and an upstream
session can be had (the Maildir is writable when there is no upstream).

The relay's own pools and breakers answer that without any I/O: not ready when every
breaker is open or every pool is exhausted, ready while sessions are open or one was used
recently (``RelayProbe``).  Only when they know nothing (no message needed a session
lately) does a TCP probe ask the preferred upstream; it is cached for ``PROBE_CACHE``
seconds, concurrent probes share one attempt, and it logs nothing when it works.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from esmtpfa.logs import logger

log = logger("esmtpfa.web")

PROBE_TIMEOUT = 3.0
PROBE_CACHE = 30.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    #: A failure that settles readiness alone: ``/readyz`` answers at once, asking nothing
    #: else (a relay shutting down must leave the load balancer's rotation now).
    decisive: bool = False


#: What the providers check says from SIGTERM on (docs/smtp-limits.md, "Shutdown").
SHUTTING_DOWN = Check(False, "shutting down: finishing the sessions in progress, "
                             "accepting no new ones", decisive=True)


class UpstreamProbe:
    """Can a TCP connection to the upstream be opened?  (Cached for ``ttl`` seconds.)"""

    def __init__(self, reactor: Any, host: str, port: int, *,
                 timeout: float = PROBE_TIMEOUT, ttl: float = PROBE_CACHE):
        self._reactor = reactor
        self._host, self._port = host, port
        self._timeout = timeout
        self.ttl = ttl
        self._cached: tuple[float, Check] | None = None
        self._waiting: list[defer.Deferred] | None = None

    def check(self) -> defer.Deferred:
        now = self._reactor.seconds()
        if self._cached is not None and now - self._cached[0] < self.ttl:
            return defer.succeed(self._cached[1])
        waiter: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        endpoint = HostnameEndpoint(self._reactor, self._host, self._port,
                                    timeout=self._timeout)
        d = endpoint.connect(_QuietFactory())
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(self._connected, self._failed)
        return waiter

    def _connected(self, protocol: Protocol) -> None:
        protocol.transport.loseConnection()
        self._done(Check(True, f"{self._host}:{self._port} accepts connections"))

    def _failed(self, failure) -> None:
        reason = getattr(failure.value, "osError", None) or failure.value
        detail = str(reason) or type(failure.value).__name__
        self._done(Check(False, f"{self._host}:{self._port} unreachable: {detail}"))

    def _done(self, check: Check) -> None:
        self._cached = (self._reactor.seconds(), check)
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(check)


class _QuietFactory(Factory):
    """A probe's factory: no "Starting factory" / "Stopping factory" lines per probe."""

    noisy = False
    protocol = Protocol


class _Wrapping:
    """A probe that asks another one: ``ttl`` (how long an answer is kept) is the inner
    probe's, which is the one that caches."""

    def __init__(self, inner: Any):
        self._inner = inner

    @property
    def ttl(self) -> float:
        return self._inner.ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:
        self._inner.ttl = seconds


class RelayProbe(_Wrapping):
    """Readiness from what the relay knows (``SMTPRelay.readiness``), probing only when
    it knows nothing: a probing load balancer never costs the smarthost a connection
    while mail is flowing."""

    def __init__(self, relay: Any, fallback: UpstreamProbe):
        super().__init__(fallback)
        self._relay = relay

    def check(self) -> defer.Deferred:
        ready, detail = self._relay.readiness()
        if ready is None:
            return self._inner.check()
        return defer.succeed(Check(ready, detail))


class MaildirProbe:
    """Without an upstream, mail goes to the Maildir: can we write there?"""

    def __init__(self, path: str):
        self._path = path

    def check(self) -> defer.Deferred:
        path = self._path
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)  # created on first delivery: its parent counts
        if os.access(path, os.W_OK | os.X_OK):
            return defer.succeed(Check(True, f"Maildir {self._path} is writable"))
        return defer.succeed(Check(False, f"Maildir {self._path} is not writable"))


class SpoolProbe(_Wrapping):
    """Readiness in the spooling modes: ready while the spool can store a message,
    whatever the upstream does (taking mail while the upstream is down is the spool's
    point); the upstream's state is said beside it."""

    def __init__(self, spool: Any, upstream: Any):
        super().__init__(upstream)
        self._spool = spool

    def check(self) -> defer.Deferred:
        refused = self._spool.accepting()
        why = refused.detail if refused is not None else "accepting messages"

        def answer(upstream: Check) -> Check:
            return Check(refused is None, f"spool: {why}; upstream: {upstream.detail}")
        return self._inner.check().addCallback(answer)


def _text(request, code: int, body: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body.encode("utf-8")


class OkResource(Resource):
    """``/status`` (the original's) and ``/healthz``: the process is alive."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        return _text(request, 200, "ok")

    render_HEAD = render_GET


class ReadyResource(Resource):
    """``/readyz``: 200 when mail can flow, 503 with the failing check otherwise."""

    isLeaf = True

    def __init__(self, providers: Callable[[], Check], upstream):
        super().__init__()
        self._providers = providers
        self._upstream = upstream

    def render_GET(self, request):
        providers = self._providers()
        if providers.decisive and not providers.ok:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return json.dumps({"ready": False, "checks": {"shutdown": {
                "ok": False, "detail": providers.detail}}}).encode() + b"\n"
        gone: list[bool] = []  # the client left while we checked: nothing to write to
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self._upstream.check()

        def answer(upstream: Check) -> None:
            ready = providers.ok and upstream.ok
            body = {"ready": ready, "checks": {
                "providers": {"ok": providers.ok, "detail": providers.detail},
                "upstream": {"ok": upstream.ok, "detail": upstream.detail}}}
            if not gone:
                request.setResponseCode(200 if ready else 503)
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"cache-control", b"no-store")
                request.write(json.dumps(body).encode() + b"\n")
                request.finish()

        d.addCallback(answer)
        d.addErrback(lambda failure: log.failure("/readyz failed", failure))
        return NOT_DONE_YET


__all__ = ["Check", "MaildirProbe", "OkResource", "ReadyResource", "RelayProbe",
           "SHUTTING_DOWN", "SpoolProbe", "UpstreamProbe"]
