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

from esmtpfa.runtime import options as _options
from esmtpfa.common.logs import logger
from esmtpfa.runtime.service import (
    RelayService,
    listen_address,
    load_providers,
    load_tls_options,
)
from esmtpfa.runtime.workers.supervisor import Supervisor

log = logger("esmtpfa")

#: Each listener as an operator knows it: its service name, what it is, the flags that
#: place it (the address flag, the port flag).
LISTENERS = {
    "plain": ("SMTP listener", "addr", "port"),
    "tls": ("submissions (implicit TLS) listener", "addr", "tls-port"),
    "http": ("HTTP listener", "http-addr", "http-port"),
    "metrics": ("metrics listener", "metrics-addr", "metrics-port"),
}


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
        if self.get("print-config") or self.get("check-config") or self.get("check-connect"):
            # Every problem is collected instead of stopping at the first.
            problems: list[str] = []
            try:
                super().postOptions()
            except _options.OptionsProblems as error:
                problems = error.problems
            except usage.UsageError as error:
                problems = [str(error)]
            if self.get("print-config"):
                raise SystemExit(print_config(self, problems))
            self["check-config"] = True  # --check-connect implies it
            self["check-config-problems"] = problems
            from esmtpfa.runtime.checkconfig import run
            raise SystemExit(run(self))
        super().postOptions()
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None and (
                "fileLogObserverFactory" in parent):
            # ``twist``: its runner makes the log observer with this factory (twistd
            # takes it from the application: TwistdRelayService).
            from esmtpfa.common.jsonlog import JSONLinesObserver
            parent["fileLogObserverFactory"] = JSONLinesObserver
        from twisted.internet import reactor
        self["provider-set"] = load_providers(self, reactor)
        self["tls-options"] = load_tls_options(self)
        self["http-tls-options"] = load_tls_options(self, "http-tls", "HTTP TLS")


def print_config(options: _options.Options, problems: list[str], out=None,
                 err=None) -> int:
    """``--print-config [--non-default]``: the effective settings, then any problem on
    standard error; the exit status is 1 when there is one."""
    out, err = out or sys.stdout, err or sys.stderr
    for line in options.effective(non_default=bool(options.get("non-default"))):
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
        json = options["log-format"] == "json"
        own_file = self.owns_log_file and not logs_to_standard_output(server_options)
        if (json or own_file) and hasattr(parent, "setComponent") and not under_twist:
            out = twistd_log_file(server_options)
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
    for name, (label, addr, port) in LISTENERS.items():
        if (options.get(name, True) and options[port] == error.port
                and listen_address(options[addr]) == error.interface):
            what = f"{label} (--{addr}, --{port})"
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
    if options.get("check-config"):  # answered while parsing, unless Options was skipped
        from esmtpfa.runtime.checkconfig import run
        raise SystemExit(run(options))
    # From here on a listener may be bound before the reload service takes SIGHUP.
    from esmtpfa.config.reload import startup_sighup
    startup_sighup.install()
    try:
        if options["workers"] > 1:
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
