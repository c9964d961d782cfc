"""What each failure toward an upstream is called: the constructors of ``RelayError``.

A failure is a ``RelayError`` from the moment it is seen, built here by the code that
sees it: the reply parser and the timers in ``protocol.py`` (lost, timed out, garbage,
TLS, a refused AUTH), the session set-up in ``session.py`` (greeting, STARTTLS, the
OAuth2 token, a ``421``), the pool (no connection), the transaction in ``upstream.py``
(the upstream's verdicts, what we refuse before sending).  Nothing translates errors
afterwards, so the kind and the phase are decided once, by whoever knows them
(docs/delivery-guarantee.md, "Failures are values: kind and phase"):

* the kind says what the session and the circuit breaker learn (``Kind``);
* the phase is ``Phase.OUTCOME_UNKNOWN`` for anything that broke after the final dot had
  left: the upstream may have the message, so it is never sent again by us and the
  client hears that a duplicate is possible (docs/delivery-guarantee.md, "After the
  final dot: never again by our hand").  The connection failures below take
  ``after_dot`` for that reason: only the protocol knows where the dot is.

The client's reply for a failure of our own making is always a ``451`` (``unavailable``);
the upstream's own verdict keeps its code (``rejected``); what we refuse before sending
keeps the code the refusal needs (``permanent``, ``policy``).
"""

from __future__ import annotations

from esmtpfa.common.replies import Reply
from esmtpfa.relay.interfaces import REJECTED, Kind, Phase, RelayError

#: The reply for every failure after the final dot: the client keeps the message and
#: retries, knowing the upstream may already have it (docs/delivery-guarantee.md).
MAYBE_DELIVERED = ("Upstream connection failed after the message was sent; "
                   "try again later (a duplicate is possible)")

#: What a client hears when the upstream's token cannot be had or was refused: a
#: temporary failure of our own credentials (RFC 3463 X.7.0), so it retries.
TOKEN_UNAVAILABLE = "Upstream credentials unavailable, try again later"

AUTH_FAILED = "Upstream authentication failed, try again later"
TLS_FAILED = "TLS with the upstream server failed, try again later"
SESSION_REFUSED = "Upstream server refused the session, try again later"


# --- the general forms ---------------------------------------------------------------------

def unavailable(enhanced: str, text: str, detail: str, command: str | None = None,
                upstream_reply: Reply | None = None, upstream: str | None = None, *,
                kind: str = Kind.UNAVAILABLE, phase: str = Phase.BEFORE_DOT) -> RelayError:
    """A failure of our own making: ``451 enhanced text``; the client retries."""
    return RelayError(Reply(451, enhanced, text), kind, command, upstream_reply,
                      detail, upstream, kind=kind, phase=phase)


def rejected(command: str, reply: Reply, text: str | None = None,
             upstream: str | None = None) -> RelayError:
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
                      text or f"upstream answered {command} with {reply}", upstream,
                      kind=Kind.REJECTED)


def policy(reply: Reply, command: str, upstream: str | None = None,
           detail: str | None = None) -> RelayError:
    """A refusal we decide before sending (``Kind.POLICY``): the upstream lacks what the
    message needs, or an address cannot be written on the wire.  The upstream was not
    asked, so it says nothing about its health."""
    return RelayError(reply, REJECTED, command, None, detail or reply.text, upstream,
                      kind=Kind.POLICY)


def permanent(code: int, enhanced: str, text: str, command: str,
              upstream: str | None = None) -> RelayError:
    """``policy`` with a reply code: the upstream could never accept this."""
    return policy(Reply(code, enhanced, text), command, upstream)


def outcome_unknown(detail: str, command: str | None, upstream: str | None = None,
                    kind: str = Kind.UNAVAILABLE) -> RelayError:
    """Whatever broke after the final dot: the one thing that matters is that the
    upstream may have accepted the message."""
    return unavailable("4.4.2", MAYBE_DELIVERED, detail, command, upstream=upstream,
                       kind=kind, phase=Phase.OUTCOME_UNKNOWN)


# --- the connection (raised by the protocol) ------------------------------------------------

def connection_failed(detail: str, command: str | None, upstream: str | None = None, *,
                      after_dot: bool = False) -> RelayError:
    """The connection was lost, or an answer did not come in time."""
    if after_dot:
        return outcome_unknown(detail, command, upstream)
    return unavailable("4.4.2", "Upstream connection failed, try again later", detail,
                       command, upstream=upstream)


def tls_failed(detail: str, command: str | None, upstream: str | None = None, *,
               after_dot: bool = False) -> RelayError:
    """The TLS handshake or the certificate's verification failed."""
    if after_dot:
        return outcome_unknown(detail, command, upstream)
    return unavailable("4.4.2", TLS_FAILED, detail, command, upstream=upstream)


def protocol_violation(detail: str, command: str | None, upstream: str | None = None, *,
                       after_dot: bool = False) -> RelayError:
    """The upstream sent something that is not SMTP, or not at this point."""
    if after_dot:
        return outcome_unknown(detail, command, upstream, Kind.PROTOCOL)
    return unavailable("4.4.2", "Upstream protocol error, try again later", detail,
                       command, upstream=upstream, kind=Kind.PROTOCOL)


def abandoned(detail: str, command: str | None, upstream: str | None = None, *,
              after_dot: bool = False) -> RelayError:
    """We dropped the connection ourselves (an abort, a message we could not read).
    Before the dot the session is out of step, like after garbage; after it, this is
    one more way the connection went while the outcome was pending."""
    if after_dot:
        return outcome_unknown(detail, command, upstream)
    return unavailable("4.4.2", "Upstream protocol error, try again later", detail,
                       command, upstream=upstream, kind=Kind.PROTOCOL)


def session_refused(command: str, reply: Reply, upstream: str | None = None,
                    detail: str | None = None) -> RelayError:
    """A well-formed reply that ends the session's set-up (greeting, EHLO and HELO,
    RSET): not about the message."""
    return unavailable("4.4.0", SESSION_REFUSED, detail or f"{command}: {reply}", command,
                       reply, upstream)


def starttls_refused(reply: Reply, upstream: str | None = None) -> RelayError:
    """STARTTLS offered but refused.  Never a fall back to cleartext: whoever could make
    STARTTLS fail could then read the session."""
    return unavailable("4.4.2", TLS_FAILED, f"STARTTLS refused: {reply}", "STARTTLS",
                       reply, upstream)


def auth_refused(reply: Reply, upstream: str | None = None) -> RelayError:
    """The upstream refused our credentials (RFC 4954 §6: 535, 534, 454 ...).  The only
    AUTH failure that carries the upstream's reply."""
    return unavailable("4.3.0", AUTH_FAILED, f"upstream refused our AUTH: {reply}", "AUTH",
                       reply, upstream)


def auth_cancelled(detail: str, upstream: str | None = None) -> RelayError:
    """We cancelled the SASL exchange: the server's side of it was not acceptable."""
    return unavailable("4.3.0", AUTH_FAILED, detail, "AUTH", upstream=upstream)


def token_refused(reply: Reply, status: str | None, upstream: str | None = None
                  ) -> RelayError:
    """The upstream refused our OAuth2 access token (docs/oauth2.md, "When the upstream
    refuses a token").  ``status`` is the RFC 7628 error challenge's, never the token."""
    why = f" ({status})" if status else ""
    return unavailable("4.7.0", TOKEN_UNAVAILABLE,
                       f"upstream refused our OAuth2 token{why}: {reply}", "AUTH", reply,
                       upstream)


def closing(command: str | None, reply: Reply, upstream: str | None = None) -> RelayError:
    """The upstream answered ``421``: it is closing this connection (RFC 5321 §3.8),
    whatever the command was.  The client hears a ``451`` with the upstream's words."""
    told = rejected(command or "connection", reply).reply
    return unavailable(told.enhanced if told.enhanced.startswith("4.") else "4.4.2",
                       f"upstream: {reply.text}",
                       f"upstream is closing the connection: {reply}", command, reply,
                       upstream)


# --- before and around the connection -------------------------------------------------------

def unreachable(cause: BaseException, upstream: str | None = None) -> RelayError:
    """No connection: refused, unreachable, DNS, the connect timeout."""
    return unavailable("4.4.1", "Upstream server unreachable, try again later",
                       f"cannot connect: {cause}", "connect", upstream=upstream)


def local_error(cause: BaseException, command: str | None,
                upstream: str | None = None) -> RelayError:
    """Something that is no SMTP failure broke a session (a bug, a mechanism we cannot
    run): the client retries, the log says what it was."""
    return unavailable("4.3.0", "Local error talking to the upstream, try again later",
                       f"{type(cause).__name__}: {cause}", command, upstream=upstream)
