"""The failed-login line: one format for SMTP AUTH and HTTP API logins alike.

An operator acts on it (docs/logging.md, "Failed logins"): fail2ban bans on it
(deploy/fail2ban), a human reads whose account is being guessed and why it failed.
So the line is built for both:

    urn:uuid:… login failed: client=203.0.113.9 reason=bad-password protocol=smtp mechanism=PLAIN
    identity=corp-ldap/alice

Everything before ``identity`` is ours (the address from the socket, a reason from
``esmtpfa.auth.errors.REASONS``, a mechanism the server knows), and the one part the
client types, the identity, comes last and escaped (no spaces, quotes or control
characters): no user name can make the line name another address to a filter.  The
client hears nothing of the reason (535 5.7.8 or HTTP 401 whatever it is).

It is a ``warn``: a failed login is worth seeing at ``--log-level warn``, and fail2ban
must not go blind when an operator quiets the log.
"""

from __future__ import annotations

from esmtpfa.auth.errors import Attempted, reason_of
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.logs import logger

log = logger("esmtpfa.auth")

#: The text every failed-login line has after the session id (deploy/fail2ban matches it).
MARK = "login failed:"


def log_failed_login(context: ConnectionContext, mechanism: str, error: BaseException,
                     typed_user: str | None = None) -> str:
    """Log the failed-login line for ``error`` (what the login failed with); return the
    reason.  ``typed_user`` is the user the client gave, for a failure that happened
    before any provider was chosen (the error's ``attempted`` says more when set)."""
    reason = reason_of(error)
    attempted = getattr(error, "attempted", None)
    if not isinstance(attempted, Attempted):
        attempted = Attempted(None, typed_user)
    log.warn("{connection_id} " + MARK + " client={client} reason={reason} "
             "protocol={protocol} mechanism={mechanism} identity={identity}",
             connection_id=context.connection_id, client=context.peer_host or "-",
             reason=reason, protocol=context.protocol, mechanism=mechanism,
             identity=attempted)
    return reason


__all__ = ["MARK", "log_failed_login"]
