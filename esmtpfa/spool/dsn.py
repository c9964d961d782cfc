"""The bounce: an RFC 3464 delivery status notification to a message's envelope sender.

When the spool gives up on recipients (the upstream refused them for good, or the
message outlived its lifetime) and the identity's ending is ``Ending.BOUNCE``, the
sender learns it from a ``multipart/report`` (RFC 6522) with three parts: a text for
the person, a ``message/delivery-status`` for their software (RFC 3464 §2), and the
original header section (``text/rfc822-headers``, RFC 6522 §4) so both can tell which
message it was.  The caller sends it with the null reverse-path (RFC 5321 §4.5.5,
RFC 3464 §2), so that no bounce is ever answered by another one.

Almost everything in a bounce comes from peers: the addresses from the client, the
reply text from the upstream, the header section from whoever wrote the message.  None
of it may add a header field or a MIME part.  The structure is made by the ``email``
package, never by joining strings; but the package decodes RFC 2047 encoded words in
any header value it is handed (an ``=?utf-8?q?=0D=0A...?=`` becomes a real line break
on output), so no peer text ever reaches its header parser: header fields that carry
peer text are checked printable, free of ``=?``, short enough never to be refolded,
and stored as they are (``set_raw``).  Bodies are text that the generator never reads
as structure; what could end a part early is a line that starts with the boundary
(RFC 2046 §5.1.1), so the boundary is ours, chosen to occur nowhere in any part.  (The
package's own check looks for it only on lines ended by a bare LF, and misses it on
the CRLF lines of a message generated for SMTP.)

The bounce is 7-bit (parts that need more are quoted-printable) except for one case:
a sender whose own address is not ASCII gets it raw in ``To:`` (RFC 6532 §3.2),
which is no extra demand, since reaching that mailbox needs SMTPUTF8 (RFC 6531)
anyway.
"""

from __future__ import annotations

import email.policy
import re
import secrets
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, make_msgid
from typing import Iterable, Sequence

from esmtpfa.smtp.address import DOT_ATOM, QUOTED_STRING
from esmtpfa.spool.interfaces import Recipient, SpoolEntry

#: RFC 5322 §2.1.1: no line may be longer than 998 octets; the policy folds only past
#: that, so a field we store as it is keeps its exact text (see the module docstring).
MAX_LINE = 998
#: At most this much of an upstream's reply goes into a header field (the rest is
#: dropped with a marker); the text part carries up to ``MAX_TEXT_REPLY``.
MAX_FIELD_REPLY = 800
MAX_TEXT_REPLY = 4000

#: Status for a message that outlived its lifetime: RFC 3463 §3.5, X.4.7 "Delivery
#: time expired", persistent transient class because nothing refused it for good.
EXPIRED_STATUS = "4.4.7"
#: RFC 3463 §3.1: the class alone when nothing more specific is known.
DEFAULT_STATUS = "5.0.0"

SUBJECT = "Undelivered Mail Returned to Sender"

# Our generation policy: CRLF (the bounce is stored and sent as SMTP content), 7-bit
# bodies (quoted-printable when needed), and folding only past RFC 5322's hard limit.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", max_line_length=MAX_LINE)
_POLICY_UTF8 = _POLICY.clone(utf8=True)

# An SMTP reply as the relay records it: "550 5.1.1 text" (``str(Reply)``), possibly
# without an enhanced code (RFC 5321 §4.2); the enhanced code as RFC 3463 §2 writes it.
_SMTP_REPLY = re.compile(r"[2-5][0-9][0-9](?=[ -]|$)")
_ENHANCED = re.compile(r"[ -]([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")

# RFC 5322 §3.4.1 addr-spec with RFC 6532 §3.2's UTF-8 (any non-ASCII printable
# character), as the ``To:`` field will show the sender: a dot-atom or quoted-string
# local part, a dot-atom domain or a domain literal.
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"
_ADDR_SPEC = re.compile(rf"(?:{DOT_ATOM}|{QUOTED_STRING})@(?:{DOT_ATOM}|{_LITERAL})")

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


def build_bounce(entry: SpoolEntry, failed: Sequence[Recipient], headers: bytes, *,
                 reporting_mta: str, now: float, expired: bool = False,
                 remote_mta: str | None = None, max_headers: int = 64 * 1024) -> bytes:
    """The whole bounce for ``failed`` recipients of ``entry``, CRLF line ends, to be
    stored and sent from ``<>`` to ``entry.envelope.mail_from``.

    ``headers`` is the original message's header section (``original_headers``), of
    which at most ``max_headers`` octets are returned, cut at a line end.
    ``reporting_mta`` is our own host name (configuration, not peer data: a bad one is
    a ValueError); ``remote_mta`` the upstream's, when one answered.  ``now`` is the
    time of the last attempt and of the bounce.  ``expired``: the message outlived its
    lifetime rather than being refused.

    Raises ValueError for a message with the null sender: a bounce is never bounced
    (RFC 3464 §2, RFC 5321 §4.5.5); the caller holds it instead.
    """
    if entry.is_bounce:
        raise ValueError("a message with the null sender is never bounced")
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    reporter = _hostname(reporting_mta)
    if reporter is None:
        raise ValueError(f"reporting MTA {reporting_mta!r} is not a host name")
    remote = _remote_name(remote_mta) if remote_mta else None
    sender = entry.envelope.mail_from
    to = _to_field(sender)
    policy = _POLICY_UTF8 if to is not None and not to.isascii() else _POLICY

    report = EmailMessage(policy=policy)
    report["From"] = Address("Mail Delivery System", "MAILER-DAEMON", reporter)
    if to is not None:
        # Checked by ``_to_field``; stored as it is, never parsed (module docstring).
        # Without it, the message simply has no To: (RFC 5322 §3.6.3 makes it optional).
        report.set_raw("To", to)
    report["Subject"] = SUBJECT
    report["Date"] = _date(now)
    report["Message-ID"] = make_msgid(domain=reporter)
    # RFC 3834 §5: an automatic answer, which responders (vacation replies) must not
    # answer in turn.
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    # RFC 6522 §3: multipart/report, report-type naming the second part's type.
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")

    section, truncated = _cut_headers(headers, max_headers)
    parts = [
        _text_part(_explanation(entry, failed, reporter, expired, truncated), "plain",
                   "Notification"),
        _status_part(entry, failed, reporter, remote, now, expired, policy),
        _headers_part(section, policy),
    ]
    report.set_boundary(_boundary(parts, policy))
    for part in parts:
        # typeshed wants the container's own class; a part is a MIMEPart (no MIME-Version).
        report.attach(part)  # type: ignore[arg-type]
    return report.as_bytes(policy=policy)


def original_headers(chunks: Iterable[bytes], limit: int = 64 * 1024) -> bytes:
    """The header section of a stored message (CRLF line ends): up to and including the
    empty line that ends it (RFC 5322 §2.1), or, for a longer one, as many whole lines
    as fit in ``limit`` octets.  Stops reading as soon as it has it: a bounce for a
    25 MB message reads its first chunk, not 25 MB."""
    buffer = bytearray()
    iterator = iter(chunks)
    ran_out = True
    try:
        for chunk in iterator:
            searched = max(0, len(buffer) - 3)  # the CRLFCRLF may straddle two chunks
            buffer += chunk
            if buffer.startswith(b"\r\n"):  # no header fields at all
                return b"\r\n"
            end = buffer.find(b"\r\n\r\n", searched)
            if end >= 0 and end + 4 <= limit:
                return bytes(buffer[:end + 4])
            if len(buffer) >= limit:
                ran_out = False
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if ran_out:
        return bytes(buffer)  # a message that is all header section
    cut = buffer.rfind(b"\r\n", 0, limit)
    return bytes(buffer[:cut + 2]) if cut >= 0 else b""


# -- the three parts ------------------------------------------------------------------


def _explanation(entry: SpoolEntry, failed: Sequence[Recipient], reporter: str,
                 expired: bool, truncated: bool) -> str:
    """The first part (RFC 6522 §3): for the person, who may read nothing else."""
    lines = [f"This is the mail system at {reporter}.", ""]
    if expired:
        lines += ["Your message could not be delivered within its lifetime to the",
                  "recipients below; the mail system has stopped trying."]
    else:
        lines += ["Your message could not be delivered to the recipients below: the",
                  "receiving mail system refused it for good."]
    lines += ["", f"It was accepted on {_date(entry.received)}.", ""]
    for recipient in failed:
        lines.append(f"<{_printable(recipient.address)}>")
        reply = _printable(_one_line(recipient.reply), MAX_TEXT_REPLY)
        if reply and _SMTP_REPLY.match(reply):
            lines.append(f"    The mail server answered: {reply}")
        elif reply:
            lines.append(f"    Reason: {reply}")
        elif expired:
            lines.append("    Delivery time expired.")
        else:
            lines.append("    No reason was recorded.")
        lines.append("")
    lines.append("The header section of your message follows"
                 + (" (shortened)." if truncated else "."))
    return "\n".join(lines) + "\n"


def _status_part(entry: SpoolEntry, failed: Sequence[Recipient], reporter: str,
                 remote: str | None, now: float, expired: bool, policy) -> MIMEPart:
    """The second part: RFC 3464 §2.2 per-message fields, then one block of §2.3
    per-recipient fields for each failed recipient, in the order of its grammar."""
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    message = MIMEPart(policy=policy)
    message["Reporting-MTA"] = f"dns; {reporter}"
    message["Arrival-Date"] = _date(entry.received)
    _set_field(message, "X-Esmtpfa-Queue-ID", entry.id)  # an extension field, RFC 3464 §2.4
    blocks = [message]
    for recipient in failed:
        block = MIMEPart(policy=policy)
        _set_field(block, "Final-Recipient", _final_recipient(recipient.address))
        block["Action"] = "failed"
        block["Status"] = _status(recipient.reply, expired)
        if remote is not None:
            block["Remote-MTA"] = f"dns; {remote}"
        diagnostic = _diagnostic(recipient.reply)
        if diagnostic is not None:
            _set_field(block, "Diagnostic-Code", diagnostic)
        block["Last-Attempt-Date"] = _date(now)
        blocks.append(block)
    # The generator writes each block's fields and one empty line between blocks.
    # typeshed's set_payload omits a list of MIMEParts, which is what a multipart holds.
    part.set_payload(blocks)  # type: ignore[arg-type]
    return part


def _headers_part(section: bytes, policy) -> MIMEPart:
    """The third part: ``text/rfc822-headers`` (RFC 6522 §4).  A section of printable
    ASCII with lines of legal length goes as it is (7bit); anything else (8-bit octets
    of an RFC 6532 message or of a broken one, control characters, overlong lines) as
    quoted-printable UTF-8, which no octet of it can break out of."""
    lines = re.split(rb"\r\n|\r|\n", section)
    while lines and not lines[-1]:
        lines.pop()  # the empty line that ended the section is ours to write, or not
    clean = all(len(line) <= MAX_LINE and re.fullmatch(rb"[\t\x20-\x7e]*", line)
                for line in lines)
    text = "\n".join(line.decode("utf-8", "replace") for line in lines)
    if lines:
        text += "\n"
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype="rfc822-headers", charset="us-ascii" if clean else "utf-8",
                     cte="7bit" if clean else "quoted-printable")
    part["Content-Description"] = "Undelivered message headers"
    return part


def _text_part(text: str, subtype: str, description: str) -> MIMEPart:
    ascii_ok = text.isascii() and all(len(line) <= MAX_LINE for line in text.split("\n"))
    part = MIMEPart(policy=_POLICY)
    part.set_content(text, subtype=subtype, charset="us-ascii" if ascii_ok else "utf-8",
                     cte="7bit" if ascii_ok else "quoted-printable")
    part["Content-Description"] = description
    return part


def _boundary(parts: list[MIMEPart], policy) -> str:
    """A boundary found nowhere in the parts as they will be written, so that no line
    of theirs can be taken for a delimiter (RFC 2046 §5.1.1 requires that).  It starts
    with ``=_``, which no quoted-printable text can hold (RFC 2045 §6.7), and goes on
    with 128 random bits; the check covers the 7bit parts, whose text is the peers'."""
    written = b"".join(part.as_bytes(policy=policy) for part in parts)
    while True:
        boundary = "=_" + _token()
        if boundary.encode("ascii") not in written:
            return boundary


def _token() -> str:
    return secrets.token_hex(16)


def _cut_headers(headers: bytes, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` octets of ``headers``, ending at a line end."""
    if len(headers) <= limit:
        return headers, False
    cut = max(headers.rfind(b"\n", 0, limit), headers.rfind(b"\r", 0, limit))
    return headers[:cut + 1] if cut >= 0 else b"", True


# -- field values ---------------------------------------------------------------------


def _status(reply: str, expired: bool) -> str:
    """RFC 3464 §2.3.4's Status: the upstream's own enhanced code (RFC 3463) when its
    reply had one; for an expired message 4.4.7 unless the upstream had refused the
    recipient for good; otherwise the permanent class alone."""
    enhanced = _enhanced(reply)
    if enhanced is not None and enhanced.startswith("5"):
        return enhanced
    if expired:
        return EXPIRED_STATUS
    if enhanced is not None and enhanced.startswith("4"):
        return enhanced
    return DEFAULT_STATUS


def _enhanced(reply: str) -> str | None:
    reply = reply.lstrip()
    if not _SMTP_REPLY.match(reply):
        return None
    match = _ENHANCED.match(reply, 3)
    if match is None:
        return None
    # An enhanced code's class must agree with the reply code's (RFC 3463 §2).
    return match.group(0)[1:] if match.group(1) == reply[0] else None


def _diagnostic(reply: str) -> str | None:
    """RFC 3464 §2.3.6: ``smtp;`` and the reply, when it is an SMTP reply; a note of
    ours (the upstream never answered) goes under our own X- diagnostic type."""
    text = _field_text(_one_line(reply), MAX_FIELD_REPLY)
    if not text:
        return None
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-Esmtpfa"
    return f"{kind}; {text}"


def _final_recipient(address: str) -> str:
    """RFC 3464 §2.3.2.  An address of visible ASCII goes as ``rfc822``; any other (a
    UTF-8 one, or one with spaces or controls that no header line may carry) as
    ``utf-8`` in the 7-bit xtext form RFC 6533 §3 defines for ``message/delivery-
    status``: ``\\x{HEX}`` for each character outside QCHAR.  An address containing
    ``=?`` takes the second form too, so no reader decodes it as an encoded word."""
    if re.fullmatch(r"[\x21-\x7e]+", address) and "=?" not in address:
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_xtext(address)}"


def _utf8_xtext(address: str) -> str:
    out = []
    for char in address:
        point = ord(char)
        if 0xD800 <= point <= 0xDFFF:  # a lone surrogate encodes no character
            point = 0xFFFD
        if 0x21 <= point <= 0x7E and char not in "\\+=":
            out.append(char)
        else:
            out.append(f"\\x{{{point:02X}}}")
    return "".join(out)


def _to_field(sender: str) -> str | None:
    """The sender as an RFC 5322 addr-spec for ``To:``, or None when it is not one that
    can be shown safely (the envelope still carries the bounce to it)."""
    if len(sender.encode("utf-8", "replace")) > 900 or "=?" in sender \
            or not sender.isprintable():
        return None
    return sender if _ADDR_SPEC.fullmatch(sender) else None


def _hostname(name: str) -> str | None:
    """A host name in the ASCII form DNS uses (RFC 5890 A-labels for an IDN)."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if _HOSTNAME.fullmatch(name) else None


def _remote_name(name: str) -> str:
    """The upstream as RFC 3464 §2.3.5 wants it: a host name, or an address literal
    (``[192.0.2.1]``) kept as given; anything else in visible ASCII only."""
    host = _hostname(name)
    if host is not None:
        return host
    return _field_text(name.replace(" ", "_"), 255) or "unknown"


def _date(when: float) -> str:
    """RFC 5322 §3.3 date-time, in UTC with an explicit +0000."""
    return format_datetime(datetime.fromtimestamp(when, UTC))


# -- peer text ------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A multi-line reply on one line, its lines joined as ``str(Reply)`` does."""
    return " / ".join(line.strip() for line in re.split(r"\r\n|\r|\n", text)
                      if line.strip())


def _printable(text: str, limit: int | None = None) -> str:
    """For the text part: every character a terminal or mail reader would not show as
    itself (controls, line and paragraph separators, lone surrogates) becomes ``?``."""
    text = "".join(c if c.isprintable() else ("?" if c != "\t" else " ") for c in text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


def _field_text(text: str, limit: int) -> str:
    """For a header field: visible ASCII and spaces only, as RFC 3464 §2.1 requires of
    a ``message/delivery-status`` field; no ``=?`` (which a reader would decode as an
    RFC 2047 encoded word); at most ``limit`` characters."""
    text = re.sub(r"[^\x20-\x7e]", "?", text.replace("\t", " ")).strip()
    text = text.replace("=?", "= ?")
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def _set_field(part: MIMEPart, name: str, value: str) -> None:
    """Store a field that carries peer text as it is, without the header parser
    (module docstring).  The checks are what make that safe: one line, no control
    character, no encoded word, short enough that the policy never refolds it."""
    if (not value.isprintable() or "=?" in value
            or len(name) + 2 + len(value.encode("utf-8")) > MAX_LINE):
        value = _field_text(value, MAX_LINE - len(name) - 5)
    part.set_raw(name, value)
