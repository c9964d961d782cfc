"""The ESMTP server protocol (RFC 5321) with the extensions a submission relay needs.

Written for the failure modes of docs/twisted-defects.md (server list):

* every command, pipelined or not, is handled strictly in order and the next one is not
  read until the previous reply is written, even when a check is asynchronous (#5, #7);
* after STARTTLS, bytes that arrived with the command are discarded and the session is
  reset (#2); the implicit-TLS listener never offers STARTTLS;
* DATA is read in chunks and only CRLF.CRLF ends it (#3, #10, #11);
* AUTH is refused in cleartext, before EHLO, inside a transaction and after success, and
  every malformed exchange gets a reply instead of a dropped connection (#6);
* undecodable bytes get ``500 5.5.2`` (#9); the idle timeout is honoured (#8).
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, cast

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.credentials import SubmissionCredentials
from esmtpfa.auth.errors import ProviderUnavailable
from esmtpfa.auth.failures import log_failed_login
from esmtpfa.auth.interfaces import IMessageDelivery
from esmtpfa.auth.selection import ANONYMOUS
from esmtpfa.common import replies
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import NO_TLS, logger, tls_session
from esmtpfa.common.replies import Reply, SMTPReplyError
from esmtpfa.common.transport import (
    IStreamTransport,
    connection_of,
    limit_send_buffer,
    output_waiting,
    output_waiting_since,
)
from esmtpfa.limits.throttle import LoginThrottled
from esmtpfa.smtp import server_sasl as sasl
from esmtpfa.smtp.address import PathArgument, parse_path_argument
from esmtpfa.smtp.data import ChunkReader, DataReader
from esmtpfa.smtp.deadlines import ClientDeadline, Stage, WriteStall

log = logger("esmtpfa.smtp")

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: RFC 5321 §4.5.3.1.4: 512 octets is the minimum; we allow 1000 like most MTAs.
MAX_COMMAND_LINE = 1000
#: Bytes we buffer while a command is being answered before we stop reading the socket.
MAX_PIPELINED = 64 * 1024
#: Octets of replies held before they are handed to the transport even in mid-batch, so
#: that a client that does not read meets the transport's back-pressure promptly.
MAX_HELD_REPLIES = 16 * 1024

BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(554, "5.5.1", "No valid recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8 (RFC 6531)")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
NO_STARTTLS = Reply(502, "5.5.1", "STARTTLS not available")
BAD_CHARACTERS = Reply(500, "5.5.2", "Invalid characters in command")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed authentications, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
#: The connection's count could not be had (workers: the supervisor did not answer):
#: a local, temporary condition (RFC 3463 X.3.0), not a limit reached.
COUNT_UNAVAILABLE = Reply(421, "4.3.0", "Connection limits cannot be checked now, try again later")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
#: The shutdown deadline came while the upstream's verdict on a message was awaited: the
#: final dot may have reached it (docs/delivery-guarantee.md, "After the final dot").
SHUTDOWN_OUTCOME_UNKNOWN = Reply(
    451, "4.3.2", "Shutting down before the upstream answered; try again later "
                  "(a duplicate is possible)")
#: RFC 3463 X.4.2: the connection is dropped because the client is too slow.
TIMEOUTS = {
    Stage.IDLE: replies.IDLE_TIMEOUT,
    Stage.COMMAND: Reply(421, "4.4.2", "Timeout waiting for the rest of the command, "
                                       "closing connection"),
    Stage.DATA: Reply(421, "4.4.2", "Message data arrived too slowly, closing connection"),
}


def _is_number(text: str) -> bool:
    """ASCII digits only (RFC 5321 §4.1.2 Digit, RFC 1870 size-value, RFC 3030
    chunk-size).  ``str.isdigit`` alone also takes ``²`` (which ``int()`` refuses:
    a crash) and other scripts' digits (which ``int()`` reads as a number no SMTP peer
    writes)."""
    return text.isascii() and text.isdigit()


def _mail_params_error(key: str) -> SMTPReplyError:
    return SMTPReplyError(Reply(555, "5.5.4", f"Unsupported MAIL parameter {key}"))


class _Chunk:
    """One BDAT chunk being read: its octets are data whatever they look like."""

    def __init__(self, size: int, last: bool, error: Reply | None):
        self.remaining, self.last, self.error = size, last, error


@implementer(IHandshakeListener, IPushProducer)
class ESMTPServer(Protocol):
    """One SMTP session.  The factory holds settings, the Portal and TLS options.

    Every deadline ends the connection (``docs/smtp-limits.md``): the client's
    time is measured by stage, not reset by its bytes (``deadlines.ClientDeadline``); a TLS
    handshake that does not finish in time is aborted (nothing can be said to a peer
    without TLS), and every close, polite or not, is followed by ``abortConnection`` when
    it has not completed within ``close_grace`` (a peer that never reads, or never
    finishes the handshake our last reply waits for, cannot keep the socket and its
    limit slot).

    The session is the streaming producer of its replies (``IPushProducer``): when the
    transport holds more unsent replies than its buffer size, because the client does not
    read them, it pauses the session, which stops executing commands and stops reading
    the socket until the replies drain.  A client that pipelines and never reads thus
    costs a bounded amount of memory and ends by its deadline.

    What it costs in the kernel is bounded too (``docs/smtp-limits.md``, "Clients that
    do not read"): the socket's send buffer is fixed at ``send_buffer`` octets instead of
    growing to megabytes, and output that has not moved for ``write_stall_timeout``
    (``deadlines.WriteStall``) ends the connection, long before its stage would.
    """

    transport: IStreamTransport

    def __init__(self, factory):
        self.factory = factory
        self.settings = factory.settings
        self.id = new_id()
        self._buffer = b""
        self._out: list[bytes] = []  # replies not yet written (RFC 2920 batching)
        self._held = 0  # octets in _out
        self._blocked = False  # the transport paused us: the client is not reading
        self._in_process = False
        self._waiting = False
        self._paused = False
        self._discarding_line = False
        self._closing = False
        self._tls = factory.implicit_tls
        self._tls_session = NO_TLS  # what the handshake agreed, for the disconnect line
        self._helo: str | None = None
        self._esmtp = False
        self._identity = None
        self._avatar = None
        self._logout = None
        self._login_in_flight: defer.Deferred | None = None  # cancelled if the client goes
        self._auth_failures = 0
        self._sasl: sasl.Mechanism | None = None
        self._sasl_failed = False
        self._transaction: Any = None  # the delivery's, from MAIL to the end of the message
        self._mail: PathArgument | None = None
        self._recipients: list[str] = []
        self._reader: DataReader | None = None
        self._chunks: ChunkReader | None = None  # BDAT content of this transaction
        self._chunk: _Chunk | None = None        # the BDAT chunk being read
        self._context = ConnectionContext(connection_id=self.id, protocol="smtp")
        self._deadline = ClientDeadline(factory.deadlines, factory.reactor, self.settings,
                                        self.timeoutConnection)
        #: The TCP connection under any wrappers (set by connectionMade).
        self._connection: FileDescriptor | None = None
        self._stall = WriteStall(factory.deadlines, factory.reactor,
                                 self.settings.write_stall_timeout,
                                 self._output_waiting_since, self.writeStalled)
        self._abort_call = None  # the bounded grace of a close in progress
        self._draining = False  # the relay shuts down: no new transaction (drain())
        self._finishing = False  # the message is with the relay, its verdict awaited

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connection = connection_of(self.transport)
        limit_send_buffer(self.transport, self.settings.send_buffer)
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self._context = self._context.evolve(
            peer_host=getattr(peer, "host", ""), peer_port=getattr(peer, "port", 0),
            local_host=getattr(host, "host", ""), local_port=getattr(host, "port", 0),
            tls=self._tls)
        # Replies to pipelined commands can leave in several writes when one waits for the
        # upstream (RCPT); with Nagle on, the later ones would wait for the client's
        # delayed ACK (~40 ms per message).  A TLS wrapper forwards this to the TCP socket.
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):  # not TCP (tests over pipes, UNIX sockets)
            pass
        admission = self.factory.admit(self)
        if not admission.called:
            # The count is kept by another process (workers): read nothing until it
            # answers; the greeting waits with it.
            self.transport.pauseProducing()
        admission.addCallback(self._admitted)

    def _admitted(self, refusal: Reply | None) -> None:
        if self._closing:
            return  # gone while the count was asked: the factory gave the slot back
        if refusal is not None:
            # Logged (and collapsed when repeated) by the factory: nothing more here.
            self._reply(refusal)
            self._close()
            return
        self.transport.resumeProducing()
        log.info("{connection_id} connect from [{peer}]:{port} on {listener}",
                 connection_id=self.id, peer=self._context.peer_host,
                 port=self._context.peer_port, listener=self.factory.name)
        self.transport.registerProducer(self, True)
        if self._tls:  # implicit TLS: the handshake runs first, under its own deadline
            self._deadline.handshake()
        else:
            self._deadline.idle()
        self._write(f"220 {self.settings.hostname} ESMTP esmtpfa ready\r\n".encode())

    def handshakeCompleted(self) -> None:
        """``IHandshakeListener``: TLS is up (implicit, or after STARTTLS)."""
        self._tls_session = tls_session(self.transport)
        if self._deadline.stage is Stage.HANDSHAKE and not self._closing:
            self._deadline.idle()

    # -- IPushProducer: the transport's back-pressure on our replies -------------------

    def pauseProducing(self) -> None:
        """The client is not reading our replies: stop executing its commands and
        stop reading what it sends (RFC 2920 §3.1 lets a server stop reading)."""
        self._blocked = True
        self._flow_control()

    def resumeProducing(self) -> None:
        self._blocked = False
        self._flow_control()
        if not self._closing and not self._waiting:
            self._process()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` does the cleaning."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        in_handshake = self._deadline.stage is Stage.HANDSHAKE  # implicit TLS or STARTTLS
        self._deadline.stop()
        self._stall.stop()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._closing = True
        if self._login_in_flight is not None:
            # Nobody is left to answer: stop asking the provider, and stop any delay
            # the login throttle holds for this attempt (docs/login-throttle.md).
            self._login_in_flight.cancel()
        self._reset_transaction()
        if self._logout is not None:
            self._logout()
            self._logout = None
        if self.factory.release(self):
            if in_handshake and self.factory.observer is not None:
                self.factory.observer.tls_handshake_failed(self.factory.name)
            log.info("{connection_id} disconnect (tls={tls_version} cipher={tls_cipher})",
                     connection_id=self.id, tls_version=self._tls_session.version,
                     tls_cipher=self._tls_session.cipher)

    def timeoutConnection(self, stage: Stage = Stage.IDLE) -> None:
        log.info("{connection_id} {stage} timeout", connection_id=self.id, stage=stage.value)
        if stage is Stage.HANDSHAKE or self._blocked:
            # No reply can reach a peer that has not finished the handshake, nor one
            # that leaves a transport's worth of earlier replies unread.
            self._closing = True
            self._abort()
            return
        self._reply(TIMEOUTS[stage])
        self._close()

    def _output_waiting_since(self) -> float | None:
        return output_waiting_since(self._connection)

    def writeStalled(self) -> None:
        """The client has read none of our waiting replies for ``write_stall_timeout``
        seconds: abort (a 421 would only queue behind them)."""
        connection = self._connection
        log.info("{connection_id} write stall: client read nothing for {seconds:g} s "
                 "with {octets} octets waiting, aborting", connection_id=self.id,
                 seconds=self.settings.write_stall_timeout,
                 octets=0 if connection is None else output_waiting(connection))
        self._closing = True
        self._abort()

    # -- shutdown (the factory's drain; docs/smtp-limits.md, "Shutdown") ---------------

    def drain(self) -> None:
        """The relay shuts down: end now when between transactions, else after the
        transaction in progress (``_dispatch`` answers the next command with 421)."""
        self._draining = True
        if not (self._closing or self._waiting or self._in_transaction()):
            self._shut_down()

    def shut_down(self) -> None:
        """The drain's deadline: 421 and close, whatever the session is doing.  A message
        whose verdict is still awaited is not acknowledged: the client keeps it."""
        if self._closing:
            return
        if self._finishing:
            self._reply(SHUTDOWN_OUTCOME_UNKNOWN)
        self._shut_down()

    def _in_transaction(self) -> bool:
        return self._mail is not None or self._reader is not None or self._chunk is not None

    def _shut_down(self) -> None:
        log.info("{connection_id} closed: shutting down", connection_id=self.id)
        self._reply(replies.SHUTTING_DOWN)
        self._close()

    def _close(self) -> None:
        self._flush()
        self._closing = True
        # A registered producer keeps a closing transport open (it may still write):
        # let go, so the close waits only for the replies already written.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._abort_call is None:
            # loseConnection waits for our last reply to be written, which a peer that
            # does not read (or has not finished TLS) can postpone for ever.
            self._abort_call = self.factory.reactor.callLater(
                self.settings.close_grace, self._abort_late)

    def _abort_late(self) -> None:
        self._abort_call = None
        log.info("{connection_id} close not completed within {grace} s: aborting",
                 connection_id=self.id, grace=self.settings.close_grace)
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _write(self, data: bytes) -> None:
        if not self._closing or data.startswith(b"421"):
            self._out.append(data)
            self._held += len(data)
            if (not self._in_process and not self._waiting) \
                    or self._held > MAX_HELD_REPLIES:
                self._flush()

    def _flush(self) -> None:
        """Write the replies held so far, in one piece."""
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._held = 0
            self.transport.write(data)
            self._stall.check()

    def _reply(self, reply: Reply) -> None:
        if reply.enhanced == "5.3.4" and self.factory.observer is not None:
            # RFC 3463 5.3.4 "message too big for system": SIZE=, DATA and BDAT alike
            self.factory.observer.size_refused(self.factory.name)
        self._write(reply.to_bytes())

    # -- input ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        stage = self._deadline.stage
        if stage is Stage.IDLE:
            self._deadline.command()  # the first byte of a command: its clock starts
        elif stage is Stage.DATA:
            self._deadline.received(len(data))
        self._buffer += data
        self._process()

    def _process(self, progressed: bool = False) -> None:
        """Handle buffered input until it runs out, a reply is pending, or the client
        stops reading our replies.  ``progressed``: a command was answered before."""
        if self._in_process:
            return
        self._in_process = True
        try:
            while self._buffer and not self._waiting and not self._closing \
                    and not self._blocked:
                if self._chunk is not None:
                    self._feed_chunk()
                elif self._reader is not None:
                    self._feed_data()
                else:
                    line = self._next_line()
                    if line is None:
                        break
                    self._dispatch(line)
                progressed = True
        finally:
            self._in_process = False
        if progressed and not (self._waiting or self._closing or self._reader is not None
                               or self._chunk is not None):
            self._next_command()
        # RFC 2920 §3.2: while the client's pipelined commands are still queued behind one
        # that waits (a RCPT the upstream is judging), hold the replies so far: they leave
        # together with the later ones, in one packet, when the queue runs dry.
        if not (self._waiting and self._buffer):
            self._flush()
        self._flow_control()

    def _next_command(self) -> None:
        """Commands were answered: the client's clock starts again for the next one,
        already begun when a part of it was pipelined behind them (the complete ones were
        executed at once).  After STARTTLS the handshake's own deadline runs until
        ``handshakeCompleted``."""
        if self._deadline.stage is Stage.HANDSHAKE:
            return
        if self._buffer:
            self._deadline.command()
        else:
            self._deadline.idle()

    def _flow_control(self) -> None:
        """Stop reading the socket once ``MAX_PIPELINED`` octets wait in our buffer
        behind a command we cannot execute yet: a reply is pending, or the client is not
        reading our replies.  (Reading is not stopped while the buffer is short: a TLS
        handshake, during which the TLS layer holds our greeting and pauses us, must go
        on reading the client's handshake messages.)"""
        if self._closing or self.transport is None:
            return
        stop = (self._waiting or self._blocked) and len(self._buffer) > MAX_PIPELINED
        if stop and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not stop:
            self._paused = False
            self.transport.resumeProducing()

    def _line_limit(self) -> int:
        if self._sasl is not None or self._buffer[:5].upper() == b"AUTH ":
            return sasl.MAX_RESPONSE + 2
        return MAX_COMMAND_LINE

    def _next_line(self) -> bytes | None:
        buffer = self._buffer
        newline = buffer.find(b"\n")
        if 0 <= newline < MAX_COMMAND_LINE and not self._discarding_line:
            # A complete line within every limit (``_line_limit`` is never below
            # MAX_COMMAND_LINE): the usual case, without the checks below.
            self._buffer = buffer[newline + 1:]
            return buffer[:newline - 1] if newline and buffer[newline - 1] == 13 \
                else buffer[:newline]
        limit = self._line_limit()
        if newline < 0:
            if len(self._buffer) > limit:
                self._discarding_line = True
                self._buffer = b""
            return None
        line, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
        if self._discarding_line or len(line) + 1 > limit:
            self._discarding_line = False
            self._abandon_sasl()
            self._reply(replies.LINE_TOO_LONG)
            self._next_command()
            return None if not self._buffer else self._next_line()
        return line[:-1] if line.endswith(b"\r") else line

    def _dispatch(self, line: bytes) -> None:
        if self._draining and self._mail is None:
            self._shut_down()  # draining: finish a transaction, never start one
            return
        if self._sasl is not None:
            self._run(self._sasl_response, line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(BAD_CHARACTERS)
            return
        if _CONTROL_CHARACTERS.search(text):
            self._reply(BAD_CHARACTERS)
            return
        verb, _, argument = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isascii() else None
        if handler is None:
            self._reply(replies.SYNTAX_ERROR)
            return
        self._run(handler, argument.strip(" "))

    def _run(self, handler, *args) -> None:
        """Call a command handler; wait for it if it returns a Deferred."""
        try:
            result = handler(*args)
        except Exception:
            self._answer(Failure())
            return
        if isinstance(result, defer.Deferred):
            # A Deferred that has its result already (MAIL with a pooled relay, a
            # refusal decided at once) is answered now, like a plain value: no wait, no
            # trip back through ``_resume``.
            if result.called and not result.paused:
                result.addBoth(self._answer)
                return
            self._waiting = True
            self._deadline.waiting()  # the client is waiting for us: that time is ours
            result.addBoth(self._answer_and_resume)
        else:
            self._answer(result)

    def _answer_and_resume(self, result) -> None:
        self._answer(result)
        self._resume()

    def _answer(self, result) -> None:
        # The answer to the command being executed: when that was the final dot
        # (``_finish``), the message's verdict is no longer awaited.
        self._finishing = False
        if isinstance(result, Failure):
            if isinstance(result.value, SMTPReplyError):
                result = result.value.reply
            else:
                log.failure("{connection_id} unexpected error", result,
                            connection_id=self.id)
                result = LOCAL_ERROR
        if isinstance(result, Reply):
            self._reply(result)

    def _resume(self, _=None) -> None:
        self._waiting = False
        if self._closing:
            return
        self._process(progressed=True)

    # -- session commands ---------------------------------------------------------------

    def smtp_HELO(self, argument: str) -> Reply:
        if not argument:
            return Reply(501, "5.5.4", "HELO requires a domain or address literal")
        self._greeted(argument, esmtp=False)
        return Reply(250, "", self.settings.hostname)

    def smtp_EHLO(self, argument: str) -> Reply:
        if not argument:
            return Reply(501, "5.5.4", "EHLO requires a domain or address literal")
        self._greeted(argument, esmtp=True)
        # RFC 2034: the EHLO response carries no enhanced codes.
        return Reply(250, "", "\n".join([
            f"{self.settings.hostname} greets {argument.split(' ')[0][:64]}",
            *self._extensions()]))

    def _greeted(self, helo: str, esmtp: bool) -> None:
        self._reset_transaction()
        self._helo, self._esmtp = helo.split(" ")[0], esmtp
        self._context = self._context.evolve(helo=self._helo, sni=self._sni(), tls=self._tls)

    def _extensions(self) -> list[str]:
        settings = self.settings
        extensions = ["PIPELINING", f"SIZE {settings.max_message_size}", "8BITMIME",
                      "ENHANCEDSTATUSCODES"]
        if self.factory.tls_options is not None and not self._tls:
            extensions.append("STARTTLS")
        if self._tls or self.factory.allows_cleartext_auth(self._context.peer_host):
            extensions.append("AUTH " + " ".join(sasl.MECHANISMS))
        if settings.smtputf8:
            extensions.append("SMTPUTF8")
        if settings.requiretls and self._tls:
            extensions.append("REQUIRETLS")
        if settings.binarymime:
            extensions += ["CHUNKING", "BINARYMIME"]  # RFC 3030
        return extensions

    def _sni(self) -> str | None:
        if not self._tls:
            return None
        try:
            handle: Any = self.transport.getHandle()  # with TLS, the OpenSSL connection
            name = handle.get_servername()
        except Exception:
            return None
        return name.decode("idna") if name else None

    def smtp_NOOP(self, argument: str) -> Reply:
        return replies.OK

    def smtp_RSET(self, argument: str) -> Reply:
        self._reset_transaction()
        return RESET_OK

    def smtp_VRFY(self, argument: str) -> Reply:
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message for delivery")

    def smtp_EXPN(self, argument: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN not supported")

    def smtp_HELP(self, argument: str) -> Reply:
        return Reply(214, "2.0.0", "See RFC 5321; esmtpfa relays authenticated submissions")

    def smtp_QUIT(self, argument: str) -> None:
        self._reply(replies.CLOSING)
        self._close()

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        if self._tls or self.factory.tls_options is None:
            return NO_STARTTLS
        if argument:
            return Reply(501, "5.5.4", "STARTTLS takes no parameters")
        if self._buffer:
            # RFC 3207 §6 / docs/twisted-defects.md #2: plaintext sent after STARTTLS must never be
            # acted on as if it had arrived over TLS.
            log.warn("{connection_id} discarded {n} bytes pipelined after STARTTLS",
                     connection_id=self.id, n=len(self._buffer))
            self._buffer = b""
        self._reply(Reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()  # the 220 goes out in cleartext, before the handshake
        self.transport.startTLS(self.factory.tls_options)
        self._tls = True
        self._deadline.handshake()  # until handshakeCompleted; silence ends the connection
        # RFC 3207 §4.2: forget everything learned from the client before TLS.
        self._reset_transaction()
        self._helo, self._esmtp = None, False
        self._context = self._context.evolve(helo=None, tls=True)
        if self._logout is not None:
            self._logout()
        self._identity = self._avatar = self._logout = None
        return None

    # -- AUTH (RFC 4954) --------------------------------------------------------------

    def smtp_AUTH(self, argument: str):
        # After HELO too, as Postfix allows: scan-to-mail printers greet with HELO and
        # then log in although HELO advertises nothing (RFC 4954 names EHLO, but a
        # server that refuses them only leaves the device unable to send).
        if self._helo is None:
            return NEED_HELO
        if self._identity is not None:
            return ALREADY_AUTHENTICATED
        if self._mail is not None:
            return AUTH_IN_TRANSACTION
        if not self._tls and not self.factory.allows_cleartext_auth(
                self._context.peer_host):  # --allow-insecure-auth, or a legacy listener's
            return replies.ENCRYPTION_REQUIRED
        name, _, initial = argument.partition(" ")
        if not name:
            return Reply(501, "5.5.4", "AUTH requires a mechanism name")
        mechanism = sasl.mechanism_for(name)
        decoded = sasl.decode_response(initial.encode()) if initial else None
        self._sasl = mechanism
        self._sasl_failed = False
        try:
            return self._sasl_step(mechanism.start(decoded))
        except SMTPReplyError:
            self._sasl = None
            raise

    def _sasl_response(self, line: bytes):
        mechanism = self._sasl
        assert mechanism is not None  # called only during an AUTH exchange
        if self._sasl_failed:  # RFC 7628 §3.2.3: the client acknowledged the error
            self._sasl = None
            return self._auth_failed()
        try:
            return self._sasl_step(mechanism.respond(sasl.decode_response(line)))
        except SMTPReplyError:
            self._sasl = None
            raise

    def _abandon_sasl(self) -> None:
        self._sasl = None

    def _sasl_step(self, step: sasl.Step):
        if isinstance(step, sasl.Challenge):
            return Reply(334, "", base64.b64encode(step.data).decode("ascii"))
        return self._login(step)

    def _login(self, offer: sasl.Offer) -> defer.Deferred:
        mechanism = self._sasl
        assert mechanism is not None  # an offer ends an AUTH exchange
        context = self._context
        if offer.oauth_host:
            context = context.evolve(oauth_host=offer.oauth_host)
        credentials = SubmissionCredentials(
            offer.username, offer.secret, context, bearer=offer.bearer,
            mechanism=mechanism.name)
        started = time.monotonic()
        d = self._login_in_flight = self.factory.portal.login(
            credentials, None, IMessageDelivery)

        def settled(result):
            self._login_in_flight = None
            return result

        d.addBoth(settled)

        def succeeded(result):
            _, avatar, logout = result
            self._sasl = None
            if self._closing:
                logout()
                return None
            self._avatar, self._logout = avatar, logout
            self._identity = avatar.identity
            log.info("{connection_id} AUTH {mechanism} ok as {identity} via {via} "
                     "({ms:.0f} ms)", connection_id=self.id, mechanism=mechanism.name,
                     identity=str(self._identity), via=self._identity.via,
                     ms=(time.monotonic() - started) * 1000)
            return replies.AUTH_OK

        def failed(failure: Failure):
            if failure.check(defer.CancelledError) and self._closing:
                return None  # the client went away while we asked: nobody to answer
            log_failed_login(context, mechanism.name, cast(BaseException, failure.value),
                             offer.username)
            if failure.check(UnauthorizedLogin):
                challenge = mechanism.failure_challenge()
                if challenge is not None:
                    self._sasl_failed = True
                    return Reply(334, "", base64.b64encode(challenge).decode("ascii"))
                self._sasl = None
                return self._auth_failed()
            self._sasl = None
            if failure.check(LoginThrottled):
                return AUTH_THROTTLED
            if not failure.check(ProviderUnavailable):
                log.failure("{connection_id} AUTH error", failure, connection_id=self.id)
            return replies.AUTH_TEMPFAIL

        return d.addCallbacks(succeeded, failed)

    def _auth_failed(self) -> Reply | None:
        self._auth_failures += 1
        if self._auth_failures >= self.settings.max_auth_failures:
            self._reply(replies.AUTH_INVALID)
            self._reply(replies.TOO_MANY_AUTH_FAILURES)
            self._close()
            return None
        return replies.AUTH_INVALID

    # -- mail transaction ----------------------------------------------------------------

    def _session_avatar(self):
        """The avatar for MAIL: the authenticated one, or an anonymous login if allowed."""
        if self._avatar is not None:
            return defer.succeed(self._avatar)
        if not self.settings.allow_anonymous:
            raise SMTPReplyError(replies.AUTH_REQUIRED)

        def logged_in(result):
            _, avatar, logout = result
            self._avatar, self._logout, self._identity = avatar, logout, ANONYMOUS
            return avatar
        return self.factory.portal.login(Anonymous(), None, IMessageDelivery).addCallback(
            logged_in)

    def _check_mail_params(self, params: dict[str, str | None]) -> None:
        settings = self.settings
        if params and not self._esmtp:
            raise SMTPReplyError(UNKNOWN_PARAMETER)
        for key, value in params.items():
            if key == "SIZE":
                if not value or not _is_number(value):
                    raise SMTPReplyError(Reply(501, "5.5.4", "SIZE requires a number"))
                if int(value) > settings.max_message_size:
                    raise SMTPReplyError(Reply(
                        552, "5.3.4", "Message size exceeds fixed maximum message size"))
            elif key == "BODY":
                bodies = ("7BIT", "8BITMIME") + (("BINARYMIME",) if settings.binarymime else ())
                if (value or "").upper() not in bodies:
                    raise SMTPReplyError(Reply(555, "5.5.4", f"Unsupported BODY={value}"))
            elif key == "SMTPUTF8" and settings.smtputf8 and value is None:
                pass
            elif key == "REQUIRETLS" and settings.requiretls and self._tls and value is None:
                pass
            elif key == "AUTH":
                pass  # RFC 4954 §5: we may ignore AUTH= and we do; we never trust it
            else:
                raise _mail_params_error(key)

    def smtp_MAIL(self, argument: str):
        if self._helo is None:
            return NEED_HELO
        if self._mail is not None:
            return NESTED_MAIL
        if self._avatar is None and not self.settings.allow_anonymous:
            return replies.AUTH_REQUIRED
        mail = parse_path_argument(argument, "FROM", BAD_SENDER)
        self._check_mail_params(mail.params)
        if not mail.is_ascii and "SMTPUTF8" not in mail.params:
            return NON_ASCII_ADDRESS

        def start(avatar):
            return avatar.startTransaction(self._context, mail.address, mail.params)

        def started(transaction):
            self._transaction, self._mail, self._recipients = transaction, mail, []
            return SENDER_OK

        if self._avatar is None:  # an anonymous login first
            return self._session_avatar().addCallback(start).addCallback(started)
        transaction = start(self._avatar)
        if isinstance(transaction, defer.Deferred):
            return transaction.addCallback(started)
        return started(transaction)

    def smtp_RCPT(self, argument: str):
        if self._mail is None:
            return NEED_MAIL
        rcpt = parse_path_argument(argument, "TO", BAD_RECIPIENT)
        if not rcpt.address:
            return BAD_RECIPIENT
        if rcpt.params:
            return Reply(555, "5.5.4", "Unsupported RCPT parameter")
        if not rcpt.is_ascii and "SMTPUTF8" not in self._mail.params:
            return NON_ASCII_ADDRESS
        if len(self._recipients) >= self.settings.max_recipients:
            return TOO_MANY_RECIPIENTS
        transaction = self._transaction

        def accepted(_):
            if transaction is self._transaction:
                self._recipients.append(rcpt.address)
            return RECIPIENT_OK

        verdict = transaction.addRecipient(rcpt.address, rcpt.params,
                                           data_follows=self._data_queued())
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(accepted)
        return accepted(verdict)

    def _data_queued(self) -> bool:
        """Whether the next pipelined command is a DATA that ``smtp_DATA`` will accept
        once a recipient is (RFC 2920 §3.1: DATA may end a group)."""
        command = self._buffer[:6].upper()
        return (command == b"DATA\r\n" or command[:5] == b"DATA\n") and \
            not self._needs_bdat()

    def _needs_bdat(self) -> bool:
        # RFC 3030 §3: BINARYMIME content and a transaction begun with BDAT use BDAT.
        return self._chunks is not None or self._body() == "BINARYMIME"

    def smtp_DATA(self, argument: str) -> Reply:
        if self._mail is None:
            return NEED_MAIL
        if not self._recipients:
            return NEED_RCPT
        if argument:
            return Reply(501, "5.5.4", "DATA takes no parameters")
        if self._needs_bdat():
            return Reply(503, "5.5.1", "Use BDAT for this message (RFC 3030)")
        self._reader = DataReader(
            self._transaction.write, self.settings.max_message_size,
            self.settings.max_line_length, self.settings.bare_line_ends)
        self._deadline.data()
        if self._buffer:  # content pipelined behind DATA (RFC 2920 does not allow it,
            self._deadline.received(len(self._buffer))  # but it must count all the same)
        return START_DATA

    def _feed_data(self) -> None:
        assert self._reader is not None  # called only while a DATA body is read
        data, self._buffer = self._buffer, b""
        after = self._reader.feed(data)
        if after is None:
            return
        self._buffer = after
        reader, self._reader = self._reader, None
        transaction = self._transaction
        if reader.error is not None:
            log.info("{connection_id} message {message_id} refused: {reply}",
                     connection_id=self.id, message_id=transaction.id, reply=str(reader.error))
            self._reset_transaction()
            self._reply(reader.error)
            return
        self._run(self._finish, transaction)

    def _body(self) -> str:
        return (self._mail.params.get("BODY") or "").upper() if self._mail else ""

    def smtp_BDAT(self, argument: str) -> None:
        size, _, last = argument.partition(" ")
        if not _is_number(size) or last.upper() not in ("", "LAST"):
            # Without a chunk size the stream cannot be resynchronized: the octets that
            # follow would be read as commands.  Close instead (RFC 3030 §2).
            self._reply(Reply(501, "5.5.4", "Malformed BDAT command, closing connection"))
            self._close()
            return None
        error = None
        if not self.settings.binarymime:
            error = Reply(502, "5.5.1", "CHUNKING not available")
        elif self._mail is None:
            error = NEED_MAIL
        elif not self._recipients:
            error = NEED_RCPT
        elif self._chunks is None:
            self._chunks = ChunkReader(
                self._transaction.write, self.settings.max_message_size,
                self.settings.max_line_length, self.settings.bare_line_ends,
                binary=self._body() == "BINARYMIME")
        # Even a refused chunk's octets are consumed: they are never commands.
        self._chunk = _Chunk(int(size), bool(last), error)
        self._deadline.data()
        if self._buffer:  # the chunk's octets usually arrive with its command
            self._deadline.received(len(self._buffer))
        if self._chunk.remaining == 0:
            self._end_chunk()
        return None

    def _feed_chunk(self) -> None:
        chunk = self._chunk
        assert chunk is not None  # called only inside a BDAT chunk
        data = self._buffer[:chunk.remaining]
        self._buffer = self._buffer[len(data):]
        chunk.remaining -= len(data)
        if chunk.error is None:
            assert self._chunks is not None  # an accepted chunk has its reader
            self._chunks.feed(data)
        if chunk.remaining == 0:
            self._end_chunk()

    def _end_chunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None  # called only when a BDAT chunk ends
        if chunk.error is not None:
            self._reply(chunk.error)
            return
        reader = self._chunks
        assert reader is not None  # an accepted chunk has its reader
        if chunk.last:
            reader.finish()
        if reader.error is not None:
            # RFC 3030 §2: a failed chunk fails the transaction.
            self._reset_transaction()
            self._reply(reader.error)
            return
        if not chunk.last:
            self._reply(Reply(250, "2.0.0", f"{reader.size} octets received"))
            return
        self._chunks = None
        self._run(self._finish, self._transaction)

    def _finish(self, transaction) -> defer.Deferred:
        self._transaction = None  # finish() owns it now; reset must not abort it
        self._mail, self._recipients = None, []
        self._finishing = True  # until the verdict is answered (``_answer``)
        return transaction.finish()

    def _reset_transaction(self) -> None:
        self._reader = self._chunks = None
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            transaction.abort()
        self._mail, self._recipients = None, []
