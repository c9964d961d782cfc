"""The two HTTP listeners' resource trees and factories.

* the **submission** listener: ``POST /`` (``web.submission``), on ``--http-port``;
* the **metrics** listener: ``/metrics``, ``/status``, ``/healthz``, ``/readyz``, on
  ``--metrics-port``, always on (docs/design.md, "Listeners, TLS and health"), even when no listener
  accepts mail.

Both use ``GuardedChannel`` (``web.channel``): deadlines per phase of a request that a
trickling client cannot push back, back-pressure, a close that is aborted when it cannot
complete, and bodies counted against a limit as they arrive, never written to a file
before they are admitted.  The submission channel logs the client in from its headers
before it reads the body (``web.loginfirst``).  Each listener's outermost factory is a
``CappedFactory`` (``web.bounds``) that closes connections over the total and
per-address caps before TLS or HTTP sees them.  Every error is a JSON body.
``docs/http-limits.md`` has the whole design.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from esmtpfa.common import internals
from esmtpfa.common.observers import notify
from esmtpfa.common.resources import Resources
from esmtpfa.limits.interfaces import IConnectionLedger
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.web.bounds import CappedFactory, HTTPLimits
from esmtpfa.web.channel import BoundedRequest, GuardedChannel, GuardedRequest
from esmtpfa.web.errors import HTTPError, send_error
from esmtpfa.web.health import HealthResource, Readiness, ReadyResource
from esmtpfa.web.login import HeaderLogin
from esmtpfa.web.loginfirst import SubmissionChannel, SubmissionRequest
from esmtpfa.web.metrics import CONTENT_TYPE, RelayMetrics
from esmtpfa.web.requestlog import RequestLog
from esmtpfa.web.status import RelayStatus, StatusResource
from esmtpfa.web.submission import SubmissionResource, body_limit, too_large

#: The metrics listener serves GETs: a body beyond this is refused unread.
METRICS_MAX_BODY = 16 * 1024


class GuardedSite(Site):
    """A ``Site`` for ``GuardedChannel``: Twisted's per-byte idle timeout is off (the
    channel keeps its own deadlines), form bodies are never parsed, and Twisted's access
    log is off (``request_log`` logs each request once)."""

    # Twisted types this as its HTTP/2-negotiating factory; any HTTPChannel class works.
    protocol = GuardedChannel  # type: ignore[assignment]
    requestFactory: type[BoundedRequest] = GuardedRequest
    noisy = False
    #: SO_SNDBUF of client sockets (docs/smtp-limits.md, "Clients that do not read");
    #: the submission listener takes ``--client-send-buffer``.
    send_buffer = ServerSettings.send_buffer
    #: Behind TLS (set by ``capped``): its channels count the handshakes that fail.
    tls = False

    def __init__(self, resource: Resource, *, limits: HTTPLimits, max_body: int,
                 too_large_message: str, request_log: RequestLog, reactor: Any = None):
        super().__init__(resource, timeout=None, reactor=reactor,
                         parsePOSTFormSubmission=False)
        self.limits = limits
        self.max_body = max_body
        self.too_large_message = too_large_message
        self.request_log = request_log
        #: The share of its cap the listener holds (set by ``capped``; 0 without caps).
        self.load: Callable[[], float] = lambda: 0.0

    def too_large(self) -> HTTPError:
        return HTTPError(413, self.too_large_message)

    def log(self, request) -> None:
        pass

    def stopFactory(self) -> None:
        self.request_log.stop()
        super().stopFactory()


def capped(site: GuardedSite, name: str, tls_options: Any = None,
           connections: IConnectionLedger | None = None) -> CappedFactory:
    """``site`` behind TLS (when given options) behind the connection caps, counted in
    ``connections`` when given (a worker's: the supervisor counts for all workers)."""
    factory: Any = site if tls_options is None else TLSMemoryBIOFactory(
        tls_options, False, site)
    site.tls = tls_options is not None
    capped_factory = CappedFactory(
        factory, connections or site.limits.connection_limits(name), site.request_log, name)
    site.load = capped_factory.load
    return capped_factory


# -- submission ----------------------------------------------------------------------------

class SubmissionSite(GuardedSite):
    protocol = SubmissionChannel
    requestFactory = SubmissionRequest

    def __init__(self, resource: Resource, *, header_login: HeaderLogin, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.header_login = header_login


class ObservedRequestLog(RequestLog):
    """The submission listener's request log, which also tells ``observer`` (the
    metrics) of each request refused with 413: every refusal, whether the channel saw
    the body too large or the resource the decoded message, is logged here once."""

    def __init__(self, what: str, clock: Any, observer: Any):
        super().__init__(what, clock)
        self._observer = observer

    def refused(self, connection_id: str, peer: str, status: int, reason: str,
                identity: str | None = None) -> None:
        if status == 413:
            notify(self._observer.size_refused, "http")
        super().refused(connection_id, peer, status, reason, identity)

    def handshake_failed(self) -> None:
        notify(self._observer.tls_handshake_failed, "http")


def submission_site(portal, settings, *, allow_anonymous: bool,
                    limits: HTTPLimits | None = None, resources: Resources,
                    observer: Any = None) -> SubmissionSite:
    """The submission site; a large JSON body is parsed in ``resources.threads``."""
    internals.checked()  # fail at startup, not on the first request, if Twisted changed
    reactor = resources.reactor
    header_login = HeaderLogin(portal, allow_anonymous=allow_anonymous)
    request_log = RequestLog("HTTP submission", reactor) if observer is None else \
        ObservedRequestLog("HTTP submission", reactor, observer)
    resource = SubmissionResource(settings, header_login=header_login,
                                  request_log=request_log,
                                  defer_to_thread=resources.in_thread)
    site = SubmissionSite(
        resource, header_login=header_login, limits=limits or HTTPLimits(),
        max_body=body_limit(settings), too_large_message=too_large(settings).message,
        request_log=request_log, reactor=reactor)
    site.send_buffer = settings.send_buffer
    return site


def submission_listener(portal, settings, *, allow_anonymous: bool, limits: HTTPLimits,
                        tls_options: Any = None, resources: Resources,
                        connections: IConnectionLedger | None = None,
                        observer: Any = None) -> CappedFactory:
    """What the submission port listens with: caps, then TLS if configured, then HTTP."""
    site = submission_site(portal, settings, allow_anonymous=allow_anonymous,
                           limits=limits, resources=resources, observer=observer)
    return capped(site, "http", tls_options, connections)


# -- metrics and health --------------------------------------------------------------------

class MetricsSite(GuardedSite):
    """``/metrics`` and the health endpoints (named for the "starting on" log line)."""


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: RelayMetrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request) -> bytes:
        # Rendering is fast and in-memory: no thread pool needed (docs/twisted-defects.md).
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self._metrics.render()


class Endpoints(Resource):
    """The metrics listener's tree: GET on its endpoints, a JSON 404 or 405 for anything
    else (Twisted's own answers to those are HTML pages)."""

    isLeaf = True

    def __init__(self, endpoints: dict[bytes, Resource]):
        super().__init__()
        self._endpoints = endpoints
        self._names = ", ".join("/" + name.decode() for name in endpoints)

    def render(self, request):
        path = request.postpath
        endpoint = self._endpoints.get(path[0]) if path and path[1:] in ([], [b""]) else None
        if endpoint is None:
            send_error(request, HTTPError(404, f"not found; the endpoints are {self._names}"))
        elif request.method not in (b"GET", b"HEAD"):
            send_error(request, HTTPError(405, "method not allowed; use GET",
                                          headers={b"allow": b"GET, HEAD"}))
        else:
            return endpoint.render(request)
        return NOT_DONE_YET


def metrics_site(metrics: RelayMetrics, readiness: Readiness, status: RelayStatus, *,
                 reactor: Any, limits: HTTPLimits | None = None) -> MetricsSite:
    return health_site({b"metrics": MetricsResource(metrics),
                        b"status": StatusResource(status.document),
                        b"healthz": HealthResource(),
                        b"readyz": ReadyResource(readiness)},
                       reactor=reactor, limits=limits)


def health_site(endpoints: dict[bytes, Resource], *, reactor: Any,
                limits: HTTPLimits | None = None) -> MetricsSite:
    """The metrics listener's site over ``endpoints`` (a supervisor of workers serves
    its own: ``esmtpfa.runtime.workers.supervisor``)."""
    return MetricsSite(
        Endpoints(endpoints), limits=limits or HTTPLimits(), max_body=METRICS_MAX_BODY,
        too_large_message=f"request body larger than {METRICS_MAX_BODY} octets",
        request_log=RequestLog("HTTP metrics request", reactor), reactor=reactor)


def metrics_listener(metrics: RelayMetrics, readiness: Readiness, status: RelayStatus, *,
                     limits: HTTPLimits, reactor: Any) -> CappedFactory:
    return capped(metrics_site(metrics, readiness, status, reactor=reactor,
                               limits=limits), "metrics")


__all__ = ["GuardedSite", "MetricsSite", "SubmissionSite", "capped", "health_site",
           "metrics_listener", "metrics_site", "submission_listener", "submission_site"]
