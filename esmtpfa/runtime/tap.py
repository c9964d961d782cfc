"""twistd plugin entry points: ``Options`` and ``makeService`` (twisted.application).

Everything that can be wrong with the configuration (flags, environment, provider file,
certificates) is checked while parsing options, so twistd prints one line naming the
setting and exits (not its ``--help``, not a traceback from ``makeService``).

``--check-config``, ``--print-config`` and ``--version`` answer while the options are
parsed and exit there: before twistd looks at its pidfile, starts logging, daemonizes
or runs the reactor, so they work beside a running relay with any twistd options.

A listener that cannot bind (a port in use, permission denied, an address this host
does not have) stops startup with one line naming the listener, address and port, and
exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, textFileLogObserver
from twisted.python import usage

from esmtpfa.common.logs import logger
from esmtpfa.runtime import options as _options
from esmtpfa.runtime.service import (
    Preloaded,
    RelayService,
    listen_address,
    load_providers,
    load_tls_options,
)
from esmtpfa.runtime.settings import Settings, settings_of
from esmtpfa.runtime.workers.supervisor import Supervisor

log = logger("esmtpfa")


class Options(_options.Options):
    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise  # not under twistd (a worker, a test): the caller reports it
            # twistd would print its whole --help before the one useful line.
            hint = " (twistd esmtpfa --help lists the options)" if str(error).startswith(
                "option ") else ""
            raise SystemExit(f"esmtpfa: {error}{hint}") from None

    def postOptions(self) -> None:
        try:
            super().postOptions()
        except usage.UsageError:
            # --print-config and --check-config collect every problem (``self.problems``)
            # instead of stopping at the first.
            actions = self.settings.actions if self.settings is not None else None
            if actions is None or not (actions.print_config or actions.check_config):
                raise
        settings = settings_of(self)
        if settings.actions.print_config:
            raise SystemExit(print_config(settings, self.problems))
        if settings.actions.check_config:  # --check-connect implies it
            from esmtpfa.runtime.checkconfig import run
            raise SystemExit(run(self))
        parent = getattr(self, "parent", None)
        if settings.logging.format == "json" and parent is not None and (
                "fileLogObserverFactory" in parent):
            # ``twist``: its runner makes the log observer with this factory (twistd
            # takes it from the application: TwistdRelayService).
            from esmtpfa.common.jsonlog import JSONLinesObserver
            parent["fileLogObserverFactory"] = JSONLinesObserver
        from twisted.internet import reactor

        from esmtpfa.common.resources import Resources
        #: The one bundle (docs/architecture.md, "Resources"): the service takes it over.
        self.resources = Resources.build(reactor)
        self.preloaded = Preloaded(
            providers=load_providers(settings.providers, self.resources),
            smtp_tls=load_tls_options(settings.smtp.tls),
            http_tls=load_tls_options(settings.http.tls, "HTTP TLS", "http"))


def print_config(settings: Settings, problems: list[str], out=None,
                 err=None) -> int:
    """``--print-config [--non-default]``: the effective settings, then any problem on
    standard error; the exit status is 1 when there is one."""
    out, err = out or sys.stdout, err or sys.stderr
    for line in settings.effective(non_default=settings.actions.non_default):
        out.write(line + "\n")
    out.flush()
    for problem in problems:
        err.write(f"esmtpfa: {problem}\n")
    return 1 if problems else 0


class TwistdComponents:
    """What the relay does for twistd when twistd adds it to the application, which is
    before twistd starts logging (``AppLogger.start`` takes an ``ILogObserver``
    component of the application):

    * with ``--log-format json``, the JSON log observer, so even twistd's own startup
      lines are JSON;
    * for the supervisor of ``--workers`` with ``--logfile``, the log file itself, which
      the supervisor then also writes its workers' lines to (``log_sink``), so one file
      holds the whole relay's log and rotates as one (SIGUSR1, like twistd's own).
    """

    owns_log_file = False
    log_sink: Any = None

    def setServiceParent(self, parent) -> None:
        from esmtpfa.common.jsonlog import (
            JSONLinesObserver,
            logs_to_standard_output,
            twistd_log_file,
        )
        options = self.options  # type: ignore[attr-defined]
        server_options = getattr(options, "parent", None)
        under_twist = server_options is not None and "fileLogObserverFactory" in server_options
        json = settings_of(options).logging.format == "json"
        own_file = self.owns_log_file and not logs_to_standard_output(server_options)
        if (json or own_file) and hasattr(parent, "setComponent") and not under_twist:
            out = twistd_log_file(server_options, self.reactor)  # type: ignore[attr-defined]
            parent.setComponent(ILogObserver, JSONLinesObserver(out) if json
                                else textFileLogObserver(out))
            if own_file:
                self.log_sink = out
        super().setServiceParent(parent)  # type: ignore[misc]

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[misc]
        except CannotListenError as error:
            stop_startup(self.options, cannot_listen(self.options, error))  # type: ignore[attr-defined]

    def startService(self) -> None:
        super().startService()  # type: ignore[misc]
        for line in self.options.overrides:  # type: ignore[attr-defined]
            log.warn("{override}", override=line)


def cannot_listen(options, error: CannotListenError) -> str:
    """One line naming the listener, its flags, the address and port, and why."""
    what = "listener"
    for listener in settings_of(options).listeners():
        if (listener.enabled and listener.port == error.port
                and listen_address(listener.addr) == error.interface):
            what = f"{listener.label} ({listener.flags})"
            break
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    return f"{what}: cannot listen on [{error.interface}]:{error.port}: {reason}"


def stop_startup(options, message: str) -> None:
    """End a startup that cannot go on, after twistd started logging: the reason as one
    log line (the log is where twistd's output goes by now), the daemonizing parent told
    (it prints the reason), twistd's pidfile removed, exit status 1."""
    log.critical("esmtpfa: {reason}", reason=message)
    server_options = getattr(options, "parent", None) or {}
    status = server_options.get("statusPipe")
    if status is not None:
        os.write(status, b"1 " + message.encode("ascii", "backslashreplace")[:98])
        os.close(status)
    pidfile = server_options.get("pidfile")
    if pidfile:
        try:
            with open(pidfile) as f:
                ours = int(f.read().strip() or 0) == os.getpid()
            if ours:
                os.unlink(pidfile)
        except (OSError, ValueError):
            pass
    raise SystemExit(1)


class TwistdRelayService(TwistdComponents, RelayService):
    """The relay as twistd runs it, in one process."""


class TwistdSupervisor(TwistdComponents, Supervisor):
    """The relay as twistd runs it with ``--workers`` above 1."""

    owns_log_file = True


def makeService(options) -> RelayService | Supervisor:
    settings = settings_of(options)
    if settings.actions.check_config:  # answered while parsing, unless Options was skipped
        from esmtpfa.runtime.checkconfig import run
        raise SystemExit(run(options))
    # From here on a listener may be bound before the reload service takes SIGHUP.
    from esmtpfa.config.reload import startup_sighup
    startup_sighup.install()
    try:
        if settings.process.workers > 1:
            _check_worker_logging(getattr(options, "parent", None))
            return TwistdSupervisor(options)
        return TwistdRelayService(options)
    except CannotListenError as error:  # the supervisor binds before twistd logs
        raise SystemExit(f"esmtpfa: {cannot_listen(options, error)}") from None
    except usage.UsageError as error:
        raise SystemExit(f"esmtpfa: {error}") from None


def _check_worker_logging(server_options) -> None:
    """The supervisor writes its workers' lines to standard output or to twistd's
    ``--logfile``; twistd's ``--syslog`` and ``--logger`` and twist's ``--log-file``
    are log observers it cannot write lines to."""
    from esmtpfa.common.jsonlog import logs_to_standard_output
    if not server_options:
        return
    twist = "fileLogObserverFactory" in server_options
    if server_options.get("syslog") or server_options.get("logger") or (
            twist and not logs_to_standard_output(server_options)):
        raise SystemExit("esmtpfa: --workers: the supervisor writes every worker's log "
                         "lines to standard output or to twistd's --logfile: run twistd "
                         "-n, or twistd --logfile FILE (not --syslog or --logger; with "
                         "twist, its default --log-file -)")


__all__ = ["Options", "makeService"]
