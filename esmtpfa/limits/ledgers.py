"""Which ledger each limit of one relay process uses (``esmtpfa.limits``).

A field left None means the limit keeps its counts in this process, as a relay of one
process does.  A worker gets the supervisor's ledgers; with ``--state-url`` the login
throttle and the sending rates use Redis instead (docs/workers.md, docs/shared-state.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from esmtpfa.limits.interfaces import IConnectionLedger, ILoginLedger, IRateLedger


@dataclass(frozen=True)
class Ledgers:
    login: ILoginLedger | None = None
    rates: IRateLedger | None = None
    #: Shared by the SMTP listeners (plain and implicit TLS).
    smtp_connections: IConnectionLedger | None = None
    #: The HTTP submission listener's.
    http_connections: IConnectionLedger | None = None


__all__ = ["Ledgers"]
