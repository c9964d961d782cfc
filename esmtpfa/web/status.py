"""``/status``: what this relay is doing, as JSON, for an operator (docs/metrics.md, "Health").

``/readyz`` answers one question for a load balancer (can this replica take mail?) and
``/metrics`` is for Prometheus; ``/status`` is what an operator reads during an incident:
sessions in flight, each upstream's pool and circuit breaker, each OAuth2 token's
lifetime, which configuration is applied, the spool's counts.  It is served on the
metrics listener, so it is reachable exactly where ``/metrics`` is (loopback by default,
a network policy in the shipped manifests).

It names no person and holds no secret: no mail address, no client address, no
username, no token (an OAuth2 token is said by when it expires, never by its value) and
the configuration by a short prefix of its SHA-256, as the reload log lines do.
Upstreams are named by their configured ``host:port``, as the metrics label them.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.web.resource import Resource

from esmtpfa import __version__
from esmtpfa.web.health import json_response
from esmtpfa.web.metrics import RelayMetrics, breaker_state

#: Hex digits of the configuration's SHA-256 shown (as the reload log lines do).
DIGEST_PREFIX = 16


def _when(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(
        timespec="seconds")


@dataclass
class RelayStatus:
    """The parts of one relay process ``/status`` reads (callables: read at request time)."""

    metrics: RelayMetrics
    smtp_sessions: Callable[[], Mapping[str, int]]
    http_sessions: Callable[[], int]
    upstreams: Callable[[], Sequence[Any]]
    config_digest: Callable[[], str | None]
    providers: Callable[[], int]
    draining: Callable[[], bool]
    wall: Callable[[], float] = time.time

    def document(self) -> dict[str, Any]:
        metrics = self.metrics
        digest = self.config_digest()
        document: dict[str, Any] = {
            "version": __version__,
            "draining": self.draining(),
            "sessions": {"smtp": dict(sorted(self.smtp_sessions().items())),
                         "http": self.http_sessions()},
            "config": {
                "generation": metrics.config_generation,
                "sha256_prefix": digest[:DIGEST_PREFIX] if digest else None,
                "providers": self.providers(),
                "last_load_ok": metrics.config_ok,
            },
            "upstreams": {u.address: self._upstream(u) for u in self.upstreams()},
        }
        tokens = self._tokens()
        if tokens:
            document["oauth2"] = tokens
        spool = self._spool()
        if spool is not None:
            document["spool"] = spool
        return document

    @staticmethod
    def _upstream(upstream: Any) -> dict[str, Any]:
        usage = upstream.pool.usage()
        return {"pool": {"open": usage["idle"] + usage["busy"] + usage["opening"],
                         "idle": usage["idle"], "busy": usage["busy"],
                         "opening": usage["opening"], "waiting": usage["waiting"],
                         "max": upstream.pool.settings.size},
                "breaker": {"state": breaker_state(upstream.breaker),
                            "consecutive_failures": upstream.breaker.consecutive}}

    def _tokens(self) -> dict[str, Any]:
        now = self.wall()
        tokens = {}
        for upstream, deadline in sorted(self.metrics.token_deadlines().items()):
            valid = deadline > now
            tokens[upstream] = {
                "state": "valid" if valid else "none",
                "valid_until": _when(deadline) if valid else None,
                "expires_in_seconds": int(deadline - now) if valid else 0,
                "last_refresh": self.metrics.token_results.get(upstream)}
        return tokens

    def _spool(self) -> dict[str, Any] | None:
        stats = self.metrics.latest_spool_stats()
        if stats is None:
            return None
        spool: dict[str, Any] = {state: stats.messages.get(state, 0)
                                 for state in ("queued", "held")}
        if stats.bytes is not None:
            spool["bytes"] = stats.bytes
            oldest = stats.oldest_received
            spool["oldest_message_age_seconds"] = (
                max(int(self.wall() - oldest), 0) if oldest is not None else 0)
        return spool


class StatusResource(Resource):
    """``/status``: ``document()`` of whatever it is given, as JSON."""

    isLeaf = True

    def __init__(self, document: Callable[[], Any]):
        super().__init__()
        self._document = document

    def render_GET(self, request) -> bytes:
        return json_response(request, 200, self._document())

    render_HEAD = render_GET


__all__ = ["RelayStatus", "StatusResource"]
