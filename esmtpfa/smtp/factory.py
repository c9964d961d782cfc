"""The server factory: one per listener, holding settings, the Portal and the limits."""

from __future__ import annotations

from collections import Counter

from twisted.cred.portal import Portal
from twisted.internet.protocol import ServerFactory

from esmtpfa.logs import logger
from esmtpfa.logsummary import RepeatSummary
from esmtpfa.ids import new_id
from esmtpfa.smtp.deadlines import client_sweeper
from esmtpfa.smtp.server import ESMTPServer
from esmtpfa.smtp.settings import ServerSettings

log = logger("esmtpfa.smtp")

#: Seconds between summary lines of refused connections (issue 10: 55,000 refusals in
#: 15 s wrote 21 MB of log; now the first of each reason, then one line per interval).
REFUSAL_SUMMARY_INTERVAL = 5.0


class ConnectionLimits:
    """Total and per-IP connection counts, shared by all listeners of one relay."""

    def __init__(self, total: int, per_ip: int):
        self.total, self.per_ip = total, per_ip
        self.active = 0
        self.by_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        return self.refusal(ip) is None

    def refusal(self, ip: str) -> str | None:
        """Take a slot for ``ip``; or, without taking one, the limit that refuses it."""
        if self.active >= self.total:
            return "total limit"
        if self.by_ip[ip] >= self.per_ip:
            return "per-address limit"
        self.active += 1
        self.by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.active -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


class SMTPServerFactory(ServerFactory):
    """Builds ``ESMTPServer`` sessions.

    ``tls_options`` enables STARTTLS on a plain listener; ``implicit_tls`` marks a
    listener whose transport is already TLS (port 465, RFC 8314), where STARTTLS is
    never offered.
    """

    protocol = ESMTPServer
    noisy = False  # our own connect/disconnect lines carry the connection id

    def __init__(self, settings: ServerSettings, portal: Portal, *, name: str = "smtp",
                 tls_options=None, implicit_tls: bool = False,
                 limits: ConnectionLimits | None = None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.portal = portal
        self.name = name
        self.id = new_id()
        self.tls_options = None if implicit_tls else tls_options
        self.implicit_tls = implicit_tls
        self.limits = limits or ConnectionLimits(
            settings.max_connections, settings.max_connections_per_ip)
        self.reactor = reactor
        self.sessions: set[ESMTPServer] = set()
        self.deadlines = client_sweeper(reactor)  # every session's ClientDeadline
        self.refusals = RepeatSummary(log, f"SMTP connections refused on {name}",
                                      interval=REFUSAL_SUMMARY_INTERVAL, clock=reactor)

    def buildProtocol(self, addr) -> ESMTPServer:
        return self.protocol(self)

    def admit(self, session: ESMTPServer) -> bool:
        reason = self.limits.refusal(session._context.peer_host)
        if reason is not None:
            self.refusals.record(
                reason, "{connection_id} refused: {reason} reached for [{peer}]",
                connection_id=session.id, reason=reason, peer=session._context.peer_host)
            return False
        self.sessions.add(session)
        return True

    def release(self, session: ESMTPServer) -> bool:
        """Free the session's slot; False when it never had one (it was refused)."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.limits.release(session._context.peer_host)
            return True
        return False

    def stopFactory(self) -> None:
        self.refusals.stop()
        self.deadlines.close()
