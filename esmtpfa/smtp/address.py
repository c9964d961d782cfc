"""Parsing of MAIL FROM / RCPT TO arguments (RFC 5321 §4.1.2, RFC 6531 for UTF-8).

Addresses are validated strictly enough that nothing we forward upstream can carry a
line break, a NUL or unbalanced brackets, and leniently enough for real clients (a space
after the colon, a missing pair of angle brackets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from esmtpfa.common.replies import Reply, SMTPReplyError

#: The local part's grammar (RFC 5322 §3.4.1, with RFC 6532 §3.2's UTF-8): a dot-atom or
#: a quoted-string.  Also what the spool's bounces check a sender against (spool.dsn).
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]"
DOT_ATOM = rf"{ATEXT}+(?:\.{ATEXT}+)*"
QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*"'
_LABEL = (r"[A-Za-z0-9\u0080-\U0010FFFF]"
          r"(?:[A-Za-z0-9\-\u0080-\U0010FFFF]*[A-Za-z0-9\u0080-\U0010FFFF])?")
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]"
# \Z, not $: "$" also matches before a final LF, which would let "a@b\n" pass.
_MAILBOX = re.compile(rf"^(?:{DOT_ATOM}|{QUOTED_STRING})@(?:{_DOMAIN}|{_LITERAL})\Z")
_SOURCE_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010FFFF]+))?$")

# RFC 5321 §4.5.3.1: local-part 64, domain 255, path 256 octets.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")


@dataclass(frozen=True)
class PathArgument:
    address: str  # "" for the null reverse-path
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()


def _split_path(rest: str) -> tuple[str, str]:
    """Split ``<path> params`` honouring quoted local parts that may contain '>'."""
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params
    if '"' not in rest:  # no quoted local part (nearly every address): the first '>'
        end = rest.find(">")
        if end < 0:
            raise SMTPReplyError(SYNTAX)
        return rest[1:end], rest[end + 1:]
    in_quotes = escaped = False
    for index, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return rest[1:index], rest[index + 1:]
    raise SMTPReplyError(SYNTAX)


def valid_mailbox(address: str) -> bool:
    if not _MAILBOX.match(address):
        return False
    local, _, domain = address.rpartition("@")
    return (len(local.encode()) <= MAX_LOCAL and len(domain.encode()) <= MAX_DOMAIN
            and len(address.encode()) <= MAX_PATH - 2)


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        match = _PARAM.match(token)
        if not match:
            raise SMTPReplyError(Reply(501, "5.5.4", f"Malformed parameter {token[:40]!r}"))
        key = match.group(1).upper()
        if key in params:
            raise SMTPReplyError(Reply(501, "5.5.4", f"Duplicate parameter {key}"))
        params[key] = match.group(2)
    return params


def parse_path_argument(argument: str, keyword: str, bad_address: Reply) -> PathArgument:
    """Parse ``FROM:<addr> PARAMS`` or ``TO:<addr> PARAMS``.

    ``bad_address`` is the reply for a syntactically broken mailbox (501 5.1.7 for the
    sender, 501 5.1.3 for a recipient, RFC 3463).
    """
    head = keyword + ":"
    if not argument[:len(head)].upper() == head:
        raise SMTPReplyError(SYNTAX)
    rest = argument[len(head):].lstrip(" ")
    if not rest:
        raise SMTPReplyError(SYNTAX)
    path, params_text = _split_path(rest)
    if params_text and not params_text.startswith(" ") and rest.startswith("<"):
        raise SMTPReplyError(SYNTAX)
    path = _SOURCE_ROUTE.sub("", path, count=1)  # RFC 5321 §4.1.2: ignore source routes
    if path and not valid_mailbox(path):
        raise SMTPReplyError(bad_address)
    return PathArgument(path, parse_params(params_text))
