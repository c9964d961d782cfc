"""Hostile clients for the fault suite: many connections at little cost, in the reactor.

Each kind does one thing a real attacker (or a broken client) does, and records what a
test asserts: when it connected, when the server closed it, what the server said.  They
run as Twisted protocols in the test's own reactor, so two hundred of them cost two
hundred sockets, not two hundred threads; ``source`` addresses (any of 127.0.0.0/8 on
Linux loopback) let a test put the attackers on addresses other than the well-behaved
client's, as they would be in production.

* ``Silent``: connects and never sends a byte; on an implicit-TLS port that is a TLS
  handshake that never starts.
* ``Trickler``: logs in, opens a transaction and then sends one byte every few seconds,
  either of DATA content (``in_data=True``) or of a command line that never ends.
* ``Pipeliner``: never reads, and writes ``NOOP``/``RSET`` as fast as the connection takes
  them; ``sent`` is how far the server let it go before back-pressure stopped it.
* ``Dribbler``: writes an opening at once, then the rest a few octets at a time on a
  timer, whatever the protocol: a slowloris request head, a body trickled after valid
  headers, an upload announced and never sent.
* ``Crowd``: opens many of one kind, spreads them over source addresses, waits (bounded)
  for the server to close them, and aborts whatever is left at cleanup.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Sequence

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


class HostileClient(Protocol):
    """What every kind records: connect and close times, and every byte received."""

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.connected_at: float | None = None
        self.closed_at: float | None = None
        self.failed: str | None = None  # the connection attempt itself failed
        self.received = bytearray()
        self.answered_at: float | None = None  # when the server's first byte arrived
        self.gone: defer.Deferred = defer.Deferred()

    @property
    def is_open(self) -> bool:
        return self.connected_at is not None and self.closed_at is None

    @property
    def refused(self) -> bool:
        """The server said ``421`` (too many connections, or shutting down) at once."""
        return self.received.startswith(b"421")

    def connectionMade(self) -> None:
        self.connected_at = self.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self.answered_at is None:
            self.answered_at = self.reactor.seconds()
        if len(self.received) < 65536:
            self.received += data[:65536]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed_at = self.reactor.seconds()
        self.gone.callback(None)

    def abort(self) -> None:
        if self.transport is not None and self.is_open:
            self.transport.abortConnection()


@implementer(IPushProducer)
class TimedWriter(HostileClient):
    """A client that writes on a timer (``every(seconds, write)``).  One that registers
    as its transport's streaming producer is paused while the transport is full, so
    what it counts as written is what the server's side took in, give or take the
    kernel's socket buffers."""

    def __init__(self, reactor: Any):
        super().__init__(reactor)
        self._paused = False
        self._loop: task.LoopingCall | None = None

    def every(self, seconds: float, write, now: bool = False) -> None:
        self._loop = task.LoopingCall(write)
        self._loop.clock = self.reactor
        self._loop.start(seconds, now=now)

    def stop_writing(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    # IPushProducer: our own transport says when its buffer is full and drained.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        self._paused = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stop_writing()
        super().connectionLost(reason)


class Silent(HostileClient):
    """Connects and then says nothing, ever: no EHLO, no TLS ClientHello."""


class Trickler(TimedWriter):
    """A slow client: logs in, then one byte every ``interval`` seconds, for ever.

    With ``in_data`` it gets as far as ``354`` and trickles message content (the server
    must cut it by a minimum transfer rate); without, it trickles a command line that
    never ends (the server must cut it by a total time per command line).  Each byte
    resets a plain idle timer, which is the defect this client exposes.
    """

    def __init__(self, reactor: Any, *, user: str, password: str, in_data: bool = True,
                 interval: float = 2.0, sender: str = "trickler@example.com",
                 recipient: str = "victim@example.net"):
        super().__init__(reactor)
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        self._script = [(None, 220), (b"EHLO trickler.test", 250),
                        (b"AUTH PLAIN " + token, 235)]
        if in_data:
            self._script += [(f"MAIL FROM:<{sender}>".encode(), 250),
                             (f"RCPT TO:<{recipient}>".encode(), 250), (b"DATA", 354)]
        self.interval = interval
        self._lines = bytearray()
        self._step = 0
        self.trickling = False       # the script went through: it is trickling now
        self.unexpected: bytes | None = None  # the reply that stopped the script
        self.trickled = 0            # bytes sent one at a time

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.trickling or self.unexpected is not None:
            return
        self._lines += data
        while b"\r\n" in self._lines and not self.trickling and self.unexpected is None:
            line, _, rest = bytes(self._lines).partition(b"\r\n")
            self._lines = bytearray(rest)
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on
            self._answered(line)

    def _answered(self, line: bytes) -> None:
        expected = self._script[self._step][1]
        if not line.startswith(str(expected).encode()):
            self.unexpected = line
            return
        self._step += 1
        if self._step < len(self._script):
            self.transport.write(self._script[self._step][0] + b"\r\n")
            return
        self.trickling = True
        self.every(self.interval, self._trickle)

    def _trickle(self) -> None:
        if self.is_open:
            self.transport.write(b"x")
            self.trickled += 1


class Pipeliner(TimedWriter):
    """Writes pipelined ``NOOP``/``RSET`` without end and never reads a reply.

    It stops reading at once (its own transport is paused), and writes only while its
    transport is not full, so ``sent`` counts what the server's side actually took in,
    give or take the kernel's socket buffers.  ``limit`` bounds the test's own effort.
    """

    CHUNK = b"NOOP\r\nRSET\r\n" * 5000

    def __init__(self, reactor: Any, *, limit: int = 512 * 1024 * 1024):
        super().__init__(reactor)
        self.limit = limit
        self.sent = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()  # never read what the server answers
        self.transport.registerProducer(self, True)
        self.transport.write(b"EHLO pipeliner.test\r\n")
        self.every(0.002, self._fill, now=True)

    def _fill(self) -> None:
        if self._paused or not self.is_open or self.sent >= self.limit:
            return
        self.transport.write(self.CHUNK)
        self.sent += len(self.CHUNK)


class Dribbler(TimedWriter):
    """Writes ``opening`` on connecting, then ``rest`` ``chunk`` octets at a time, one
    piece every ``interval`` seconds, until it is all sent or the server closes.

    ``rest`` may be a number of filler octets instead of bytes, so that announcing a
    30 MB upload costs the test nothing to hold.  Without an opening the first piece
    goes at once (a slowloris starts with its first byte).  It reads everything the
    server says (``received``).  A piece is skipped while its own transport is full,
    so ``written`` (how much of ``rest`` it sent) is what the server's side took in,
    give or take the kernel's socket buffers: with a large chunk and a short interval
    it is an upload as fast as the server reads.
    """

    def __init__(self, reactor: Any, *, opening: bytes = b"", rest: bytes | int = b"",
                 chunk: int = 1, interval: float = 2.0, filler: bytes = b"x"):
        super().__init__(reactor)
        self.opening = opening
        self._rest = rest
        self._size = rest if isinstance(rest, int) else len(rest)
        self.chunk = chunk
        self.interval = interval
        self._filler = filler
        self.written = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        if self.opening:
            self.transport.write(self.opening)
        if self._size:
            self.every(self.interval, self._dribble, now=not self.opening)

    def _piece(self, size: int) -> bytes:
        if isinstance(self._rest, int):
            return (self._filler * (size // len(self._filler) + 1))[:size]
        return self._rest[self.written:self.written + size]

    def _dribble(self) -> None:
        if not self.is_open or self.written >= self._size:
            self.stop_writing()
            return
        if self._paused:
            return
        piece = self._piece(min(self.chunk, self._size - self.written))
        self.transport.write(piece)
        self.written += len(piece)


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, client: HostileClient):
        self.client = client

    def buildProtocol(self, addr) -> HostileClient:
        return self.client

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.client.failed = reason.getErrorMessage()
        self.client.gone.callback(None)


def sources(count: int, first: int = 0) -> list[str]:
    """``count`` distinct loopback addresses, none of them 127.0.0.1 (the good client's).

    Linux routes all of 127.0.0.0/8 to the loopback interface, so each attacker can have
    an address of its own: 127.0.1.2, 127.0.1.3, ... (250 to a third octet).
    """
    return [f"127.0.{1 + n // 250}.{2 + n % 250}" for n in range(first, first + count)]


class Crowd:
    """Many hostile clients of one kind against one port; every wait bounded."""

    def __init__(self, make: Callable[[], HostileClient], reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self._make = make
        self.clients: list[HostileClient] = []

    def connect(self, port: int, count: int, source: str | Sequence[str] = "127.0.0.2",
                host: str = "127.0.0.1", timeout: float = 5.0, per_tick: int = 25,
                tick: float = 0.05) -> None:
        """Start ``count`` connections (from ``source``, or round-robin over a list),
        ``per_tick`` every ``tick`` seconds: as fast as a flood, but paced so that the
        kernel's accept queue (the listener's backlog) does not drop handshakes, which
        would test TCP's retransmission timers instead of the relay."""
        addresses = [source] if isinstance(source, str) else list(source)
        for n in range(count):
            client = self._make()
            self.clients.append(client)
            self.reactor.callLater(
                tick * (n // per_tick), self.reactor.connectTCP, host, port,
                _Factory(client), timeout=timeout,
                bindAddress=(addresses[n % len(addresses)], 0))

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every connection attempt connected or failed (bounded)."""
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline and any(
                c.connected_at is None and c.failed is None and not c.gone.called
                for c in self.clients):
            await task.deferLater(self.reactor, 0.05, lambda: None)

    async def wait_closed(self, timeout: float) -> None:
        """Wait until the server closed every connection, or ``timeout`` passed."""
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline and self.still_open():
            await task.deferLater(self.reactor, 0.1, lambda: None)

    def still_open(self) -> list[HostileClient]:
        return [c for c in self.clients if c.is_open]

    def connected(self) -> list[HostileClient]:
        return [c for c in self.clients if c.connected_at is not None]

    def refused(self) -> list[HostileClient]:
        return [c for c in self.clients if c.refused]

    def latest_close(self) -> float | None:
        closes = [c.closed_at for c in self.clients if c.closed_at is not None]
        return max(closes) if closes else None

    def abort(self) -> defer.Deferred:
        """Drop every connection still open (test cleanup); fires when all are gone."""
        for client in self.clients:
            client.abort()
        waits = [c.gone for c in self.clients if not c.gone.called and
                 (c.connected_at is not None or c.failed is None)]
        d = defer.DeferredList(waits)
        return d.addTimeout(10, self.reactor).addErrback(lambda _: None)


__all__ = ["Crowd", "Dribbler", "HostileClient", "Pipeliner", "Silent", "Trickler",
           "sources"]
