"""The ``Received:`` trace header esmtpfa adds to every message (RFC 5321 §4.4).

It carries the message's ``urn:uuid`` id (SPEC §9) so a message found at the upstream
can be matched to our logs; with ``hide_client`` the client's address is left out
(a privacy option for submission relays).
"""

from __future__ import annotations

import datetime
import email.utils
import re

from esmtpfa.context import ConnectionContext

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")


def with_protocol(context: ConnectionContext, authenticated: bool, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword: ESMTP + S (TLS) + A (authenticated)."""
    if context.protocol == "http":
        base = "HTTPS" if context.tls else "HTTP"
        return base
    base = "UTF8SMTP" if smtputf8 else ("ESMTP" if context.helo is not None else "SMTP")
    return base + ("S" if context.tls else "") + ("A" if authenticated else "")


def received_header(context: ConnectionContext, hostname: str, message_id: str, *,
                    authenticated: bool, smtputf8: bool = False, hide_client: bool = False,
                    now: datetime.datetime | None = None) -> bytes:
    helo = _UNSAFE.sub("", context.helo or context.http_host or "unknown")[:255] or "unknown"
    source = f"from {helo}"
    if not hide_client:
        source += f" ([{context.peer_host}])"
    stamp = email.utils.format_datetime(now or datetime.datetime.now().astimezone())
    protocol = with_protocol(context, authenticated, smtputf8)
    return (f"Received: {source}\r\n"
            f"\tby {hostname} (esmtpfa) with {protocol} id {message_id};\r\n"
            f"\t{stamp}\r\n").encode("utf-8")
