"""The PROXY protocol (v1 and v2) in front of the SMTP listeners (docs/smtp-limits.md).

Behind a TCP load balancer every connection comes from the balancer; the PROXY header it
sends first names the real client, and esmtpfa must use that address for everything it
does per client: the per-address connection limit, the login throttle, logs, metrics and
the ``Received`` header.  Only a proxy the operator trusts may name a client, else anyone
could choose the address they are limited and logged by.

``ProxyProtocolFactory`` wraps a listener's factory, outermost: for implicit TLS the
header precedes the TLS handshake.  Its wrapper differs from Twisted's
``twisted.protocols.haproxy`` wrapper, whose parsers it uses, in what a submission relay
needs:

* the wrapped protocol is started only once the header has named the client, so the
  SMTP session's ``connectionMade`` (which admits the connection, counts it against the
  client's address and writes the greeting) sees the proxied peer in
  ``transport.getPeer()``, and nothing is written to a connection without a header;
* a connection from outside ``--proxy-protocol-trusted``, a missing, malformed or
  unusable header, or silence past the deadline, closes the connection without a reply;
  those closes are logged through a ``RepeatSummary`` so that a flood costs a few lines;
* the header's addresses are checked (Twisted accepts any text as a v1 address), and a
  header split over several reads is reassembled within the protocol's own bounds (107
  octets for v1, the 16-bit length for v2);
* a TLS handshake inside (STARTTLS) reaches the session (``IHandshakeListener``).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from esmtpfa.common import internals
from esmtpfa.common.logs import logger
from esmtpfa.common.logsummary import RepeatSummary
from esmtpfa.common.transport import IStreamTransport

log = logger("esmtpfa.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The longest v1 header, CRLF included (the PROXY protocol specification, section 2.1).
V1_MAX = 107
V1_SIGNATURE = b"PROXY "
#: The v2 fixed part: signature, version and command, family, length (section 2.2).
V2_FIXED = 16
#: A v1 line as section 2.1 writes it: ``UNKNOWN`` (anything after it ignored), or
#: exactly two addresses and two decimal ports, single spaces.  Twisted's ``V1Parser``
#: ignores fields after the ports and reads a port with ``int()``, which also takes
#: ``+25`` and ``1_0``: a line no proxy writes must not name a client.  The addresses
#: themselves are checked by ``_checked``.
_V1_LINE = re.compile(
    rb"PROXY (?:UNKNOWN(?: .*)?|TCP[46] [^ ]+ [^ ]+ [0-9]{1,5} [0-9]{1,5})\Z", re.DOTALL)
#: Seconds between summary lines of closed connections (as for refused connections).
SUMMARY_INTERVAL = 5.0


def parse_networks(text: str) -> tuple[Network, ...]:
    """``--proxy-protocol-trusted``: comma-separated networks (``10.0.0.0/8``) or single
    addresses; a network with host bits set is refused, as it is most likely a typo."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as error:
            raise ValueError(f"{item!r} is not a network: {error}") from None
    if not networks:
        raise ValueError("expected one or more networks, e.g. 10.0.0.0/8,192.168.1.7")
    return tuple(networks)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a dual-stack socket reports it (``::ffff:10.1.2.3`` is IPv4)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """The networks whose connections may carry a PROXY header."""

    def __init__(self, networks: tuple[Network, ...]):
        self.networks = networks

    def trusts(self, host: str) -> bool:
        ip = _ip(host)
        return ip is not None and any(ip in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(network) for network in self.networks)


@dataclass(frozen=True)
class HeaderProblem:
    """Why a connection was closed before its session started.  ``kind`` is one of a
    small closed set (it keys the log summary); ``detail`` is for the full log line."""

    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Header:
    """A complete header: the client and the address it connected to (None when the
    proxy speaks for itself: v1 ``UNKNOWN``, v2 ``LOCAL``), and the bytes after it."""

    source: IAddress | None
    destination: IAddress | None
    rest: bytes


class HeaderReader:
    """Reassembles one PROXY header from the first reads of a connection."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Header | HeaderProblem | None:
        """The header, the problem with it, or None while more octets are needed."""
        buffer = self._buffer = self._buffer + data
        if buffer.startswith(internals.PROXY_V2_SIGNATURE[:len(buffer)]):
            return self._v2(buffer)
        if buffer.startswith(V1_SIGNATURE[:len(buffer)]):
            return self._v1(buffer)
        return HeaderProblem("no PROXY header", "the first octets are not a PROXY header")

    def _v1(self, buffer: bytes) -> Header | HeaderProblem | None:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                return HeaderProblem("malformed PROXY header", "v1 line longer than 107 octets")
            return None
        if not _V1_LINE.match(buffer, 0, end):
            self._buffer = b""
            return HeaderProblem("malformed PROXY header", "v1 line outside the grammar")
        return self._parsed(buffer[:end], buffer[end + 2:])

    def _v2(self, buffer: bytes) -> Header | HeaderProblem | None:
        if len(buffer) < V2_FIXED:
            return None
        size = V2_FIXED + struct.unpack("!H", buffer[14:16])[0]
        if len(buffer) < size:
            return None  # at most 64 KiB: the length field's bound
        return self._parsed(buffer[:size], buffer[size:])

    def _parsed(self, header: bytes, rest: bytes) -> Header | HeaderProblem:
        self._buffer = b""
        try:
            source, destination = internals.parse_proxy_header(header)
        except internals.ProxyHeaderInvalid as error:
            return HeaderProblem("malformed PROXY header", str(error))
        addresses = []
        for address in (source, destination):
            checked = _checked(address)
            if isinstance(checked, HeaderProblem):
                return checked
            addresses.append(checked)
        return Header(addresses[0], addresses[1], rest)


def _checked(address: IAddress | None) -> IAddress | HeaderProblem | None:
    """Only TCP over IPv4 or IPv6, with a real address and port, names an SMTP client.
    The address is written the standard way (Twisted spells v2 IPv6 addresses out in
    full), so that one client is one key for the per-address limits and the throttle."""
    if address is None:
        return None
    if not isinstance(address, (IPv4Address, IPv6Address)) or address.type != "TCP":
        return HeaderProblem("unusable PROXY header", f"not a TCP address: {address}")
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HeaderProblem("malformed PROXY header", "not an IP address")
    if ip.version != (4 if isinstance(address, IPv4Address) else 6):
        return HeaderProblem("malformed PROXY header", "not an address of its family")
    if not 0 <= address.port <= 65535:
        return HeaderProblem("malformed PROXY header", "port out of range")
    return type(address)("TCP", str(ip), address.port)


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection from a proxy: reads the header, then runs the wrapped protocol
    with the header's addresses as ``getPeer()`` and ``getHost()``."""

    factory: ProxyProtocolFactory
    transport: IStreamTransport
    wrappedProtocol: Any  # None once a connection without a session is gone

    def __init__(self, factory: "ProxyProtocolFactory", wrappedProtocol: Any):
        super().__init__(factory, wrappedProtocol)
        self._reader: HeaderReader | None = HeaderReader()
        self._header: Header | None = None
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection would start the wrapped protocol now.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        proxy = self.transport.getPeer()
        if not self.factory.trusted.trusts(getattr(proxy, "host", "")):
            self._refuse(HeaderProblem("untrusted source", "not in --proxy-protocol-trusted"))
            return
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._reader is None:  # refused: closing
            return
        result = self._reader.feed(data)
        if result is None:
            return
        if isinstance(result, HeaderProblem):
            self._refuse(result)
            return
        self._cancel_timer()
        self._reader, self._header = None, result
        log.debug("PROXY header from [{proxy}] names [{peer}]",
                  proxy=getattr(self.transport.getPeer(), "host", ""),
                  peer=getattr(self.getPeer(), "host", ""))
        self.wrappedProtocol.makeConnection(self)
        if result.rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(result.rest)

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()

    def handshakeCompleted(self) -> None:
        """STARTTLS runs below this wrapper: pass the news up to the session."""
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._header is not None:
            super().connectionLost(reason)
        else:  # the session never started: there is nothing to tell it
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None

    def _expired(self) -> None:
        self._timer = None
        self._refuse(HeaderProblem("no PROXY header in time",
                                   f"none within {self.factory.timeout:g} s"))

    def _refuse(self, problem: HeaderProblem) -> None:
        """Close without a word: a client without a proxy cannot understand SMTP here
        anyway, and an untrusted one learns nothing."""
        self._cancel_timer()
        self._reader = None
        self.factory.closed.record(
            problem.kind, "{listener}: closed a connection from [{peer}]: {reason} "
            "({detail})", listener=self.factory.name, reason=problem.kind,
            detail=problem.detail, peer=getattr(self.transport.getPeer(), "host", ""))
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyProtocolFactory(WrappingFactory[ProxyProtocolWrapper]):
    """Wraps one SMTP listener's factory (outermost: outside TLS)."""

    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(self, wrappedFactory: Any, *, trusted: TrustedProxies, timeout: float,
                 name: str, reactor: Any):
        super().__init__(wrappedFactory)
        self.trusted = trusted
        self.timeout = timeout
        self.name = name
        self.reactor = reactor
        self.closed = RepeatSummary(log, f"connections without a usable PROXY header "
                                         f"closed on {name}",
                                    interval=SUMMARY_INTERVAL, clock=reactor)

    def stopFactory(self) -> None:
        """The port stopped listening: write what the summary still counts."""
        self.closed.stop()


__all__ = ["HeaderProblem", "HeaderReader", "ProxyProtocolFactory", "ProxyProtocolWrapper",
           "TrustedProxies", "parse_networks"]
