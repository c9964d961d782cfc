"""JSON request bodies with bounded size, nesting and number of values.

``json.loads`` builds whatever structure a body describes: 36 MB of nested empty lists
become millions of Python lists (about a gigabyte), and deep nesting ends in a
``RecursionError``.  So a body is first *scanned*: one anchored regular expression takes
one token at a time (a whole string, however long, is one match done in C), counting
nesting depth and values with no recursion, and the scan stops at the first limit
exceeded.  Only a body within the limits is handed to ``json.loads``, which then checks
the grammar.  The scan's work is bounded by the limits, not by the body: a refused body
costs a few hundred regex matches at most.

Callers parse bodies above ``JSONLimits.inline_bytes`` in a thread
(``docs/http-limits.md``); the scan and the parse hold no reactor state.  The thread
helps only because the work is bounded: a single C call (``json.loads``, one regex
match) holds the GIL throughout, so an unbounded parse would stall the reactor from
any thread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: One token after optional whitespace: a string (escapes included), an opening or
#: closing bracket, a separator, or a scalar.  Possessive quantifiers: a long string is
#: scanned once, with no backtracking state kept per character.  Numbers are bounded in
#: length (a longer one fails to match and the body is refused as invalid).
_TOKEN = re.compile(
    rb'[ \t\r\n]*+(?:'
    rb'("[^"\\]*+(?:\\.[^"\\]*+)*+")'                         # 1: string
    rb'|([\[{])'                                               # 2: open
    rb'|([\]}])'                                               # 3: close
    rb'|([,:])'                                                # 4: separator
    rb'|(-?(?:0|[1-9][0-9]{0,63})(?:\.[0-9]{1,64})?(?:[eE][+-]?[0-9]{1,4})?(?![0-9.eE])'
    rb'|true|false|null))',                                    # 5: scalar
    re.DOTALL)
_TRAILING_SPACE = re.compile(rb"[ \t\r\n]*+\Z")
_STRING, _OPEN, _CLOSE, _SEPARATOR, _SCALAR = 1, 2, 3, 4, 5


class JSONRefused(ValueError):
    """The body is not JSON, or exceeds a limit; ``str()`` says which, for the client."""


@dataclass(frozen=True)
class JSONLimits:
    max_bytes: int
    max_depth: int = 8
    max_values: int = 1024  # strings, scalars and containers, object keys included
    inline_bytes: int = 64 * 1024  # larger bodies are parsed off the reactor thread

    @property
    def max_tokens(self) -> int:
        """Separators are not values, but they cost a step each: bound them too."""
        return 2 * self.max_values + 2 * self.max_depth


def check_structure(body: bytes, limits: JSONLimits) -> None:
    """Raise ``JSONRefused`` unless ``body`` stays within ``limits`` (grammar is left to
    ``json.loads``)."""
    if len(body) > limits.max_bytes:
        raise JSONRefused(f"body larger than {limits.max_bytes} octets")
    match, position, end = _TOKEN.match, 0, len(body)
    depth = values = tokens = 0
    while position < end:
        token = match(body, position)
        if token is None:
            if _TRAILING_SPACE.match(body, position):
                break
            raise JSONRefused("body is not valid JSON")
        position = token.end()
        kind = token.lastindex
        tokens += 1
        if kind == _OPEN:
            depth += 1
            values += 1
            if depth > limits.max_depth:
                raise JSONRefused(f"body is nested deeper than {limits.max_depth} levels")
        elif kind == _CLOSE:
            depth -= 1
            if depth < 0:
                raise JSONRefused("body is not valid JSON")
        elif kind != _SEPARATOR:
            values += 1
        if values > limits.max_values or tokens > limits.max_tokens:
            raise JSONRefused(f"body has more than {limits.max_values} JSON values")


#: RFC 9110 §8.3.1: ``type "/" subtype *( OWS ";" OWS parameter )``, each parameter a
#: token ``=`` token or quoted-string; type, subtype and parameter names case-insensitive.
#: Possessive throughout: a refused header costs one pass, whatever its blanks.
_TOKEN_CHARS = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_VALUE = rb"(?:" + _TOKEN_CHARS + rb'|"(?:[^"\\]|\\.)*+")'
_MEDIA_TYPE = re.compile(rb"[ \t]*+(" + _TOKEN_CHARS + rb"/" + _TOKEN_CHARS + rb")"
                         rb"((?:[ \t]*+;[ \t]*+(?:" + _TOKEN_CHARS + rb"=" + _VALUE +
                         rb")?+)*+)[ \t]*+\Z")
_PARAMETER = re.compile(rb"(" + _TOKEN_CHARS + rb")=(" + _VALUE + rb")")


def media_type_problem(values: list[bytes] | None) -> str | None:
    """Why a request with these ``Content-Type`` field values is no JSON document, or
    None when it is one: ``application/json``, with at most a UTF-8 ``charset`` (RFC 8259
    §8.1 allows no other; other parameters mean nothing to JSON and are ignored).

    Refusing the rest is what keeps a web page from submitting with a browser's saved
    credentials: a cross-site form or ``fetch`` may only send ``text/plain``, form and
    multipart types without a CORS preflight, which this listener never answers."""
    if not values:
        return "Content-Type application/json required"
    if len(values) > 1:
        return "more than one Content-Type"
    match = _MEDIA_TYPE.match(values[0])
    if match is None:
        return "malformed Content-Type"
    if match.group(1).lower() != b"application/json":
        return "unsupported Content-Type; send application/json"
    for name, value in _PARAMETER.findall(match.group(2)):
        if name.lower() == b"charset" and value.strip(b'"').lower() not in (b"utf-8",
                                                                            b"utf8"):
            return "JSON is UTF-8 (RFC 8259 §8.1): charset must be utf-8"
    return None


def parse_json(body: bytes, limits: JSONLimits) -> Any:
    """The document in ``body``; ``JSONRefused`` for anything else (never another error:
    a malformed body is the client's fault and gets a 400)."""
    check_structure(body, limits)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JSONRefused("body is not valid JSON") from None


__all__ = ["JSONLimits", "JSONRefused", "check_structure", "media_type_problem", "parse_json"]
