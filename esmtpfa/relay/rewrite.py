"""``-relay-from R``: send every message as R, keep the author reachable (docs/design.md,
"The relay and the delivery guarantee").

Smarthosts often accept only their own sender address (SPF/DMARC alignment, account
policy).  This wrapper makes the envelope sender R (RFC 5321 §4.1.1.2) and the ``From:``
header R with the original display name, and moves the client's ``From:`` to
``Reply-To:`` (RFC 5322 §3.6.2) unless the message already has one, so replies still reach
the author.

Only the header section is read (at most ``HEADER_LIMIT``) and rebuilt into the message's
``prefix``; ``content_offset`` then points at the body, which stays byte-for-byte.  A
header section that does not end within ``HEADER_LIMIT`` is refused (552 5.3.4): treating
its tail as body, as some MTAs do, could leave a second ``From:`` where readers still
find it.  Reading and parsing a header section of up to a megabyte is work for a thread,
not the reactor: above ``INLINE_LIMIT`` octets of content the rewrite runs in one.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from esmtpfa.common.message import Envelope, OutboundMessage
from esmtpfa.common.probe import IProbeGroup, probes_of
from esmtpfa.common.replies import Reply
from esmtpfa.common.resources import Resources
from esmtpfa.relay.interfaces import REJECTED, IRelay, IRelayTransaction, RelayError

#: The most header we read from the spool for one message.
HEADER_LIMIT = 1024 * 1024
#: Messages up to this size are rewritten in the reactor thread (a thread hop costs more).
INLINE_LIMIT = 64 * 1024
#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; we fold what we build.
FOLD_AT = 78

CRLF = b"\r\n"
# RFC 5322 §3.6.8 field name (printable US-ASCII except ":"), obsolete WSP before ":".
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:\"]+@[^\s<>()\[\]\\,;:\"@]+$")


class HeaderSection:
    """The parsed header section: raw fields (folding kept) and where the body starts."""

    def __init__(self, fields: list[bytes], end: int, separator: bool):
        self.fields = fields          # each field with its continuation lines and CRLF
        self.end = end                # offset of the blank line / first body line
        self.separator = separator    # True when a blank line ends the section

    @classmethod
    def parse(cls, data: bytes, complete: bool) -> "HeaderSection | None":
        """Fields up to the blank line, a non-header line, or the end of ``data``.

        Returns None when ``data`` ends inside the header section and is not ``complete``.
        """
        # Each field's lines are gathered in a list and joined once: a field folded over
        # thousands of lines must cost linear time, not one copy per continuation.
        lines: list[list[bytes]] = []

        def section(end: int, separator: bool) -> "HeaderSection":
            return cls([b"".join(parts) for parts in lines], end, separator)

        position = 0
        while True:
            end = data.find(CRLF, position)
            if end < 0:
                if not complete:
                    return None
                rest = data[position:]
                if rest and (_FIELD.match(rest) or (lines and rest[:1] in b" \t")):
                    # The last line lacks its CRLF; the field we rebuild gets one.
                    if rest[:1] in b" \t" and lines:
                        lines[-1].append(rest + CRLF)
                    else:
                        lines.append([rest + CRLF])
                    return section(len(data), False)
                return section(position, False)
            line = data[position:end]
            if not line:
                return section(position, True)
            if line[:1] in b" \t" and lines:
                lines[-1].append(line + CRLF)  # RFC 5322 §2.2.3 folded continuation
            elif _FIELD.match(line):
                lines.append([line + CRLF])
            else:
                # Not a header line: the body starts here, without a blank line before it.
                return section(position, False)
            position = end + 2


def field_name(raw: bytes) -> bytes:
    match = _FIELD.match(raw)
    return match.group(1).lower() if match else b""


def field_value(raw: bytes) -> bytes:
    """The raw value after the colon, folding kept, final CRLF removed."""
    value = raw[raw.index(b":") + 1:]
    return value[:-2] if value.endswith(CRLF) else value


def unfold(value: bytes) -> bytes:
    """RFC 5322 §2.2.3: a CRLF followed by WSP is removed."""
    return re.sub(rb"\r\n(?=[ \t])", b"", value)


def display_name(from_value: bytes) -> bytes | None:
    """The phrase before the first mailbox's ``<addr>``, verbatim (quotes, encoded words).

    ``"Doe, Jane" <j@x>`` gives ``"Doe, Jane"``; ``Jane <j@x>`` gives ``Jane``;
    ``j@x`` and ``j@x (Jane)`` give None.  Only the first mailbox of a list counts.
    """
    value = unfold(from_value)
    quoted = False
    depth = 0
    escape = False
    for index, char in enumerate(value):
        c = bytes([char])
        if escape:
            escape = False
        elif c == b"\\" and (quoted or depth):
            escape = True
        elif quoted:
            quoted = c != b'"'
        elif depth:
            depth += {b"(": 1, b")": -1}.get(c, 0)
        elif c == b'"':
            quoted = True
        elif c == b"(":
            depth = 1
        elif c == b",":
            return None  # the first mailbox has no angle address
        elif c == b"<":
            phrase = b" ".join(value[:index].split())
            return phrase or None
    return None


def fold(line: bytes, width: int = FOLD_AT) -> bytes:
    """Fold a header line (without CRLF) at whitespace so lines stay near ``width``."""
    if len(line) <= width:
        return line
    out: list[bytes] = []
    current = b""
    for word in re.split(rb"(?=[ \t])", line):
        if current and len(current) + len(word) > width:
            out.append(current)
            current = word
        else:
            current += word
    out.append(current)
    return CRLF.join(out)


@implementer(IRelay, IProbeGroup)
class RelayFromRewriter:
    """Wraps another IRelay; rewrites sender and ``From:`` before handing the message on.

    A large message's header is rewritten in ``resources.threads``, off the reactor."""

    def __init__(self, inner: Any, relay_from: str, *, resources: Resources):
        if not _ADDRESS.match(relay_from) or not relay_from.isprintable():
            raise ValueError(f"-relay-from must be a plain address, not {relay_from!r}")
        self.inner = inner
        self.relay_from = relay_from
        self._resources = resources

    @property
    def description(self) -> str:
        return f"{self.inner.description}, sender rewritten to {self.relay_from}"

    def probes(self) -> list:
        """The wrapped relay's (the rewrite has no back end of its own)."""
        return probes_of(self.inner)

    def begin(self, envelope: Envelope, message_id: str = "", connection_id: str = "",
              client: tuple[str, ...] = (), paced: bool = False
              ) -> Deferred["_RewritingTransaction"]:
        """The upstream transaction opens with R as the sender; the header is rewritten
        when the content is handed over."""
        d = self.inner.begin(self.rewrite_envelope(envelope), message_id, connection_id,
                             client, paced)
        return d.addCallback(lambda inner: _RewritingTransaction(self, inner))

    def rewrite_later(self, message: OutboundMessage) -> Deferred[OutboundMessage]:
        """``rewrite``, in a thread unless the message is small."""
        if _content_size(message) <= INLINE_LIMIT:
            return maybeDeferred(self.rewrite, message)
        return self._resources.in_thread(self.rewrite, message)

    def rewrite_envelope(self, envelope: Envelope) -> Envelope:
        return replace(envelope, mail_from=self.relay_from,
                       smtputf8=envelope.smtputf8 or not self.relay_from.isascii())

    def close(self) -> Deferred[None]:
        return self.inner.close()

    def rewrite(self, message: OutboundMessage) -> OutboundMessage:
        header = read_header_section(message)
        address = self.relay_from.encode("utf-8")
        originals = [f for f in header.fields if field_name(f) == b"from"]
        has_reply_to = any(field_name(f) == b"reply-to" for f in header.fields)
        if originals:
            original = field_value(originals[0])
            phrase = display_name(original)
            new_from = [_from_field(phrase, address)]
            if not has_reply_to:
                new_from.append(b"Reply-To:" + original + CRLF)
        else:
            new_from = [_from_field(None, address)]
        fields: list[bytes] = []
        for raw in header.fields:
            if field_name(raw) == b"from":
                # Exactly one From in the result (RFC 5322 §3.6): a second one, kept,
                # would let the client's address show through.
                fields.extend(new_from)
                new_from = []
            else:
                fields.append(raw)
        fields.extend(new_from)  # the message had no From: it gets one
        separator = b"" if header.separator or header.end >= _content_size(message) else CRLF
        prefix = message.prefix + b"".join(fields) + separator
        envelope = self.rewrite_envelope(message.envelope)
        return replace(message, envelope=envelope, prefix=prefix,
                       content_offset=message.content_offset + header.end)


@implementer(IRelayTransaction)
class _RewritingTransaction:
    """The inner relay's transaction, with the header rewrite applied at ``send``."""

    def __init__(self, rewriter: RelayFromRewriter, inner: Any):
        self._rewriter = rewriter
        self._inner = inner

    @property
    def max_size(self) -> int | None:
        return self._inner.max_size

    def addRecipient(self, address: str, data_follows: bool = False) -> Deferred[Reply]:
        return self._inner.addRecipient(address, data_follows)

    def send(self, message: OutboundMessage) -> Deferred[Reply]:
        def refused(failure: Any) -> Any:
            self._inner.abort()
            return failure
        return self._rewriter.rewrite_later(message).addCallbacks(
            self._inner.send, refused)

    def abort(self) -> None:
        self._inner.abort()


def _from_field(phrase: bytes | None, address: bytes) -> bytes:
    value = phrase + b" <" + address + b">" if phrase else address
    return fold(b"From: " + value) + CRLF


def _content_size(message: OutboundMessage) -> int:
    return message.spool.size - message.content_offset


def read_header_section(message: OutboundMessage) -> HeaderSection:
    """Read at most ``HEADER_LIMIT`` (+ one chunk) of the content and parse its header.

    Bounded 64 KiB reads from the spool; large messages get here in a thread
    (``RelayFromRewriter.rewrite_later``), while the reactor leaves the spool alone.
    """
    data = b""
    complete = True
    for chunk in message.spool.read_from(message.content_offset):
        data += chunk
        if data.startswith(CRLF) or CRLF + CRLF in data[-len(chunk) - 3:]:
            complete = False
            break
        if len(data) > HEADER_LIMIT:
            complete = False
            break
    header = HeaderSection.parse(data, complete=complete)
    if header is None or header.end > HEADER_LIMIT:
        raise RelayError(
            Reply(552, "5.3.4", f"Message header section too large to rewrite "
                                f"(limit {HEADER_LIMIT} octets)"),
            REJECTED, "DATA", None, "header section over the limit while rewriting From")
    return header
