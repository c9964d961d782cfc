"""SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 3463, RFC 2034).

One small value type shared by the server (what we answer), the upstream client (what the
upstream answered us) and the HTTP API (which maps replies to statuses), so a rejection can
travel from the upstream to the client without being re-invented on the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") or [""]

    def to_bytes(self) -> bytes:
        """Wire form: each line carries the code and, when known, the enhanced code."""
        # Replies are constants more often than not: encoded once, kept on the instance
        # (a plain dict read: ``cached_property`` takes a lock on every first use, and
        # the reply to each message is a new instance).
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.__dict__["_wire"] = self._encode()
        return wire

    def _encode(self) -> bytes:
        lines = self.lines()
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for index, line in enumerate(lines):
            separator = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{separator}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        joined = " / ".join(self.lines())
        return f"{self.code} {self.enhanced} {joined}".replace("  ", " ")

    @classmethod
    def parse(cls, code: int, lines: list[bytes]) -> "Reply":
        """Build from an upstream's reply lines (without code prefixes).

        The enhanced code is taken from the first line when the server sent one; otherwise
        the class default (RFC 3463 X.0.0) is used so our own client always sees one.
        """
        if len(lines) == 1:  # the common case, without the loop
            raw = lines[0]
            match = _ENHANCED.match(raw)
            if match:
                return cls(code, match.group(0).strip().decode("ascii"),
                           raw[match.end():].decode("utf-8", "replace"))
            return cls(code, f"{code // 100}.0.0" if code >= 200 else "",
                       raw.decode("utf-8", "replace"))
        enhanced = ""
        texts = []
        for index, raw in enumerate(lines):
            match = _ENHANCED.match(raw)
            if match and (index == 0 or enhanced):
                if index == 0:
                    enhanced = match.group(0).strip().decode("ascii")
                raw = raw[match.end():]
            texts.append(raw.decode("utf-8", "replace"))
        if not enhanced and code >= 200:
            enhanced = f"{code // 100}.0.0"
        return cls(code, enhanced, "\n".join(texts))


class SMTPReplyError(Exception):
    """Raised anywhere below the server to make it answer with ``reply``."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


# Replies the server uses in more than one place.  Texts cite the RFC where a client
# author would want to look.
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot decode the authentication response")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
