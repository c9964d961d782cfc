"""The resources a component uses but does not own, built once and passed in.

A component that reached for ``twisted.internet.reactor``, ``deferToThread`` or a
module-level cache used whatever the process happened to hold: a test could not give
it a ``Clock``, two services in one process shared state by accident, and the order
of imports decided which reactor a module saw.  As treq takes its ``reactor`` and its
agent from the caller, every component takes what it needs from a ``Resources`` bundle
that the composition root (``esmtpfa.runtime.service``) builds once.
docs/architecture.md, "Resources".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Generic, TypeVar

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool

from esmtpfa.common.httpclient import new_http_client

#: Threads for short blocking work off the reactor: CPU scans of a large message
#: (8-bit, BDAT, a From: rewrite), a configuration document's parse.  Each job is
#: bounded by the message size limit, so a handful keeps the reactor free without
#: letting scans crowd the box (the spool and each LDAP provider have their own).
BLOCKING_THREADS = 4

#: ``http_client(connect_timeout)``: a treq ``HTTPClient`` that follows no redirect
#: and keeps no cookie, over its own persistent pool, which the caller closes
#: (``esmtpfa.common.httpclient.new_http_client`` bound to the reactor).
HTTPClientFactory = Callable[[float], "tuple[HTTPClient, HTTPConnectionPool]"]

V = TypeVar("V")


class LastGood(Generic[V]):
    """The last good value fetched from each URL, with when it was fetched.

    The JWT providers keep their key sets here, so the successive provider instances a
    reload creates neither refetch nor lose them.  It lives in the bundle, not in a
    module: two services in one process keep two caches.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[V, float]] = {}

    def get(self, url: str) -> tuple[V, float] | None:
        return self._entries.get(url)

    def put(self, url: str, value: V, fetched_at: float) -> None:
        self._entries[url] = (value, fetched_at)


@dataclass(frozen=True)
class Resources:
    """What the running process lends its components.

    ``reactor`` carries the network (connects, ``callFromThread``); ``clock`` is the
    ``IReactorTime`` that deadlines, windows and refreshes are measured with: the same
    object outside tests, a ``twisted.internet.task.Clock`` in them.  ``threads`` runs
    blocking work (``in_thread``), ``http_client`` makes outbound HTTP clients,
    ``jwks`` holds the JWT providers' key sets, ``observer`` hears what the metrics
    count (None: nobody listens).
    """

    reactor: Any
    clock: IReactorTime
    threads: ThreadPool
    http_client: HTTPClientFactory
    jwks: LastGood = field(default_factory=LastGood)
    observer: Any = None

    @classmethod
    def build(cls, reactor: Any, *, clock: IReactorTime | None = None,
              threads: ThreadPool | None = None,
              http_client: HTTPClientFactory | None = None,
              observer: Any = None) -> "Resources":
        """The bundle for ``reactor``.  Without ``threads``, a pool of
        ``BLOCKING_THREADS`` is made, started when the reactor runs and stopped at its
        shutdown, as the reactor does with its own pool."""
        if threads is None:
            threads = ThreadPool(minthreads=0, maxthreads=BLOCKING_THREADS,
                                 name="esmtpfa-blocking")
            when_running = getattr(reactor, "callWhenRunning", None)
            if when_running is not None:
                when_running(threads.start)
                reactor.addSystemEventTrigger("during", "shutdown", threads.stop)
        return cls(reactor=reactor, clock=clock if clock is not None else reactor,
                   threads=threads,
                   http_client=http_client or partial(new_http_client, reactor),
                   observer=observer)

    def in_thread(self, function: Callable[..., V], *args: Any, **kwargs: Any
                  ) -> Deferred[V]:
        """``function(*args, **kwargs)`` in ``threads``; its result on the reactor."""
        return deferToThreadPool(self.reactor, self.threads, function, *args, **kwargs)

    def observed_by(self, observer: Any) -> "Resources":
        """The same bundle, heard by ``observer`` (built after the bundle it observes)."""
        return replace(self, observer=observer)


__all__ = ["BLOCKING_THREADS", "HTTPClientFactory", "LastGood", "Resources"]
