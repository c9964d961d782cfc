"""TCP transports that send at once when nothing is queued ("write-through").

Twisted's ``FileDescriptor.write`` only queues: the bytes leave on the next reactor
iteration, after ``startWriting`` (an ``epoll_ctl``), the poll, ``doWrite`` dispatched
through the logging context, and ``stopWriting`` (another ``epoll_ctl``).  A relay writes
small replies and commands on both sides of every message, so that detour was about a
tenth of its CPU per message (``docs/performance.md``).  Like asyncio's selector
transports, these try ``send()`` first when the queue is empty and queue only what the
kernel did not take; everything else (TLS, producers, closing, errors) is Twisted's.

Use ``write_through(reactor)`` where an endpoint takes a reactor: listeners and upstream
connections then get these transports.  Any reactor that is not a real POSIX one (tests'
``MemoryReactor`` and ``Clock``) is returned unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import directlyProvides, providedBy

try:  # where STARTTLS lives in Twisted 21+; without it STARTTLS'd sessions just queue
    from twisted.internet._newtls import startTLS as _start_tls
except ImportError:  # pragma: no cover
    _start_tls = None


def _write(transport: Any, data: bytes) -> None:
    """``FileDescriptor.write`` that tries ``send()`` first when it cannot reorder data."""
    if (data and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected
            and transport.producer is None  # a pull producer is driven by doWrite
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN; or an error that doWrite will report as connectionLost
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    FileDescriptor.write(transport, data)


class _DirectWrites(FileDescriptor):
    """What the STARTTLS layer writes ciphertext through (its "bypass" class)."""

    write = _write


class _WriteThrough:
    """Mixed into ``tcp.Server`` and ``tcp.Client``."""

    def write(self, data: bytes) -> None:
        if self.TLS:  # type: ignore[attr-defined]  # STARTTLS: encrypt, then _DirectWrites
            super().write(data)  # type: ignore[misc]
        else:
            _write(self, data)

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        if _start_tls is None:  # pragma: no cover
            super().startTLS(ctx, normal)  # type: ignore[misc]
        else:
            _start_tls(self, ctx, normal, _DirectWrites)


class _Server(_WriteThrough, tcp.Server):
    pass


class _Client(_WriteThrough, tcp.Client):
    pass


class _Port(tcp.Port):
    transport = _Server


class _Connector(tcp.Connector):
    def _makeTransport(self) -> _Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


class _WriteThroughReactor:
    """The reactor, except that its TCP ports and connections write through."""

    def __init__(self, reactor: PosixReactorBase):
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))  # endpoints look at interfaces

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> tcp.Port:
        listening = _Port(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> tcp.Connector:
        connector = _Connector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector


def write_through(reactor: Any) -> Any:
    """``reactor`` with write-through TCP, when it is a real POSIX reactor."""
    if isinstance(reactor, PosixReactorBase):
        return _WriteThroughReactor(reactor)
    return reactor
