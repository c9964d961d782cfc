"""TCP transports that send at once when nothing is queued ("write-through").

Twisted's ``FileDescriptor.write`` only queues: the bytes leave on the next reactor
iteration, after ``startWriting`` (an ``epoll_ctl``), the poll, ``doWrite`` dispatched
through the logging context, and ``stopWriting`` (another ``epoll_ctl``).  A relay writes
small replies and commands on both sides of every message, so that detour was about a
tenth of its CPU per message (``docs/performance.md``).  Like asyncio's selector
transports, these try ``send()`` first when the queue is empty and queue only what the
kernel did not take; everything else (TLS, producers, closing, errors) is Twisted's.

Two more things for the sessions on top of them (``docs/smtp-limits.md``, "Clients
that do not read"): ``limit_send_buffer`` fixes a client socket's kernel send buffer,
which Linux would otherwise grow to megabytes for a client that does not read, and
``output_waiting_since`` says how long queued output has gone without the kernel taking
any of it, which the write-stall deadline reads.

This is the public face.  The implementation subclasses Twisted's TCP classes and reads
their private send queue, so it lives in ``esmtpfa.common.internals``, the one module that may
touch Twisted's private names, and is verified there against the installed Twisted.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IConsumer, IPushProducer, ISystemHandle, ITLSTransport
from twisted.internet.posixbase import PosixReactorBase

from esmtpfa.common import internals

#: Wrappers a connection may sit under: the connection cap, PROXY, TLS.
_MOST_WRAPPERS = 8


def write_through(reactor: Any) -> Any:
    """``reactor`` with write-through TCP, when it is a real POSIX reactor.

    Use it where an endpoint takes a reactor: listeners and upstream connections then get
    write-through transports.  Any other reactor (tests' ``MemoryReactor`` and ``Clock``)
    is returned unchanged.  The first call checks the installed Twisted
    (``internals.check``) and raises ``internals.TwistedChanged`` if it differs.
    """
    if isinstance(reactor, PosixReactorBase):
        internals.checked()
        return internals.WriteThroughReactor(reactor)
    return reactor


def connection_of(transport: Any) -> FileDescriptor | None:
    """The connection that owns the socket under ``transport``'s wrappers (TLS,
    PROXY protocol, connection caps: each a protocol whose ``transport`` is the next),
    or None when there is no such connection (tests' in-memory transports)."""
    for _ in range(_MOST_WRAPPERS):
        if transport is None or isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def limit_send_buffer(transport: Any, octets: int) -> int | None:
    """Fix the kernel's send buffer of ``transport``'s TCP socket at ``octets``
    (``SO_SNDBUF``; Linux doubles it for its bookkeeping and stops growing it by
    itself).  Returns the size the kernel now reports, or None when there is no TCP
    socket or nothing to set (``octets`` 0 leaves the kernel's own sizing)."""
    connection = connection_of(transport)
    if connection is None or octets <= 0:
        return None
    handle = getattr(connection, "getHandle", lambda: None)()  # ISystemHandle
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM \
            or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, octets)
        return handle.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:  # the peer is already gone
        return None


def output_waiting_since(connection: FileDescriptor | None) -> float | None:
    """When output queued on ``connection`` (from ``connection_of``) last moved, or
    began to wait: the kernel's send buffer is full and this is how long the peer has
    left it so.  None when nothing waits, or when the connection does not write
    through (then nothing is known)."""
    return internals.output_waiting_since(connection)


def output_waiting(connection: FileDescriptor) -> int:
    """Octets queued on ``connection`` that the kernel has not taken yet."""
    return internals.output_waiting(connection)


class IStreamTransport(ITLSTransport, IPushProducer, IConsumer, ISystemHandle):
    """What the sessions use of a connection's transport: TCP (peer, host, abort, the
    socket), STARTTLS, and flow control both ways (pausing the peer, registering a
    producer).

    Twisted's TCP and TLS transports, and the wrappers above them, provide all of it,
    but ``Protocol.transport`` is typed as an optional bare ``ITransport``.  A protocol
    class says what it is connected to with ``transport: IStreamTransport`` (for the
    type checker only: nothing checks it at run time, and before ``makeConnection`` the
    attribute is still None, as it is for any protocol)."""


__all__ = ["IStreamTransport", "connection_of", "limit_send_buffer", "output_waiting",
           "output_waiting_since", "write_through"]
