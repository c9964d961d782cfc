"""Listening sockets the supervisor opens once and every worker adopts (docs/workers.md).

For each listener the supervisor binds one socket and keeps it open for its whole life;
every worker adopts it (``IReactorSocket.adoptStreamPort``) and accepts from it, as
Postfix's master hands one listening socket to all the processes of a service.  Why this
shape:

* a worker that stops accepting (a stuck reactor, SIGSTOP) simply stops taking: the
  kernel queues every new connection on the one socket and whichever worker runs next
  accepts it.  With one ``SO_REUSEPORT`` socket per worker the kernel went on sending
  that worker its share, and those clients waited until it was killed and replaced;
* a worker takes connections when its reactor is free to, so a busy worker takes fewer;
  the price is that every worker waiting in ``epoll`` wakes for each new connection and
  all but one find nothing to accept (Twisted does not ask for ``EPOLLEXCLUSIVE``): a
  few system calls per worker and connection, for the handful of workers a host has;
* the supervisor binds, so a port in use, a privileged port or a bad address stops the
  relay at startup with one message, as with one process, and workers never bind;
* a worker that dies takes nothing with it: the socket stays open in the supervisor
  and the other workers, which accept what it would have.

A worker adopts the socket and closes its inherited copy (adoption duplicates it).  A
worker that stops listening closes its own copy without ``shutdown()`` (Twisted does not
shut down an adopted socket), which would stop the listening socket for every process.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer

from esmtpfa.common.logs import logger
from esmtpfa.common.transport import write_through

log = logger("esmtpfa.workers")

#: Connections the kernel may queue before some worker accepts them.
BACKLOG = 511


@dataclass(frozen=True)
class ListenerAddress:
    """Where one listener listens: ``host`` is an interface address ("" for all)."""

    name: str
    host: str
    port: int


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_listener(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """One listening socket on ``host``/``port`` for every worker to accept from.

    Port 0 takes a free port.  On a dual-stack ``::`` the socket accepts IPv4 too, as
    one process's would.  Raises ``OSError`` (closing what it opened) when the address
    cannot be bound."""
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)  # every worker's reactor accepts without blocking
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


class AdoptedPort(Service):
    """A worker's listener: adopts the supervisor's socket when started, stops accepting
    when stopped (the drain starts there)."""

    def __init__(self, reactor: Any, name: str, fd: int, family: socket.AddressFamily,
                 factory: Any):
        self.name = name
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._factory = factory
        self.port = None

    def privilegedStartService(self) -> None:
        # Adopted before the reactor runs anything else, like a port a service binds.
        # Write-through transports, as a single process's listeners have (transport.py).
        self.port = write_through(self._reactor).adoptStreamPort(
            self._fd, self._family, self._factory)
        try:
            socket.close(self._fd)  # adoption made its own copy
        except OSError:
            pass
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


__all__ = ["BACKLOG", "AdoptedPort", "ListenerAddress", "bind_listener", "family_of"]
