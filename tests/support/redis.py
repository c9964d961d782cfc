"""A real ``redis-server`` (Debian ``redis-server``) on a free loopback port.

Nothing is persisted (no RDB, no AOF), the working directory is a temporary one, and
the server is stopped by its process id: SIGTERM, then SIGKILL after a bounded grace.
A missing ``redis-server`` fails the test loudly (``.ci/run`` installs it).  Also here: a
TCP server that accepts and never answers, the "stalled Redis" of the timeout tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile

from twisted.internet import defer, protocol, reactor

from tests.support.ports import free_port
from tests.support.processes import Collector, require, terminate, until_serving


class RedisServer:
    """``redis-server`` with ``requirepass`` (and an ACL user) when given.

    ``url`` is what a relay's ``--state-url`` gets."""

    def __init__(self, password: str | None = None, username: str | None = None,
                 port: int | None = None, tls=None):
        """``tls``: a ``tests.support.certs.Leaf``: TLS only (``rediss://``), on ``port``."""
        self.password, self.username = password, username
        self.tls = tls
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="esmtpfa-redis-")
        self._process = None
        self._collector: Collector | None = None
        self._paused = False

    @property
    def url(self) -> str:
        auth = ""
        if self.password:
            auth = f"{self.username or ''}:{self.password}@"
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._collector is not None and not self._collector.ended.called

    @property
    def output(self) -> str:
        return self._collector.output.decode("utf-8", "replace") if self._collector else ""

    @defer.inlineCallbacks
    def start(self):
        binary = require("redis-server")
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", self.tls.cert_path, "--tls-key-file", self.tls.key_path,
                      "--tls-auth-clients", "no"]
        else:
            listen = ["--port", str(self.port)]
        args = [binary, *listen, "--bind", "127.0.0.1",
                "--dir", self.directory, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning", "--databases", "4"]
        if self.password and self.username:
            # The default user is turned off: only the named one may log in.
            args += ["--user", "default", "off",
                     "--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all"]
        elif self.password:
            args += ["--requirepass", self.password]
        self._collector = Collector()
        self._process = reactor.spawnProcess(self._collector, binary, args,
                                             env={"PATH": os.environ.get("PATH", "")},
                                             path=self.directory)

        def answers(sock: socket.socket) -> bool:
            if self.tls is not None:
                return True  # accepting; the client under test does the TLS
            sock.sendall(b"PING\r\n")
            return sock.recv(100).startswith((b"+PONG", b"-NOAUTH"))
        yield until_serving("redis-server", self.port, self._collector, probe=answers)
        return self

    def command(self, *args: str) -> bytes:
        """One command over a blocking socket (a test's look inside); the raw reply."""
        parts = [*(["AUTH", *([self.username] if self.username else []), self.password]
                   if self.password else [])]
        payload = b""
        if parts:
            payload += _encode(parts)
        payload += _encode(list(args))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if parts:
            data = data.split(b"\r\n", 1)[1]  # AUTH's +OK
        return data

    @defer.inlineCallbacks
    def stop(self):
        if self._process is not None and self.running:
            self.resume()  # a stopped process would wait out the grace before SIGKILL
            yield terminate(self._process, self._collector.ended, grace=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> defer.Deferred:
        """SIGKILL: an outage, not a shutdown.  Fires once the process is gone."""
        self._process.signalProcess("KILL")
        return self._collector.ended

    @defer.inlineCallbacks
    def restart(self):
        """Killed and started again on the same port: empty, as a Redis without
        persistence (or with its data lost) comes back."""
        if self.running:
            yield self.kill()
        yield self.start()
        return self

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port (the kernel still accepts connections) and
        answers nothing: a Redis too slow to be of use."""
        self._process.signalProcess(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT: it answers again, the requests it queued first."""
        if self._paused and self.running:
            self._process.signalProcess(signal.SIGCONT)
        self._paused = False


def _encode(args: list[str]) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


class _Silent(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)

    def connectionMade(self) -> None:
        self.factory.connections.append(self)


class StalledRedis(protocol.Factory):
    """Accepts connections and reads requests, and never answers."""

    protocol = _Silent

    def __init__(self):
        self.received = 0
        self.connections: list[_Silent] = []
        self.port = None

    def start(self) -> "StalledRedis":
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port.getHost().port}/0"

    def stop(self) -> defer.Deferred:
        for connection in self.connections:
            connection.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


__all__ = ["RedisServer", "StalledRedis"]
