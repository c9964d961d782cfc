"""Delivery to the upstream smarthosts: per-recipient transactions, pooling and failover.

``SMTPRelay`` is the ``IRelay`` toward one or more upstreams (``--relay-addr a,b:587``,
tried in order).  Each upstream has a pool of negotiated sessions and a circuit breaker
(``pool.py``).  Two ways in:

* ``begin`` (the SMTP server, at the client's MAIL): an ``UpstreamTransaction`` that sends
  MAIL at once and each RCPT as the client names it, so every client RCPT is answered
  with the upstream's verdict for that recipient; ``send`` (at the client's final dot)
  sends DATA and the spooled content.  The client's reply to DATA is the upstream's.
* ``deliver`` (the HTTP API): a whole message, MAIL + RCPTs + DATA in one flight when
  the upstream pipelines (RFC 2920), all recipients or nothing.

Failover.  Whenever an upstream fails *before it accepted anything* (cannot connect, TLS,
greeting, AUTH, a timeout, a lost connection, ``421``, or a ``4xx`` to MAIL, DATA or the
end of data) the next upstream is tried before our client is answered.  A ``5xx`` is
final, and so is a ``4xx`` to a RCPT: it is that recipient's verdict and goes to the
client as it is.  The answer is permanent only when every upstream's answer was.

Replay.  A pooled connection can die between the client's MAIL and its final dot (the
upstream restarted, timed out an idle client, or closed during DATA).  The transaction
then opens a new one (on the other upstreams first, then the same one) and replays MAIL
and every accepted RCPT in one flight.  If any recipient the client was told ``250`` for is not accepted again,
the message cannot be delivered as acknowledged: the rest of the transaction is answered
``451`` (the client retries and learns each recipient's new verdict then); a ``250`` for a
message some acknowledged recipient would not receive is never given.  After the final
dot nothing is replayed: a lost reply then means "maybe delivered", and the client is told
so (``451``, duplicate possible) rather than risking the duplicate ourselves.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from esmtpfa.logs import logger
from esmtpfa.message import Envelope, OutboundMessage
from esmtpfa.relay.interfaces import (
    REJECTED, UNAVAILABLE, IRelay, IRelayTransaction, RelayError)
from esmtpfa.relay.pool import Upstream
from esmtpfa.relay.protocol import (
    ConnectionLost, ProtocolViolation, SMTPClientProtocol, UpstreamError)
from esmtpfa.relay.session import (
    QUIT_TIMEOUT, UpstreamSession, eight_bit_unsupported, endpoint_for, permanent, rejected,
    relay_error_from, unavailable)
from esmtpfa.relay.settings import (
    STARTTLS_MODES, PoolSettings, UpstreamSettings, parse_upstream_addresses)
from esmtpfa.relay.tls import client_tls_options
from esmtpfa.smtp.data import has_bare_line_ends
from esmtpfa.replies import Reply

__all__ = ["SMTPRelay", "UpstreamTransaction", "UpstreamSettings", "PoolSettings",
           "STARTTLS_MODES", "QUIT_TIMEOUT", "parse_upstream_addresses", "relay_error_from",
           "UpstreamSession"]

log = logger("esmtpfa.relay.upstream")

T = TypeVar("T")

SHUTTING_DOWN = Reply(451, "4.3.2", "Relay shutting down, try again later")


class _Final(Exception):
    """Raised by an attempt: this verdict ends the search (no other upstream is tried)."""

    def __init__(self, error: RelayError):
        super().__init__(str(error))
        self.error = error


@implementer(IRelay)
class SMTPRelay:
    """IRelay to one or more upstream smarthosts, tried in order, with pooled sessions."""

    def __init__(self, settings: UpstreamSettings | Sequence[UpstreamSettings],
                 reactor: Any = None, pool: PoolSettings | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        all_settings = [settings] if isinstance(settings, UpstreamSettings) else list(settings)
        if not all_settings:
            raise ValueError("no upstream configured")
        self._reactor = reactor
        self.pool_settings = pool or PoolSettings()
        sasl_cache: dict = {}
        self.upstreams = [
            Upstream(s, self.pool_settings, reactor, client_tls_options(
                s.tls_server_name, s.ca_cert, s.client_cert, s.client_key, s.skip_verify)
                if s.uses_tls else None, sasl_cache)
            for s in all_settings]
        #: Called with every ``RelayError`` of every attempt (metrics: failures by reason).
        self.observers: list[Callable[[RelayError], None]] = []
        self._in_flight: set[object] = set()
        self._idle: list[Deferred[None]] = []
        self._closed = False
        for s in all_settings:
            if s.authenticates and not s.uses_tls and not s.allow_insecure_auth:
                log.warn("relay {upstream}: credentials are set but TLS is off and insecure "
                         "AUTH is not allowed: every delivery will fail with 451 4.3.0",
                         upstream=s.address)

    @property
    def settings(self) -> UpstreamSettings:
        """The first (preferred) upstream's settings."""
        return self.upstreams[0].settings

    @property
    def description(self) -> str:
        parts = []
        for upstream in self.upstreams:
            s = upstream.settings
            tls = "implicit TLS" if s.implicit_tls else f"STARTTLS {s.starttls}"
            auth = ""
            if s.authenticates:
                auth = f", AUTH {s.auth_mechanism or 'strongest offered'} as {s.username}"
            verify = ", certificate NOT verified" if s.uses_tls and s.skip_verify else ""
            parts.append(f"{s.address} ({tls}{verify}{auth})")
        p = self.pool_settings
        failover = "; failover in this order" if len(parts) > 1 else ""
        return (f"SMTP relay {', '.join(parts)}{failover}; up to {p.size} pooled "
                f"connection(s) per upstream, idle {p.idle_timeout:g} s")

    def connect(self) -> Deferred[SMTPClientProtocol]:
        """A bare connection to the first upstream, before the greeting (diagnostics)."""
        upstream = self.upstreams[0]
        endpoint = endpoint_for(self._reactor, upstream.settings, upstream.tls_options)
        return endpoint.connect(upstream.factory)

    # -- IRelay ----------------------------------------------------------------------------

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = ""
              ) -> Deferred["UpstreamTransaction"]:
        """The upstream transaction; MAIL goes out with the first RCPT (one flight).

        Refused at once only when the answer is already known: every upstream is behind
        an open circuit breaker, or the declared size exceeds every upstream's limit.
        """
        if self._closed:
            return fail(RelayError(SHUTTING_DOWN, UNAVAILABLE, None, None, "relay closed"))
        if all(u.breaker.open_now() for u in self.upstreams):
            names = ", ".join(u.address for u in self.upstreams)
            return fail(unavailable("4.4.1", "No upstream server available, try again later",
                                    f"circuit breaker open for {names}", "MAIL",
                                    upstream=self.upstreams[0].address))
        size = envelope.declared_size
        limits = [u.known_max_size for u in self.upstreams]
        if size is not None and all(limits) and size > max(limits):  # None: not known yet
            return fail(permanent(552, "5.3.4", f"Message too big for the upstream server "
                                  f"({size} > {max(limits)} octets)", "MAIL",
                                  self.upstreams[0].address))
        return succeed(UpstreamTransaction(self, envelope, message_id, connection_id))

    def deliver(self, message: OutboundMessage) -> Deferred[Reply]:
        if self._closed:
            return fail(RelayError(SHUTTING_DOWN, UNAVAILABLE, None, None, "relay closed"))
        return self._track(Deferred.fromCoroutine(self._deliver(message)))

    def close(self) -> Deferred[None]:
        """Refuse new work; fire once every delivery in progress and every QUIT ended."""
        self._closed = True
        for upstream in self.upstreams:
            upstream.pool.close()  # idle sessions QUIT now, busy ones when released
        waiter: Deferred[None] = Deferred()
        if self._in_flight:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter.addCallback(lambda _: DeferredList(
            [u.pool.close() for u in self.upstreams])).addCallback(lambda _: None)

    # -- the search over upstreams --------------------------------------------------------

    async def _on_some_upstream(self, attempt: Callable[[Upstream, UpstreamSession],
                                                        Awaitable[T]],
                                message_id: str, exclude: Sequence[Upstream] = (),
                                fresh: bool = False, last: Upstream | None = None) -> T:
        """Run ``attempt`` on a session of the first upstream that can take it.

        ``attempt`` raises ``_Final`` for a verdict that ends the search, ``RelayError`` to
        move on to the next upstream (after releasing the session), and lets the protocol's
        ``UpstreamError`` through when the connection failed: a pooled session that was
        already dead is replaced by a fresh one on the same upstream, any other failure
        counts against the upstream's breaker and moves on.
        """
        errors: list[RelayError] = []
        skipped: list[Upstream] = []
        order = self.upstreams
        if last is not None:  # the one that just failed us: the others first
            order = [u for u in order if u is not last] + [last]
        for upstream in order:
            if upstream in exclude:
                continue
            if not upstream.breaker.allow():
                skipped.append(upstream)
                continue
            use_fresh = fresh
            while True:
                try:
                    session = await upstream.pool.acquire(fresh=use_fresh)
                except RelayError as error:
                    if error.command == "connect" and error.reply.enhanced == "4.4.5" \
                            or error.reply.enhanced == "4.3.2":
                        upstream.breaker.release()  # busy or closing: says nothing about it
                    else:
                        upstream.breaker.failure()
                    self._report(error, message_id)
                    errors.append(error)
                    break
                reused = session.transactions > 0
                try:
                    result = await attempt(upstream, session)
                except _Final as final:
                    upstream.breaker.success()  # it answered: it is alive
                    raise final.error from None
                except RelayError as error:
                    upstream.breaker.success()
                    self._report(error, message_id)
                    errors.append(error)
                    break
                except UpstreamError as error:
                    upstream.pool.release(session, reusable=False)
                    if reused and not use_fresh:
                        # The pooled connection died while idle (upstream restart, idle
                        # timeout racing our MAIL): not the upstream's failure, not the
                        # message's.  Same upstream, new connection.
                        log.info("upstream {upstream}: pooled connection was dead ({detail}); "
                                 "retrying on a new one", upstream=upstream.address,
                                 detail=error.detail, message_id=message_id)
                        use_fresh = True
                        continue
                    upstream.breaker.failure()
                    relay_error = relay_error_from(error, "session", upstream.address)
                    self._report(relay_error, message_id)
                    errors.append(relay_error)
                    break
                except BaseException:
                    upstream.pool.release(session, reusable=False)
                    upstream.breaker.release()
                    raise
                upstream.breaker.success()
                return result
        raise self._verdict(errors, skipped)

    def _verdict(self, errors: list[RelayError], skipped: list[Upstream]) -> RelayError:
        """Permanent only when every upstream said so; else the most telling 4xx."""
        transient = [e for e in errors if e.transient]
        if errors and not transient and not skipped:
            return errors[0]
        told = [e for e in transient if e.reason == REJECTED]
        if told:
            return told[0]  # an upstream's own 4xx: its words are the best explanation
        if transient:
            if len(self.upstreams) == 1:
                return transient[0]
            details = "; ".join(e.describe() for e in transient)
            return unavailable("4.4.1", "No upstream server available, try again later",
                               details, transient[0].command, transient[0].upstream_reply)
        names = ", ".join(u.address for u in skipped)
        return unavailable("4.4.1", "No upstream server available, try again later",
                           f"skipped while their circuit breaker is open: {names}",
                           "connect", upstream=skipped[0].address if skipped else None)

    def _report(self, error: RelayError, message_id: str) -> None:
        log.info("relay attempt failed: message={message_id} {description}",
                 message_id=message_id, description=error.describe(),
                 upstream=error.upstream, command=error.command, reason=error.reason,
                 permanent=error.permanent,
                 upstream_reply=str(error.upstream_reply) if error.upstream_reply else None)
        for observer in list(self.observers):
            try:
                observer(error)
            except Exception:
                log.failure("relay failure observer failed")

    # -- whole messages ----------------------------------------------------------------------

    async def _deliver(self, message: OutboundMessage) -> Reply:
        envelope = message.envelope
        eight_bit: list[bool] = []

        async def attempt(upstream: Upstream, session: UpstreamSession
                          ) -> tuple[Reply, str, bool]:
            if not envelope.recipients:
                _release(upstream, session)
                raise _Final(permanent(554, "5.5.1", "No recipients", "RCPT"))
            try:
                if _declares_8bit(envelope) and not session.extensions.eightbitmime \
                        and not eight_bit:
                    eight_bit.append(await deferToThread(_has_8bit, message))
                mail = session.mail_line(envelope, message.size,
                                         eight_bit[0] if eight_bit else None)
                smtputf8 = b" SMTPUTF8" in mail
                rcpts = [session.rcpt_line(r, smtputf8) for r in envelope.recipients]
            except RelayError:
                _release(upstream, session)
                raise
            mail_reply, rcpt_replies, data_reply = await session.start(mail, rcpts, data=True)
            data_started = data_reply is not None and data_reply.code == 354
            try:
                _check_mail(mail_reply, upstream)
                _check_recipients(envelope.recipients, rcpt_replies, upstream)
            except (RelayError, _Final):
                if data_started:
                    session.abandon()
                _release(upstream, session)
                raise
            assert data_reply is not None
            if data_reply.code != 354:
                _release(upstream, session)
                if data_reply.is_positive:
                    raise ProtocolViolation(f"DATA answered {data_reply}, not 354", "DATA")
                error = rejected("DATA", data_reply, upstream=upstream.address)
                raise error if error.transient else _Final(error)
            final = await _content(session, message, upstream)
            _release(upstream, session)
            return _final_verdict(final, upstream), upstream.address, session.secure

        try:
            if _declares_binary(envelope) and await deferToThread(_needs_bdat, message):
                raise _binary_refusal()
            reply, address, tls = await self._on_some_upstream(attempt, message.id)
        except RelayError as error:
            self._log(message.id, message.connection_id, "failed", error.reply, error)
            raise
        self._log(message.id, message.connection_id, "accepted", reply, None, address, tls)
        return reply

    def _log(self, message_id: str, connection_id: str, outcome: str, reply: Reply,
             error: RelayError | None, upstream: str | None = None,
             tls: bool | None = None, debug: bool = False) -> None:
        (log.debug if debug else log.info)(
            "relay {outcome}: message={message_id} connection={connection_id} "
            "upstream={upstream} tls={tls} reply={reply}{detail}",
            outcome=outcome, message_id=message_id, connection_id=connection_id,
            upstream=upstream or (error.upstream if error else None), tls=tls,
            reply=str(reply), upstream_reply=str(error.upstream_reply) if error and
            error.upstream_reply else None,
            detail=f" ({error.describe()})" if error else "",
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


@implementer(IRelayTransaction)
class UpstreamTransaction:
    """One client transaction mirrored on one upstream session (see the module doc)."""

    def __init__(self, relay: SMTPRelay, envelope: Envelope, message_id: str,
                 connection_id: str):
        self._relay = relay
        self.envelope = replace(envelope, recipients=())
        self.message_id = message_id
        self.connection_id = connection_id
        self._upstream: Upstream | None = None
        self._session: UpstreamSession | None = None
        self._smtputf8 = False
        self._accepted: list[tuple[str, bytes]] = []
        self._poisoned: RelayError | None = None
        self._replays = 0
        self._busy: Deferred[Any] | None = None
        #: The upstream's reply to a DATA sent with the last RCPT (``data_follows``).
        self._early_data: Reply | None = None
        self._finished = False   # send() started, or abort(): no more commands from us
        self._aborted = False

    @property
    def upstream(self) -> str | None:
        return self._upstream.address if self._upstream else None

    @property
    def max_size(self) -> int | None:
        return self._session.max_size if self._session is not None else None

    @property
    def recipients(self) -> list[str]:
        return [address for address, _ in self._accepted]

    # -- IRelayTransaction --------------------------------------------------------------

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        """``data_follows``: the client pipelined DATA right behind this RCPT (RFC 2920),
        so DATA goes upstream in the same flight and ``send`` will not wait for a 354."""
        return self._relay._track(self._serialize(self._add, address, data_follows))

    def send(self, message: OutboundMessage) -> Deferred[Reply]:
        return self._relay._track(self._serialize(self._send, message))

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._finished = True
        if self._busy is None:
            self._let_go(reusable=True)
        # else: the operation in flight lets go of the session when it ends

    # -- MAIL with the first RCPT ----------------------------------------------------------

    async def _first(self, address: str, data_follows: bool
                     ) -> tuple[bytes, Reply, Reply | None]:
        """Open the transaction: [RSET,] MAIL and the first RCPT (and DATA when the client
        pipelined it) in one flight, on the first upstream that takes the MAIL.  A refused
        MAIL is every recipient's answer."""
        envelope, size = self.envelope, self.envelope.declared_size

        async def attempt(upstream: Upstream, session: UpstreamSession
                          ) -> tuple[Upstream, UpstreamSession, bytes, bytes, Reply,
                                     Reply | None]:
            try:
                mail = session.mail_line(envelope, size)
                line = session.rcpt_line(address, b" SMTPUTF8" in mail)
            except RelayError:
                _release(upstream, session)
                raise
            mail_reply, replies, data_reply = await session.start(
                mail, [line], data=data_follows and session.pipelining)
            _check_mail(mail_reply, upstream, release=session)
            return upstream, session, mail, line, replies[0], data_reply

        try:
            upstream, session, mail, line, reply, data_reply = \
                await self._relay._on_some_upstream(attempt, self.message_id)
        except RelayError as error:
            self._poisoned = error  # the sender's verdict holds for every recipient
            raise
        if self._aborted:
            _release(upstream, session)
            raise _aborted()
        self._upstream, self._session = upstream, session
        self._smtputf8 = b" SMTPUTF8" in mail
        return line, reply, data_reply

    # -- RCPT ------------------------------------------------------------------------------

    async def _add(self, address: str, data_follows: bool) -> Reply:
        if self._poisoned is not None:
            raise self._poisoned
        if self._finished:
            raise RuntimeError("RCPT after the transaction ended")
        # A refused early DATA does not end the upstream transaction (RFC 5321 §4.1.1.4
        # leaves MAIL in effect): the client may add recipients and try DATA again.
        self._early_data = None
        data_reply: Reply | None = None
        if self._session is None:
            line, reply, data_reply = await self._first(address, data_follows)
        else:
            session, upstream = self._session, self._upstream
            assert upstream is not None
            rcptmax = session.extensions.rcptmax
            if rcptmax is not None and len(self._accepted) >= rcptmax:
                # RFC 9422 §4.2 / RFC 5321 §4.5.3.1.10: the client sends the rest later.
                return self._refuse(RelayError(
                    Reply(452, "4.5.3", f"Too many recipients for the upstream server (at "
                                        f"most {rcptmax} per message), send the rest later"),
                    REJECTED, "RCPT", None, f"LIMITS RCPTMAX={rcptmax}", upstream.address))
            line = session.rcpt_line(address, self._smtputf8)
            try:
                if data_follows and session.pipelining:
                    reply, data_reply = await session.rcpt_then_data(line)
                else:
                    reply = await session.rcpt(line)
            except UpstreamError as error:
                self._relay._report(relay_error_from(error, "session", upstream.address),
                                    self.message_id)
                upstream.breaker.failure()
                reply = await self._replay(error, extra=line)
        if self._aborted:
            raise _aborted()
        accepted = reply.code in (250, 251)
        if accepted:
            self._accepted.append((address, line))
        self._keep_early_data(data_reply)
        if accepted:
            return reply
        if reply.is_positive:
            return self._refuse(unavailable(
                "4.4.2", "Upstream protocol error, try again later",
                f"RCPT answered {reply}", "RCPT", reply, self.upstream))
        return self._refuse(rejected("RCPT", reply, f"upstream rejected <{address}>: "
                                     f"{reply.text}", self.upstream))

    def _keep_early_data(self, reply: Reply | None) -> None:
        """Keep the reply to an early DATA for ``send``.  An upstream that says 354 with
        no recipient accepted waits for content of a message that goes nowhere: only a
        dropped connection ends that DATA safely (a "." could deliver an empty message)."""
        if reply is None:
            return
        if reply.code == 354 and not self._accepted:
            log.info("message={message_id}: upstream {upstream} answered DATA with 354 "
                     "although it accepted no recipient; dropping that connection",
                     message_id=self.message_id, upstream=self.upstream)
            self._let_go(reusable=False)  # the next RCPT opens a new transaction
            return
        self._early_data = reply

    def _refuse(self, error: RelayError) -> Reply:
        self._relay._report(error, self.message_id)
        raise error

    # -- DATA -------------------------------------------------------------------------------

    async def _send(self, message: OutboundMessage) -> Reply:
        if self._poisoned is not None:
            self._finished = True
            self._let_go(reusable=True)
            return self._fail(self._poisoned)
        if self._finished or self._session is None:
            raise RuntimeError("send() after the transaction ended")
        self._finished = True
        if not self._accepted:
            self._let_go(reusable=True)
            return self._fail(permanent(554, "5.5.1", "No valid recipients", "DATA"))
        if list(message.envelope.recipients) != self.recipients:
            raise RuntimeError("the message's recipients are not the accepted ones")
        if _declares_binary(self.envelope) and await deferToThread(_needs_bdat, message):
            self._let_go(reusable=True)
            return self._fail(_binary_refusal())
        tried: list[Upstream] = []
        eight_bit: list[bool] = []
        early, self._early_data = self._early_data, None
        while True:
            session, upstream = self._session, self._upstream
            assert session is not None and upstream is not None
            # The early DATA reply belongs to the first session only (not to a replay).
            data_reply, early = early, None
            try:
                limit = session.max_size
                if limit is not None and message.size > limit:
                    raise permanent(552, "5.3.4", f"Message too big for the upstream server "
                                    f"({message.size} > {limit} octets)", "DATA",
                                    upstream.address)
                if _declares_8bit(self.envelope) and not session.extensions.eightbitmime:
                    if not eight_bit:
                        eight_bit.append(await deferToThread(_has_8bit, message))
                    if eight_bit[0]:
                        raise eight_bit_unsupported(upstream.address)
                # A session still waiting for content after a refusal here is dropped by
                # ``_let_go`` (the protocol is not ``usable``), never sent a command.
                data = data_reply if data_reply is not None else await session.data()
                if data.code == 354:
                    final = await _content(session, message, upstream)
                    self._let_go(reusable=True)
                    return self._done(_final_verdict(final, upstream), upstream, session)
                if data.is_positive:
                    raise ProtocolViolation(f"DATA answered {data}, not 354", "DATA")
                raise rejected("DATA", data, upstream=upstream.address)
            except _Final as final:
                self._let_go(reusable=True)
                return self._fail(final.error)
            except RelayError as error:
                # A 4xx to DATA or to the end of data, or a capability this upstream
                # lacks: nothing was accepted, so the next upstream may take it (with the
                # same recipients); a 5xx is the upstream's final word.
                tried.append(upstream)
                others = [u for u in self._relay.upstreams if u not in tried]
                if not others or (error.permanent and error.upstream_reply is not None):
                    self._let_go(reusable=True)
                    return self._fail(error)
                self._relay._report(error, self.message_id)
                try:
                    await self._replay(error, exclude=tried)
                except RelayError:
                    # No other upstream took it: the first answer is the one that counts.
                    return self._fail(error)
            except UpstreamError as error:
                self._relay._report(relay_error_from(error, "session", upstream.address),
                                    self.message_id)
                upstream.breaker.failure()
                try:
                    await self._replay(error)
                except RelayError as replay_error:
                    return self._fail(replay_error)

    def _done(self, reply: Reply, upstream: Upstream, session: UpstreamSession) -> Reply:
        # The delivery logs every outcome; this line matters when the way was unusual.
        unusual = bool(self._replays) or upstream is not self._relay.upstreams[0]
        self._relay._log(self.message_id, self.connection_id, "accepted", reply, None,
                         upstream.address, session.secure, debug=not unusual)
        return reply

    def _fail(self, error: RelayError) -> Reply:
        self._relay._log(self.message_id, self.connection_id, "failed", error.reply, error,
                         self.upstream)
        raise error

    # -- replay on a new connection -----------------------------------------------------------

    async def _replay(self, cause: BaseException, extra: bytes | None = None,
                      exclude: Sequence[Upstream] = ()) -> Reply | None:
        """Re-open the transaction elsewhere: MAIL and every accepted RCPT (plus ``extra``)
        in one flight.  Returns the reply to ``extra``; raises ``RelayError`` (and answers
        the rest of the transaction with it) when that is impossible or the recipients'
        verdicts changed."""
        lost = isinstance(cause, UpstreamError)
        failed = self._upstream
        self._let_go(reusable=not lost)
        if self._aborted:
            raise _aborted()
        if self._replays >= self._relay.pool_settings.max_replays:
            return self._poison(relay_error_from(cause, "session", self.upstream),
                                f"gave up after {self._replays} replays")
        self._replays += 1
        accepted = list(self._accepted)
        lines = [line for _, line in accepted] + ([extra] if extra else [])
        log.info("message={message_id}: re-opening the upstream transaction ({cause}): "
                 "MAIL and {count} RCPT on another connection", message_id=self.message_id,
                 cause=getattr(cause, "detail", None) or str(cause), count=len(lines))
        envelope, size = self.envelope, self.envelope.declared_size

        async def attempt(upstream: Upstream, session: UpstreamSession
                          ) -> tuple[Upstream, UpstreamSession, Reply | None]:
            try:
                mail = session.mail_line(envelope, size)
                if (b" SMTPUTF8" in mail) != self._smtputf8:
                    raise permanent(550, "5.6.7", "Upstream SMTPUTF8 support differs",
                                    "MAIL", upstream.address)
            except RelayError:
                _release(upstream, session)
                raise
            mail_reply, replies, _ = await session.start(mail, lines)
            _check_mail(mail_reply, upstream, release=session, final=False)
            for (address, _), reply in zip(accepted, replies):
                if reply.code not in (250, 251):
                    _release(upstream, session)
                    raise rejected("RCPT", reply, f"upstream now rejects <{address}>, "
                                   f"accepted before: {reply.text}", upstream.address)
            return upstream, session, (replies[-1] if extra else None)

        try:
            upstream, session, extra_reply = await self._relay._on_some_upstream(
                attempt, self.message_id, exclude=exclude, fresh=lost,
                last=failed if lost else None)
        except RelayError as error:
            return self._poison(error, "the replay failed")
        if self._aborted:
            _release(upstream, session)
            raise _aborted()
        self._upstream, self._session = upstream, session
        return extra_reply

    def _poison(self, error: RelayError, why: str) -> Reply:
        """Answer the rest of this transaction with a 451: the client retries it all."""
        self._poisoned = RelayError(
            Reply(451, "4.4.2", "Upstream connection lost during the transaction and it "
                                "could not be resumed, try again later"),
            UNAVAILABLE, error.command, error.upstream_reply,
            f"{why}: {error.describe()}", error.upstream)
        self._relay._report(self._poisoned, self.message_id)
        raise self._poisoned

    # -- bookkeeping ----------------------------------------------------------------------------

    def _serialize(self, operation: Callable[..., Awaitable[Reply]], *arguments: Any
                   ) -> Deferred[Reply]:
        if self._busy is not None:
            return fail(RuntimeError("one operation at a time on a relay transaction"))
        d = Deferred.fromCoroutine(operation(*arguments))
        if d.called:
            return d
        self._busy = d

        def done(result: Any) -> Any:
            self._busy = None
            if self._aborted:
                self._let_go(reusable=True)
            return result
        return d.addBoth(done)

    def _let_go(self, reusable: bool) -> None:
        """Give the session back to its pool (``_upstream`` stays, for the logs)."""
        session, upstream = self._session, self._upstream
        self._session = None
        if session is not None and upstream is not None:
            upstream.pool.release(session, reusable=reusable)


# --- shared steps ------------------------------------------------------------------------------

def _aborted() -> RelayError:
    return RelayError(Reply(451, "4.3.0", "Transaction aborted"), UNAVAILABLE, "RCPT")


def _release(upstream: Upstream, session: UpstreamSession) -> None:
    upstream.pool.release(session, reusable=True)


def _check_mail(reply: Reply, upstream: Upstream, release: UpstreamSession | None = None,
                final: bool = True) -> None:
    if reply.code == 250:
        return
    if release is not None:
        _release(upstream, release)
    if reply.is_positive:
        raise ProtocolViolation(f"MAIL answered {reply}", "MAIL")
    error = rejected("MAIL", reply, upstream=upstream.address)
    if error.permanent and final:
        raise _Final(error)
    raise error


def _check_recipients(recipients: Sequence[str], replies: list[Reply],
                      upstream: Upstream) -> None:
    """All recipients or nothing (``deliver``): a 250 must mean every recipient got it."""
    refused = [(rcpt, reply) for rcpt, reply in zip(recipients, replies)
               if reply.code not in (250, 251)]
    if not refused:
        return
    for rcpt, reply in refused:
        if reply.is_positive:
            raise ProtocolViolation(f"RCPT answered {reply}", "RCPT")
    # A transient refusal makes the whole message transient: the client retries and the
    # permanently refused recipient is reported then.
    rcpt, reply = next(((r, p) for r, p in refused if p.is_transient), refused[0])
    error = rejected("RCPT", reply, f"upstream rejected <{rcpt}>: {reply.text}",
                     upstream.address)
    raise error if error.transient else _Final(error)


async def _content(session: UpstreamSession, message: OutboundMessage,
                   upstream: Upstream) -> Reply:
    """Stream the content; a connection lost after the final dot ends everything."""
    try:
        return await session.content(message.chunks())
    except ConnectionLost as error:
        if not error.after_data:
            raise  # nothing was delivered: another connection or upstream may take it
        # The final dot went out: the upstream may have accepted the message.  Sending it
        # again could deliver it twice; the client is told (451, duplicate possible).
        upstream.pool.release(session, reusable=False)
        upstream.breaker.failure()
        raise _Final(relay_error_from(error, "session", upstream.address)) from None


def _final_verdict(final: Reply, upstream: Upstream) -> Reply:
    if final.code == 250:
        return final
    if final.is_positive:
        raise _Final(unavailable("4.4.2", "Upstream protocol error, try again later",
                                 f"end of data answered {final}", "end of data", final,
                                 upstream.address))
    error = rejected("end of data", final, upstream=upstream.address)
    raise error if error.transient else _Final(error)


def _binary_refusal(upstream: str | None = None) -> RelayError:
    # RFC 3030 §3: BINARYMIME content is sent only with BDAT, which we do not send
    # upstream yet; DATA would have to rewrite it, and we never alter content
    # (mox: no downgrade).  Line-shaped content goes as 8BITMIME instead.
    return permanent(554, "5.6.3", "Binary content cannot be relayed: the upstream "
                     "transfer needs BDAT (RFC 3030), which is not supported", "DATA", upstream)


def _needs_bdat(message: OutboundMessage) -> bool:
    """Whether BINARYMIME content could not travel in DATA unchanged: bare CR or LF,
    NUL, or a line over 998 octets (runs in a thread: reads the whole spool)."""
    tail = b""
    for chunk in message.chunks():
        block = tail + chunk
        cut = block.rfind(b"\n") + 1
        lines, tail = block[:cut], block[cut:]
        if b"\0" in block or has_bare_line_ends(lines) or any(
                len(line) > 999 for line in lines.split(b"\n")) or len(tail) > 999:
            return True
    return bool(tail)  # content must end with CRLF to travel in DATA unchanged


def _declares_binary(envelope: Envelope) -> bool:
    return (envelope.body or "").upper() == "BINARYMIME"


def _declares_8bit(envelope: Envelope) -> bool:
    return (envelope.body or "").upper() in ("8BITMIME", "BINARYMIME")


def _has_8bit(message: OutboundMessage) -> bool:
    """Whether any octet has the high bit set (runs in a thread: reads the whole spool)."""
    return any(not chunk.isascii() for chunk in message.chunks())
