"""The server factory: one per listener, holding settings, the Portal and the limits."""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import logger
from esmtpfa.common.logsummary import RepeatSummary
from esmtpfa.common.replies import Reply
from esmtpfa.limits.guard import UNAVAILABLE
from esmtpfa.limits.interfaces import IConnectionLedger
from esmtpfa.limits.ledgers import ConnectionLimits
from esmtpfa.smtp.deadlines import client_sweeper
from esmtpfa.smtp.devices import NETWORK_NOT_ALLOWED, NOT_ALLOWED, Networks
from esmtpfa.smtp.server import COUNT_UNAVAILABLE, TOO_MANY_CONNECTIONS, ESMTPServer
from esmtpfa.smtp.settings import ServerSettings

log = logger("esmtpfa.smtp")

#: Seconds between summary lines of refused connections (a flood of 55,000 refusals in
#: 15 s wrote 21 MB of log; now the first of each reason, then one line per interval).
REFUSAL_SUMMARY_INTERVAL = 5.0

#: What a client refused by a ledger hears, by the ledger's reason; a limit reached is
#: temporary (421), an address a legacy listener does not serve is not (554).
REFUSAL_REPLIES = {NETWORK_NOT_ALLOWED: NOT_ALLOWED}
#: The log line of a refusal, by reason (the default: a limit reached).
REFUSAL_LINES = {NETWORK_NOT_ALLOWED:
                 "{connection_id} refused: [{peer}] is not in this listener's networks"}


class SMTPServerFactory(ServerFactory):
    """Builds ``ESMTPServer`` sessions.

    ``tls_options`` enables STARTTLS on a plain listener; ``implicit_tls`` marks a
    listener whose transport is already TLS (port 465, RFC 8314), where STARTTLS is
    never offered.  ``cleartext_auth`` (a legacy listener's, ``esmtpfa.smtp.devices``)
    names the networks whose clients may log in without TLS.
    """

    protocol = ESMTPServer
    noisy = False  # our own connect/disconnect lines carry the connection id
    #: Hears ``tls_handshake_failed(name)`` and ``size_refused(name)`` (the metrics).
    observer: Any = None

    def __init__(self, settings: ServerSettings, portal: Portal, *, name: str = "smtp",
                 tls_options=None, implicit_tls: bool = False,
                 limits: IConnectionLedger | None = None, reactor: Any,
                 cleartext_auth: Networks | None = None):
        self.settings = settings
        self.portal = portal
        self.name = name
        self.id = new_id()
        self.tls_options = None if implicit_tls else tls_options
        self.implicit_tls = implicit_tls
        self.cleartext_auth = cleartext_auth
        self.limits = limits or ConnectionLimits(
            settings.max_connections, settings.max_connections_per_ip)
        self.reactor = reactor
        self.sessions: set[ESMTPServer] = set()
        self.deadlines = client_sweeper(reactor)  # every session's ClientDeadline
        self.refusals = RepeatSummary(log, f"SMTP connections refused on {name}",
                                      interval=REFUSAL_SUMMARY_INTERVAL, clock=reactor)
        #: Set by ``drain``: the relay is shutting down (docs/smtp-limits.md, "Shutdown").
        self.draining = False
        self._drained: list[defer.Deferred] = []  # fire when the last session is gone
        self._stopped = False  # the port stopped listening (sessions may outlive it)

    def buildProtocol(self, addr) -> ESMTPServer:
        return self.protocol(self)

    def allows_cleartext_auth(self, host: str) -> bool:
        """Whether a client at ``host`` may log in without TLS on this listener:
        ``--allow-insecure-auth`` for everybody, or a legacy listener's
        ``--legacy-cleartext-auth-networks``."""
        if self.settings.allow_insecure_auth:
            return True
        return self.cleartext_auth is not None and self.cleartext_auth.allows(host)

    def admit(self, session: ESMTPServer) -> defer.Deferred:
        """Fires with ``None`` when the session may go on (it then holds a slot), else
        with the reply that refuses it.  A session that left before the count answered
        gives its slot straight back."""
        host = session._context.peer_host

        def decided(reason: str | None) -> Reply | None:
            if reason is not None:
                self.refusals.record(
                    reason, REFUSAL_LINES.get(
                        reason, "{connection_id} refused: {reason} reached for [{peer}]"),
                    connection_id=session.id, reason=reason, peer=host)
                return REFUSAL_REPLIES.get(reason, TOO_MANY_CONNECTIONS)
            if session._closing:
                self.limits.release(host)
                return None
            self.sessions.add(session)
            return None

        def unknown(failure) -> Reply:
            # The count could not be had (workers: the supervisor did not answer within
            # its call deadline): refuse for now, saying so, and log it once per summary
            # window, not once per connection of an outage.  Anything else is a bug.
            if not failure.check(*UNAVAILABLE):
                log.failure("{connection_id}: counting the connection failed", failure,
                            connection_id=session.id)
                return COUNT_UNAVAILABLE
            self.refusals.record(
                "connection count unavailable",
                "{connection_id} refused: the connection count could not be had ({error})",
                connection_id=session.id, error=failure.getErrorMessage() or
                failure.type.__name__)
            return COUNT_UNAVAILABLE
        return self.limits.refusal(host).addCallbacks(decided, unknown)

    def release(self, session: ESMTPServer) -> bool:
        """Free the session's slot; False when it never had one (it was refused)."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.limits.release(session._context.peer_host)
            if not self.sessions:
                self._all_gone()
            return True
        return False

    # -- shutdown (docs/smtp-limits.md, "Shutdown") -----------------------------------

    def drain(self) -> defer.Deferred:
        """Ask every session to end at its next chance; fires when none is left.

        Sessions between transactions hear ``421 4.3.2`` at once; one inside a
        transaction finishes it (the client hears the upstream's verdict) and hears
        ``421`` at its next command instead of starting another (RFC 5321 §3.8 lets a
        server that must shut down answer any command with 421)."""
        self.draining = True
        if self.sessions:
            log.info("{listener}: draining {count} SMTP session(s)", listener=self.name,
                     count=len(self.sessions))
        for session in list(self.sessions):
            session.drain()
        waiter: defer.Deferred = defer.Deferred()
        self._drained.append(waiter)
        if not self.sessions:
            self._all_gone()
        return waiter

    def close_remaining(self) -> None:
        """The drain's deadline passed: every session left gets 421 and is closed (a
        close that cannot complete is aborted after ``close_grace``, as always)."""
        if self.sessions:
            log.info("{listener}: shutdown grace over, closing {count} SMTP session(s)",
                     listener=self.name, count=len(self.sessions))
        for session in list(self.sessions):
            session.shut_down()

    def _all_gone(self) -> None:
        waiters, self._drained = self._drained, []
        for waiter in waiters:
            waiter.callback(None)
        if self._stopped:
            self.deadlines.close()

    def stopFactory(self) -> None:
        """The port stopped listening.  Sessions still draining keep their deadlines
        (a trickler stays bounded during the drain): the sweeper closes with the last."""
        self.refusals.stop()
        self._stopped = True
        if not self.sessions:
            self.deadlines.close()


def drain_listeners(factories: list[SMTPServerFactory], grace: float,
                    clock) -> defer.Deferred:
    """Drain every factory; at ``grace`` seconds close what remains.  Fires once every
    session is gone: by ``grace`` plus ``close_grace`` at the latest."""
    done = defer.DeferredList([factory.drain() for factory in factories])
    if not done.called:
        def deadline() -> None:
            for factory in factories:
                factory.close_remaining()
        call = clock.callLater(grace, deadline)

        def finished(result):
            if call.active():
                call.cancel()
            return result
        done.addBoth(finished)
    return done
