"""Real processes for end-to-end tests: ``twistd esmtpfa`` and command-line clients.

Started with ``reactor.spawnProcess`` so the test's own servers (the recording upstream)
keep running in the same reactor while the child talks to them.  Every process is
stopped by the test that started it, and every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from typing import Callable

from twisted.internet import defer, protocol, reactor, task, utils

from tests.support.ports import free_port

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require(tool: str) -> str:
    """The path of a command-line tool; a missing tool fails the test loudly."""
    path = shutil.which(tool)
    if path is None:
        raise AssertionError(
            f"{tool} is not installed: run .ci/run (apt-get install {tool}) first")
    return path


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SMTP_", "RELAY_", "HTTP_", "PROVIDER_", "METRICS_",
                                  "SPOOL_", "DELIVERY_"))}
    env["PYTHONPATH"] = PROJECT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


class Collector(protocol.ProcessProtocol):
    """Collects a child's output; ``ended`` fires with its exit code."""

    def __init__(self):
        self.output = bytearray()
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


@defer.inlineCallbacks
def until_serving(name: str, port: int, collector: Collector, *, timeout: float = 10.0,
                  interval: float = 0.05, source: str | None = None,
                  probe: Callable[[socket.socket], bool] = lambda sock: True):
    """Poll until a fresh connection to 127.0.0.1:``port`` is served (``probe`` says so;
    by default, accepting is enough), trying at least once.  Fails loudly, with the
    child's output, when the child ends first or ``timeout`` passes."""
    deadline = reactor.seconds() + timeout
    while True:
        if collector.ended.called:
            raise AssertionError(f"{name} exited early:\n{collector.text}")
        try:
            with socket.create_connection(
                    ("127.0.0.1", port), timeout=0.2,
                    source_address=None if source is None else (source, 0)) as sock:
                if probe(sock):
                    return
        except OSError:
            pass
        if reactor.seconds() >= deadline:
            raise AssertionError(f"{name} did not answer on {port} within {timeout:g} s:\n"
                                 f"{collector.text}")
        yield task.deferLater(reactor, interval, lambda: None)


@defer.inlineCallbacks
def until_logged(name: str, collector: Collector, pattern: str, *, count: int = 1,
                 timeout: float = 10.0):
    """Fires with the child's lines matching ``pattern`` (a regular expression) once
    there are at least ``count``; fails loudly, with the output, when ``timeout`` passes
    or the child ends without them.

    A test that looks for what the child logged waits here rather than reading the
    output once: a line the child wrote before an event the test saw (a port that
    listens, a reply) may still be in the pipe, unread by this reactor.
    """
    deadline = reactor.seconds() + timeout
    while True:
        found = [line for line in collector.text.splitlines() if re.search(pattern, line)]
        if len(found) >= count:
            return found
        if reactor.seconds() > deadline or collector.ended.called:
            raise AssertionError(f"{name}: {count} line(s) matching {pattern!r} expected, "
                                 f"{len(found)} logged:\n{collector.text}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class Twistd:
    """``twistd -n esmtpfa ARGS`` as a child process.

    The metrics listener always runs (default port 9090): unless the test chooses
    ``--metrics-port``, a free one is used so tests never collide with each other or
    with a Prometheus exporter on the machine (``metrics_port``).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        if not any(arg.startswith("--metrics-port") for arg in args):
            args = [*args, "--metrics-port", str(free_port())]
        self.metrics_port = int(args[args.index("--metrics-port") + 1]) if (
            "--metrics-port" in args) else None
        self.args = args
        self.env = child_environment(env)
        self._collector = Collector()
        self._process = None

    @property
    def output(self) -> str:
        return self._collector.text

    def start(self) -> None:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "esmtpfa", *self.args]
        self._process = reactor.spawnProcess(
            self._collector, sys.executable, argv, env=self.env, path=PROJECT)

    def wait_for_port(self, port: int, timeout: float = 20.0) -> defer.Deferred:
        """Poll until something accepts on 127.0.0.1:port, or fail with the log."""
        return until_serving("twistd", port, self._collector, timeout=timeout, interval=0.1)

    def wait_for_lines(self, pattern: str, count: int = 1,
                       timeout: float = 10.0) -> defer.Deferred:
        """The output's lines matching ``pattern``, once ``count`` are there (bounded)."""
        return until_logged("twistd", self._collector, pattern, count=count, timeout=timeout)

    def exited(self) -> defer.Deferred:
        """Fires with the exit code when the process ends by itself (bounded)."""
        return self._collector.ended.addTimeout(30, reactor)

    @defer.inlineCallbacks
    def stop(self):
        if self._process is None or self._collector.ended.called:
            return
        yield terminate(self._process, self._collector.ended, grace=15)

    def kill(self) -> defer.Deferred:
        """SIGKILL; fires once the process has ended (bounded)."""
        if self._process is None or self._collector.ended.called:
            return defer.succeed(None)
        self._process.signalProcess("KILL")
        return self._collector.ended.addTimeout(30, reactor).addBoth(lambda _: None)


@defer.inlineCallbacks
def terminate(process, ended: defer.Deferred, grace: float):
    """SIGTERM, then SIGKILL if the process has not ended (``ended`` fired) in ``grace`` s."""
    process.signalProcess("TERM")
    killer = reactor.callLater(grace, process.signalProcess, "KILL")
    yield ended
    if killer.active():
        killer.cancel()


def run_tool(tool: str, *args: str, env: dict[str, str] | None = None):
    """Run a command-line tool; fires with ``(stdout+stderr text, exit code)``."""
    d = utils.getProcessOutputAndValue(require(tool), args, env=child_environment(env),
                                       path=PROJECT)
    return d.addCallback(lambda r: ((r[0] + r[1]).decode("utf-8", "replace"), r[2]))


def queue_tool(*args: str, spool_url: str):
    """``esmtpfa-queue ARGS`` as an operator runs it: the console script installed
    beside this interpreter (a missing one fails the test), with ``SPOOL_URL`` set."""
    script = os.path.join(os.path.dirname(sys.executable), "esmtpfa-queue")
    if not os.path.exists(script):
        raise AssertionError(f"the esmtpfa-queue console script is not installed beside "
                             f"{sys.executable}: pip install the project")
    d = utils.getProcessOutputAndValue(
        script, args, env=child_environment({"SPOOL_URL": spool_url}), path=PROJECT)
    return d.addCallback(lambda r: ((r[0] + r[1]).decode("utf-8", "replace"), r[2]))

