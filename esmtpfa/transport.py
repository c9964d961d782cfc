"""TCP transports that send at once when nothing is queued ("write-through").

Twisted's ``FileDescriptor.write`` only queues: the bytes leave on the next reactor
iteration, after ``startWriting`` (an ``epoll_ctl``), the poll, ``doWrite`` dispatched
through the logging context, and ``stopWriting`` (another ``epoll_ctl``).  A relay writes
small replies and commands on both sides of every message, so that detour was about a
tenth of its CPU per message (``docs/performance.md``).  Like asyncio's selector
transports, these try ``send()`` first when the queue is empty and queue only what the
kernel did not take; everything else (TLS, producers, closing, errors) is Twisted's.

This is the public face.  The implementation subclasses Twisted's TCP classes and reads
their private send queue, so it lives in ``esmtpfa.internals``, the one module that may
touch Twisted's private names, and is verified there against the installed Twisted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.posixbase import PosixReactorBase

from esmtpfa import internals


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


__all__ = ["write_through"]
