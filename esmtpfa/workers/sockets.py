"""Listening sockets the supervisor opens once and its workers adopt (docs/workers.md).

For each listener the supervisor binds one socket per worker slot, all on the same
address and port with ``SO_REUSEPORT``, and keeps them open for its whole life; worker
*k* adopts the socket of slot *k* (``IReactorSocket.adoptStreamPort``).  Why this shape:

* the kernel spreads new connections over the slots' sockets by a hash of the client's
  address and port, so the workers share the load evenly without any process handing
  connections around, and without one worker's accept loop taking a whole burst;
* the supervisor binds, so a port in use, a privileged port or a bad address stops the
  relay at startup with one message, as with one process, and workers never bind (Linux
  lets only sockets of the same user join a ``SO_REUSEPORT`` group);
* a worker that dies leaves its socket open in the supervisor: connections the kernel
  queued for that slot wait for the restarted worker instead of being reset.

A worker adopts a socket and closes its inherited copy (adoption duplicates it).
"""

from __future__ import annotations

from dataclasses import dataclass
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer

from esmtpfa.logs import logger
from esmtpfa.transport import write_through

log = logger("esmtpfa.workers")

#: Connections the kernel may queue per slot before the worker accepts them.
BACKLOG = 511


@dataclass(frozen=True)
class ListenerAddress:
    """Where one listener listens: ``host`` is an interface address ("" for all)."""

    name: str
    host: str
    port: int


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_group(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host``/``port`` in one ``SO_REUSEPORT`` group.

    Port 0 takes a free port for the first socket and the same port for the others.
    On a dual-stack ``::`` the IPv6 sockets accept IPv4 too, as one process's would.
    Raises ``OSError`` (closing what it opened) when the address cannot be bound."""
    family = family_of(host)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.setblocking(False)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class AdoptedPort(Service):
    """A worker's listener: adopts the supervisor's socket for this slot when started,
    stops accepting when stopped (the drain starts there)."""

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


__all__ = ["AdoptedPort", "BACKLOG", "ListenerAddress", "bind_group", "family_of"]
