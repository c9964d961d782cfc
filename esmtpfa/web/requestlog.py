"""What an HTTP listener logs: one line per answered request, floods collapsed.

Each request is logged once, when it is answered, with the connection id, the client's
address and, once it logged in, its identity as ``provider/user`` (never a credential):
accepted, refused with the status and the reason, or cut by a deadline.  Twisted's
access log is off (``GuardedSite.log``); these lines replace it.

Lines about clients that did not log in (failed logins, 408s, connections over a cap)
are what floods are made of, so they go through ``RepeatSummary``
(``esmtpfa/common/logsummary.py``): the first of each kind in an interval in full, then one
summary line with counts.  A logged-in identity's lines are always written: there are
few, and each names who to ask.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel

from esmtpfa.common.logs import logger
from esmtpfa.common.logsummary import RepeatSummary

log = logger("esmtpfa.web")

#: Seconds between summary lines of collapsed refusals.
FLOOD_INTERVAL = 5.0


class RequestLog:
    """The log of one listener; ``what`` names its requests ("HTTP submission")."""

    def __init__(self, what: str, clock: IReactorTime, *, interval: float = FLOOD_INTERVAL):
        self.what = what
        self._floods = RepeatSummary(log, f"{what} refusals", interval=interval,
                                     clock=clock, level=LogLevel.info)

    def accepted(self, connection_id: str, peer: str, identity: str, message_id: str,
                 recipients: int) -> None:
        log.info("{connection_id} {what} from [{peer}] as {identity}: message {message_id} "
                 "to {count} recipient(s) accepted", connection_id=connection_id,
                 what=self.what, peer=peer, identity=identity, message_id=message_id,
                 count=recipients)

    def refused(self, connection_id: str, peer: str, status: int, reason: str,
                identity: str | None = None) -> None:
        fields: dict[str, Any] = dict(
            connection_id=connection_id, what=self.what, peer=peer, status=status,
            reason=reason, identity=identity, who=f" as {identity}" if identity else "")
        text = "{connection_id} {what} from [{peer}]{who} refused: {status} {reason}"
        if identity is None:
            self._floods.record(str(status), text, **fields)
        else:
            log.info(text, **fields)

    def handshake_failed(self) -> None:
        """A connection of a TLS listener ended before its handshake completed (the
        metrics count it; the connection's own line says why it closed)."""

    def closed(self, connection_id: str, peer: str, why: str) -> None:
        """A connection closed without an answer (nothing came before the deadline)."""
        self._floods.record("closed unanswered", "{connection_id} {what} connection from "
                            "[{peer}] closed: {why}", connection_id=connection_id,
                            what=self.what, peer=peer, why=why)

    def over_cap(self, listener: str, peer: str) -> None:
        self._floods.record("connection cap", "{listener} connection from [{peer}] refused: "
                            "connection limit reached", listener=listener, peer=peer)

    def evicted(self, listener: str, peer: str) -> None:
        """A connection waiting for a request was closed for a new one (the cap was
        reached): a flood's doing, so summed up."""
        self._floods.record("closed for a new connection", "{listener} connection from "
                            "[{peer}] closed: the connection limit was reached and it "
                            "was the oldest waiting for a request", listener=listener,
                            peer=peer)

    def count_unavailable(self, listener: str, peer: str, error: str) -> None:
        """A connection closed because its count could not be had (workers: the
        supervisor did not answer in time); summed up like the floods, since an outage
        refuses every new connection."""
        self._floods.record("connection count unavailable",
                            "{listener} connection from [{peer}] closed: the connection "
                            "count could not be had ({error})", listener=listener,
                            peer=peer, error=error)

    def stop(self) -> None:
        """Write the counts still pending; the listener stops."""
        self._floods.stop()


__all__ = ["FLOOD_INTERVAL", "RequestLog"]
