"""Delivery to the upstream smarthost: settings, one SMTP session, and the IRelay on top.

``UpstreamSession`` is one authenticated, negotiated SMTP session (greeting, EHLO,
STARTTLS, AUTH) able to run mail transactions; ``SMTPRelay`` opens one session per message
and turns every outcome into the reply our own client must hear (SPEC §5):

* the upstream's own code and enhanced code when it rejects the message (reason REJECTED),
* ``451 4.4.1`` when it cannot be reached, ``451 4.4.2`` when the connection breaks, times
  out, fails TLS or speaks garbage, ``451 4.3.0`` when our AUTH toward it fails
  (reason UNAVAILABLE: the client retries, nothing is lost),
* a positive reply only once the upstream said 250 to the end of data.

A session can run several transactions (``reset`` sends RSET, RFC 5321 §4.1.1.5), so a
pool of sessions and several upstreams can be added without touching the wire code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThread
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.message import OutboundMessage
from esmtpfa.relay.interfaces import REJECTED, UNAVAILABLE, IRelay, RelayError
from esmtpfa.relay.protocol import (
    AuthenticationFailed, ConnectionLost, Extensions, ProtocolViolation, SMTPClientFactory,
    SMTPClientProtocol, TLSFailure, UnexpectedReply, UpstreamError, gatherReplies)
from esmtpfa.relay.tls import client_tls_options
from esmtpfa.replies import Reply

log = Logger(namespace="esmtpfa.relay.upstream")

STARTTLS_MODES = ("opportunistic", "required", "none")
#: How long a QUIT may take once the outcome is known; it never changes the outcome.
QUIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream smarthost and how to talk to it (flags ``-relay-*``, SPEC §5)."""

    host: str
    port: int = 25
    implicit_tls: bool = False          # RFC 8314: TLS from the first byte (port 465)
    starttls: str = "opportunistic"     # RFC 3207: "opportunistic", "required" or "none"
    ca_cert: str | None = None          # PEM bundle to trust instead of the platform store
    client_cert: str | None = None      # PEM, leaf first, then intermediates
    client_key: str | None = None
    skip_verify: bool = False           # encrypt without authenticating the upstream
    server_name: str | None = None      # SNI and certificate name; defaults to ``host``
    username: str | None = None
    password: str | None = None
    allow_insecure_auth: bool = False   # permit AUTH over cleartext
    helo_name: str = socket.gethostname()
    connect_timeout: float = 30.0
    command_timeout: float = 300.0      # RFC 5321 §4.5.3.2: 5 minutes
    data_timeout: float = 600.0         # RFC 5321 §4.5.3.2.6: 10 minutes for the final reply

    def __post_init__(self) -> None:
        if self.starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {STARTTLS_MODES}, not {self.starttls!r}")
        if not self.host:
            raise ValueError("the relay host is empty")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"bad relay port {self.port}")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("a relay client certificate needs both -relay-tls-cert and -key")
        for name in ("connect_timeout", "command_timeout", "data_timeout"):
            value = float(getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be positive")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "port", int(self.port))

    def __repr__(self) -> str:
        # The password never reaches a log line, even through a repr (SPEC §9).
        fields = ", ".join(
            f"{name}={'<redacted>' if name == 'password' and value else value!r}"
            for name, value in self.__dict__.items())
        return f"UpstreamSettings({fields})"

    @property
    def tls_server_name(self) -> str:
        return self.server_name or self.host

    @property
    def authenticates(self) -> bool:
        return bool(self.username) and self.password is not None and self.password != ""

    @property
    def uses_tls(self) -> bool:
        return self.implicit_tls or self.starttls != "none"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --- replies we give our client ---------------------------------------------------------------

def _unavailable(enhanced: str, text: str, detail: str, command: str | None = None,
                 upstream_reply: Reply | None = None) -> RelayError:
    return RelayError(Reply(451, enhanced, text), UNAVAILABLE, command, upstream_reply, detail)


def _rejected(command: str, reply: Reply, text: str | None = None) -> RelayError:
    """Pass the upstream's verdict through: its code and enhanced code, our prefix."""
    code = reply.code
    if code == 421:
        # 421 means "closing the channel" (RFC 5321 §3.8); from us it would tell our
        # client that *we* are closing.  The meaning for the message is a 451.
        code = 451
    enhanced = reply.enhanced
    if not enhanced or enhanced[0] != str(code)[0]:
        enhanced = f"{code // 100}.0.0"  # an inconsistent class digit (RFC 3463 §2)
    body = text if text is not None else f"upstream: {reply.text}"
    return RelayError(Reply(code, enhanced, body), REJECTED, command, reply,
                      f"upstream answered {command} with {reply}")


def _permanent(code: int, enhanced: str, text: str, command: str) -> RelayError:
    """A refusal we decide before sending: the upstream could never accept this message."""
    return RelayError(Reply(code, enhanced, text), REJECTED, command, None, text)


def relay_error_from(error: BaseException, stage: str) -> RelayError:
    """Map whatever stopped a delivery to the reply our client gets."""
    if isinstance(error, RelayError):
        return error
    if stage == "connect":  # refused, unreachable, DNS, connect timeout
        return _unavailable("4.4.1", "Upstream server unreachable, try again later",
                            f"cannot connect: {error}", "connect")
    if isinstance(error, AuthenticationFailed):
        return _unavailable("4.3.0", "Upstream authentication failed, try again later",
                            f"upstream refused our AUTH: {error.reply}", "AUTH", error.reply)
    if isinstance(error, TLSFailure):
        return _unavailable("4.4.2", "TLS with the upstream server failed, try again later",
                            error.detail, error.command)
    if isinstance(error, ConnectionLost):  # includes ReplyTimeout
        text = "Upstream connection failed, try again later"
        if error.after_data:
            text = ("Upstream connection failed after the message was sent; "
                    "try again later (a duplicate is possible)")
        return _unavailable("4.4.2", text, error.detail, error.command)
    if isinstance(error, UnexpectedReply):
        # The session could not be set up (EHLO/HELO refused): not about the message.
        return _unavailable("4.4.0", "Upstream server refused the session, try again later",
                            error.detail, error.command, error.reply)
    if isinstance(error, (ProtocolViolation, UpstreamError)):
        return _unavailable("4.4.2", "Upstream protocol error, try again later",
                            error.detail, error.command)
    return _unavailable("4.3.0", "Local error talking to the upstream, try again later",
                        f"{type(error).__name__}: {error}", stage)


# --- one session ---------------------------------------------------------------------------

class UpstreamSession:
    """One SMTP session, set up according to ``UpstreamSettings``.

    ``open()`` runs greeting → EHLO → STARTTLS per policy → EHLO → AUTH; ``send()`` runs
    one mail transaction.  Failures raise ``RelayError`` (policy decisions, rejections) or
    the protocol's ``UpstreamError`` (mapped by ``relay_error_from``).
    """

    def __init__(self, protocol: SMTPClientProtocol, settings: UpstreamSettings,
                 tls_options: Any):
        self.protocol = protocol
        self.settings = settings
        self._tls_options = tls_options
        self.extensions = Extensions.none()
        self.authenticated = False
        self.transactions = 0
        self.needs_reset = False
        self.mechanism: str | None = None

    @property
    def secure(self) -> bool:
        return self.protocol.secure

    async def open(self) -> None:
        greeting = await self.protocol.greeting()
        if greeting.code != 220:
            # RFC 5321 §3.1: 554 (or anything but 220) means "no service here".
            raise _unavailable("4.4.0", "Upstream server refused the session, try again later",
                               f"upstream greeting: {greeting}", "greeting", greeting)
        name = self.settings.helo_name
        self.extensions = await self.protocol.ehlo(name)
        if not self.settings.implicit_tls:
            await self._starttls(name)
        if self.settings.authenticates:
            await self._authenticate()

    async def _starttls(self, name: str) -> None:
        mode = self.settings.starttls
        if mode == "none":
            return
        if not self.extensions.starttls:
            if mode == "required":
                raise _unavailable("4.7.0", "Upstream server does not offer STARTTLS, "
                                   "which is required, try again later",
                                   "STARTTLS required but not offered", "STARTTLS")
            return  # opportunistic and not offered: cleartext, as configured
        try:
            await self.protocol.starttls(self._tls_options)
        except UnexpectedReply as error:
            # Offered but refused.  We do not fall back to cleartext: whoever could make
            # STARTTLS fail could then read the session.
            raise _unavailable("4.4.2", "TLS with the upstream server failed, try again later",
                               f"STARTTLS refused: {error.reply}", "STARTTLS", error.reply)
        # RFC 3207 §4.2: forget everything learned before TLS and ask again.
        self.extensions = await self.protocol.ehlo(name)

    async def _authenticate(self) -> None:
        if not self.secure and not self.settings.allow_insecure_auth:
            raise _unavailable(
                "4.3.0", "Upstream authentication impossible, try again later",
                "refusing to send credentials over a cleartext connection "
                "(enable TLS toward the relay, or allow insecure auth)", "AUTH")
        offered = self.extensions.auth_mechanisms
        # Strongest of what we implement; SPEC §5 lists SCRAM/CRAM for later.
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            raise _unavailable(
                "4.3.0", "Upstream authentication impossible, try again later",
                f"upstream offers no usable AUTH mechanism (offered: "
                f"{' '.join(sorted(offered)) or 'none'})", "AUTH")
        assert self.settings.username is not None and self.settings.password is not None
        await self.protocol.authenticate(mechanism, self.settings.username,
                                         self.settings.password)
        self.authenticated = True
        self.mechanism = mechanism

    async def reset(self) -> None:
        """RSET before another transaction on this session (RFC 5321 §4.1.1.5)."""
        reply = await self.protocol.command(b"RSET")
        if reply.code != 250:
            raise UnexpectedReply("RSET", reply)
        self.needs_reset = False

    async def send(self, message: OutboundMessage) -> Reply:
        """One mail transaction; returns the upstream's 250 to the end of data."""
        if self.needs_reset:
            await self.reset()
        eight_bit = None
        if (message.envelope.body or "").upper() in ("8BITMIME", "BINARYMIME") \
                and not self.extensions.eightbitmime:
            # Rare (every current MTA offers 8BITMIME) and clients often declare it for
            # plain ASCII: look at the content (in a thread: it may be large) before deciding.
            eight_bit = await deferToThread(_has_8bit, message)
        mail, rcpts = self._commands(message, eight_bit)
        self.needs_reset = True
        self.transactions += 1
        if self.extensions.pipelining:
            replies = await gatherReplies(self.protocol.pipeline(
                [mail, *rcpts, b"DATA"], ["MAIL", *["RCPT"] * len(rcpts), "DATA"]))
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
            data_started = data_reply.code == 354
            try:
                self._check_mail(mail_reply)
                self._check_recipients(message, rcpt_replies)
            except RelayError:
                if data_started:
                    # The upstream waits for content we must not send: an empty message
                    # or a "." would deliver to the accepted recipients.  Drop the link.
                    self.protocol.abort()
                raise
        else:
            self._check_mail(await self.protocol.command(mail, "MAIL"))
            rcpt_replies = []
            for rcpt in rcpts:
                # Keep going after a rejection: the transient/permanent choice needs all.
                rcpt_replies.append(await self.protocol.command(rcpt, "RCPT"))
            self._check_recipients(message, rcpt_replies)
            data_reply = await self.protocol.command(b"DATA")
        if data_reply.code != 354:
            if data_reply.is_positive:
                raise ProtocolViolation(f"DATA answered {data_reply}, not 354", "DATA")
            raise _rejected("DATA", data_reply)
        final = await self.protocol.sendData(message.chunks())
        if final.is_positive:
            if final.code != 250:
                raise ProtocolViolation(f"end of data answered {final}", "end of data")
            self.needs_reset = False  # RFC 5321 §4.1.1.4: a completed transaction resets
            return final
        raise _rejected("end of data", final)

    def _commands(self, message: OutboundMessage, eight_bit: bool | None = None
                  ) -> tuple[bytes, list[bytes]]:
        envelope, ext = message.envelope, self.extensions
        addresses = [envelope.mail_from, *envelope.recipients]
        for address in addresses:
            if "<" in address or ">" in address or not address.isprintable():
                raise _permanent(553, "5.1.3", f"Invalid address {address!r}", "MAIL")
        if not envelope.recipients:
            raise _permanent(554, "5.5.1", "No recipients", "RCPT")
        size = message.size
        # RFC 1870 §6: do not send what the upstream already said it would refuse.
        if ext.size and size > ext.size:
            raise _permanent(552, "5.3.4", f"Message too big for the upstream server "
                             f"({size} > {ext.size} octets)", "MAIL")
        needs_utf8 = envelope.smtputf8 or not all(a.isascii() for a in addresses)
        if needs_utf8 and not ext.smtputf8:
            # RFC 6531 §3.2 (mox: ErrSMTPUTF8Unsupported): no downgrade, a permanent error.
            raise _permanent(550, "5.6.7", "Upstream server does not support SMTPUTF8, "
                             "required by this message", "MAIL")
        params: list[str] = []
        if ext.size is not None:
            params.append(f"SIZE={size}")
        body = (envelope.body or "").upper()
        if body in ("8BITMIME", "BINARYMIME"):
            # The spool holds CRLF-normalized content sent with DATA, which is what
            # 8BITMIME means on the wire (RFC 6152); BINARYMIME would need BDAT (RFC 3030).
            if ext.eightbitmime:
                params.append("BODY=8BITMIME")
            elif eight_bit:
                # RFC 6152 §3: 8-bit data must not go to a server without 8BITMIME, and we
                # do not downgrade (mox: Err8bitmimeUnsupported).
                raise _permanent(554, "5.6.3", "Upstream server does not support 8BITMIME, "
                                 "required by this message", "MAIL")
            # else: declared 8BITMIME, but the content is 7-bit: send it as such.
        if needs_utf8:
            params.append("SMTPUTF8")
        if envelope.requiretls:
            # RFC 8689 §4.2.1: only over TLS, only to a server that carries the promise on.
            if not (self.secure and ext.requiretls):
                raise _permanent(550, "5.7.30", "REQUIRETLS support required but the "
                                 "upstream server does not offer it", "MAIL")
            params.append("REQUIRETLS")
        mail = f"MAIL FROM:<{envelope.mail_from}>" + "".join(" " + p for p in params)
        rcpts = [f"RCPT TO:<{r}>".encode("utf-8") for r in envelope.recipients]
        return mail.encode("utf-8"), rcpts

    @staticmethod
    def _check_mail(reply: Reply) -> None:
        if reply.code != 250:
            if reply.is_positive:
                raise ProtocolViolation(f"MAIL answered {reply}", "MAIL")
            raise _rejected("MAIL", reply)

    @staticmethod
    def _check_recipients(message: OutboundMessage, replies: list[Reply]) -> None:
        """All recipients or nothing: our 250 must mean every recipient got the message."""
        rejected = [(rcpt, reply) for rcpt, reply in zip(message.envelope.recipients, replies)
                    if reply.code not in (250, 251)]
        if not rejected:
            return
        for rcpt, reply in rejected:
            if reply.is_positive:
                raise ProtocolViolation(f"RCPT answered {reply}", "RCPT")
        # A transient refusal makes the whole message transient: the client retries and
        # the permanently refused recipient is reported then.
        rcpt, reply = next(((r, p) for r, p in rejected if p.is_transient), rejected[0])
        raise _rejected("RCPT", reply, f"upstream rejected <{rcpt}>: {reply.text}")

    def close(self) -> Deferred[None]:
        """QUIT (bounded by the command timeout, at most ``QUIT_TIMEOUT``) and disconnect."""
        return self.protocol.quit(min(QUIT_TIMEOUT, self.settings.command_timeout))


# --- the relay ----------------------------------------------------------------------------------

@implementer(IRelay)
class SMTPRelay:
    """IRelay to one upstream smarthost, one connection per message.

    ``deliver`` fires with the upstream's 250 to the end of data, or fails with a
    ``RelayError`` whose ``reply`` is what our client must be told.
    """

    def __init__(self, settings: UpstreamSettings, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.settings = settings
        self._reactor = reactor
        self._tls_options = client_tls_options(
            settings.tls_server_name, settings.ca_cert, settings.client_cert,
            settings.client_key, settings.skip_verify) if settings.uses_tls else None
        self._factory = SMTPClientFactory(reactor, settings.command_timeout,
                                          settings.data_timeout)
        self._in_flight: set[object] = set()
        self._idle: list[Deferred[None]] = []
        self._closed = False
        if settings.authenticates and not settings.uses_tls and not settings.allow_insecure_auth:
            log.warn("relay {upstream}: credentials are set but TLS is off and insecure AUTH "
                     "is not allowed: every delivery will fail with 451 4.3.0",
                     upstream=settings.address)

    @property
    def description(self) -> str:
        s = self.settings
        tls = "implicit TLS" if s.implicit_tls else f"STARTTLS {s.starttls}"
        auth = f", AUTH as {s.username}" if s.authenticates else ""
        verify = ", certificate NOT verified" if s.uses_tls and s.skip_verify else ""
        return f"SMTP relay {s.address} ({tls}{verify}{auth})"

    def connect(self) -> Deferred[SMTPClientProtocol]:
        """A TCP (or implicit TLS) connection to the upstream, before the greeting."""
        s = self.settings
        endpoint: Any = HostnameEndpoint(self._reactor, s.host, s.port,
                                         timeout=s.connect_timeout)
        if s.implicit_tls:
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        return endpoint.connect(self._factory)

    def deliver(self, message: OutboundMessage) -> Deferred[Reply]:
        if self._closed:
            error = RelayError(Reply(451, "4.3.2", "Relay shutting down, try again later"),
                               UNAVAILABLE, None, None, "relay closed")
            return fail(error)
        d = Deferred.fromCoroutine(self._deliver(message))
        return self._track(d)

    async def _deliver(self, message: OutboundMessage) -> Reply:
        stage = "connect"
        session: UpstreamSession | None = None
        try:
            protocol = await self.connect()
            stage = "session"
            session = UpstreamSession(protocol, self.settings, self._tls_options)
            await session.open()
            stage = "transaction"
            reply = await session.send(message)
        except Exception as error:  # everything becomes a RelayError
            failure = relay_error_from(error, stage)
            if stage != "connect" and not isinstance(error, (RelayError, UpstreamError)):
                log.failure("unexpected error relaying {message_id}", Failure(error),
                            message_id=message.id)
            self._log(message, session, "failed", failure.reply, failure)
            if session is not None:
                self._track(session.close())
            raise failure
        self._log(message, session, "accepted", reply, None)
        # The outcome is final: QUIT in the background, its failure changes nothing.
        self._track(session.close())
        return reply

    def _log(self, message: OutboundMessage, session: UpstreamSession | None, outcome: str,
             reply: Reply, error: RelayError | None) -> None:
        log.info(
            "relay {outcome}: message={message_id} connection={connection_id} "
            "upstream={upstream} tls={tls} reply={reply}{detail}",
            outcome=outcome, message_id=message.id, connection_id=message.connection_id,
            upstream=self.settings.address, tls=bool(session and session.secure),
            reply=str(reply), upstream_reply=str(error.upstream_reply) if error and
            error.upstream_reply else None,
            detail=f" ({error.detail})" if error and error.detail else "",
            reason=error.reason if error else None)

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        token = object()
        self._in_flight.add(token)

        def done(result: Any) -> Any:
            self._in_flight.discard(token)
            if not self._in_flight:
                waiters, self._idle = self._idle, []
                for waiter in waiters:
                    waiter.callback(None)
            return result
        d.addBoth(done)
        return d

    def close(self) -> Deferred[None]:
        """Refuse new work; fire once every delivery and every QUIT has finished."""
        self._closed = True
        waiter: Deferred[None] = Deferred()
        if self._in_flight:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter


def _has_8bit(message: OutboundMessage) -> bool:
    """Whether any octet has the high bit set (runs in a thread: reads the whole spool)."""
    return any(not chunk.isascii() for chunk in message.chunks())


def with_settings(settings: UpstreamSettings, **changes: Any) -> UpstreamSettings:
    """A copy with some fields changed (config reloads, tests)."""
    return replace(settings, **changes)
