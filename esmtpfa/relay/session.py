"""One negotiated SMTP session with an upstream, and how it is reached.

``UpstreamSession.open()`` runs greeting → EHLO → STARTTLS per policy → EHLO → AUTH;
after that the session runs mail transactions, one command group at a time, and can be
reused for the next message (RSET first).  What to do when something fails (another
upstream, a fresh connection, a replay) is decided in ``upstream.py``; this module only
says what happened, and says it once, where it happens: every failure is a
``RelayError`` built by ``errors.py``'s constructors, here (a refused greeting, a missing
STARTTLS or AUTH mechanism, the OAuth2 token, a ``421``) or in the protocol below (a lost
or silent connection, garbage, TLS, a refused AUTH).  Nothing maps errors afterwards
(docs/delivery-guarantee.md, "Failures are values: kind and phase").

A ``421`` is the upstream closing the channel (RFC 5321 §3.8) whatever the command was:
the connection is dropped and the failure is ``Kind.UNAVAILABLE``, never the message's
verdict.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)

from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope
from esmtpfa.common.replies import Reply
from esmtpfa.common.transport import write_through
from esmtpfa.relay.client_sasl import (
    choose_mechanism,
    choose_token_mechanism,
    client_for,
    token_client_for,
)
from esmtpfa.relay.errors import (
    TOKEN_UNAVAILABLE,
    closing,
    local_error,
    permanent,
    session_refused,
    token_refused,
    unavailable,
    unreachable,
)
from esmtpfa.relay.interfaces import Kind, RelayError
from esmtpfa.relay.oauth2 import TokenUnavailable
from esmtpfa.relay.protocol import Extensions, SMTPClientProtocol
from esmtpfa.relay.settings import UpstreamSettings

log = logger("esmtpfa.relay.session")

#: How long a QUIT may take once the outcome is known; it never changes the outcome.
QUIT_TIMEOUT = 10.0


# --- connecting -----------------------------------------------------------------------------

def dial(reactor: Any, settings: UpstreamSettings, tls_options: Any, factory: Any
         ) -> Deferred[SMTPClientProtocol]:
    """A connection to the upstream, or a ``RelayError`` (``errors.unreachable``)."""
    try:
        connecting = endpoint_for(reactor, settings, tls_options).connect(factory)
    except Exception as error:
        connecting = Deferred()
        connecting.errback(error)

    def failed(failure: Any) -> None:
        raise unreachable(failure.value, settings.address) from None
    return connecting.addErrback(failed)


def endpoint_for(reactor: Any, settings: UpstreamSettings, tls_options: Any) -> Any:
    """IP literals connect directly (``HostnameEndpoint`` would send even those through
    getaddrinfo in the thread pool); names go through ``HostnameEndpoint`` (happy eyeballs).
    """
    version = settings.ip_version
    reactor = write_through(reactor)
    if version == 4:
        endpoint: Any = TCP4ClientEndpoint(reactor, settings.host, settings.port,
                                           timeout=settings.connect_timeout)
    elif version == 6:
        endpoint = TCP6ClientEndpoint(reactor, settings.host, settings.port,
                                      timeout=settings.connect_timeout)
    else:
        endpoint = HostnameEndpoint(reactor, settings.host, settings.port,
                                    timeout=settings.connect_timeout)
    if settings.implicit_tls:
        endpoint = wrapClientTLS(tls_options, endpoint)
    return endpoint


# --- one session ---------------------------------------------------------------------------

class UpstreamSession:
    """One SMTP session, set up according to ``UpstreamSettings``."""

    def __init__(self, protocol: SMTPClientProtocol, settings: UpstreamSettings,
                 tls_options: Any, sasl_cache: dict | None = None, clock: Any = time,
                 tokens: Any = None):
        self.protocol = protocol
        self.settings = settings
        #: The upstream's ``oauth2.TokenBroker`` when it logs in with a token.
        self._tokens = tokens
        self._tls_options = tls_options
        self._sasl_cache = sasl_cache if sasl_cache is not None else {}
        self._clock = clock
        self.extensions = Extensions.none()
        self.authenticated = False
        self.mechanism: str | None = None
        #: The upstream refused our OAuth2 token (the broker dropped it): a new
        #: connection with a new token may succeed (``pool.SessionPool``).
        self.token_refused = False
        self.transactions = 0       # MAIL commands sent on this connection (LIMITS MAILMAX)
        self.needs_reset = False    # a transaction was started and not completed
        self.created = clock.monotonic()
        self.idle_since = self.created
        self.idle_timer: Any = None  # the pool's ``timeouts.Deadline`` while pooled

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def secure(self) -> bool:
        return self.protocol.secure

    @property
    def usable(self) -> bool:
        return self.protocol.usable

    @property
    def exhausted(self) -> bool:
        """LIMITS MAILMAX reached: no further transaction on this connection."""
        mailmax = self.extensions.mailmax
        return mailmax is not None and self.transactions >= mailmax

    @property
    def max_size(self) -> int | None:
        size = self.extensions.size
        return size or None

    @property
    def pipelining(self) -> bool:
        return self.extensions.pipelining

    # -- setting up ------------------------------------------------------------------------

    async def open(self) -> None:
        """Set the session up; fails with a ``RelayError`` (anything else that breaks
        it is a local error: a bug, or a mechanism we cannot run)."""
        try:
            await self._open()
        except RelayError:
            raise
        except Exception as error:
            raise local_error(error, "session", self.address) from None

    async def _open(self) -> None:
        greeting = await self.protocol.greeting()
        if greeting.code != 220:
            # RFC 5321 §3.1: 554 (or anything but 220) means "no service here"; 421 is
            # "busy, come back later".  Either way, not this connection.
            raise session_refused("greeting", greeting, self.address,
                                  f"upstream greeting: {greeting}")
        name = self.settings.helo_name
        self.extensions = await self.protocol.ehlo(name)
        if not self.settings.implicit_tls:
            await self._starttls(name)
        if self.settings.authenticates or self.settings.uses_oauth2:
            await self._authenticate()

    async def _starttls(self, name: str) -> None:
        mode = self.settings.starttls
        if mode == "none":
            return
        if not self.extensions.starttls:
            if mode == "required":
                raise unavailable("4.7.0", "Upstream server does not offer STARTTLS, "
                                  "which is required, try again later",
                                  "STARTTLS required but not offered", "STARTTLS",
                                  upstream=self.address)
            return  # opportunistic and not offered: cleartext, as configured
        # Offered but refused fails (``errors.starttls_refused``): we do not fall back to
        # cleartext, since whoever could make STARTTLS fail could then read the session.
        await self.protocol.starttls(self._tls_options)
        # RFC 3207 §4.2: forget everything learned before TLS and ask again.
        self.extensions = await self.protocol.ehlo(name)

    async def _authenticate(self) -> None:
        if not self.secure and not self.settings.allow_insecure_auth:
            raise unavailable(
                "4.3.0", "Upstream authentication impossible, try again later",
                "refusing to send credentials over a cleartext connection "
                "(enable TLS toward the relay, or allow insecure auth)", "AUTH",
                upstream=self.address)
        offered = self.extensions.auth_mechanisms
        if self.settings.uses_oauth2:
            await self._authenticate_with_token(offered)
            return
        mechanism = choose_mechanism(offered, self.settings.auth_mechanism)
        if mechanism is None:
            raise self._no_mechanism(offered, "a supported AUTH mechanism")
        assert self.settings.username is not None and self.settings.password is not None
        client = client_for(mechanism, self.settings.username, self.settings.password,
                            self._sasl_cache)
        await self.protocol.authenticate(client)
        self.authenticated = True
        self.mechanism = mechanism

    def _no_mechanism(self, offered: frozenset[str], default: str) -> RelayError:
        """None of the mechanisms we would use (``default``, or the forced one) is
        offered: the client retries, the log says what the upstream offers."""
        forced = self.settings.auth_mechanism
        wanted = f"--relay-auth-mech {forced}" if forced else default
        return unavailable(
            "4.3.0", "Upstream authentication impossible, try again later",
            f"upstream does not offer {wanted} (offered: "
            f"{' '.join(sorted(offered)) or 'none'})", "AUTH", upstream=self.address)

    async def _authenticate_with_token(self, offered: frozenset[str]) -> None:
        """XOAUTH2 or OAUTHBEARER (RFC 7628) with a token from the upstream's broker
        (docs/oauth2.md).  No token: ``451 4.7.0``, so the client keeps the message.  A
        token the upstream refuses is dropped from the broker and ``token_refused`` says
        so: the pool then tries once more, on a new connection, with a new token."""
        mechanism = choose_token_mechanism(offered, self.settings.auth_mechanism)
        if mechanism is None:
            raise self._no_mechanism(offered, "OAUTHBEARER or XOAUTH2")
        if self._tokens is None:  # a relay built without its brokers: a bug
            raise unavailable("4.7.0", TOKEN_UNAVAILABLE, "no OAuth2 token broker",
                              "AUTH", upstream=self.address)
        try:
            token = await self._tokens.token()
        except TokenUnavailable as error:
            raise unavailable("4.7.0", TOKEN_UNAVAILABLE, f"no OAuth2 token: {error}",
                              "AUTH", upstream=self.address, kind=Kind.CREDENTIALS
                              ) from None
        assert self.settings.username is not None
        client = token_client_for(mechanism, self.settings.username, token,
                                  self.settings.host, self.settings.port)
        try:
            await self.protocol.authenticate(client)
        except RelayError as error:
            if error.upstream_reply is None:  # not a refusal: lost, cancelled, timed out
                raise
            # The token is all we log in with: whatever the server's words, the token
            # goes (a revoked or re-scoped token would otherwise be offered again).
            self._tokens.invalidate(token)
            self.token_refused = True
            status = client.refusal.status if client.refusal is not None else None
            raise token_refused(error.upstream_reply, status, self.address) from None
        self.authenticated = True
        self.mechanism = mechanism

    # -- commands for a transaction ---------------------------------------------------------

    def mail_line(self, envelope: Envelope, size: int | None,
                  eight_bit: bool | None = None) -> bytes:
        """MAIL FROM with the parameters this upstream understands, or a permanent
        ``RelayError`` when the message needs an extension the upstream lacks (mox:
        ErrSize, ErrSMTPUTF8Unsupported, Err8bitmimeUnsupported, ErrRequireTLSUnsupported).
        """
        ext = self.extensions
        if not _plain_path(envelope.mail_from):
            raise permanent(553, "5.1.7", f"Invalid sender address {envelope.mail_from!r}",
                            "MAIL", self.address)
        limit = self.max_size
        if size is not None and limit is not None and size > limit:
            # RFC 1870 §6: do not send what the upstream already said it would refuse.
            raise permanent(552, "5.3.4", f"Message too big for the upstream server "
                            f"({size} > {limit} octets)", "MAIL", self.address)
        needs_utf8 = envelope.smtputf8 or not envelope.mail_from.isascii() or not all(
            r.isascii() for r in envelope.recipients)
        if needs_utf8 and not ext.smtputf8:
            # RFC 6531 §3.2 (mox: ErrSMTPUTF8Unsupported): no downgrade, a permanent error.
            raise permanent(550, "5.6.7", "Upstream server does not support SMTPUTF8, "
                            "required by this message", "MAIL", self.address)
        params: list[str] = []
        if ext.size is not None and size is not None:
            params.append(f"SIZE={size}")
        body = (envelope.body or "").upper()
        if body in ("8BITMIME", "BINARYMIME"):
            # The spool holds CRLF-normalized content sent with DATA, which is what
            # 8BITMIME means on the wire (RFC 6152); BINARYMIME would need BDAT (RFC 3030).
            if ext.eightbitmime:
                params.append("BODY=8BITMIME")
            elif eight_bit:
                raise eight_bit_unsupported(self.address)
            # else: declared 8BITMIME, but the content is (or may be) 7-bit; ``send``
            # checks the content before any of it is relayed.
        if needs_utf8:
            params.append("SMTPUTF8")
        if envelope.requiretls:
            # RFC 8689 §4.2.1: only over TLS, only to a server that carries the promise on.
            if not (self.secure and ext.requiretls):
                raise permanent(550, "5.7.30", "REQUIRETLS support required but the "
                                "upstream server does not offer it", "MAIL", self.address)
            params.append("REQUIRETLS")
        mail = f"MAIL FROM:<{envelope.mail_from}>" + "".join(" " + p for p in params)
        return mail.encode("utf-8")

    def rcpt_line(self, address: str, smtputf8: bool) -> bytes:
        if not address or not _plain_path(address):
            raise permanent(553, "5.1.3", f"Invalid recipient address {address!r}", "RCPT",
                            self.address)
        if not address.isascii() and not smtputf8:
            raise permanent(553, "5.6.7", "Non-ASCII recipient without SMTPUTF8", "RCPT",
                            self.address)
        return f"RCPT TO:<{address}>".encode("utf-8")

    def start(self, mail: bytes, rcpts: Sequence[bytes] = (), data: bool = False
              ) -> Deferred[tuple[Reply, list[Reply], Reply | None]]:
        """RSET when the connection was used before (RFC 5321 §4.1.1.5), MAIL, the RCPTs
        and optionally DATA: in one flight when the upstream pipelines (RFC 2920), else one
        at a time, stopping after a refused MAIL and sending DATA only when every
        recipient was accepted.

        Returns (MAIL reply, RCPT replies, DATA reply or None).  Fails with a
        ``RelayError``: ``errors.closing`` for a 421 to RSET, MAIL or RCPT, the
        protocol's when the connection fails.  A 354 to a pipelined DATA after refused recipients is
        the caller's to
        handle (``abandon``); callers look at the MAIL reply first.
        """
        reset = self.transactions > 0 or self.needs_reset
        self.transactions += 1
        self.needs_reset = True
        if not self.pipelining:
            return Deferred.fromCoroutine(self._start_in_steps(mail, rcpts, data, reset))
        lines = ([b"RSET"] if reset else []) + [mail, *rcpts] + ([b"DATA"] if data else [])
        names = (["RSET"] if reset else []) + ["MAIL"] + ["RCPT"] * len(rcpts) + (
            ["DATA"] if data else [])

        def answered(replies: list[Reply]) -> tuple[Reply, list[Reply], Reply | None]:
            if reset:
                self._check_reset(replies.pop(0))
            mail_reply = replies[0]
            self._check_closing("MAIL", mail_reply)
            rcpt_replies = replies[1:-1] if data else replies[1:]
            for reply in rcpt_replies:
                self._check_closing("RCPT", reply)
            return mail_reply, rcpt_replies, replies[-1] if data else None
        # One flight, one callback: the hot path of every message (no coroutine).
        return self.protocol.pipelineAll(lines, names).addCallback(answered)

    async def _start_in_steps(self, mail: bytes, rcpts: Sequence[bytes], data: bool,
                              reset: bool) -> tuple[Reply, list[Reply], Reply | None]:
        """``start`` toward an upstream without PIPELINING: one command at a time."""
        if reset:
            self._check_reset(await self.protocol.command(b"RSET"))
        mail_reply = await self.protocol.command(mail, "MAIL")
        self._check_closing("MAIL", mail_reply)
        if mail_reply.code != 250:
            return mail_reply, [], None
        rcpt_replies = [await self.rcpt(line) for line in rcpts]
        data_reply = None
        if data and all(r.code in (250, 251) for r in rcpt_replies):
            data_reply = await self.data()
        return mail_reply, rcpt_replies, data_reply

    def _check_reset(self, reply: Reply) -> None:
        if reply.code != 250:
            self.protocol.abort()
            if reply.code == 421:
                raise closing("RSET", reply, self.address)
            raise session_refused("RSET", reply, self.address)

    def _check_closing(self, command: str, reply: Reply) -> None:
        if reply.code == 421:
            self.protocol.abort()
            raise closing(command, reply, self.address)

    # Each step below is the protocol's Deferred and one callback: they run for every
    # message, so they are not coroutines.

    def rcpt(self, line: bytes) -> Deferred[Reply]:
        return self.protocol.command(line, "RCPT").addCallback(self._closing_or, "RCPT")

    def rcpt_then_data(self, line: bytes) -> Deferred[tuple[Reply, Reply]]:
        """RCPT and DATA in one flight (RFC 2920 §3.1: DATA may end a group), for a client
        that pipelined its DATA behind this RCPT: one round trip less per message.  After a
        354 the protocol refuses every command until the content is sent."""
        def answered(replies: list[Reply]) -> tuple[Reply, Reply]:
            rcpt, data = replies
            self._check_closing("RCPT", rcpt)
            self._check_closing("DATA", data)
            return rcpt, data
        return self.protocol.pipelineAll([line, b"DATA"], ["RCPT", "DATA"]).addCallback(
            answered)

    def data(self) -> Deferred[Reply]:
        return self.protocol.command(b"DATA").addCallback(self._closing_or, "DATA")

    def content(self, chunks: Any) -> Deferred[Reply]:
        """Stream the content after a 354; the end-of-data reply (any code)."""
        return self.protocol.sendData(chunks).addCallback(self._data_ended)

    def _data_ended(self, final: Reply) -> Reply:
        # RFC 5321 §4.1.1.4: the end of data ends the transaction, whatever the verdict.
        self.needs_reset = False
        return final

    def _closing_or(self, reply: Reply, command: str) -> Reply:
        self._check_closing(command, reply)
        return reply

    def abandon(self) -> None:
        """The upstream waits for content we must not send (a 354 after refused
        recipients): an empty message or a "." would deliver it.  Drop the link."""
        self.protocol.abort()

    def close(self) -> Deferred[None]:
        """QUIT (bounded by the command timeout, at most ``QUIT_TIMEOUT``) and disconnect."""
        if self.idle_timer is not None:
            self.idle_timer.stop()
        self.idle_timer = None
        return self.protocol.quit(min(QUIT_TIMEOUT, self.settings.command_timeout))


def eight_bit_unsupported(upstream: str | None = None) -> RelayError:
    # RFC 6152 §3: 8-bit data must not go to a server without 8BITMIME, and we do not
    # downgrade (mox: Err8bitmimeUnsupported).
    return permanent(554, "5.6.3", "Upstream server does not support 8BITMIME, required "
                     "by this message", "DATA", upstream)


def _plain_path(address: str) -> bool:
    """Nothing that could close the angle brackets or start another command."""
    return "<" not in address and ">" not in address and address.isprintable()
