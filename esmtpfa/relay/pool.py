"""Connection reuse and failure tracking per upstream: a session pool and a circuit breaker.

``SessionPool`` keeps negotiated sessions (TLS and AUTH done) of one upstream: a message
takes one (``acquire``), gives it back (``release``), and the next message runs on it after
an RSET.  Idle sessions are closed after ``idle_timeout``; a session the upstream closed
while idle leaves the pool at once (the protocol sees the FIN or the ``421``), and one
that dies in the short window between being taken and used is replaced by the caller
(``acquire(fresh=True)``) without failing the message.  LIMITS MAILMAX (RFC 9422) retires
a session once it ran that many transactions.  A new session's failure is the
``RelayError`` of the step that failed (``session.dial``, ``UpstreamSession.open``), passed
on as it is; the pool only asks once more after the upstream refused our OAuth2 token
(docs/oauth2.md, "When the upstream refuses a token").

Each upstream's ``CircuitBreaker`` (``esmtpfa.common.breaker``) counts consecutive
connection-level failures (connect, TLS, greeting, AUTH, timeouts, lost connections).
After ``failures`` of them the upstream is skipped for ``cooldown`` seconds; then one
trial (half-open) decides whether it is back.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.common.breaker import CLOSED, OPEN, CircuitBreaker
from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.common.timeouts import Deadline
from esmtpfa.relay.errors import local_error, unavailable
from esmtpfa.relay.interfaces import Kind, RelayError
from esmtpfa.relay.protocol import SMTPClientFactory, SMTPClientProtocol
from esmtpfa.relay.session import UpstreamSession, dial
from esmtpfa.relay.settings import PoolSettings, UpstreamSettings

log = logger("esmtpfa.relay.pool")


class SessionPool:
    """Negotiated sessions of one upstream: at most ``settings.size`` at a time."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings, reactor: Any,
                 tls_options: Any, factory: SMTPClientFactory, sasl_cache: dict,
                 tokens: Any = None):
        self.upstream = upstream
        self.settings = settings
        self._reactor = reactor
        self._tls_options = tls_options
        self._factory = factory
        self._sasl_cache = sasl_cache
        self._tokens = tokens  # ``oauth2.TokenBroker`` of an upstream that uses OAuth2
        self._idle: list[UpstreamSession] = []   # most recently used last
        self._busy: set[UpstreamSession] = set()
        self._opening = 0
        self._waiters: deque[Deferred[UpstreamSession]] = deque()
        self._quitting: set[Deferred[None]] = set()
        self._closed = False
        self.known_max_size: int | None = None  # SIZE of the last EHLO (0: no limit)
        self.opened = 0     # sessions ever opened (for logs and tests)
        self.reused = 0     # acquisitions served by an idle session

    @property
    def address(self) -> str:
        return self.upstream.address

    @property
    def total(self) -> int:
        return len(self._idle) + len(self._busy) + self._opening

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def exhausted(self) -> bool:
        """Full, nothing idle, and messages already waiting for a session."""
        return self.total >= self.settings.size and not self._idle and bool(self._waiters)

    def acquire(self, fresh: bool = False) -> Deferred[UpstreamSession]:
        """A session ready for a transaction; fails with ``RelayError`` (451).

        ``fresh`` skips idle sessions (the caller just found one dead: its siblings are
        suspect) and makes room by closing idle ones when the pool is full.
        """
        if self._closed:
            return fail(unavailable("4.3.2", "Relay shutting down, try again later",
                                    "pool closed", upstream=self.address, kind=Kind.CLOSING))
        if not fresh:
            session = self._take_idle()
            if session is not None:
                self.reused += 1
                return succeed(session)
        elif self._idle and self.total >= self.settings.size:
            self._retire(self._idle.pop(0))
        if self.total < self.settings.size:
            return self._open()
        waiter: Deferred[UpstreamSession] = Deferred(lambda d: self._waiters.remove(d)
                                                     if d in self._waiters else None)
        self._waiters.append(waiter)
        timeout = self.upstream.connect_timeout

        def timed_out(failure: Any) -> Any:
            if failure.check(CancelledError, TimeoutError):
                raise unavailable(
                    "4.4.5", "Upstream connections all busy, try again later",
                    f"no free connection among {self.settings.size} within {timeout:g} s",
                    "connect", upstream=self.address, kind=Kind.BUSY)
            return failure
        return waiter.addTimeout(timeout, self._reactor).addErrback(timed_out)

    def acquire_idle(self) -> UpstreamSession | None:
        """``acquire()`` when an idle session answers it at once (most messages): the
        session, without a Deferred; None when ``acquire`` must be asked."""
        if self._closed:
            return None
        session = self._take_idle()
        if session is not None:
            self.reused += 1
        return session

    def release(self, session: UpstreamSession, reusable: bool = True) -> None:
        """Give a session back; it is kept for the next message when it can be."""
        if session not in self._busy:
            return
        self._busy.discard(session)
        if not reusable:
            # Its state is unknown (a failed command, content we must not finish): no
            # QUIT, which could land inside DATA; just drop the connection.
            _cancel(session)
            session.protocol.abort()
        elif self._closed or not session.usable or session.exhausted:
            self._retire(session)
        elif self._waiters:
            self._busy.add(session)
            self.reused += 1
            self._waiters.popleft().callback(session)
            return
        else:
            session.idle_since = self._reactor.seconds()
            # One Deadline per session, moved at every release: a session reused for
            # message after message makes no new DelayedCall each time.
            timer = session.idle_timer
            if timer is None:
                timer = session.idle_timer = Deadline(
                    self._reactor, lambda: self._expire(session))
            timer.set(self.settings.idle_timeout)
            self._idle.append(session)
        self._dispatch()

    def close(self) -> Deferred[Any]:
        """No new sessions; idle ones QUIT; busy ones QUIT when released."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(unavailable("4.3.2", "Relay shutting down, try again later",
                                       "pool closed", upstream=self.address, kind=Kind.CLOSING))
        while self._idle:
            self._retire(self._idle.pop())
        return DeferredList(list(self._quitting))

    # -- internals ----------------------------------------------------------------------

    def _take_idle(self) -> UpstreamSession | None:
        while self._idle:
            session = self._idle.pop()
            if session.idle_timer is not None:
                session.idle_timer.clear()  # kept for its next idle time
            if session.usable and not session.exhausted:
                self._busy.add(session)
                return session
            self._retire(session)
        return None

    def _open(self) -> Deferred[UpstreamSession]:
        self._opening += 1
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> UpstreamSession:
        """A new session; fails with the ``RelayError`` of the step that failed
        (``session.dial``: the connection; ``UpstreamSession.open``: the set-up)."""
        protocol: SMTPClientProtocol | None = None
        try:
            for last in (False, True):
                protocol = await dial(self._reactor, self.upstream, self._tls_options,
                                      self._factory)
                session = UpstreamSession(protocol, self.upstream, self._tls_options,
                                          self._sasl_cache, clock=_Monotonic(self._reactor),
                                          tokens=self._tokens)
                try:
                    await session.open()
                    break
                except RelayError:
                    if last or not session.token_refused:
                        raise
                    # The broker dropped the refused token: once more, with a new token
                    # on a new connection (docs/oauth2.md, "When the upstream refuses a
                    # token"); the message waits meanwhile.
                    log.info("upstream {upstream}: our OAuth2 token was refused; trying "
                             "once more with a new one", upstream=self.address)
                    self._track_quit(protocol.quit(1.0))
                    protocol = None
        except Exception as error:
            self._opening -= 1
            if protocol is not None:
                self._track_quit(protocol.quit(1.0))
            self._dispatch()
            if isinstance(error, RelayError):
                raise error from None
            raise local_error(error, "session", self.address) from None  # a bug
        # The loop above ends only at its break, with the protocol of an open session.
        assert protocol is not None
        self._opening -= 1
        self.opened += 1
        self.known_max_size = session.max_size or 0
        protocol.whenDisconnected().addCallback(lambda _: self._lost(session))
        if self._closed:
            self._track_quit(session.close())
            raise unavailable("4.3.2", "Relay shutting down, try again later",
                              "pool closed", upstream=self.address, kind=Kind.CLOSING)
        self._busy.add(session)
        log.debug("upstream {upstream}: new session (tls={tls}, auth={mechanism}), "
                  "{total} in the pool", upstream=self.address, tls=session.secure,
                  mechanism=session.mechanism, total=self.total)
        return session

    def _dispatch(self) -> None:
        """Serve waiters with idle sessions or free slots."""
        while self._waiters:
            session = self._take_idle()
            if session is not None:
                self.reused += 1
                self._waiters.popleft().callback(session)
                continue
            if self.total >= self.settings.size or self._closed:
                return
            waiter = self._waiters.popleft()
            self._open().addCallbacks(lambda s, w=waiter: self._hand(w, s),
                                      lambda f, w=waiter: None if w.called else w.errback(f))

    def _hand(self, waiter: Deferred[UpstreamSession], session: UpstreamSession) -> None:
        if waiter.called:  # it timed out meanwhile: keep the session for someone else
            self.release(session)
        else:
            waiter.callback(session)

    def _expire(self, session: UpstreamSession) -> None:
        session.idle_timer = None
        if session in self._idle:
            self._idle.remove(session)
            log.debug("upstream {upstream}: idle session closed after {seconds:g} s",
                      upstream=self.address, seconds=self.settings.idle_timeout)
            self._retire(session)

    def _lost(self, session: UpstreamSession) -> None:
        _cancel(session)
        if session in self._idle:
            self._idle.remove(session)
            log.debug("upstream {upstream}: idle session closed by the upstream",
                      upstream=self.address)
            self._dispatch()

    def _retire(self, session: UpstreamSession) -> None:
        _cancel(session)
        self._track_quit(session.close())

    def _track_quit(self, d: Deferred[None]) -> None:
        self._quitting.add(d)
        d.addBoth(lambda _: self._quitting.discard(d))

    def usage(self) -> dict[str, int]:
        """Sessions by state and messages waiting, for ``/status`` and the metrics
        (read only: nothing here changes the pool)."""
        return {"idle": len(self._idle), "busy": len(self._busy),
                "opening": self._opening, "waiting": len(self._waiters)}


def _cancel(session: UpstreamSession) -> None:
    if session.idle_timer is not None:
        session.idle_timer.stop()
        session.idle_timer = None


class _Monotonic:
    """The reactor's clock with the ``time.monotonic`` name the session expects."""

    def __init__(self, reactor: Any):
        self._reactor = reactor

    def monotonic(self) -> float:
        return self._reactor.seconds()


class Lease:
    """The right to use one pooled session, held by exactly one owner at a time.

    ``Upstream.lease`` hands it out; whoever holds it decides when the session goes back,
    and ``release`` is the only way back to the pool.  It acts once: a second release (an
    abort racing the end of a send) does nothing.  A session whose protocol is no longer
    in sync is never pooled again, whatever the caller says.
    """

    __slots__ = ("upstream", "session", "reused", "_released")

    def __init__(self, upstream: "Upstream", session: UpstreamSession, reused: bool):
        self.upstream = upstream
        self.session = session
        self.reused = reused
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self, reusable: bool) -> None:
        if self._released:
            return
        self._released = True
        self.upstream.pool.release(self.session, reusable and self.session.usable)


class ClientShares:
    """At most ``cap`` upstream sessions held at once per client key.

    A message counts against every key it names (its client address and its identity),
    so neither many connections from one address nor one identity spread over many
    addresses can hold every pooled session.  Over its share a client waits, in order,
    until one of its own messages finishes; the wait is bounded by the caller.

    Work-conserving for paced senders: a transaction the relay paces itself (the queue
    runner's, whose content is on local storage, so no client can stretch it) may go
    over its keys' share while fewer than ``room`` tickets are held and nobody waits, so
    the connections no live client wants are not left idle while a backlog waits.  Such
    a *borrowed* ticket counts toward ``room`` only, never toward a key's share: a live
    client that comes later is under its own share at once and waits at most for the
    next session the pool frees (the pool serves its waiters before anybody new), and
    the borrower gets no more until the room is free again.  Live clients never borrow:
    a client that trickles its content could hold a borrowed connection for minutes
    (docs/delivery-guarantee.md, "Fair use of the upstream connections").
    """

    def __init__(self, cap: int, room: int | None = None):
        self.cap = cap
        #: Tickets of all clients together beyond which nobody borrows: the pool's size.
        self.room = cap if room is None else max(cap, room)
        self._held: dict[str, int] = {}
        self._entitled = 0  # tickets within their keys' share
        self.borrowed = 0   # tickets over it (paced senders only)
        self._waiting: deque[tuple[tuple[str, ...], bool, Deferred[ShareTicket]]] = deque()

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def try_acquire(self, keys: tuple[str, ...], paced: bool = False
                    ) -> "ShareTicket | None":
        """A ticket now, or None when the client must wait (``acquire``).

        Served at once when under its share and nobody waits on one of its keys (who
        would otherwise be overtaken by its own address or identity for ever); a paced
        sender over its share borrows when there is room and nobody waits at all."""
        if self._waiting:
            if any(set(keys) & set(waiting) for waiting, _, _ in self._waiting):
                return None
            return self._take(keys) if self._fits(keys) else None
        if self._fits(keys):
            return self._take(keys)
        return self._borrow(keys) if paced and self._has_room() else None

    def acquire(self, keys: tuple[str, ...], paced: bool = False
                ) -> Deferred["ShareTicket"]:
        ticket = self.try_acquire(keys, paced)
        if ticket is not None:
            return succeed(ticket)
        entry: tuple[tuple[str, ...], bool, Deferred[ShareTicket]]
        waiter: Deferred[ShareTicket] = Deferred(
            lambda d: self._waiting.remove(entry) if entry in self._waiting else None)
        entry = (keys, paced, waiter)
        self._waiting.append(entry)
        return waiter

    def _fits(self, keys: tuple[str, ...]) -> bool:
        return all(self._held.get(key, 0) < self.cap for key in keys)

    def _has_room(self) -> bool:
        return self._entitled + self.borrowed < self.room

    def _take(self, keys: tuple[str, ...]) -> "ShareTicket":
        for key in keys:
            self._held[key] = self._held.get(key, 0) + 1
        self._entitled += 1
        return ShareTicket(self, keys)

    def _borrow(self, keys: tuple[str, ...]) -> "ShareTicket":
        self.borrowed += 1
        return ShareTicket(self, keys, borrowed=True)

    def _give_back(self, keys: tuple[str, ...], borrowed: bool) -> None:
        if borrowed:
            self.borrowed -= 1
        else:
            self._entitled -= 1
            for key in keys:
                left = self._held.get(key, 0) - 1
                if left > 0:
                    self._held[key] = left
                else:
                    self._held.pop(key, None)
        # Serve waiters in order; one that still does not fit lets later ones (other
        # clients) pass, so a client over its share never blocks anybody else.  Every
        # grant is decided and counted before any waiter hears of it: a waiter's
        # callback runs its transaction on at once, and one refused at once (every
        # upstream's breaker open) gives its ticket back inside this loop, which then
        # serves the queue again from its state as it is by then.
        granted: list[tuple[Deferred[ShareTicket], ShareTicket]] = []
        for entry in list(self._waiting):
            waiting_keys, paced, waiter = entry
            if self._fits(waiting_keys):
                ticket = self._take(waiting_keys)
            elif paced and self._has_room():
                ticket = self._borrow(waiting_keys)
            else:
                continue
            self._waiting.remove(entry)
            granted.append((waiter, ticket))
        for waiter, ticket in granted:
            if waiter.called:  # cancelled by an earlier waiter's callback: not needed
                ticket.release()
            else:
                waiter.callback(ticket)


class ShareTicket:
    """One message's place in ``ClientShares``; ``release`` acts once."""

    __slots__ = ("_shares", "_keys", "borrowed")

    def __init__(self, shares: ClientShares, keys: tuple[str, ...], borrowed: bool = False):
        self._shares: ClientShares | None = shares
        self._keys = keys
        self.borrowed = borrowed

    def release(self) -> None:
        shares, self._shares = self._shares, None
        if shares is not None:
            shares._give_back(self._keys, self.borrowed)


def _probe_failed(failure: Any) -> ProbeResult | Failure:
    """A relay error in its own words (stage and reply, never a credential); a
    cancellation stays a failure, as ``ProbeResult.from_failure`` leaves it."""
    if failure.check(RelayError):
        return ProbeResult.failed(failure.value.describe())
    return ProbeResult.from_failure(failure)


@implementer(IProbe)
class Upstream:
    """One configured upstream: its settings, its pool and its breaker."""

    def __init__(self, settings: UpstreamSettings, pool_settings: PoolSettings, reactor: Any,
                 tls_options: Any, sasl_cache: dict, tokens: Any = None):
        self._reactor = reactor
        self.settings = settings
        self.tokens = tokens  # its ``oauth2.TokenBroker`` when it logs in with OAuth2
        self.factory = SMTPClientFactory(reactor, settings.command_timeout,
                                         settings.data_timeout, upstream=settings.address)
        self.pool = SessionPool(settings, pool_settings, reactor, tls_options, self.factory,
                                sasl_cache, tokens)
        self.breaker = CircuitBreaker(pool_settings.breaker_failures,
                                      pool_settings.breaker_cooldown, reactor,
                                      on_change=self._breaker_changed)
        self.tls_options = tls_options

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def known_max_size(self) -> int | None:
        """SIZE from the last session's EHLO: None unknown, 0 no limit."""
        return self.pool.known_max_size

    @property
    def probe_subject(self) -> str:
        return f"upstream {self.address}"

    def probe(self) -> Deferred[ProbeResult]:
        """One session as the pool opens them (greeting, EHLO, STARTTLS, AUTH, and an
        OAuth2 token first when it logs in with one: docs/oauth2.md), then QUIT.  The
        session is the probe's own: the pool and its breaker are left as they were."""
        return ensureDeferred(self._probe()).addCallbacks(ProbeResult.passed,
                                                           _probe_failed)

    async def _probe(self) -> str:
        # Both fail with a RelayError naming the stage (esmtpfa/relay/errors.py).
        protocol = await dial(self._reactor, self.settings, self.tls_options, self.factory)
        session = UpstreamSession(protocol, self.settings, self.tls_options,
                                  tokens=self.tokens)
        try:
            await session.open()
        except Exception:
            protocol.abort()
            raise
        await session.close()
        return (f"connected, {'TLS' if session.secure else 'no TLS'}, "
                f"{'AUTH ' + session.mechanism if session.mechanism else 'no AUTH'}")

    def lease(self, fresh: bool = False) -> Deferred[Lease]:
        """A session of this upstream, owned by the caller until ``Lease.release``."""
        return self.pool.acquire(fresh=fresh).addCallback(self._lease_of)

    def lease_idle(self) -> Lease | None:
        """``lease()`` when an idle session answers it at once; None otherwise."""
        session = self.pool.acquire_idle()
        return self._lease_of(session) if session is not None else None

    def _lease_of(self, session: UpstreamSession) -> Lease:
        return Lease(self, session, reused=session.transactions > 0)

    def _breaker_changed(self, previous: str, state: str) -> None:
        if state == OPEN:
            log.warn("upstream {upstream}: {count} consecutive failures, skipped for "
                     "{seconds:g} s (circuit open)", upstream=self.address,
                     count=self.breaker.consecutive, seconds=self.breaker.cooldown)
        elif state == CLOSED:
            log.info("upstream {upstream}: back in service (circuit closed)",
                     upstream=self.address)
        else:
            log.info("upstream {upstream}: trying again (circuit half-open)",
                     upstream=self.address)
