"""THE ONE PLACE in esmtpfa that touches Twisted's private names (docs/twisted-internals.md).

Twisted keeps no compatibility promise for underscore names, nor for hooks it documents as
"not intended for users".  Every such use is here, and ``check()`` verifies each one
against the installed Twisted *by behaviour*, on real objects, not only by name.  The
test suite runs it (``tests/test_internals.py``), and so does the relay at startup: a
Twisted that changed refuses to start with a ``TwistedChanged`` that names what changed,
instead of misbehaving later.  ``TESTED_TWISTED`` is the range this was verified with,
and ``setup.cfg`` pins the same range.

What is used, and by whom:

1. Write-through TCP transports (public face: ``esmtpfa.common.transport.write_through``).
   The whole implementation is here rather than in ``transport.py``, because almost
   every line of it is an internal: it subclasses ``tcp.Server``, ``tcp.Client``,
   ``tcp.Port`` (its ``transport`` class attribute) and ``tcp.Connector`` (its
   ``_makeTransport`` hook) and relies on their constructors' signatures; it reads
   ``FileDescriptor``'s private send queue (``_tempDataBuffer``, ``dataBuffer``,
   ``offset``, ``_tempDataLen``) and ``_writeDisconnected`` to know that nothing is
   queued, and how much is; it overrides ``writeSomeData`` (which ``doWrite`` calls)
   to note when queued output last moved, for the write-stall deadline
   (``output_waiting_since``, used by ``esmtpfa.smtp.server``); and it calls
   ``twisted.internet._newtls.startTLS`` with its own "bypass" class, so that TLS
   ciphertext is written through too.  After that call, on the server side, it
   replaces the TLS layer's write aggregator (``BufferingTLSTransport._aggregator``, and
   the instance ``write`` bound to it) so that each reply is encrypted and sent at
   once, and keeps the ``zope.interface`` declarations ``startTLS`` makes so they are
   computed once per process rather than per connection (docs/performance.md, "The
   cost of a STARTTLS connection").  Splitting it would only spread the internals over
   two modules.
2. ``twisted.web`` (used by ``esmtpfa.web.channel``): ``HTTPChannel._version`` holds the
   request's HTTP version when ``allHeadersReceived`` runs (RFC 9110 §10.1.1 ignores
   ``Expect: 100-continue`` from HTTP/1.0), and ``allHeadersReceived`` answers
   ``100-continue`` by itself from the request's ``Expect`` header, which the submission
   channel takes away first so that it answers only after the client logged in.  The
   channel and request hooks it overrides (``CHANNEL_HOOKS``, ``REQUEST_HOOKS``) are
   public names with an internal contract.
3. Accessors for private attributes read elsewhere: ``Request._disconnected``
   (``request_gone``), and ``StreamServerEndpointService._raiseSynchronously`` and
   ``_waitingForPort`` (``listening_service``, ``port_of``).
4. ``twisted.protocols.haproxy`` (used by ``esmtpfa.smtp.proxy``): its PROXY protocol
   header parsers ``V1Parser.parse`` and ``V2Parser.parse``, their ``InvalidProxyHeader``
   and ``V2Parser.PREFIX`` live in private modules (the package exports only
   ``proxyEndpoint``, whose wrapper starts the wrapped protocol before the header has
   arrived).  ``parse_proxy_header`` is their one caller.
5. ``twisted.python.log.theLogPublisher._publishPublisher``, swapped for the moment
   the write-through check opens and closes its own port (``_self_check_unlogged``):
   ``tcp.Port`` logs "starting on" and "Closed" whatever its factory's ``noisy`` says,
   and a self-check's port is no news to an operator reading the info log.
"""

from __future__ import annotations

import inspect
import socket
import struct
from contextlib import contextmanager
from functools import cache, partial
from typing import Any, Callable, Iterator

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, tcp, unix
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.posixbase import PosixReactorBase
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from zope.interface import directlyProvides, providedBy
from zope.interface.declarations import Provides

import twisted

try:  # STARTTLS on a TCP transport; check() reports it if it moved
    from twisted.internet._newtls import startTLS as _start_tls
except ImportError:  # pragma: no cover
    _start_tls = None  # type: ignore[assignment]  # a Twisted without it: check() says so

#: Verified from the first (inclusive) to the second (exclusive) (major, minor) version;
#: setup.cfg's ``twisted[tls] >= 26.10, < 27`` says the same.
TESTED_TWISTED = ((26, 10), (27, 0))


class TwistedChanged(RuntimeError):
    """The installed Twisted no longer behaves as esmtpfa relies on."""


# -- 1. write-through TCP transports ----------------------------------------------------

def _queue_empty(transport: Any) -> bool:
    """Nothing waits in the transport's send queue (FileDescriptor internals)."""
    return not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer)


def _write(transport: Any, data: bytes) -> None:
    """``FileDescriptor.write`` that tries ``send()`` first when it cannot reorder data."""
    empty = _queue_empty(transport)
    if (data and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected
            # a pull producer is driven by doWrite; a streaming one is only paused and
            # resumed by the buffer's size, which a write that left at once did not grow
            and (transport.producer is None or transport.streamingProducer)
            and empty):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN; or an error that doWrite will report as connectionLost
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    FileDescriptor.write(transport, data)
    _began_waiting(transport, empty)


def _write_sequence(transport: Any, iovec: Any) -> None:
    """``FileDescriptor.writeSequence``, noting when output begins to wait."""
    empty = _queue_empty(transport)
    FileDescriptor.writeSequence(transport, iovec)
    _began_waiting(transport, empty)


def _began_waiting(transport: Any, was_empty: bool) -> None:
    if was_empty and not _queue_empty(transport):  # the kernel is full: output waits
        transport._output_moved = transport.reactor.seconds()


class _DirectWrites(FileDescriptor):
    """What the STARTTLS layer writes ciphertext through (its "bypass" class)."""

    write = _write
    writeSequence = _write_sequence


class _WriteThrough:
    """Mixed into ``tcp.Server`` and ``tcp.Client``.

    It also notes when queued output last moved (``output_waiting_since``): when a write
    had to queue, and whenever ``doWrite`` got the kernel to take more of the queue.  A
    peer that reads nothing lets nothing move, however long the output waits."""

    _output_moved = 0.0  # when output began to wait, or last left the queue

    def writeSomeData(self, data: Any) -> Any:
        sent = super().writeSomeData(data)  # type: ignore[misc]
        if isinstance(sent, int) and sent > 0:
            self._output_moved = self.reactor.seconds()  # type: ignore[attr-defined]
        return sent

    def write(self, data: bytes) -> None:
        if self.TLS:  # type: ignore[attr-defined]  # STARTTLS: encrypt, then _DirectWrites
            super().write(data)  # type: ignore[misc]
        else:
            _write(self, data)

    def writeSequence(self, iovec: Any) -> None:
        if self.TLS:  # type: ignore[attr-defined]
            super().writeSequence(iovec)  # type: ignore[misc]
        else:
            _write_sequence(self, iovec)

    #: Whether the application above writes whole batches itself, so that the TLS
    #: layer may encrypt and send each write at once (``_write_at_once``).
    _writes_batched = False

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        if _start_tls is None:  # pragma: no cover  (check() refuses such a Twisted)
            super().startTLS(ctx, normal)
            return
        _start_tls(self, ctx, normal, _DirectWrites)
        _keep_declarations(self)
        if self._writes_batched:
            _write_at_once(self.protocol)  # type: ignore[attr-defined]


#: The ``zope.interface`` declarations ``startTLS`` makes for each connection, kept.
_KEPT_DECLARATIONS: dict[tuple[type, type], tuple[Any, ...]] = {}


def _keep_declarations(transport: Any) -> None:
    """Keep alive the per-instance interface declarations ``startTLS`` makes.

    ``startTLS`` declares ``ISSLTransport`` on the transport, and the TLS layer's
    ``makeConnection`` declares on itself, one ``directlyProvides`` after the other,
    each interface the transport provides.  ``zope.interface`` shares such declarations
    between instances through a cache of *weak* references: when the connection goes, so
    do they, and the next connection computes them again (a resolution order each,
    about a tenth of a millisecond of CPU per STARTTLS).  Held here, one set per pair of
    classes, they are computed once per process."""
    tls = transport.protocol
    key = (type(transport), type(tls))
    if key not in _KEPT_DECLARATIONS:
        _KEPT_DECLARATIONS[key] = (transport.__provides__, *(
            Provides(type(tls), interface) for interface in providedBy(tls.transport)))


class _WritesAtOnce:
    """Stands in for the STARTTLS layer's write aggregator: each write is encrypted and
    sent now.  Twisted's aggregator holds small writes for a turn of the reactor (a timed
    call per write, and the ciphertext of one reply in a second ``send``); an
    application that gathers its own writes gains nothing from it."""

    def __init__(self, write: Callable[[bytes], object]):
        self.write = write

    def flush(self) -> None:
        """Nothing is held."""

    def close(self) -> None:
        """Nothing is scheduled."""


def _write_at_once(tls: Any) -> None:
    """Make a ``BufferingTLSTransport`` write without aggregating: its ``write`` is an
    instance attribute bound to its ``_aggregator`` (set in its ``__init__``), and the
    aggregator's ``flush`` and ``close`` are what ``loseConnection`` and
    ``connectionLost`` call."""
    tls._aggregator = _WritesAtOnce(partial(TLSMemoryBIOProtocol.write, tls))
    tls.write = tls._aggregator.write


class _Server(_WriteThrough, tcp.Server):
    #: The SMTP server gathers the replies to what one read brought into one write
    #: (``ESMTPServer._flush``), and is the one server protocol that starts TLS.
    _writes_batched = True


class _Client(_WriteThrough, tcp.Client):
    pass


class _Port(tcp.Port):
    transport = _Server


class _Connector(tcp.Connector):
    def _makeTransport(self) -> _Client:
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


class _UNIXServer(_WriteThrough, unix.Server):
    """A workers' control channel (an adopted UNIX socket) that writes through."""


class WriteThroughReactor:
    """``reactor``, except that its TCP ports and connections write through."""

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

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: socket.AddressFamily,
                        factory: Any) -> tcp.Port:
        """A worker's listener: a socket its supervisor bound (``esmtpfa.runtime.workers``)."""
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)
        listening = _Port._fromListeningDescriptor(
            self._reactor, fileDescriptor, addressFamily, factory)
        listening.startListening()
        return listening

    def adoptStreamConnection(self, fileDescriptor: int,
                              addressFamily: socket.AddressFamily, factory: Any) -> Any:
        """A workers' control channel (one end of a UNIX socket pair)."""
        if addressFamily != socket.AF_UNIX:
            return self._reactor.adoptStreamConnection(fileDescriptor, addressFamily,
                                                       factory)
        return _UNIXServer._fromConnectedSocket(fileDescriptor, factory, self._reactor)


def output_waiting_since(transport: Any) -> float | None:
    """When the queued output of a write-through ``transport`` last moved (or began to
    wait); None when nothing waits, or for any other transport (nothing is known)."""
    if not isinstance(transport, _WriteThrough) or _queue_empty(transport):
        return None
    return transport._output_moved


def output_waiting(transport: Any) -> int:
    """Octets queued in ``transport`` that the kernel has not taken yet."""
    return (len(transport.dataBuffer) - transport.offset) + transport._tempDataLen


# -- 2. twisted.web ---------------------------------------------------------------------

#: The hooks the HTTP channels override (public names, internal contract).
CHANNEL_HOOKS = ("allHeadersReceived", "allContentReceived", "rawDataReceived",
                 "requestDone", "dataReceived", "loseConnection")
REQUEST_HOOKS = ("gotLength", "handleContentChunk", "requestReceived")


def request_version(channel: HTTPChannel) -> bytes:
    """The HTTP version of the request whose head was just received."""
    return getattr(channel, "_version", b"")


def take_expect_continue(channel: HTTPChannel, request: Request) -> bool:
    """Remove a ``100-continue`` expectation from ``request`` before Twisted answers it;
    true when the client is waiting for ``100 Continue`` (HTTP/1.1 only)."""
    values = request.requestHeaders.getRawHeaders(b"expect")
    if not values:
        return False
    request.requestHeaders.removeHeader(b"expect")
    return (values[0].strip().lower() == b"100-continue"
            and request_version(channel) == b"HTTP/1.1")


# -- 3. accessors -----------------------------------------------------------------------

def request_gone(request: Request) -> bool:
    """Whether the client of ``request`` has disconnected (nothing may be written)."""
    return request._disconnected


def listening_service(endpoint: Any, factory: Any) -> StreamServerEndpointService:
    """A listening service whose failure to listen (a port in use) raises from
    ``startService``, so startup stops loudly instead of logging and running deaf."""
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service


def port_of(service: StreamServerEndpointService) -> defer.Deferred:
    """Fires with the service's listening port once it listens (after ``startService``)."""
    waiting = service._waitingForPort
    assert waiting is not None, "port_of() before startService()"
    return waiting


# -- 4. twisted.protocols.haproxy ---------------------------------------------------------

#: The twelve octets every PROXY protocol v2 header starts with.
PROXY_V2_SIGNATURE: bytes = V2Parser.PREFIX


class ProxyHeaderInvalid(ValueError):
    """A PROXY protocol header Twisted's parsers refuse (or stumble on)."""


def parse_proxy_header(header: bytes) -> tuple[Any, Any]:
    """``(source, destination)`` addresses of one complete PROXY header: a v1 line without
    its CRLF, or a whole v2 header; ``(None, None)`` for v1 ``UNKNOWN`` and v2 ``LOCAL``
    (the proxy speaking for itself).  Raises ``ProxyHeaderInvalid``."""
    if header == b"PROXY UNKNOWN":  # legal v1 (nothing follows), which V1Parser refuses
        return None, None
    parser = V2Parser if header.startswith(PROXY_V2_SIGNATURE) else V1Parser
    try:
        info = parser.parse(header)
    # Twisted lets a few malformed headers through as other errors (a v1 port that is not
    # a number, an unknown v2 address family, ``ord(b"")`` on a v2 signature with nothing
    # after it): all of them mean "malformed".
    except (InvalidProxyHeader, ValueError, KeyError, IndexError, TypeError,
            struct.error) as error:
        raise ProxyHeaderInvalid(type(error).__name__) from None
    return info.source, info.destination


# -- check() ----------------------------------------------------------------------------

def twisted_version() -> tuple[int, int]:
    major, minor = twisted.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise TwistedChanged(what)


def _check_version() -> None:
    low, high = TESTED_TWISTED
    _require(low <= twisted_version() < high,
             f"Twisted {twisted.__version__} is outside the tested range "
             f"{low[0]}.{low[1]} to below {high[0]}.{high[1]}")


def _check_signatures() -> None:
    _require(_start_tls is not None, "twisted.internet._newtls.startTLS is gone")
    expected: list[tuple[str, Callable, list[str]]] = [
        ("_newtls.startTLS", _start_tls, ["transport", "contextFactory", "normal", "bypass"]),
        ("tcp.Server.__init__", tcp.Server.__init__,
         ["self", "sock", "protocol", "client", "server", "sessionno", "reactor"]),
        ("tcp.Client.__init__", tcp.Client.__init__,
         ["self", "host", "port", "bindAddress", "connector", "reactor"]),
        ("tcp.Port.__init__", tcp.Port.__init__,
         ["self", "port", "factory", "backlog", "interface", "reactor"]),
        ("tcp.Connector.__init__", tcp.Connector.__init__,
         ["self", "host", "port", "factory", "timeout", "bindAddress", "reactor"]),
        ("tcp.Connector._makeTransport", tcp.Connector._makeTransport, ["self"]),
    ]
    for name, function, parameters in expected:
        found = list(inspect.signature(function).parameters)
        _require(found == parameters, f"{name}({', '.join(found)}) is no longer "
                                      f"{name}({', '.join(parameters)})")
    _require(tcp.Port.transport is tcp.Server, "tcp.Port.transport is no longer tcp.Server")
    adopted: list[tuple[str, Callable, list[str]]] = [
        ("tcp.Port._fromListeningDescriptor", tcp.Port._fromListeningDescriptor,
         ["reactor", "fd", "addressFamily", "factory"]),
        ("unix.Server._fromConnectedSocket", unix.Server._fromConnectedSocket,
         ["fileDescriptor", "factory", "reactor"]),
    ]
    for name, function, parameters in adopted:  # classmethods: no ``cls`` in the list
        found = list(inspect.signature(function).parameters)
        _require(found == parameters, f"{name}({', '.join(found)}) is no longer "
                                      f"{name}({', '.join(parameters)})")
    _require(issubclass(unix.Server, tcp.Server),
             "unix.Server is no longer a tcp.Server (write-through relies on its queue)")


@contextmanager
def _self_check_unlogged() -> Iterator[None]:
    """No ``twisted.python.log`` line while the self-check's own port starts and stops.

    Only the check's synchronous steps run inside (before the reactor runs), so what
    it keeps out of the log is the check's own port's lines."""
    from twisted.python import log as legacy_log
    publisher = legacy_log.theLogPublisher
    original = publisher._publishPublisher
    publisher._publishPublisher = lambda event: None
    try:
        yield
    finally:
        publisher._publishPublisher = original


def _check_write_through() -> None:
    """The write-through transports, checked on a real port (``_write_through_on_a_port``)
    without the port's and its factories' log lines."""
    from twisted.python import log as legacy_log
    _require(callable(getattr(legacy_log.theLogPublisher, "_publishPublisher", None)),
             "twisted.python.log.theLogPublisher._publishPublisher is gone")
    with _self_check_unlogged():
        _write_through_on_a_port()


def _check_tls_aggregator(clock: Any) -> None:
    """What ``_write_at_once`` replaces: the TLS layer ``startTLS`` builds (the
    factory's ``protocol``) holds its writes in ``_aggregator`` (``write``, ``flush``,
    ``close``), and its ``write`` is an instance attribute bound to the aggregator's."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import CertificateOptions
    factory = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol),
                                  clock)
    tls = factory.protocol(factory, Protocol(), False)
    aggregator = getattr(tls, "_aggregator", None)
    _require(all(callable(getattr(aggregator, name, None))
                 for name in ("write", "flush", "close")),
             "the STARTTLS layer no longer aggregates its writes in _aggregator")
    _require(vars(tls).get("write") == getattr(aggregator, "write", None),
             "the STARTTLS layer's write is no longer its aggregator's write")


def _quiet(factory: Any) -> Any:
    """A factory that logs no "Starting factory" / "Stopping factory" lines."""
    factory.noisy = False
    return factory


def _write_through_on_a_port() -> None:
    """A real listening port and connection on loopback, driven by hand on a
    ``MemoryReactorClock`` (so it works before the reactor runs): the accepted transport
    must be ours, write through when its queue is empty, queue behind queued bytes, and
    send the STARTTLS layer's ciphertext through its bypass."""
    from twisted.internet.protocol import ClientFactory, Factory, Protocol
    from twisted.internet.ssl import CertificateOptions
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    accepted: list[Any] = []

    class Accepted(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self.transport)

    port = _Port(0, _quiet(Factory.forProtocol(Accepted)), 5, "127.0.0.1", reactor)
    port.startListening()
    peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    peer.setblocking(False)
    try:
        port.doRead()  # accept: tcp.Port builds its ``transport`` class
        _require(len(accepted) == 1 and type(accepted[0]) is _Server,
                 "tcp.Port no longer builds its connections from Port.transport")
        server = accepted[0]
        _require(server._writeDisconnected is False and server.producer is None
                 and server.streamingProducer is False and server.TLS is False
                 and _queue_empty(server),
                 "a new tcp.Server no longer has the send-queue attributes write-through "
                 "reads (_tempDataBuffer, dataBuffer, offset, _writeDisconnected, "
                 "producer, streamingProducer, TLS)")

        def received() -> bytes:
            try:
                return peer.recv(65536)
            except BlockingIOError:
                return b""

        server.write(b"one")
        _require(received() == b"one", "a write with an empty queue no longer leaves at once")
        FileDescriptor.write(server, b"two")  # Twisted's own write: queued
        _require(list(server._tempDataBuffer) == [b"two"] and not _queue_empty(server),
                 "FileDescriptor.write no longer queues in _tempDataBuffer")
        server.write(b"three")
        _require(received() == b"", "a write overtook bytes already queued")
        _require(output_waiting(server) == len(b"twothree"),
                 "FileDescriptor's dataBuffer, offset and _tempDataLen no longer count "
                 "what is queued")
        server._output_moved = -1.0
        _require(output_waiting_since(server) == -1.0,
                 "queued output is no longer seen as waiting")
        server.doWrite()
        _require(received() == b"twothree" and _queue_empty(server),
                 "FileDescriptor.doWrite no longer empties the queue it was given")
        _require(server._output_moved == reactor.seconds()
                 and output_waiting_since(server) is None,
                 "FileDescriptor.doWrite no longer sends through writeSomeData")
        _check_tls_aggregator(reactor)
        server.startTLS(CertificateOptions(), normal=False)  # we are the TLS client
        _require(server.TLS is True, "startTLS no longer sets transport.TLS")
        layer = server.protocol
        _require(isinstance(layer, TLSMemoryBIOProtocol)
                 and layer.write == layer._aggregator.write,
                 "_newtls.startTLS no longer puts its TLS layer in transport.protocol")
        kept = _KEPT_DECLARATIONS.get((type(server), type(layer)), ())
        _require(ISSLTransport.providedBy(server)
                 and kept[:1] == (vars(server).get("__provides__"),),
                 "startTLS no longer declares ISSLTransport on the transport")
        hello = received()
        _require(hello[:1] == b"\x16", "_newtls.startTLS no longer writes the TLS "
                                      "handshake through its bypass class at once")
        server.connectionLost(Failure(ConnectionDone()))

        connector = _Connector("127.0.0.1", port.getHost().port,
                               _quiet(ClientFactory.forProtocol(Protocol)), 5, None, reactor)
        connector.connect()
        _require(type(connector.transport) is _Client,
                 "tcp.Connector.connect no longer builds its transport by _makeTransport")
        connector.stopConnecting()

        # What a worker adopts (esmtpfa.runtime.workers): its listener and its control channel.
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        bound.listen(5)
        bound.setblocking(False)
        try:
            listening = _Port._fromListeningDescriptor(
                reactor, bound.fileno(), socket.AF_INET, _quiet(Factory.forProtocol(Accepted)))
            _require(type(listening) is _Port and listening.transport is _Server,
                     "tcp.Port._fromListeningDescriptor no longer builds its own class")
        finally:
            bound.close()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            channel = _UNIXServer._fromConnectedSocket(
                ours.fileno(), _quiet(Factory.forProtocol(Accepted)), reactor)
            _require(type(channel) is _UNIXServer and _queue_empty(channel),
                     "unix.Server._fromConnectedSocket no longer builds its own class")
            channel.write(b"four")
            theirs.settimeout(5)
            _require(theirs.recv(16) == b"four",
                     "an adopted UNIX connection no longer writes through")
            channel.connectionLost(Failure(ConnectionDone()))
        finally:
            ours.close()
            theirs.close()
    finally:
        peer.close()
        port.connectionLost(None)


def _check_web() -> None:
    """Feed a real ``HTTPChannel`` a request head that expects ``100 Continue``."""
    from twisted.internet.testing import StringTransport

    for name in CHANNEL_HOOKS:
        _require(callable(getattr(HTTPChannel, name, None)), f"HTTPChannel.{name} is gone")
    for name in REQUEST_HOOKS:
        _require(callable(getattr(Request, name, None)), f"Request.{name} is gone")
    channel = HTTPChannel()
    transport = StringTransport()
    seen: dict[str, Any] = {}
    requests: list[Request] = []

    def all_headers_received(original=channel.allHeadersReceived) -> None:
        seen["version"] = request_version(channel)
        original()
        seen["continued"] = b"100 Continue" in transport.value()

    def request_factory(channel: HTTPChannel, queued: Any = None) -> Request:
        requests.append(Request(channel))
        return requests[-1]

    channel.allHeadersReceived = all_headers_received  # type: ignore[method-assign]
    channel.requestFactory = request_factory  # type: ignore[assignment]
    channel.makeConnection(transport)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 3\r\n\r\n")
    _require(seen.get("version") == b"HTTP/1.1",
             "HTTPChannel._version no longer holds the request's version when "
             "allHeadersReceived runs")
    _require(bool(seen.get("continued")), "HTTPChannel.allHeadersReceived no longer "
                                          "answers Expect: 100-continue from the headers")
    _require(len(requests) == 1 and request_gone(requests[0]) is False,
             "Request._disconnected is not False on a live request")
    channel.connectionLost(Failure(ConnectionDone()))
    _require(request_gone(requests[0]) is True,
             "Request._disconnected is not set when the connection is lost")


def _check_listening_service() -> None:
    """A service whose endpoint fails to listen must raise from startService, and one
    whose endpoint listens must hand out the port."""
    class Endpoint:
        def __init__(self, result: Any):
            self.result = result

        def listen(self, factory: Any) -> defer.Deferred:
            if isinstance(self.result, Exception):
                return defer.fail(self.result)
            return defer.succeed(self.result)

    failing = listening_service(Endpoint(OSError("in use")), None)
    try:
        failing.privilegedStartService()
    except OSError:
        pass
    else:
        raise TwistedChanged("StreamServerEndpointService._raiseSynchronously no longer "
                             "makes a failure to listen raise")
    port = object()
    working = listening_service(Endpoint(port), None)
    working.privilegedStartService()
    found: list[Any] = []
    port_of(working).addCallback(found.append)
    _require(found == [port], "StreamServerEndpointService._waitingForPort no longer "
                              "fires with the listening port")


def _check_haproxy() -> None:
    """Parse real v1 and v2 headers (TCP4, TCP6, LOCAL) and malformed ones."""
    from twisted.internet.address import IPv4Address, IPv6Address

    _require(PROXY_V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n",
             "V2Parser.PREFIX is no longer the PROXY protocol v2 signature")
    source, destination = parse_proxy_header(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25")
    _require(source == IPv4Address("TCP", "192.0.2.1", 56324)
             and destination == IPv4Address("TCP", "198.51.100.2", 25),
             "V1Parser.parse no longer reads a TCP4 line into IPv4Address source/destination")
    source, _ = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 465")
    _require(source == IPv6Address("TCP", "2001:db8::1", 4000),
             "V1Parser.parse no longer reads a TCP6 line into an IPv6Address")
    v2 = (PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c" + socket.inet_aton("192.0.2.7")
          + socket.inet_aton("198.51.100.2") + struct.pack("!HH", 40000, 587))
    source, _ = parse_proxy_header(v2)
    _require(source == IPv4Address("TCP", "192.0.2.7", 40000),
             "V2Parser.parse no longer reads a PROXY TCP4 header into an IPv4Address")
    _require(parse_proxy_header(PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00") == (None, None),
             "V2Parser.parse no longer reads a LOCAL header as having no addresses")
    for bad in (b"PROXY TCP4 192.0.2.1", b"PROXY TCP4 a b c d", b"PROXY SCTP x y 1 2",
                PROXY_V2_SIGNATURE + b"\x31\x11\x00\x00"):
        try:
            parse_proxy_header(bad)
        except ProxyHeaderInvalid:
            continue
        raise TwistedChanged(f"the PROXY parsers accept the malformed header {bad!r}")


_CHECKS: tuple[tuple[str, Callable[[], None]], ...] = (
    ("version", _check_version),
    ("signatures", _check_signatures),
    ("write-through", _check_write_through),
    ("twisted.web", _check_web),
    ("listening service", _check_listening_service),
    ("twisted.protocols.haproxy", _check_haproxy),
)


def check() -> None:
    """Raise ``TwistedChanged`` naming every internal above that no longer holds."""
    problems = []
    for name, run in _CHECKS:
        try:
            run()
        except TwistedChanged as error:
            problems.append(f"{name}: {error}")
        except Exception as error:  # an attribute gone, a signature changed…
            problems.append(f"{name}: {type(error).__name__}: {error}")
    if problems:
        raise TwistedChanged(
            f"Twisted {twisted.__version__} differs from what esmtpfa/common/internals.py relies "
            "on (docs/twisted-internals.md):\n  " + "\n  ".join(problems))


@cache
def checked() -> bool:
    """``check()``, once per process (the callers ask at every connection)."""
    check()
    return True


__all__ = ["CHANNEL_HOOKS", "PROXY_V2_SIGNATURE", "REQUEST_HOOKS", "TESTED_TWISTED",
           "ProxyHeaderInvalid", "TwistedChanged", "parse_proxy_header",
           "WriteThroughReactor", "check", "checked", "listening_service",
           "output_waiting", "output_waiting_since", "port_of",
           "request_gone", "request_version", "take_expect_continue", "twisted_version"]
