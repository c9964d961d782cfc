"""The HTTP channel both listeners use: deadlines no trickle can move, bounded bodies,
back-pressure, and a close that always completes (``docs/http-limits.md``).

Twisted's ``HTTPChannel`` has one idle timeout that every byte pushes back, keeps
reading while a request is handled, and serves pipelined requests whose answers the
client never reads.  ``GuardedChannel`` keeps one deadline per phase of a request
instead, set when the phase starts and never moved by incoming data:

* the request head must be complete ``header_timeout`` seconds after the connection
  opened (TLS handshake included) or, on a kept-alive connection, after its first byte;
  near the listener's cap, a new connection's TLS handshake and first byte must come
  within ``busy_timeout`` (``web/bounds.py``);
* the body must keep up with ``min_body_rate`` after a ``body_timeout`` allowance;
* a kept-alive connection may stay silent ``idle_timeout`` seconds between requests, and
  a client that does not read an answer gets as long before the connection ends;
* a close that does not complete within ``close_grace`` seconds (a client that does not
  read, a TLS handshake that never ends) is aborted.

A client whose answers pile up unread is not read from, nor served its next pipelined
request, until it reads: output per connection stays around one answer.  A body is
counted against the site's limit as it arrives; it is read only once ``admit_body``
allows it (``100 Continue`` is sent then, not before), so a subclass can decide about a
request from its head alone (``web/loginfirst.py`` logs the client in first).
"""

from __future__ import annotations

import enum
import tempfile
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import implementer

from esmtpfa.common import internals
from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import logger
from esmtpfa.common.timeouts import Deadline
from esmtpfa.common.transport import IStreamTransport, limit_send_buffer
from esmtpfa.web.errors import HTTPError, raw_response, send_error

log = logger("esmtpfa.web")

#: After a refusal, drop at most this much of a body already on its way (so that the
#: client sees the answer rather than a reset), then abort.
DRAIN_REFUSED = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Phase(enum.Enum):
    HEAD = "waiting for the request head"
    IDLE = "idle between requests"
    LOGIN = "logging in"
    BODY = "reading the body"
    HANDLING = "handling the request"
    UNREAD = "waiting for the client to read the answer"
    DRAINING = "refused, dropping what is in flight"
    CLOSING = "closing"
    CLOSED = "closed"


#: Phases after which nothing more is read as HTTP.
ENDING = frozenset({Phase.DRAINING, Phase.CLOSING, Phase.CLOSED})


@implementer(IHandshakeListener)
class GuardedChannel(HTTPChannel):
    """An ``HTTPChannel`` with per-phase deadlines, back-pressure and a bounded close."""

    site: Any  # GuardedSite (set by Site.buildProtocol)
    transport: IStreamTransport
    #: How much of a body past the size limit is dropped before the abort.
    over_limit_drain = DRAIN_REFUSED
    _phase = Phase.HEAD
    _head_started = False
    _expect_continue = False
    _output_blocked = False
    _unread: Any = None  # a finished request whose answer the client has not read
    _body_started = 0.0
    _body_received = 0
    _drain_left = 0
    _drain_all = False
    _connected_at = 0.0
    _first_byte = False  # any byte of a request has arrived on this connection
    #: A request on this connection logged in: it is a client's, not a squatter's.
    logged_in = False
    #: The TLS handshake completed (``handshakeCompleted``; a listener with TLS only).
    _handshaken = False

    # -- phases ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connection_id = new_id()
        self._clock = self.site.reactor
        self._deadline = Deadline(self._clock, self._expired)
        limit_send_buffer(self.transport, self.site.send_buffer)  # docs/smtp-limits.md
        self._connected_at = self._clock.seconds()
        super().connectionMade()
        self._enter(Phase.HEAD, self.site.limits.first_byte_timeout(self.site.load()))

    def _enter(self, phase: Phase, seconds: float | None = None) -> None:
        self._phase = phase
        if seconds is None:
            self._deadline.clear()
        else:
            self._deadline.set(max(seconds, 0.0))

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def reading_body(self) -> bool:
        return self._phase is Phase.BODY

    @property
    def peer(self) -> str:
        return getattr(self.transport.getPeer(), "host", "")

    @property
    def identity(self) -> str | None:
        """Who the current request logged in as (for log lines); None here."""
        return None

    @property
    def evictable(self) -> bool:
        """Waiting for a request, and no request of it ever logged in: what a listener
        at its cap may close for a new connection (``web/bounds.py``)."""
        return self._phase in (Phase.HEAD, Phase.IDLE) and not self.logged_in

    def evicted(self) -> None:
        """The listener gave this connection's slot to a newer one: abort (it was
        waiting for a request, so no answer is cut short)."""
        self.abort(f"{self._phase.value}: closed for a new connection at the cap")

    def dataReceived(self, data: bytes) -> None:
        if self._phase in ENDING:
            self._drop(data)
            return
        if self._phase is Phase.IDLE:
            self._enter(Phase.HEAD, self.site.limits.header_timeout)
        if self._phase is Phase.HEAD:
            self._head_started = True
            if not self._first_byte:
                # The first byte ends the first-byte deadline; the head still has to
                # be complete ``header_timeout`` after the connection opened.
                self._first_byte = True
                self._enter(Phase.HEAD, self._connected_at +
                            self.site.limits.header_timeout - self._clock.seconds())
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase in ENDING:
            self._drop(data)
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        # Twisted would answer "Expect: 100-continue" itself, before anyone decided
        # whether the body is wanted: take it, and answer it in ``admit_body``.
        self._expect_continue = internals.take_expect_continue(self, self.requests[-1])
        super().allHeadersReceived()
        if self._phase is Phase.HEAD:
            self.head_complete()

    def head_complete(self) -> None:
        """The request head is in: refuse a declared body over the limit, or read it."""
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(self.site.too_large(), drain=self.over_limit_drain)
            return
        self.admit_body()

    def admit_body(self) -> None:
        """Read the body (if any) now, under the body deadline."""
        self.requests[-1].admit_body(self.length)
        self._body_started = self._clock.seconds()
        self._body_received = 0
        self._enter(Phase.BODY, self.site.limits.body_timeout)
        if self._expect_continue and self.length != 0:
            self.transport.write(CONTINUE)

    def body_progress(self, size: int) -> None:
        """``size`` more octets of body arrived: the deadline moves by what the minimum
        rate allows for them, never more."""
        self._body_received += size
        if self._phase is Phase.BODY:
            due = self.site.limits.body_deadline(self._body_started, self._body_received)
            self._deadline.set(max(due - self._clock.seconds(), 0.0))

    def allContentReceived(self) -> None:
        if self._phase in ENDING:
            if self._phase is Phase.DRAINING and self._drain_all:
                self.loseConnection()  # the refused body arrived whole: a clean close
            return
        self._enter(Phase.HANDLING)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self._output_blocked and self.persistent and self._phase is Phase.HANDLING:
            # The client has not read this answer: serve nothing more until it does.
            self._unread = request
            self._enter(Phase.UNREAD, self.site.limits.idle_timeout)
            return
        self._next_request(request)

    def _next_request(self, request: Any) -> None:
        if self.persistent and self._phase in (Phase.HANDLING, Phase.UNREAD):
            self._head_started = False
            self._enter(Phase.IDLE, self.site.limits.idle_timeout)
        super().requestDone(request)  # may parse a pipelined request: HEAD again

    # -- back-pressure ---------------------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's output buffer is full: the client is not reading.  Stop
        reading from it too, even while a request is handled (Twisted reads on then)."""
        self._output_blocked = True
        super().pauseProducing()
        if self._phase not in ENDING:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client read its answers: serve the next request, if one waited."""
        self._output_blocked = False
        super().resumeProducing()
        if self._phase is Phase.LOGIN:
            self.transport.pauseProducing()  # nothing is read while a login is pending
        elif self._unread is not None:
            request, self._unread = self._unread, None
            self._next_request(request)

    # -- ending ----------------------------------------------------------------------

    def refuse(self, error: HTTPError, *, drain: int) -> None:
        """Answer ``error`` now and end the connection without reading the body: drop
        at most ``drain`` octets already on their way (a clean close when that was all
        of a declared body), abort after the close grace otherwise."""
        if self._phase in ENDING:
            return
        self.site.request_log.refused(self.connection_id, self.peer, error.status,
                                      error.message, self.identity)
        self.persistent = False
        self.transport.write(raw_response(error))
        declared = self.length
        received = self._body_received + self._discard_unprocessed()
        remaining = None if declared is None else declared - received
        self._drain_all = remaining is not None and remaining <= drain
        self._drain_left = drain if remaining is None else min(remaining, drain)
        self._enter(Phase.DRAINING, self.site.limits.close_grace)
        if self._drain_left <= 0:
            self.loseConnection()
            return
        self.transport.resumeProducing()

    def _discard_unprocessed(self) -> int:
        """Drop what was read but not parsed yet; how many octets that was."""
        return len(self.clearLineBuffer())

    def _drop(self, data: bytes) -> None:
        if self._phase is not Phase.DRAINING:
            return
        self._drain_left -= len(data)
        if self._drain_left > 0:
            return
        if self._drain_all:
            self.loseConnection()
        else:
            self.abort("sent more than allowed after a refusal")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(HTTPError(431, f"request line or header field longer than "
                                   f"{self.MAX_LENGTH} octets"), drain=0)

    def loseConnection(self) -> None:
        """A polite close (the answer is flushed first), aborted if it cannot complete
        within the close grace."""
        if self._phase is Phase.CLOSED:
            return
        if self._phase is not Phase.CLOSING:
            self._enter(Phase.CLOSING, self.site.limits.close_grace)
        super().loseConnection()

    def abort(self, why: str) -> None:
        if self._phase is Phase.CLOSED:
            return
        log.debug("{connection_id} HTTP connection aborted: {why}",
                  connection_id=self.connection_id, why=why)
        self._enter(Phase.CLOSED)
        self.transport.abortConnection()

    def _expired(self) -> None:
        phase = self._phase
        if phase in (Phase.DRAINING, Phase.CLOSING):
            self.abort(f"{phase.value}: not done within the close grace")
        elif phase is Phase.BODY:
            self.refuse(HTTPError(408, f"request body not received in time (after "
                                       f"{self.site.limits.body_timeout:g} s, at least "
                                       f"{self.site.limits.min_body_rate:g} octets/s)"),
                        drain=0)
        elif phase is Phase.HEAD and self._head_started:
            self.refuse(HTTPError(408, f"request head not received within "
                                       f"{self.site.limits.header_timeout:g} s"), drain=0)
        elif phase is Phase.HEAD:  # nothing at all came (or no TLS handshake)
            self.site.request_log.closed(self.connection_id, self.peer, phase.value)
            # Nothing was written, so nothing is lost by an abort, and the slot is free
            # now rather than after a TLS close that waits for the handshake.
            self.abort("nothing received in time")
        else:
            self.loseConnection()

    def handshakeCompleted(self) -> None:
        """``IHandshakeListener``: TLS is up (called only behind a TLS listener)."""
        self._handshaken = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.site.tls and not self._handshaken:
            self.site.request_log.handshake_failed()
        self._phase = Phase.CLOSED
        self._deadline.stop()
        self._unread = None
        super().connectionLost(reason)


class BoundedRequest(Request):
    """A request whose body is counted against the site's limit as it arrives, and is
    read only once the channel admitted it.  ``spool_past``: a larger body goes to an
    anonymous temporary file; None keeps every body in memory (the limit is small)."""

    channel: GuardedChannel
    content: Any  # BytesIO, or a SpooledTemporaryFile for a large body
    spool_past: int | None = None
    received = 0

    def gotLength(self, length: int | None) -> None:
        # Twisted opens a temporary file here for a declared length over 100 KB (or none),
        # before anyone decided whether the body is wanted: start in memory instead.
        self.content = BytesIO()

    def admit_body(self, length: int | None) -> None:
        if self.spool_past is not None and (length is None or length > self.spool_past):
            self.content = tempfile.SpooledTemporaryFile(max_size=self.spool_past)

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or not channel.reading_body:
            return
        self.received += len(data)
        if self.received > channel.site.max_body:
            channel.refuse(channel.site.too_large(), drain=channel.over_limit_drain)
            return
        channel.body_progress(len(data))
        self.content.write(data)

    def processingFailed(self, reason: Failure) -> Failure:
        """A resource failed: log it, and answer a JSON 500 with no traceback."""
        log.failure("{connection_id} HTTP request failed", reason,
                    connection_id=getattr(self.channel, "connection_id", None))
        send_error(self, HTTPError(500, "internal error"))
        return reason


class GuardedRequest(BoundedRequest):
    """The metrics listener's requests: small bodies only, in memory."""


__all__ = ["BoundedRequest", "CONTINUE", "DRAIN_REFUSED", "GuardedChannel", "GuardedRequest",
           "Phase"]
