"""Bounds on the HTTP listeners: how many connections, and how long each may take.

``HTTPLimits`` carries the flags (``docs/http-limits.md`` lists them with their
environment variables and defaults).  ``CappedFactory`` sits outermost on a listener,
outside TLS, so a connection over a cap is aborted as soon as it is accepted, before any
TLS handshake or HTTP parsing: it costs one ``accept()`` and one ``close()``, and never
holds a file descriptor the SMTP listeners need.

The caps are also held to a share of the process's open-file limit
(``RLIMIT_NOFILE``): each HTTP listener gets at most ``1 / DESCRIPTOR_SHARE`` of it
whatever the flags say, so the two HTTP listeners together can never take more than a
quarter of the descriptors, and SMTP keeps the rest.

A cap full of silent connections must not keep a real client out, and holding it must
cost an attacker more than it costs the relay (docs/http-limits.md, "Near the cap").
Two rules, both on the count of this process's own connections on the listener:

* **busy**: once a listener holds ``BUSY_SHARE`` of its cap, a new connection gets
  ``busy_timeout`` instead of ``header_timeout`` for its TLS handshake and the first
  byte of its request (``HTTPLimits.first_byte_timeout``);
* **at the cap**: a new connection over the total cap closes the oldest connection
  that is waiting for a request and never logged in (``GuardedChannel.evictable``),
  and takes its slot.  RFC 9112 (section "Persistence") lets a server close an idle
  connection at any time; a client retries on a new one.  The per-address cap still
  refuses: closing one of an address's connections for another of the same address
  gains nothing.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from esmtpfa.common.logs import logger
from esmtpfa.common.transport import IStreamTransport
from esmtpfa.limits.guard import UNAVAILABLE
from esmtpfa.limits.interfaces import IConnectionLedger
from esmtpfa.limits.ledgers import ConnectionLimits
from esmtpfa.web.requestlog import RequestLog

log = logger("esmtpfa.web")

#: The ledgers' reason for a connection over the total cap (``ConnectionLimits``).
TOTAL = "total limit"

#: Each HTTP listener may hold at most this fraction (1/n) of the open-file limit.
DESCRIPTOR_SHARE = 8
#: From this share of its cap on, a listener gives new connections ``busy_timeout``
#: for their first byte: early enough that connections opened meanwhile are short-lived
#: by the time the cap is reached.
BUSY_SHARE = 0.75


def descriptor_limit() -> int | None:
    """The soft limit on open files, or None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class HTTPLimits:
    max_connections: int = 200
    max_connections_per_ip: int = 20
    header_timeout: float = 10.0  # the whole request head, from connect or first byte
    body_timeout: float = 30.0  # allowance on top of the minimum rate
    min_body_rate: float = 4096.0  # octets per second the body must average
    idle_timeout: float = 15.0  # kept alive between requests, or an answer left unread
    close_grace: float = 5.0  # a polite close that has not completed by then is aborted
    busy_timeout: float = 2.0  # TLS handshake and first byte, near the cap

    def first_byte_timeout(self, load: float) -> float:
        """Seconds a new connection gets for its TLS handshake and first request byte,
        when its listener holds ``load`` (a share) of its cap.  Under ``BUSY_SHARE`` it
        is the head deadline itself: a quiet listener treats every client alike."""
        if load < BUSY_SHARE:
            return self.header_timeout
        return min(self.busy_timeout, self.header_timeout)

    def body_deadline(self, started: float, received: int) -> float:
        """When a body that started at ``started`` and brought ``received`` octets so far
        must have ended: a fixed allowance plus the time the minimum rate needs.  A
        client trickling below the rate falls behind for good, however often it sends."""
        return started + self.body_timeout + received / self.min_body_rate

    def connection_limits(self, listener: str,
                          descriptors: int | None = None) -> ConnectionLimits:
        """The caps of one listener, held to its share of ``descriptors`` (by default
        the process's open-file limit), with a warning when that lowers a flag."""
        if descriptors is None:
            descriptors = descriptor_limit()
        total = self.max_connections
        if descriptors is not None:
            share = max(descriptors // DESCRIPTOR_SHARE, 1)
            if total > share:
                log.warn("{listener}: --http-max-connections {configured} lowered to "
                         "{share}: the process may open {descriptors} files and an HTTP "
                         "listener gets at most 1/{n} of them (raise the limit with "
                         "ulimit -n)", listener=listener, configured=total, share=share,
                         descriptors=descriptors, n=DESCRIPTOR_SHARE)
                total = share
        return ConnectionLimits(total, min(self.max_connections_per_ip, total))


class CountedConnection(ProtocolWrapper):
    """A connection under the caps; ``host`` is what it counts against.

    When the count is kept in this process the decision is made before the connection
    has a protocol (``CappedFactory.buildProtocol``).  A worker's count is kept by its
    supervisor and answers a moment later: the connection then reaches the HTTP channel
    only once admitted, and nothing is read from it before."""

    factory: CappedFactory
    transport: IStreamTransport
    host = ""
    admitted = True
    decision: Any = None  # the pending answer of a ledger in another process
    released = False  # its slot was given to another connection (``evict``)

    def makeConnection(self, transport) -> None:
        if self.decision is None:
            super().makeConnection(transport)
            return
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        transport.pauseProducing()
        decision, self.decision = self.decision, None
        decision.addCallbacks(self._decided, self._unknown)

    def _decided(self, reason: str | None, may_evict: bool = True) -> None:
        if not self.connected:  # gone while the count was asked
            if reason is None:
                self.factory.limits.release(self.host)
            return
        if reason == TOTAL and may_evict and self.factory.evict_one():
            self.factory.limits.refusal(self.host).addCallbacks(  # once more, freed
                self._decided, self._unknown, callbackArgs=(False,))
            return
        if reason is not None:
            self.factory.requests.over_cap(self.factory.name, self.host)
            self.transport.loseConnection()
            return
        self.admitted = True
        self.factory.registerProtocol(self)
        self.transport.resumeProducing()
        # A ProtocolWrapper is its protocol's transport (``directlyProvides`` above).
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def _unknown(self, failure) -> None:
        if failure.check(*UNAVAILABLE):  # an outage: summed up, not a line per connection
            self.factory.requests.count_unavailable(
                self.factory.name, self.host,
                failure.getErrorMessage() or failure.type.__name__)
        else:
            log.failure("counting an HTTP connection failed", failure)
        if self.connected:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.admitted:
            super().connectionLost(reason)
        else:
            self.connected = False

    def channel(self) -> Any:
        """The HTTP channel under this wrapper (and TLS, if any); None before it has
        one."""
        protocol: Any = self.wrappedProtocol
        while protocol is not None and not hasattr(protocol, "evictable"):
            protocol = getattr(protocol, "wrappedProtocol", None)
        return protocol

    def evict(self) -> None:
        """Give this connection's slot up now, and abort it: the slot goes to a new
        connection at once, not when the abort completes (a reactor turn later)."""
        self.released = True
        self.factory.limits.release(self.host)
        channel = self.channel()
        if channel is not None:
            channel.evicted()
        else:
            self.transport.abortConnection()


class CappedFactory(WrappingFactory[CountedConnection]):
    """Admits a connection only under the total and per-address caps; others are closed
    at once (``buildProtocol`` returning ``None`` makes the port close the socket), or,
    when the count is another process's, as soon as it answers."""

    protocol = CountedConnection
    noisy = False

    def __init__(self, wrapped: Any, limits: IConnectionLedger, requests: RequestLog,
                 name: str):
        super().__init__(wrapped)
        self.limits = limits
        self.requests = requests
        self.name = name

    # IProtocolFactory.buildProtocol may return None; WrappingFactory's annotation omits it.
    def buildProtocol(  # type: ignore[override]
            self, addr: Any) -> CountedConnection | None:
        host = getattr(addr, "host", "")
        decision = self.limits.refusal(host)
        if decision.called:
            refused: list = []
            decision.addBoth(refused.append)
            if refused[0] == TOTAL and self.evict_one():
                refused.clear()
                decision = self.limits.refusal(host)  # once more, with the slot freed
                if decision.called:
                    decision.addBoth(refused.append)
            if refused and refused[0] is not None:  # a reason, or a failure to count
                self.requests.over_cap(self.name, host)
                return None
        try:
            protocol = super().buildProtocol(addr)
        except BaseException:
            if decision.called:
                self.limits.release(host)
            raise
        protocol.host = host
        if not decision.called:
            protocol.admitted = False
            protocol.decision = decision
        return protocol

    def unregisterProtocol(self, protocol: CountedConnection) -> None:
        super().unregisterProtocol(protocol)
        if not protocol.released:
            self.limits.release(protocol.host)

    def load(self) -> float:
        """The share of the total cap this listener's connections in this process hold
        (with workers each counts its own: a lower bound of the listener's)."""
        return len(self.protocols) / max(self.limits.total, 1)

    def evict_one(self) -> bool:
        """Close the oldest connection that waits for a request and never logged in,
        giving its slot up; False when every connection is at work.  ``protocols`` is
        kept in the order connections were admitted, so the scan starts at the oldest
        and, under a flood of silent connections, stops at once."""
        for protocol in self.protocols:
            if protocol.released:
                continue
            channel = protocol.channel()
            if channel is not None and channel.evictable:
                self.requests.evicted(self.name, protocol.host)
                protocol.evict()
                return True
        return False

    def logPrefix(self) -> str:
        return self.name


__all__ = ["BUSY_SHARE", "DESCRIPTOR_SHARE", "CappedFactory", "HTTPLimits",
           "descriptor_limit"]
