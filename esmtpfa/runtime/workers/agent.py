"""A worker's side of its supervisor: the control channel, the shared ledgers, the relay.

``WorkerAgent`` adopts the control channel the supervisor passed down, builds the same
``RelayService`` a single process runs (listeners adopted, limits counted by the
supervisor or Redis), and answers the supervisor's calls:

* ``reload``: apply the document the supervisor read (a private snapshot file), through
  the worker's own ``ProviderReloader``, off the reactor thread as always;
* ``metrics``: a snapshot of the worker's registry (``esmtpfa.runtime.workers.merged_metrics``);
* ``readiness``: the worker's own ``/readyz`` checks (``web.health.Readiness``);
* ``status``: the worker's ``/status`` document (``web.status``).

When the channel closes, the supervisor is gone: the worker drains as on SIGTERM and
exits, so no worker outlives its supervisor.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet import defer
from twisted.internet.protocol import Factory

from esmtpfa.common.logs import logger
from esmtpfa.common.transport import write_through
from esmtpfa.config.documents import read_document
from esmtpfa.limits.ledgers import Ledgers
from esmtpfa.runtime.settings import Settings, settings_of
from esmtpfa.runtime.workers.control import (
    CERTIFICATES_RELOAD,
    CONN_RECALL,
    METRICS,
    PING,
    READINESS,
    RELOAD,
    RELOAD_FAILED,
    STARTED,
    STATUS,
    ControlChannel,
)
from esmtpfa.runtime.workers.counts import (
    HTTP,
    SMTP,
    RemoteConnections,
    RemoteLoginLedger,
    RemoteRateLedger,
)
from esmtpfa.runtime.workers.merged_metrics import snapshot

if TYPE_CHECKING:
    from esmtpfa.runtime.service import RelayService

log = logger("esmtpfa.workers")


def worker_ledgers(settings: Settings, channel: ControlChannel) -> Ledgers:
    """The supervisor counts connections, and logins and rates too (with ``--state-url``
    the relay service uses Redis for those instead: shared by every replica)."""
    http, server, throttle = settings.http.limits, settings.smtp.server, settings.throttle
    return Ledgers(
        login=RemoteLoginLedger(channel, throttle.per_address, throttle.per_identity,
                                throttle.window),
        rates=RemoteRateLedger(channel),
        smtp_connections=RemoteConnections(channel, SMTP, server.max_connections,
                                           server.max_connections_per_ip, channel.reactor),
        http_connections=RemoteConnections(channel, HTTP, http.max_connections,
                                           http.max_connections_per_ip, channel.reactor))


class WorkerAgent:
    def __init__(self, reactor: Any, options: Any, *, slot: int, control_fd: int,
                 listeners: Mapping[str, int]):
        self.reactor = reactor
        self.options = options
        self.slot = slot
        self.control_fd = control_fd
        self.listeners = dict(listeners)
        self.service: RelayService | None = None
        self.channel: ControlChannel | None = None
        self.ledgers: Ledgers | None = None
        self.exit_code = 0

    def start(self) -> None:
        from esmtpfa.runtime.service import RelayService
        channel = self.channel = ControlChannel({
            RELOAD: self.reload, RELOAD_FAILED: self.reload_failed,
            CERTIFICATES_RELOAD: self.reload_certificates,
            METRICS: self.metrics, READINESS: self.readiness, STATUS: self.status,
            PING: lambda: True, CONN_RECALL: self.recall_connections,
        }, self.reactor, name=f"worker {self.slot}")
        write_through(self.reactor).adoptStreamConnection(
            self.control_fd, socket.AF_UNIX, Factory.forProtocol(lambda: channel))
        try:
            socket.close(self.control_fd)  # adoption made its own copy
        except OSError:
            pass
        channel.lost.addCallback(self._supervisor_gone)
        ledgers = self.ledgers = worker_ledgers(settings_of(self.options), channel)
        service = self.service = RelayService(
            self.options, self.reactor, adopted=self.listeners, ledgers=ledgers)
        service.privilegedStartService()
        service.startService()
        self.reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        channel.notify(STARTED, pid=os.getpid())

    @property
    def _relay(self) -> RelayService:
        """The relay service ``start()`` made: the channel it opened first delivers
        nothing before ``start()`` returns."""
        assert self.service is not None
        return self.service

    def _supervisor_gone(self, _: Any) -> None:
        if self.reactor.running and not self._relay.draining:
            log.warn("worker {slot}: the supervisor is gone; draining and exiting",
                     slot=self.slot)
            self.reactor.stop()

    # -- the supervisor's calls ---------------------------------------------------------------

    def reload(self, path: str, source: str, kind: str, force: bool = False
               ) -> defer.Deferred:
        reloader = self._relay.reloader
        return reloader.load(partial(read_document, path, reloader.limits), source, kind,
                             force=force)

    def reload_certificates(self) -> None:
        """SIGHUP reached the supervisor: the worker reads its certificates again (it
        also watches their files itself, as a single process does)."""
        self._relay.reload_certificates()

    def reload_failed(self, kind: str, source: str, reason: str) -> None:
        """The supervisor could not even read the document (over the size bound): the
        worker counts and logs the failed reload as a single process would."""
        self._relay.reloader.failed(kind, source, reason)

    def recall_connections(self, kind: str, ip: str) -> int:
        """The supervisor is about to refuse a connection: give back the slots kept
        toward that limit (``esmtpfa.runtime.workers.counts``)."""
        ledgers = self.ledgers
        ledger = None if ledgers is None else (
            ledgers.smtp_connections if kind == SMTP else ledgers.http_connections)
        return ledger.recall(ip) if isinstance(ledger, RemoteConnections) else 0

    def metrics(self) -> list:
        return snapshot(self._relay.metrics.registry.collect())

    def readiness(self) -> dict:
        return {"checks": self._relay.readiness.as_json()["checks"],
                "draining": self._relay.draining}

    def status(self) -> dict:
        return self._relay.status.document()


__all__ = ["WorkerAgent", "worker_ledgers"]
