"""Liveness and readiness (docs/metrics.md, "Health"): ``/healthz`` and ``/readyz``.

``/healthz`` answers ``200 ok`` whenever the reactor answers at all: a process that can
serve it is alive.

``/readyz`` says whether **this replica** can take mail: its listeners are bound, its
configuration is loaded, and what it keeps itself works (an OAuth2 token can be had
where an upstream logs in with one, the spool or the Maildir can be written to).  It
never asks an upstream, and never follows one.  The upstream is shared by every
replica: were readiness to follow it, every replica would turn unready at once when it
fails, the load balancer would have nobody left to send clients to, and they would hear
a refused connection instead of the ``451`` that makes them retry.  Upstream health is
in ``/status`` and the metrics (``upstream_breaker_state``, ``upstream_pool_*``).

Every check reads state this process keeps (at most a ``stat``), so a probe costs
nothing, and the answer changes the moment the state does: no cache.

The two resources here are the only ``/healthz`` and ``/readyz`` there are.  A single
process hands them its own checks; a supervisor of workers hands them checks that ask
its workers (``esmtpfa.runtime.workers.supervisor``), which may answer later: a readiness
answering a ``Deferred`` is written when it fires.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from esmtpfa.common import internals
from esmtpfa.common.logs import logger

log = logger("esmtpfa.web")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    #: A failure that settles readiness alone: ``/readyz`` answers at once, asking nothing
    #: else (a relay shutting down must leave the load balancer's rotation now).
    decisive: bool = False


#: What a process that answers at all says of itself.
ALIVE = Check(True, "ok")

#: What the configuration check says from SIGTERM on (docs/smtp-limits.md, "Shutdown").
SHUTTING_DOWN = Check(False, "shutting down: finishing the sessions in progress, "
                             "accepting no new ones", decisive=True)

#: A named check of this replica: a callable answering a ``Check`` at once.
NamedCheck = tuple[str, Callable[[], Check]]


class ReadinessSource(Protocol):
    """What ``/readyz`` asks: ``{"ready": …, "checks": {name: {"ok", "detail"}}}``, now
    or (a supervisor asking its workers) when the ``Deferred`` fires."""

    def as_json(self) -> dict[str, Any] | Deferred[dict[str, Any]]: ...


class Readiness:
    """This replica's checks, asked in order; the first decisive failure ends the list."""

    def __init__(self, checks: Iterable[NamedCheck]):
        self.checks: list[NamedCheck] = list(checks)

    def check(self) -> dict[str, Check]:
        answers: dict[str, Check] = {}
        for name, check in self.checks:
            answer = answers[name] = check()
            if answer.decisive and not answer.ok:
                return {name: answer}
        return answers

    def as_json(self) -> dict[str, Any]:
        """``{"ready": …, "checks": {name: {"ok", "detail"}}}``, as ``/readyz`` says it."""
        checks = self.check()
        return {"ready": all(check.ok for check in checks.values()),
                "checks": {name: {"ok": check.ok, "detail": check.detail}
                           for name, check in checks.items()}}


class ListenersCheck:
    """Every mail listener of this process is bound (or adopted, in a worker)."""

    def __init__(self, services: Callable[[], Sequence[Any]]):
        self._services = services

    def __call__(self) -> Check:
        services = list(self._services())
        waiting = [s.name for s in services if not _listening(s)]
        if waiting:
            return Check(False, "not listening yet: " + ", ".join(waiting))
        if not services:
            return Check(True, "no mail listener configured")
        return Check(True, "listening: " + ", ".join(s.name for s in services))


def _listening(service: Any) -> bool:
    if not service.running:
        return False
    if isinstance(service, StreamServerEndpointService):
        return internals.port_of(service).called
    return True  # an adopted socket is bound by the supervisor


class TokensCheck:
    """Upstreams that log in with OAuth2 (docs/oauth2.md): ready while at least one
    upstream can be used — it does not need a token, or its broker has a valid one or
    has not been refused one yet.  Not ready when every upstream needs a token and none
    can be had (a wrong client secret, a revoked grant): this replica could not relay."""

    def __init__(self, upstreams: Callable[[], Sequence[Any]]):
        self._upstreams = upstreams

    def __call__(self) -> Check:
        upstreams = list(self._upstreams())
        brokers = [(u, u.tokens.readiness()) for u in upstreams if u.tokens is not None]
        failing = [(u, detail) for u, (ok, detail) in brokers if ok is False]
        details = "; ".join(f"{u.address}: {detail}" for u, (_, detail) in brokers)
        if failing and len(failing) == len(upstreams):
            return Check(False, details)
        return Check(True, details or "no upstream logs in with OAuth2")


class MaildirCheck:
    """Without an upstream, mail goes to the Maildir: can we write there?"""

    def __init__(self, path: str):
        self._path = path

    def __call__(self) -> Check:
        path = self._path
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)  # created on first delivery: its parent counts
        if os.access(path, os.W_OK | os.X_OK):
            return Check(True, f"Maildir {self._path} is writable")
        return Check(False, f"Maildir {self._path} is not writable")


class SpoolCheck:
    """In the spooling modes: the spool can store a message (``Spool.accepting``)."""

    def __init__(self, spool: Any):
        self._spool = spool

    def __call__(self) -> Check:
        refused = self._spool.accepting()
        if refused is None:
            return Check(True, "the spool accepts messages")
        return Check(False, f"the spool refuses messages: {refused.detail}")


def _text(request, code: int, body: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body.encode("utf-8")


class LaterLeaf(Resource):
    """A leaf whose answer may come later: ``answer`` writes it when the ``Deferred``
    fires, and not at all if the client has left by then."""

    isLeaf = True

    def answer(self, request, d: Deferred, write: Callable[[Any, Any], bytes]) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(result: Any) -> None:
            if not gone:
                request.write(write(request, result))
                request.finish()
        d.addCallback(done).addErrback(
            lambda failure: log.failure("{path} failed", failure, path=request.path))
        return NOT_DONE_YET


class HealthResource(Resource):
    """``/healthz``: ``200 ok`` while ``alive()`` says so, else 503 with what it says.
    A single process is alive when it answers (``ALIVE``, the default)."""

    isLeaf = True

    def __init__(self, alive: Callable[[], Check] = lambda: ALIVE):
        super().__init__()
        self._alive = alive

    def render_GET(self, request) -> bytes:
        check = self._alive()
        return _text(request, 200, "ok") if check.ok else _text(request, 503, check.detail)

    render_HEAD = render_GET


class ReadyResource(LaterLeaf):
    """``/readyz``: 200 when this replica can take mail, 503 with the failing checks."""

    def __init__(self, readiness: ReadinessSource):
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request) -> Any:
        body = self._readiness.as_json()
        if isinstance(body, Deferred):
            return self.answer(request, body, _ready)
        return _ready(request, body)

    render_HEAD = render_GET


def _ready(request, body: dict[str, Any]) -> bytes:
    return json_response(request, 200 if body["ready"] else 503, body)


def json_response(request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


__all__ = [
    "ALIVE",
    "SHUTTING_DOWN",
    "Check",
    "HealthResource",
    "LaterLeaf",
    "ListenersCheck",
    "MaildirCheck",
    "Readiness",
    "ReadinessSource",
    "ReadyResource",
    "SpoolCheck",
    "TokensCheck",
    "json_response",
]
