"""The ``Received:`` trace header esmtpfa adds to every message (RFC 5321 §4.4).

It carries the message's ``urn:uuid`` id (docs/design.md, "Identifiers and logs") so a message found
at the upstream
can be matched to our logs; with ``hide_client`` the client's address is left out
(a privacy option for submission relays).
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
import re
import time

from esmtpfa.common.context import ConnectionContext

#: RFC 5321 §4.1.2 Domain: LDH labels (U-labels too, for SMTPUTF8 clients, RFC 6531).
_LABEL = (r"[A-Za-z0-9\u0080-\U0010FFFF]"
          r"(?:[A-Za-z0-9\-\u0080-\U0010FFFF]*[A-Za-z0-9\u0080-\U0010FFFF])?")
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
#: What an invalid name is reduced to: characters that are safe in any header parser.
_NOT_SAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 255


def _is_address_literal(name: str) -> bool:
    """RFC 5321 §4.1.3: ``[IPv4]`` or ``[IPv6:...]``."""
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def safe_client_name(name: str | None, smtputf8: bool = False) -> str:
    """The client's EHLO name (or HTTP Host) as the Received header may carry it.

    A valid domain or address literal is kept as the client sent it (RFC 5321 §4.4 asks
    for the name "as presented"); anything else has every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_``, so a ``;`` (the separator before the date,
    RFC 5322 §3.6.7), a parenthesis, a quote or a bracket cannot change how the header
    parses.  The underscore also marks the name as not a real host name.

    A name with U-labels (``münchen.example``) is kept as it is only in the header of
    an SMTPUTF8 message (RFC 6531 §3.7.3).  Any other message may travel on to an
    upstream that offers neither SMTPUTF8 nor 8BITMIME, where raw UTF-8 in a header
    is not allowed (RFC 5321 §2.3.1, §4.4: the domain is ASCII LDH there), so the name
    is written as its A-labels (``xn--mnchen-3ya.example``, RFC 5890 §2.3.2.1): the
    same domain, in the form every ASCII hop understands.  A name that IDNA cannot
    encode is reduced like any other invalid name.

    The EHLO itself is not refused for a U-label: the name is informational (RFC 5321
    §4.1.4 forbids refusing a message because it does not verify), and a printer with
    a non-ASCII host name has no other name to give.
    """
    if not name:
        return "unknown"
    name = name[:MAX_NAME]
    if _is_address_literal(name):
        return name
    if _DOMAIN.match(name) and len(name.encode("utf-8")) <= MAX_NAME:
        if name.isascii() or smtputf8:
            return name
        encoded = _a_labels(name)
        if encoded is not None:
            return encoded
    return _NOT_SAFE.sub("_", name)


def _a_labels(name: str) -> str | None:
    """``name`` in A-labels (IDNA 2008 with the UTS #46 mapping, what resolvers and
    browsers use), or None when it is not a valid IDN."""
    import idna  # a dependency of Twisted's (hyperlink)
    try:
        encoded = idna.encode(name.rstrip("."), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    encoded += "." if name.endswith(".") else ""
    return encoded if len(encoded) <= MAX_NAME and _DOMAIN.match(encoded) else None


def _host_as_domain(host: str) -> str:
    """An HTTP Host (already without port or brackets) in the form of an EHLO argument:
    an IP address becomes an address literal (RFC 5321 §4.1.3), a name stays."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def with_protocol(context: ConnectionContext, authenticated: bool, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword: ESMTP + S (TLS) + A (authenticated)."""
    if context.protocol == "http":
        base = "HTTPS" if context.tls else "HTTP"
        return base
    base = "UTF8SMTP" if smtputf8 else ("ESMTP" if context.helo is not None else "SMTP")
    return base + ("S" if context.tls else "") + ("A" if authenticated else "")


_last_stamp: tuple[int, str] = (-1, "")
#: The "from" clause per (EHLO name, HTTP Host, client address), at most this many.
SOURCES = 1024
_sources: dict[tuple, str] = {}


def _stamp_now() -> str:
    """The RFC 5322 date of this second, local time: formatted once per second (a
    busy relay stamps many messages in one), the same text as formatting ``now``."""
    global _last_stamp
    second = int(time.time())
    if _last_stamp[0] != second:
        _last_stamp = (second, email.utils.format_datetime(
            datetime.datetime.fromtimestamp(second).astimezone()))
    return _last_stamp[1]


def received_header(context: ConnectionContext, hostname: str, message_id: str, *,
                    authenticated: bool, smtputf8: bool = False, hide_client: bool = False,
                    now: datetime.datetime | None = None) -> bytes:
    key = (context.helo, context.http_host, None if hide_client else context.peer_host,
           smtputf8)
    source = _sources.get(key)
    if source is None:  # once per client and name, not once per message
        name = context.helo
        if name is None and context.http_host:
            name = _host_as_domain(context.http_host)
        source = f"from {safe_client_name(name, smtputf8)}"
        if not hide_client:
            source += f" ([{context.peer_host}])"
        if len(_sources) >= SOURCES:
            _sources.clear()
        _sources[key] = source
    stamp = email.utils.format_datetime(now) if now is not None else _stamp_now()
    protocol = with_protocol(context, authenticated, smtputf8)
    return (f"Received: {source}\r\n"
            f"\tby {hostname} (esmtpfa) with {protocol} id {message_id};\r\n"
            f"\t{stamp}\r\n").encode("utf-8")
