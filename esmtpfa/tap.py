"""twistd plugin entry points: ``Options`` and ``makeService`` (twisted.application).

Everything that can be wrong with the configuration (flags, environment, provider file,
certificates) is checked while parsing options, so twistd prints one clear line and
exits instead of a traceback from ``makeService``.  ``--check-config`` defers those
checks to ``esmtpfa.checkconfig``, which reports every problem it finds, then exits
from ``makeService`` before twistd starts logging, daemonizes or runs the reactor.
"""

from twisted.logger import ILogObserver
from twisted.python import usage

from esmtpfa import options as _options
from esmtpfa.service import RelayService, load_providers, load_tls_options
from esmtpfa.workers.supervisor import Supervisor


class Options(_options.Options):
    def postOptions(self) -> None:
        if self.get("check-config") or self.get("check-connect"):
            # Collect problems instead of stopping at the first (esmtpfa.checkconfig).
            try:
                super().postOptions()
            except usage.UsageError as error:
                self["check-config-problem"] = str(error)
            self["check-config"] = True  # --check-connect implies it
            return
        super().postOptions()
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None and (
                "fileLogObserverFactory" in parent):
            # ``twist``: its runner makes the log observer with this factory (twistd
            # takes it from the application: TwistdRelayService).
            from esmtpfa.jsonlog import JSONLinesObserver
            parent["fileLogObserverFactory"] = JSONLinesObserver
        from twisted.internet import reactor
        self["provider-set"] = load_providers(self, reactor)
        self["tls-options"] = load_tls_options(self)
        self["http-tls-options"] = load_tls_options(self, "http-tls", "HTTP TLS")


class JSONLogComponent:
    """With ``--log-format json``, hands twistd the log observer when twistd adds the
    service to the application, which is before twistd starts logging
    (``AppLogger.start`` takes an ``ILogObserver`` component of the application), so
    even twistd's own startup lines are JSON."""

    def setServiceParent(self, parent) -> None:
        server_options = getattr(self.options, "parent", None)
        under_twist = server_options is not None and "fileLogObserverFactory" in server_options
        if (self.options["log-format"] == "json" and hasattr(parent, "setComponent")
                and not under_twist):  # twist: Options.postOptions set its factory
            from esmtpfa.jsonlog import JSONLinesObserver, twistd_log_file
            parent.setComponent(ILogObserver,
                                JSONLinesObserver(twistd_log_file(server_options)))
        super().setServiceParent(parent)


class TwistdRelayService(JSONLogComponent, RelayService):
    """The relay as twistd runs it, in one process."""


class TwistdSupervisor(JSONLogComponent, Supervisor):
    """The relay as twistd runs it with ``--workers`` above 1."""


def makeService(options) -> RelayService:
    if options.get("check-config"):
        from esmtpfa.checkconfig import run
        raise SystemExit(run(options))
    # From here on a listener may be bound before the reload service takes SIGHUP.
    from esmtpfa.reload import startup_sighup
    startup_sighup.install()
    if options["workers"] > 1:
        from esmtpfa.jsonlog import logs_to_standard_output
        if not logs_to_standard_output(getattr(options, "parent", None)):
            raise SystemExit("--workers: the workers log to standard output, so twistd "
                             "must too: run it with -n (--nodaemon) and no --logfile, or "
                             "with --logfile -")
        return TwistdSupervisor(options)
    return TwistdRelayService(options)


__all__ = ["Options", "makeService"]
