"""The wire side of the upstream SMTP client: replies in, commands and message data out.

We own this code instead of using ``twisted.mail.smtp.ESMTPSender`` because the defects
that matter for a relay live exactly here (docs/twisted-defects.md, "Client side: what
the stock `ESMTPSender` gets wrong"): its dot-stuffing misses the first line and lines
crossing read boundaries (SMTP smuggling toward the upstream), it doubles CRs, and its
Deferred never fires when the connection is lost.

The protocol knows SMTP syntax, not delivery policy: it sends commands, matches replies to
them in order (so several can be in flight, RFC 2920), upgrades to TLS (RFC 3207), runs a
SASL exchange (RFC 4954) and streams one message with correct transparency (RFC 5321
§4.5.2).  What to send and what a reply means for the message is decided above it
(``session.py``: one negotiated session; ``pool.py``: reuse; ``upstream.py``: transactions
and failover).

Its failures are ``RelayError`` values from the start (``errors.py``): a lost connection,
a timeout, garbage, a TLS or AUTH failure is stated here, with its kind and its phase,
because only here is it known whether the final dot had left.  Once it had, every
failure is ``Phase.OUTCOME_UNKNOWN``: the upstream may have the message, and nobody above
may send it again (docs/delivery-guarantee.md, "After the final dot: never again by our
hand").
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IHandshakeListener, IPullProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.logs import logger
from esmtpfa.common.replies import Reply
from esmtpfa.common.timeouts import Deadline
from esmtpfa.common.transport import IStreamTransport
from esmtpfa.relay.client_sasl import Mechanism, SASLError, client_for
from esmtpfa.relay.errors import (
    abandoned,
    auth_cancelled,
    auth_refused,
    connection_failed,
    protocol_violation,
    session_refused,
    starttls_refused,
    tls_failed,
)
from esmtpfa.relay.interfaces import RelayError

#: RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers stay well below.
#: We accept more (long EHLO AUTH lines, verbose texts) but never an unbounded line.
MAX_REPLY_LINE = 8192
#: A multi-line reply longer than this is garbage, not an EHLO list.
MAX_REPLY_LINES = 512

#: RFC 5321 §4.5.3.2 minimum timeouts: 5 min for the greeting and most commands, 10 min
#: for the end-of-data reply.
DEFAULT_COMMAND_TIMEOUT = 300.0
DEFAULT_DATA_TIMEOUT = 600.0

#: Message content is written in pieces of about this size (the spool's read size): the
#: user-space buffer stays bounded, and a small message is one write.
BATCH = 64 * 1024

#: One-line upstream replies kept parsed (``_line_received``); past this many distinct
#: lines (queue ids make many) the cache starts over.
ONE_LINE_REPLIES = 256
_ONE_LINE_REPLIES: dict[bytes, Reply] = {}

_FORBIDDEN_IN_COMMAND = re.compile(rb"[\r\n\x00]")
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")


#: How a failure of the connection is stated (``errors.py``): each takes the detail, the
#: command and the upstream, and ``after_dot`` (the final dot had left).
_Fault = Callable[..., RelayError]


# --- EHLO keywords -----------------------------------------------------------------------

@dataclass(frozen=True)
class Extensions:
    """What the upstream advertised in its EHLO reply (RFC 5321 §4.1.1.1).

    ``keywords`` maps the upper-cased keyword to its parameter string.  After STARTTLS the
    client must discard this and ask again (RFC 3207 §4.2).
    """

    keywords: dict[str, str] = field(default_factory=dict)
    esmtp: bool = True  # False after a HELO fallback: no extensions at all

    @classmethod
    def parse(cls, reply: Reply) -> "Extensions":
        keywords: dict[str, str] = {}
        for line in reply.lines()[1:]:  # the first line is the server's greeting
            line = line.strip()
            if not line:
                continue
            name, _, params = line.partition(" ")
            if name.upper().startswith("AUTH="):  # pre-RFC 4954 servers: "AUTH=LOGIN PLAIN"
                name, params = "AUTH", (name[5:] + " " + params).strip()
            keywords.setdefault(name.upper(), params.strip())
        return cls(keywords)

    @classmethod
    def none(cls) -> "Extensions":
        return cls({}, esmtp=False)

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @cached_property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords  # RFC 2920

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords  # RFC 3207

    @cached_property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords  # RFC 6152

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords  # RFC 6531 (parameters must be ignored)

    @property
    def requiretls(self) -> bool:
        return "REQUIRETLS" in self.keywords  # RFC 8689

    @cached_property  # read for every message and every chunk it writes
    def size(self) -> int | None:
        """RFC 1870: None when SIZE is not offered, 0 when offered without a limit.
        The limit is ASCII digits: ``str.isdigit`` alone also takes ``²`` (which
        ``int()`` refuses) and other scripts' digits, which are no usable limit."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].split(" ", 1)[0]
        return int(value) if value.isascii() and value.isdigit() else 0

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords  # RFC 2034

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(m.upper() for m in self.keywords.get("AUTH", "").split())

    @property
    def limits(self) -> dict[str, str]:
        """RFC 9422 LIMITS as ``{NAME: value}``; empty when absent or malformed."""
        return parse_limits(self.keywords.get("LIMITS", "")) if "LIMITS" in self.keywords else {}

    @cached_property
    def mailmax(self) -> int | None:
        """LIMITS MAILMAX: transactions per connection (None: no limit announced)."""
        return _limit(self.limits.get("MAILMAX"))

    @cached_property
    def rcptmax(self) -> int | None:
        """LIMITS RCPTMAX: recipients per transaction (None: no limit announced)."""
        return _limit(self.limits.get("RCPTMAX"))


_LIMIT_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_LIMIT_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]+\Z")  # printable, no ";"


def parse_limits(text: str) -> dict[str, str]:
    """RFC 9422 §3: ``LIMITS name=value ...``.  A syntax error voids the whole keyword
    (§3.1: the client then behaves as if it were absent), like mox's parseLimits."""
    limits: dict[str, str] = {}
    for item in text.split():
        name, equals, value = item.partition("=")
        if not equals or not _LIMIT_NAME.match(name) or not _LIMIT_VALUE.match(value):
            return {}
        name = name.upper()
        if name in limits:
            return {}
        limits[name] = value
    return limits


def _limit(value: str | None) -> int | None:
    # RFC 9422 §4: 1 to 6 digits; a bad value is ignored (the limit stays unknown).
    if value is None or not value.isdigit() or len(value) > 6 or int(value) == 0:
        return None
    return int(value)


# --- transparency --------------------------------------------------------------------------

class DotStuffer:
    """RFC 5321 §4.5.2 transparency, applied chunk by chunk.

    Every line that starts with "." gets one more, including the first line of the message
    and a line that starts right after a chunk boundary; the stream ends with CRLF "." CRLF
    (RFC 5321 §4.1.1.4).  The content handed to us is already CRLF-normalized; as a second
    line of defence against smuggling, a bare CR or LF that got through anyway is turned into
    CRLF here, so the upstream can never see "<LF>.<LF>" or "<CR>.<CR>" from us.
    """

    def __init__(self) -> None:
        self._at_line_start = True  # the start of the message is the start of a line
        self._held_cr = False       # a CR at a chunk's end: CRLF or bare, the next chunk says
        self.normalized = 0         # chunks in which a bare CR/LF had to be repaired

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _LINE_BREAKS.sub(b"\r\n", chunk)
            self.normalized += 1
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """The end of the stream: close an unterminated last line, then the final dot."""
        tail = b""
        if self._held_cr:
            tail = b"\r\n"  # a bare CR at the very end
            self.normalized += 1
        elif not self._at_line_start:
            tail = b"\r\n"  # RFC 5321 §4.1.1.4: the content must end with CRLF
        self._held_cr = False
        self._at_line_start = True
        return tail + b".\r\n"


# --- the protocol ---------------------------------------------------------------------------

class _Group:
    """The replies of a pipelined group, delivered together through one Deferred."""

    __slots__ = ("deferred", "replies", "expected", "failed")

    def __init__(self, expected: int):
        self.deferred: Deferred[list[Reply]] = Deferred()
        self.replies: list[Reply] = []
        self.expected = expected
        self.failed = False

    def add(self, reply: Reply) -> None:
        self.replies.append(reply)
        if len(self.replies) == self.expected:
            self.deferred.callback(self.replies)

    def fail(self, failure: Failure) -> None:
        if not self.failed:
            self.failed = True
            self.deferred.errback(failure)


class _Waiter:
    """One reply we are waiting for (alone, or as a member of a ``_Group``).

    ``after_dot``: this is the end-of-data reply and the final dot has left, so a failure
    from now on leaves the message's outcome unknown."""

    __slots__ = ("command", "deferred", "timeout", "after_dot", "group")

    def __init__(self, command: str, timeout: float, group: _Group | None = None):
        self.command = command
        self.group = group
        self.deferred: Deferred[Reply] | None = Deferred() if group is None else None
        self.timeout = timeout
        self.after_dot = False

    def complete(self, reply: Reply) -> None:
        if self.group is None:
            assert self.deferred is not None  # a lone command has its own
            self.deferred.callback(reply)
        else:
            self.group.add(reply)

    def fail(self, failure: Failure) -> None:
        if self.group is None:
            assert self.deferred is not None  # a lone command has its own
            self.deferred.errback(failure)
        else:
            self.group.fail(failure)


@implementer(IPullProducer)
class _DataStreamer:
    """Pulls message chunks only when the transport has room for them.

    Registered as a pull producer: the transport calls ``resumeProducing`` each time its
    buffer has drained, so at most about one batch (``BATCH``) sits in our user-space
    buffer however large the message is.
    """

    def __init__(self, protocol: "SMTPClientProtocol", chunks: Iterator[bytes]):
        self._protocol = protocol
        self._chunks = chunks
        self._stuffer = DotStuffer()
        self._done = False
        self.registered = False  # with the transport (only messages over one batch)

    def resumeProducing(self) -> None:
        # Chunks are gathered up to ``BATCH`` octets per write, so a small message (trace
        # header, content, final dot) leaves in one send instead of one per chunk.
        pending: list[bytes] = []
        size = 0
        while not self._done:
            try:
                chunk = next(self._chunks, None)
            except Exception as error:  # a spool read error: nothing sane left to send
                self._done = True
                self._protocol._stream_failed(error)
                return
            if chunk is None:
                self._done = True
                pending.append(self._stuffer.finish())
                self._protocol._stream_finished(b"".join(pending), self._stuffer.normalized)
                return
            data = self._stuffer.feed(chunk)
            if data:
                pending.append(data)
                size += len(data)
                if size >= BATCH:
                    # Only return after a write: a pull producer that writes nothing is
                    # never asked again, and the transfer would hang.
                    self._protocol._stream_write(b"".join(pending))
                    return

    def stopProducing(self) -> None:
        self._done = True


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """An SMTP client connection with a Deferred-returning command API.

    Replies are matched to commands in FIFO order, so ``pipelineAll`` can put several
    commands in one write (RFC 2920).  Every pending Deferred fails with a ``RelayError``
    when the connection is lost, times out or turns to garbage: nothing ever waits
    forever.  ``upstream`` (``host:port`` as configured) names the upstream in them.
    """

    transport: IStreamTransport
    log = logger("esmtpfa.relay.protocol")

    def __init__(self, reactor: IReactorTime, command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                 data_timeout: float = DEFAULT_DATA_TIMEOUT, upstream: str | None = None):
        self._reactor = reactor
        self.upstream = upstream
        self.command_timeout = float(command_timeout)
        self.data_timeout = float(data_timeout)
        self._buffer = b""
        self._lines: list[bytes] = []
        self._code: int | None = None
        self._waiters: deque[_Waiter] = deque()
        self._timer = Deadline(reactor, self._timed_out)  # for the head waiter's reply
        self._error: RelayError | None = None  # once set, the connection is unusable
        self._fault: tuple[_Fault, str, str | None] | None = None  # how _error was stated
        self._streamer: _DataStreamer | None = None
        # The upstream answered 354: it reads everything we send as message content until
        # CRLF.CRLF, so no command (RSET, QUIT) may go out; only ``sendData`` or a drop.
        self._awaiting_content = False
        self._handshake: Deferred[None] | None = None
        self._disconnected: list[Deferred[None]] = []
        self._connected = False
        self.secure = False  # TLS handshake completed (implicit TLS or STARTTLS)
        self.peer = ""
        # The greeting is the reply to "connecting" (RFC 5321 §3.1).  Its outcome is kept
        # here, so a failed greeting nobody asked for is never an unhandled Deferred error.
        self._greeting_result: Reply | Failure | None = None
        self._greeting_waiters: list[Deferred[Reply]] = []
        self._enqueue(_Waiter("greeting", self.command_timeout)).addBoth(self._greeted)

    # -- connection events --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        # docs/twisted-defects.md client #5: with Nagle on, each command waits for the previous ACK.
        # A TLS wrapper forwards unknown attributes to the TCP transport underneath.
        set_no_delay: Callable[[bool], Any] | None = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket (tests over pipes)
                pass
        self._arm_timer()

    def handshakeCompleted(self) -> None:
        self.secure = True
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            self._cancel_timer()
            handshake.callback(None)
            self._arm_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._timer.stop()
        if self._error is None:
            self._lost(reason)
        self._fail_all()
        waiters, self._disconnected = self._disconnected, []
        for waiter in waiters:
            waiter.callback(None)

    def _lost(self, reason: Failure) -> None:
        head = self._waiters[0] if self._waiters else None
        command = "STARTTLS handshake" if self._handshake is not None else (
            head.command if head else None)
        if reason.check(SSL.Error, VerificationError):
            self._set_error(tls_failed, f"TLS failure: {_describe(reason)}", command)
            return
        detail = f"connection lost: {_describe(reason)}"
        if head and head.after_dot:
            detail += " (after the message was sent: the upstream may have accepted it)"
        self._set_error(connection_failed, detail, command)

    # -- replies ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        while self._error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._violation(f"reply line longer than {MAX_REPLY_LINE} octets")
                return
            if end > MAX_REPLY_LINE:
                self._violation(f"reply line longer than {MAX_REPLY_LINE} octets")
                return
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line_received(line)

    def _line_received(self, line: bytes) -> None:
        # RFC 5321 §4.2: "NNN-text" continues, "NNN text" or a bare "NNN" ends the reply.
        if len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345" or (
                len(line) > 3 and line[3:4] not in b" -"):
            self._violation(f"not an SMTP reply line: {line[:80]!r}")
            return
        if self._code is None and line[3:4] != b"-":
            # A one-line reply (nearly all of them): an upstream repeats the same few
            # lines, so each is parsed once and the (immutable) Reply reused.
            reply = _ONE_LINE_REPLIES.get(line)
            if reply is None:
                if len(_ONE_LINE_REPLIES) >= ONE_LINE_REPLIES:
                    _ONE_LINE_REPLIES.clear()
                reply = _ONE_LINE_REPLIES[line] = Reply.parse(int(line[:3]), [line[4:]])
            self._reply_received(reply)
            return
        code = int(line[:3])
        if self._code is not None and code != self._code:
            self._violation(f"multi-line reply changed code from {self._code} to {code}")
            return
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self._violation(f"reply longer than {MAX_REPLY_LINES} lines")
            return
        if line[3:4] == b"-":
            return
        reply = Reply.parse(code, self._lines)
        self._code, self._lines = None, []
        self._reply_received(reply)

    def _reply_received(self, reply: Reply) -> None:
        if not self._waiters:
            # A reply nobody asked for; typically "421 shutting down" (RFC 5321 §3.8).
            self._violation(f"unsolicited reply: {reply}")
            return
        waiter = self._waiters[0]
        if self._streamer is not None and not waiter.after_dot:
            # The upstream answered before our final dot: it gave up on the message.
            # Whatever it said, the DATA state is now unknowable: stop and drop the link.
            self._stop_streaming()
            if reply.is_positive:
                self._violation(f"positive reply before the end of data: {reply}")
                return
            self._waiters.popleft()
            self._cancel_timer()
            self._set_error(protocol_violation, f"upstream replied during DATA: {reply}",
                           waiter.command)
            waiter.complete(reply)
            self._abort()
            return
        waiters = self._waiters
        waiters.popleft()
        # The next reply's timeout starts now (``_restart_timer``, inlined: every reply).
        if waiters and self._connected:
            self._timer.set(waiters[0].timeout)
        else:
            self._timer.clear()
        if reply.code == 354 and waiter.command == "DATA":
            self._awaiting_content = True
        waiter.complete(reply)

    # -- commands -----------------------------------------------------------------------

    def greeting(self) -> Deferred[Reply]:
        """The server's opening reply (220 expected, RFC 5321 §4.3.1)."""
        d: Deferred[Reply] = Deferred()
        if self._greeting_result is None:
            self._greeting_waiters.append(d)
        else:
            _fire(d, self._greeting_result)
        return d

    def _greeted(self, result: Reply | Failure) -> None:
        self._greeting_result = result
        waiters, self._greeting_waiters = self._greeting_waiters, []
        for d in waiters:
            _fire(d, result)

    def command(self, line: bytes, name: str | None = None,
                timeout: float | None = None) -> Deferred[Reply]:
        """Send one command line (without CRLF); fires with its reply, whatever the code."""
        self._check_commands([line])
        if name is None:
            name = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        if self._error is not None:
            return fail(self._error)
        deferred = self._enqueue(_Waiter(name, timeout or self.command_timeout))
        self.transport.write(line + b"\r\n")
        return deferred

    def pipelineAll(self, lines: list[bytes], names: list[str],
                    timeout: float | None = None) -> Deferred[list[Reply]]:
        """Send several commands in one write (RFC 2920); one Deferred for the group fires
        with every reply once the last one arrived, or fails once with the connection's
        error.  Each reply still has its own timeout, counted from the previous one."""
        self._check_commands(lines)
        if self._error is not None:
            return fail(self._error)
        group = _Group(len(lines))
        timeout = timeout or self.command_timeout
        waiters = self._waiters
        idle = not waiters
        waiters.extend([_Waiter(name, timeout, group) for name in names])
        if idle and self._connected and self._handshake is None:
            self._arm_timer()  # as ``_enqueue`` does for the first of a queue
        self.transport.write(b"\r\n".join(lines) + b"\r\n")
        return group.deferred

    def _check_commands(self, lines: list[bytes]) -> None:
        for line in lines:
            if _FORBIDDEN_IN_COMMAND.search(line):
                # Never let data become a second command line (command injection).
                raise ValueError("CR, LF or NUL in an SMTP command")
        if self._streamer is not None:
            raise RuntimeError("command sent while message data is being streamed")
        if self._awaiting_content:
            # After a 354 a command line would become message content (and a later
            # CRLF.CRLF would end it): a message we never meant to send.
            raise RuntimeError("command sent while the upstream awaits message content")

    def ehlo(self, name: str) -> Deferred[Extensions]:
        """EHLO, falling back to HELO on a 5xx (RFC 5321 §4.1.4): then no extensions."""
        return Deferred.fromCoroutine(self._ehlo(name))

    async def _ehlo(self, name: str) -> Extensions:
        encoding = "ascii" if name.isascii() else "idna"
        reply = await self.command(b"EHLO " + name.encode(encoding))
        if reply.code == 250:
            return Extensions.parse(reply)
        if not reply.is_permanent:
            raise session_refused("EHLO", reply, self.upstream)
        reply = await self.command(b"HELO " + name.encode("ascii", "replace"))
        if reply.code != 250:
            raise session_refused("HELO", reply, self.upstream)
        return Extensions.none()

    def starttls(self, creator: Any) -> Deferred[Reply]:
        """RFC 3207: STARTTLS, then the handshake; fires once TLS is up.

        ``creator`` is an ``IOpenSSLClientConnectionCreator`` (see ``tls.py``).  Fails with
        a ``RelayError`` (``errors.starttls_refused`` when refused, ``errors.tls_failed``
        when the handshake fails).  The caller must send EHLO again and forget the earlier
        extensions (RFC 3207 §4.2).
        """
        return Deferred.fromCoroutine(self._starttls(creator))

    async def _starttls(self, creator: Any) -> Reply:
        if self._waiters:
            raise RuntimeError("STARTTLS must be the only command in flight")
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            raise starttls_refused(reply, self.upstream)
        if self._buffer:
            # Bytes after the 220 arrived in cleartext; treating them as replies received
            # over TLS would let a man in the middle inject them (the client side of the
            # STARTTLS injection bug, docs/twisted-defects.md, "Server side", #2).
            self._violation("data after the STARTTLS reply, before the TLS handshake")
            raise self._error  # type: ignore[misc]
        handshake: Deferred[None] = Deferred()
        self._handshake = handshake
        self._timer.set(self.command_timeout)
        self.transport.startTLS(creator)
        await handshake
        return reply

    def authenticate(self, mechanism: Mechanism | str, username: str | None = None,
                     password: str | None = None) -> Deferred[Reply]:
        """RFC 4954 AUTH with a ``sasl.Mechanism`` (or a mechanism name, user and
        password); fires with the 235 reply.

        Fails with a ``RelayError``: ``errors.auth_refused`` when the server refuses (the
        only failure here that carries the upstream's reply, ``upstream_reply``), and
        ``errors.auth_cancelled`` when we cancel (``*``) because the server's side of the
        exchange was malformed or did not prove itself (SCRAM).  The exchange is never
        logged: it carries the password or what can lead to it.
        """
        if isinstance(mechanism, str):
            mechanism = client_for(mechanism, username or "", password or "")
        return Deferred.fromCoroutine(self._authenticate(mechanism))

    async def _authenticate(self, mechanism: Mechanism) -> Reply:
        name = mechanism.name.encode("ascii")
        initial = mechanism.initial()
        if initial is None:
            line = b"AUTH " + name
        else:  # RFC 4954 §4: "=" is an empty initial response
            line = b"AUTH " + name + b" " + (base64.b64encode(initial) or b"=")
        reply = await self.command(line, "AUTH")
        while reply.code == 334:
            try:
                if len(reply.lines()) > 1:
                    raise SASLError("multi-line AUTH challenge")
                try:
                    challenge = base64.b64decode(reply.text.strip(), validate=True)
                except ValueError:
                    raise SASLError("malformed base64 in an AUTH challenge") from None
                response = mechanism.respond(challenge)
            except SASLError as error:
                # RFC 4954 §4: "*" cancels; the server answers 501.  We give up either way.
                await self.command(b"*", "AUTH")
                raise auth_cancelled(f"AUTH {mechanism.name} cancelled: {error}",
                                     self.upstream) from None
            reply = await self.command(base64.b64encode(response), "AUTH")
        if reply.code != 235:
            raise auth_refused(reply, self.upstream)
        if not mechanism.complete:
            # A 235 before the mechanism finished: for SCRAM the server skipped proving it
            # knows the password (RFC 5802 §5.1 "v="); a success we cannot trust.
            self.abort()
            raise auth_cancelled(
                f"AUTH {mechanism.name}: the server reported success before the exchange "
                "was complete", self.upstream)
        return reply

    def sendData(self, chunks: Iterator[bytes]) -> Deferred[Reply]:
        """Stream message content after a 354 and fire with the end-of-data reply.

        ``chunks`` is the unstuffed, CRLF-normalized content (``OutboundMessage.chunks()``);
        it is pulled one chunk at a time as the transport drains.  The inactivity timeout is
        ``data_timeout`` while writing and for the final reply (RFC 5321 §4.5.3.2.5-6).
        """
        if self._waiters or self._streamer is not None:
            raise RuntimeError("DATA content sent with replies still pending")
        waiter = _Waiter("end of data", self.data_timeout)
        if self._error is not None:
            return fail(self._error)
        deferred = self._enqueue(waiter)
        self._awaiting_content = False
        streamer = self._streamer = _DataStreamer(self, iter(chunks))
        # The first batch goes now: a message that fits in it (most do) is then written
        # whole, final dot included, without the producer's trip through the reactor.
        streamer.resumeProducing()
        if self._streamer is streamer:
            # Marked before registering: registering a pull producer on a plain TCP
            # transport calls ``resumeProducing`` at once, and the message may end inside
            # that call; ``_stop_streaming`` must then see it registered and unregister it,
            # or the next message on this connection cannot register its own.
            streamer.registered = True
            self.transport.registerProducer(streamer, False)
        return deferred

    def _stream_write(self, data: bytes) -> None:
        self.transport.write(data)
        self._restart_timer()  # progress: the upstream is reading

    def _stream_finished(self, tail: bytes, normalized: int) -> None:
        if normalized:
            self.log.warn("repaired bare CR/LF in {count} chunk(s) of message content",
                          count=normalized)
        self._waiters[0].after_dot = True
        self.transport.write(tail)
        self._stop_streaming()
        self._restart_timer()

    def _stream_failed(self, error: Exception) -> None:
        self._stop_streaming()
        self._set_error(abandoned, f"reading the message failed: {error}", "DATA")
        self._fail_all()
        self._abort()

    def _stop_streaming(self) -> None:
        if self._streamer is not None:
            streamer, self._streamer = self._streamer, None
            streamer.stopProducing()
            if self._connected and streamer.registered:
                self.transport.unregisterProducer()

    # -- closing ------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Connected, in sync, nothing in flight: another command may be sent."""
        return (self._connected and self._error is None and self._streamer is None
                and not self._awaiting_content)

    @property
    def outcomePending(self) -> bool:
        """The final dot has left and its reply has not come: the message may be
        accepted already, so failing now leaves its outcome unknown."""
        return bool(self._waiters and self._waiters[0].after_dot)

    def whenDisconnected(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if not self._connected and self.transport is not None:
            d.callback(None)
        else:
            self._disconnected.append(d)
        return d

    def quit(self, timeout: float = 10.0) -> Deferred[None]:
        """QUIT politely when possible, then close; always fires (never fails).

        After a message was accepted nothing here can change the outcome (docs/design.md,
        "The relay and the delivery guarantee").
        """
        done = self.whenDisconnected()
        if not self._connected:
            return done
        if self.usable and not self._waiters:
            reply = self.command(b"QUIT", timeout=timeout)
            reply.addBoth(lambda _: self._close())
        else:
            self._abort()
        return done

    def _close(self) -> None:
        if self._connected:
            self.transport.loseConnection()
            # A TLS close_notify exchange can wait on a silent peer: bound it.
            timer = self._reactor.callLater(5.0, self._abort)

            def closed(_: object) -> None:
                if timer.active():
                    timer.cancel()
            self._disconnected.append(Deferred().addBoth(closed))

    def abort(self) -> None:
        """Drop the connection now, e.g. when message content must not be sent."""
        if self._error is None:
            self._set_error(abandoned, "connection aborted by us", None)
        self._abort()

    def _abort(self) -> None:
        if self._connected:
            self.transport.abortConnection()

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter) -> Deferred[Reply]:
        self._waiters.append(waiter)
        if len(self._waiters) == 1 and self._connected and self._handshake is None:
            self._arm_timer()
        assert waiter.deferred is not None  # a lone command, not one of a group
        return waiter.deferred

    def _arm_timer(self) -> None:
        if not self._timer.armed and self._waiters and self._connected:
            self._timer.set(self._waiters[0].timeout)

    def _restart_timer(self) -> None:
        self._cancel_timer()
        self._arm_timer()

    def _cancel_timer(self) -> None:
        self._timer.clear()

    def _timed_out(self) -> None:
        if self._handshake is not None or not self._waiters:
            command, timeout = "STARTTLS handshake", self.command_timeout
        else:
            command, timeout = self._waiters[0].command, self._waiters[0].timeout
        detail = f"no reply to {command} within {timeout:g} s"
        if self._streamer is not None:
            detail = f"upstream stopped reading message data for {timeout:g} s"
        if self.outcomePending:
            detail += " (after the message was sent: the upstream may have accepted it)"
        self._set_error(connection_failed, detail, command)
        self._stop_streaming()
        self._fail_all()
        self._abort()

    def _violation(self, detail: str) -> None:
        command = self._waiters[0].command if self._waiters else None
        self._set_error(protocol_violation, detail, command)
        self._stop_streaming()
        self._fail_all()
        self._abort()

    def _set_error(self, fault: _Fault, detail: str, command: str | None) -> None:
        """The connection is finished: ``fault`` (an ``errors`` constructor) states why,
        in the phase the message is in now.  Every later command fails with it."""
        self._fault = (fault, detail, command)
        self._error = fault(detail, command, self.upstream, after_dot=self.outcomePending)

    def _fail_all(self) -> None:
        self._cancel_timer()
        error = self._error
        assert error is not None  # _set_error came first
        fault, detail, command = self._fault  # type: ignore[misc]  # set with _error
        if self.outcomePending and not error.outcome_unknown:
            # The final dot left after the failure was stated (our abort came while the
            # producer still wrote): whatever broke, the outcome is now unknown.
            error = self._error = fault(detail, command, self.upstream, after_dot=True)
        waiters, self._waiters = self._waiters, deque()
        handshake, self._handshake = self._handshake, None
        self._streamer = None
        if handshake is not None:
            handshake.errback(Failure(error if fault is tls_failed
                                      else tls_failed(detail, "STARTTLS handshake",
                                                      self.upstream)))
        failure = Failure(error)
        for waiter in waiters:
            waiter.fail(failure)


class SMTPClientFactory(Factory):
    """Builds ``SMTPClientProtocol`` with the relay's timeouts and reactor."""

    noisy = False  # one connection per message: "Starting factory" lines would flood the log

    def __init__(self, reactor: IReactorTime, command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                 data_timeout: float = DEFAULT_DATA_TIMEOUT, upstream: str | None = None):
        self.reactor = reactor
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.upstream = upstream  # ``host:port`` as configured, named in every error

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(self.reactor, self.command_timeout, self.data_timeout,
                                      self.upstream)
        protocol.factory = self
        return protocol


def _fire(d: Deferred[Any], result: Any) -> None:
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error):
        parts = []
        for entry in value.args[0] if value.args and isinstance(value.args[0], list) else []:
            if isinstance(entry, tuple) and entry:
                parts.append(str(entry[-1]))
        return ", ".join(parts) or str(value) or "handshake failed"
    return str(value) or type(value).__name__
