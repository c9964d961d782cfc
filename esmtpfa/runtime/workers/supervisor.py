"""The supervisor of ``--workers N``: N processes serve the relay's listeners as one relay.

``twistd esmtpfa --workers N`` runs this service instead of a ``RelayService``
(docs/workers.md has the whole design).  It:

* binds every mail listener once (``esmtpfa.runtime.sockets``) and starts N workers
  (``esmtpfa.runtime.worker``) with the operator's own arguments, every one adopting
  and accepting from the same sockets;
* keeps the relay's limits for all of them (``esmtpfa.runtime.workers.counts``): connection
  caps, login throttle, sending rates;
* runs the reload sources once, for all (``esmtpfa.runtime.workers.fanout_reload``);
* serves ``/metrics`` (merged: ``esmtpfa.runtime.workers.merged_metrics``), ``/healthz``,
  ``/readyz`` and ``/status`` for all workers on the metrics listener;
* restarts a worker that dies, after a delay that grows while it keeps dying, and logs
  why it died; meanwhile the other workers accept every new connection;
* kills a worker that stopped answering (its reactor does not run) within seconds, so
  the clients it had already accepted are not held for long;
* on SIGTERM, stops accepting, asks every worker to drain (SIGTERM: each finishes its
  transactions within ``--shutdown-grace``), waits for all, kills any that overstay the
  drain by more than ``EXIT_MARGIN`` seconds, and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall

from esmtpfa import __version__
from esmtpfa.common.logs import logger, set_level
from esmtpfa.common.transport import write_through
from esmtpfa.limits.ledgers import ConnectionLimits, LocalLoginLedger, RateLimiter
from esmtpfa.limits.throttle import identity_depth
from esmtpfa.runtime.settings import Listener, Settings, settings_of
from esmtpfa.runtime.sigterm import SigtermStop
from esmtpfa.runtime.sockets import bind_listener
from esmtpfa.runtime.workers.control import (
    METRICS,
    PING,
    READINESS,
    STARTED,
    STATUS,
    Call,
    ControlChannel,
)
from esmtpfa.runtime.workers.counts import HTTP, SMTP, SharedLimits
from esmtpfa.runtime.workers.fanout_reload import FanOutReloader
from esmtpfa.runtime.workers.merged_metrics import (
    CountFiles,
    RetiredCounts,
    merge,
    of_worker,
    snapshot,
)
from esmtpfa.web.health import (
    ALIVE,
    SHUTTING_DOWN,
    Check,
    HealthResource,
    LaterLeaf,
    ReadyResource,
    json_response,
)
from esmtpfa.web.metrics import CONTENT_TYPE, render

log = logger("esmtpfa.workers")

#: Seconds before restarting a worker that died: doubling from the first while it keeps
#: dying, back to the first once it ran ``STABLE_AFTER`` seconds.
RESTART_DELAYS = (0.5, 30.0)
STABLE_AFTER = 60.0
#: Seconds past the drain (``--shutdown-grace`` plus ``--close-grace``) a worker may take
#: to exit before it is killed.
EXIT_MARGIN = 10.0
#: Seconds a scrape or a readiness check waits for the workers.
ASK_TIMEOUT = 5.0
#: Every worker is asked to answer every ``HEARTBEAT`` seconds, within as long; one that
#: missed ``MISSED_HEARTBEATS`` answers in a row is hung (its reactor has not run for
#: that many seconds) and is killed, then restarted like a worker that died.  The
#: clients it had accepted wait that long at most.  Why 1 s and 5: the ping is answered
#: by the worker's reactor, so anything that holds the reactor (a burst of handshakes, a
#: big metrics snapshot, a slow disk under a maildir, a GC pause) delays the answer; such
#: stalls last milliseconds, a second at the very worst, and a worker busy for a second
#: misses one or two answers, far from five.  A stall of the supervisor's own reactor
#: times out the pings it had sent (their deadlines run before their answers are read)
#: but the next ping is answered: one miss, never five.
HEARTBEAT = 1.0
MISSED_HEARTBEATS = 5

#: The listeners every worker accepts from (the supervisor serves metrics itself).  The
#: legacy listeners' network rule and cleartext rule run in each worker, as in a single
#: process (esmtpfa.smtp.devices): the supervisor only binds.
MAIL_LISTENERS = ("plain", "tls", "legacy-plain", "legacy-tls", "http")


def mail_listeners(settings: Settings) -> list[Listener]:
    """The enabled mail listeners, in the order the supervisor binds them."""
    return [listener for listener in settings.listeners()
            if listener.name in MAIL_LISTENERS and listener.enabled]


class LogLines:
    """One output stream of a worker, passed on to the supervisor's log file a whole
    line at a time, so the lines of different workers never mix within a line, and a
    rotation (SIGUSR1) of that file takes every worker's lines along."""

    #: A worker's "line" longer than this is cut (a runaway write, not a log line).
    MAX_LINE = 65536

    def __init__(self, sink: Any):
        self.sink = sink
        self.partial = b""

    def feed(self, data: bytes) -> None:
        complete, newline, self.partial = (self.partial + data).rpartition(b"\n")
        if newline:
            self._write(complete + newline)
        if len(self.partial) > self.MAX_LINE:
            self._write(self.partial + b"\n")
            self.partial = b""

    def close(self) -> None:
        if self.partial:
            self._write(self.partial + b"\n")
            self.partial = b""

    def _write(self, data: bytes) -> None:
        self.sink.write(data)
        self.sink.flush()


class WorkerProcess(ProcessProtocol):
    """One slot's process: reports its end to the slot, and passes its standard output
    and error on to ``sink`` when the supervisor owns the log file (twistd's
    ``--logfile``); otherwise the worker writes to the standard output it inherited."""

    def __init__(self, slot: "WorkerSlot", sink: Any = None):
        self.slot = slot
        self.streams = {1: LogLines(sink), 2: LogLines(sink)} if sink is not None else {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in self.streams:
            self.streams[childFD].feed(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD in self.streams:
            self.streams[childFD].close()

    def processEnded(self, reason) -> None:
        self.slot.ended(reason)


class WorkerSlot:
    """Slot ``number``: its process and channel, restarted when the process dies."""

    def __init__(self, supervisor: "Supervisor", number: int):
        self.supervisor = supervisor
        self.number = number
        self.process = None
        self.channel: ControlChannel | None = None
        self.account = None
        self.started_at = 0.0
        self.running = False  # started and serving
        self.restart_delay = RESTART_DELAYS[0]
        self.restart_call = None
        self.last_metrics: list | None = None
        self.missed = 0  # heartbeats in a row without an answer
        self.exited: defer.Deferred | None = None
        self.pid: int | None = None

    @property
    def name(self) -> str:
        return f"worker {self.number}"

    def spawn(self) -> None:
        supervisor = self.supervisor
        reactor = supervisor.reactor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.account = supervisor.limits.for_worker(self.number)
        handlers = {**self.account.handlers(), STARTED: self._started}
        channel = self.channel = ControlChannel(handlers, reactor, name=self.name)
        self.account.attach(channel)
        write_through(reactor).adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel))
        ours.close()
        sink = supervisor.log_sink
        child_fds: dict[int, Any] = {0: "w", 1: 1 if sink is None else "r",
                                     2: 2 if sink is None else "r", 3: theirs.fileno()}
        arguments = [sys.executable, "-m", "esmtpfa.runtime.worker",
                     "--slot", str(self.number), "--control-fd", "3"]
        fd = 4
        for name, sock in supervisor.sockets.items():
            child_fds[fd] = sock.fileno()
            arguments += ["--listener", f"{name}={fd}"]
            fd += 1
        arguments += ["--", *supervisor.options.arguments]
        self.exited = defer.Deferred()
        self.started_at = reactor.seconds()
        self.process = reactor.spawnProcess(
            WorkerProcess(self, sink), sys.executable, arguments,
            env=supervisor.worker_environment(),
            childFDs=child_fds)
        theirs.close()
        self.pid = self.process.pid
        log.info("worker {slot} starting (pid {pid})", slot=self.number, pid=self.pid)

    def _started(self, pid: int) -> None:
        self.running = True
        self.missed = 0
        self.supervisor.reloader.catch_up(self.channel).addErrback(
            lambda failure: log.failure("worker {slot}: catching up on the configuration",
                                        failure, slot=self.number))
        log.info("worker {slot} serving (pid {pid})", slot=self.number, pid=pid)

    def ended(self, reason) -> None:
        supervisor = self.supervisor
        self.running = False
        pid = self.pid
        self.process = None
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.channel = None
        if self.account is not None:
            self.account.close()
            self.account = None
        supervisor.retire(self.number, pid, self.last_metrics)
        self.last_metrics = None
        exited, self.exited = self.exited, None
        if exited is not None:
            exited.callback(None)
        how = _how_it_ended(reason)
        if supervisor.stopping:
            log.info("worker {slot} (pid {pid}) {how}", slot=self.number, pid=pid, how=how)
            return
        now = supervisor.reactor.seconds()
        if now - self.started_at >= STABLE_AFTER:
            self.restart_delay = RESTART_DELAYS[0]
        delay = self.restart_delay
        self.restart_delay = min(self.restart_delay * 2, RESTART_DELAYS[1])
        supervisor.restarts.inc()
        log.error("worker {slot} (pid {pid}) {how}; restarting it in {delay:g} s",
                  slot=self.number, pid=pid, how=how, delay=delay)
        self.restart_call = supervisor.reactor.callLater(delay, self._restart)

    def _restart(self) -> None:
        self.restart_call = None
        if not self.supervisor.stopping:
            self.spawn()

    def terminate(self) -> defer.Deferred:
        """Ask the worker to drain and exit; fires when it has."""
        if self.restart_call is not None and self.restart_call.active():
            self.restart_call.cancel()
        self.restart_call = None
        if self.process is None or self.exited is None:
            return defer.succeed(None)
        _signal(self.process, "TERM")
        return self.exited

    def beat(self) -> None:
        """Ask the worker to answer; kill it when it has not for too long."""
        if not self.running or self.channel is None or self.process is None:
            return

        def answered(_) -> None:
            self.missed = 0

        def missed(_) -> None:
            self.missed += 1
            if self.missed >= MISSED_HEARTBEATS and self.process is not None:
                # Pings already sent time out before the kill is noticed (processEnded):
                # they signal again, harmlessly, but the log says it once.
                if self.missed == MISSED_HEARTBEATS:
                    log.error("worker {slot} (pid {pid}) has not answered for {seconds:g} "
                              "s: killing it", slot=self.number, pid=self.pid,
                              seconds=self.missed * HEARTBEAT)
                _signal(self.process, "KILL")
        self.channel.call(PING, timeout=HEARTBEAT).addCallbacks(answered, missed)

    def kill(self) -> None:
        if self.process is not None:
            log.warn("worker {slot} (pid {pid}) did not exit in time: killed",
                     slot=self.number, pid=self.pid)
            _signal(self.process, "KILL")


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except (ierror.ProcessExitedAlready, OSError):
        pass


def _how_it_ended(reason) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            return f"was killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"


class Supervisor(SigtermStop, MultiService):
    """The relay as N workers and the process that keeps them (see the module)."""

    stopping = False
    _heartbeat: LoopingCall | None = None
    #: The log file the workers' lines go to, when the supervisor owns it (twistd's
    #: ``--logfile``: esmtpfa.runtime.tap); None: the workers inherit standard output.
    log_sink: Any = None

    def __init__(self, options: Any, reactor: Any = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        #: The parsed options: each worker parses the same arguments again.
        self.options = options
        #: Every setting, typed (``esmtpfa.runtime.settings``).
        self.config = config = settings_of(options)
        self.reactor = reactor
        self.count = config.process.workers
        self.namespace = config.metrics.namespace
        self.limits = shared_limits(config, reactor)
        self.retired = RetiredCounts()
        self.count_files: CountFiles | None = None  # made when the workers start
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "worker_restarts", "Workers restarted after they died",
            namespace=self.namespace, registry=self.registry)
        Gauge("workers", "Worker processes configured (--workers)",
              namespace=self.namespace, registry=self.registry).set(self.count)
        self._running = Gauge("workers_running", "Worker processes serving now",
                              namespace=self.namespace, registry=self.registry)
        self._running.set_function(lambda: sum(s.running for s in self.slots))
        # The supervisor's own process_* (unlabelled); the workers' come labelled by
        # worker (``workers.merged_metrics.of_worker``).
        ProcessCollector(registry=self.registry)
        self.sockets = self._bind()
        self.slots = [WorkerSlot(self, number + 1) for number in range(self.count)]
        self.reloader = self._reload_sources()
        self._listen_metrics()

    # -- setup ------------------------------------------------------------------------------

    def _bind(self) -> dict[str, socket.socket]:
        """One socket per mail listener, which every worker accepts from; one that
        cannot bind is a ``CannotListenError``, as twistd's own ports raise it, so
        ``esmtpfa.runtime.tap`` says it in the same one line."""
        from esmtpfa.runtime.service import listen_address
        sockets: dict[str, socket.socket] = {}
        try:
            for listener in mail_listeners(self.config):
                host = listen_address(listener.addr)
                try:
                    sockets[listener.name] = bind_listener(
                        host, listener.port, self.config.process.listen_backlog)
                except OSError as error:
                    raise ierror.CannotListenError(host, listener.port, error) from None
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        return sockets

    def _reload_sources(self) -> FanOutReloader:
        from esmtpfa.config.reload import ConfigServicePoller, FileWatcher, ReloadService
        providers, reactor = self.config.providers, self.reactor
        path = os.path.abspath(providers.config)
        reloader = FanOutReloader(self._serving_channels, reactor, path=path)
        if providers.service_url:
            poller = ConfigServicePoller(
                providers.service_url, reloader, interval=providers.service_interval,
                timeout=providers.service_timeout, token=providers.service_token,
                reactor=reactor)
            ReloadService(reloader, reactor=reactor, poller=poller,
                          also=[reloader.reload_certificates]).setServiceParent(self)
        else:
            watcher = FileWatcher(path, reloader, interval=providers.poll_interval,
                                  reactor=reactor)
            ReloadService(reloader, reactor=reactor, watcher=watcher,
                          also=[reloader.reload_certificates]).setServiceParent(self)
        return reloader

    def _listen_metrics(self) -> None:
        from esmtpfa.common import internals
        from esmtpfa.runtime.service import server_endpoint
        from esmtpfa.web.site import capped, health_site
        config = self.config
        health = WorkersHealth(self)
        root = {b"metrics": MergedMetricsResource(self),
                b"status": WorkersStatusResource(self),
                b"healthz": HealthResource(health.alive),
                b"readyz": ReadyResource(health)}
        site = health_site(root, reactor=self.reactor, limits=config.http.limits)
        endpoint = server_endpoint(self.reactor, config.metrics.addr, config.metrics.port,
                                   config.process.listen_backlog)
        service = internals.listening_service(endpoint, capped(site, "metrics"))
        service.setName("metrics")
        service.setServiceParent(self)

    def _serving_channels(self) -> list[ControlChannel]:
        return [slot.channel for slot in self.slots if slot.running and slot.channel]

    # -- running ----------------------------------------------------------------------------

    def startService(self) -> None:
        config = self.config
        set_level(config.logging.level)
        from esmtpfa.runtime.service import listen_address
        log.info("esmtpfa {version} starting {count} workers", version=__version__,
                 count=self.count)
        for listener in mail_listeners(config):
            log.info("{name} listener on [{addr}]:{port}, served by every worker",
                     name=listener.name, addr=listen_address(listener.addr),
                     port=listener.port)
        log.info("metrics and health of all workers on http://[{addr}]:{port}/metrics "
                 "(/status /healthz /readyz)", addr=listen_address(config.metrics.addr),
                 port=config.metrics.port)
        super().startService()
        for slot in self.slots:
            slot.spawn()
        self._heartbeat = LoopingCall(lambda: [slot.beat() for slot in self.slots])
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(HEARTBEAT, now=False)
        self.install_sigterm()

    def stopping_already(self) -> bool:
        return self.stopping

    def sigterm_received(self) -> None:
        log.info("SIGTERM: draining {count} workers for up to {grace:g} s, then "
                 "exiting", count=self.count, grace=self.config.process.shutdown_grace)

    def stopService(self) -> defer.Deferred:
        """Out of rotation (/readyz 503), no new connections, every worker drains."""
        self.stopping = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        for sock in self.sockets.values():
            sock.close()  # the workers' copies keep listening until they drain
        deadline = (self.config.process.shutdown_grace
                    + self.config.smtp.server.close_grace + EXIT_MARGIN)
        exits = [slot.terminate() for slot in self.slots]
        timer = self.reactor.callLater(deadline, self._kill_all)
        d = defer.gatherResults(exits)

        def done(_):
            if timer.active():
                timer.cancel()
            return MultiService.stopService(self)
        d.addBoth(done)
        d.addBoth(lambda _: self.reloader.stop())
        d.addBoth(self._remove_count_files)
        d.addBoth(self.restore_sigterm)
        return d

    def _remove_count_files(self, result: Any) -> Any:
        if self.count_files is not None:
            self.count_files.remove()
        return result

    def worker_environment(self) -> dict[str, str]:
        """A worker's environment: the supervisor's own, and the directory where the
        worker keeps its counts (made when the first worker starts)."""
        if self.count_files is None:
            self.count_files = CountFiles.create()
        return dict(os.environ, **self.count_files.environment())

    def retire(self, slot: int, pid: int | None, last: list | None) -> None:
        """Keep what worker ``pid``, now dead, counted: every increment it made is in
        its files, whatever killed it.  Should they be unreadable, its last snapshot is
        kept instead (what it counted since that scrape is then lost), and said."""
        counts = last
        if pid is not None and self.count_files is not None:
            try:
                counts = self.count_files.counts_of(pid)
            except (OSError, ValueError, struct.error):
                log.failure("worker {slot} (pid {pid}): its counts could not be read; "
                            "keeping those of the last scrape", slot=slot, pid=pid)
            self.count_files.forget(pid)
        self.retired.retire(counts, self.namespace)

    def _kill_all(self) -> None:
        for slot in self.slots:
            slot.kill()

    # -- what the metrics listener asks -------------------------------------------------------

    def ask_all(self, call: Call) -> defer.Deferred:
        """Fires with [(slot, answer or None)] for every slot, within ``ASK_TIMEOUT``."""
        slots = list(self.slots)
        calls = [slot.channel.call(call, timeout=ASK_TIMEOUT)
                 if slot.running and slot.channel else defer.fail(Exception("not running"))
                 for slot in slots]
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: [
            (slot, answer if ok else None)
            for slot, (ok, answer) in zip(slots, results, strict=True)])

    def metrics(self) -> defer.Deferred:
        """The merged exposition of every worker, the retired, and the supervisor."""
        def merged(answers) -> bytes:
            snapshots = []
            for slot, answer in answers:
                if answer is not None:
                    slot.last_metrics = answer
                if slot.last_metrics is not None:  # a worker that did not answer in time
                    snapshots.append(of_worker(slot.last_metrics, slot.number))
            snapshots.append(self.retired.snapshot())
            snapshots.append(snapshot(self.registry.collect()))
            return render(merge(snapshots, self.namespace))
        return self.ask_all(METRICS).addCallback(merged)


def shared_limits(settings: Settings, reactor: Any) -> SharedLimits:
    """The supervisor's counts, sized by the same settings as a single process's."""
    throttle, server = settings.throttle, settings.smtp.server
    http = settings.http.limits
    return SharedLimits(
        login=LocalLoginLedger(throttle.per_address, throttle.per_identity,
                               throttle.window, reactor,
                               depth=identity_depth(throttle.per_identity,
                                                    throttle.max_delay)),
        rates=RateLimiter(reactor),
        connections={
            SMTP: ConnectionLimits(server.max_connections, server.max_connections_per_ip),
            HTTP: http.connection_limits("http")})


# -- the metrics listener's resources ---------------------------------------------------------

class MergedMetricsResource(LaterLeaf):
    def __init__(self, supervisor: Supervisor):
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request):
        def write(request, body: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return body
        return self.answer(request, self.supervisor.metrics(), write)


class WorkersHealth:
    """What the supervisor tells ``/healthz`` and ``/readyz`` (``esmtpfa.web.health``,
    which writes the answers): the state of its workers."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def alive(self) -> Check:
        """Alive when every worker slot has a worker serving; not, naming the slots
        without one (a restart takes about a second; a worker that keeps dying keeps its
        slot empty, and the orchestrator should replace the whole relay).  Draining,
        the slots empty one by one and the relay is still alive."""
        down = [slot.name for slot in self.supervisor.slots if not slot.running]
        if down and not self.supervisor.stopping:
            return Check(False, f"not serving: {', '.join(down)}")
        return ALIVE

    def as_json(self) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """Ready when every worker is serving and ready (its own checks, which name the
        first worker failing each); not ready, at once, from SIGTERM on."""
        if self.supervisor.stopping:
            return {"ready": False, "checks": {"shutdown": {
                "ok": False, "detail": SHUTTING_DOWN.detail}}}
        return self.supervisor.ask_all(READINESS).addCallback(_merged_readiness)


def _merged_readiness(answers: list[tuple[WorkerSlot, dict | None]]) -> dict[str, Any]:
    checks: dict[str, dict] = {}
    serving = [slot for slot, answer in answers if answer is not None]
    checks["workers"] = {
        "ok": len(serving) == len(answers),
        "detail": f"{len(serving)} of {len(answers)} workers serving"}
    names = [name for _, answer in answers if answer is not None
             for name in answer["checks"]]
    for name in dict.fromkeys(names):  # each worker's checks, in their order
        failing = [(slot, answer["checks"][name]) for slot, answer in answers
                   if answer is not None and name in answer["checks"]
                   and not answer["checks"][name]["ok"]]
        if failing:
            slot, check = failing[0]
            checks[name] = {"ok": False, "detail": f"{slot.name}: {check['detail']}"}
        else:
            first = next(answer["checks"][name] for _, answer in answers
                         if answer is not None and name in answer["checks"])
            checks[name] = {"ok": True, "detail": first["detail"]}
    ready = all(check["ok"] for check in checks.values()) and bool(serving)
    return {"ready": ready, "checks": checks}


class WorkersStatusResource(LaterLeaf):
    """``/status``: the supervisor's view (workers serving, draining) and each worker's
    own document (``web.status``), ``null`` for a worker that did not answer in time."""

    def __init__(self, supervisor: Supervisor):
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request):
        supervisor = self.supervisor

        def write(request, answers) -> bytes:
            return json_response(request, 200, {
                "version": __version__, "draining": supervisor.stopping,
                "workers": {"configured": len(answers),
                            "serving": sum(answer is not None for _, answer in answers)},
                "by_worker": {str(slot.number): answer for slot, answer in answers}})
        return self.answer(request, supervisor.ask_all(STATUS), write)


__all__ = ["Supervisor", "WorkerSlot", "WorkersStatusResource", "shared_limits"]
