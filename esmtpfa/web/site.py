"""The two HTTP listeners' resource trees and ``Site`` factories.

* the **submission** site: ``POST /`` (``web.submission``), on ``--http-port``;
* the **metrics** site: ``/metrics``, ``/status``, ``/healthz``, ``/readyz``, on
  ``--metrics-port``, always on (SPEC §1), even when no listener accepts mail.

twisted.web reads a request body whole before any resource sees it, so the size limit
lives in the channel: a declared ``Content-Length`` over the limit gets ``413`` as soon as
the headers are in (no ``100 Continue``, nothing buffered), and a chunked body is
counted as it arrives.  After a 413 the rest of the body is read and dropped (bounded in
size and time) so the client sees the answer instead of a connection reset.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from esmtpfa.metrics import CONTENT_TYPE, RelayMetrics
from esmtpfa.web.health import Check, OkResource, ReadyResource
from esmtpfa.web.submission import SubmissionResource, body_limit, too_large

#: After a 413, drop at most this much of the body, for at most this long, then hang up.
DRAIN_LIMIT = 4 * 1024 * 1024
DRAIN_SECONDS = 10.0


class QuietSite(Site):
    """No access log: the resources log each request with its id (and scrapes are noise)."""

    noisy = False

    def log(self, request) -> None:
        pass


# -- submission ----------------------------------------------------------------------------

class SubmissionChannel(HTTPChannel):
    """An HTTP/1.1 channel that refuses an oversized body before reading it."""

    _refused = False
    _drain_left = 0
    _drain_all = False
    _drain_timer: Any = None

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self.refuse_body(self.length)
            return
        super().allHeadersReceived()

    def refuse_body(self, declared: int | None) -> None:
        if self._refused:
            return
        self._refused = True
        self.persistent = False
        self.setTimeout(None)
        body = json.dumps({"error": self.site.too_large_message}).encode() + b"\n"
        self.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self._drain_left = DRAIN_LIMIT if declared is None else min(declared, DRAIN_LIMIT)
        self._drain_all = declared is not None and declared <= DRAIN_LIMIT
        self._drain_timer = self.callLater(DRAIN_SECONDS, self.transport.abortConnection)
        self._networkProducer.resumeProducing()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)
            return
        self._drain_left -= len(data)
        if self._drain_left <= 0:
            if self._drain_all:
                self.body_drained()  # the client sent what it declared: a clean close
            else:
                self.transport.abortConnection()

    def body_drained(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        super().connectionLost(reason)


class SubmissionRequest(Request):
    """Counts a chunked body against the limit as it arrives."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or channel._refused:
            return
        self._received += len(data)
        if self._received > channel.site.max_body:
            channel.refuse_body(None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.channel is not None and self.channel._refused:
            self.channel.body_drained()  # the whole (refused) body has been read
            return
        super().requestReceived(command, path, version)


class SubmissionSite(QuietSite):
    protocol = SubmissionChannel
    requestFactory = SubmissionRequest

    def __init__(self, resource: Resource, *, max_body: int, too_large_message: str,
                 timeout: float, reactor: Any = None):
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body = max_body
        self.too_large_message = too_large_message


def submission_site(portal, settings, *, allow_anonymous: bool, reactor: Any = None) -> Site:
    resource = SubmissionResource(portal, settings, allow_anonymous=allow_anonymous)
    return SubmissionSite(
        resource, max_body=body_limit(settings), timeout=settings.idle_timeout,
        too_large_message=too_large(settings).message,
        reactor=reactor)


# -- metrics and health --------------------------------------------------------------------

class MetricsSite(QuietSite):
    """``/metrics`` and the health endpoints (named for the "starting on" log line)."""

class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: RelayMetrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request) -> bytes:
        # Rendering is fast and in-memory: no thread pool needed (TWISTED-NOTES).
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self._metrics.render()


def metrics_site(metrics: RelayMetrics, providers: Callable[[], Check], upstream,
                 reactor: Any = None) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"status", OkResource())
    root.putChild(b"healthz", OkResource())
    root.putChild(b"readyz", ReadyResource(providers, upstream))
    return MetricsSite(root, timeout=60, reactor=reactor)


__all__ = ["MetricsSite", "SubmissionSite", "metrics_site", "submission_site"]
