"""Sending rates as a policy states them: ``100/1h``, ``messages: 100/1h, recipients:
1000/1d`` (docs/policy.md).

These are values, parsed once where a policy, an LDAP attribute, a JWT claim or the
command line names them; ``esmtpfa.limits.rates`` counts against them.  They sit beside
the policy because a policy is where a rate is promised, and below the limits because
every counter needs to read one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*$")
_PAIR = re.compile(r"(messages|recipients)\s*[:=]\s*([^,;\s}]+(?:\s*/\s*[^,;\s}]+)?)")


class RateSyntaxError(ValueError):
    """A rate that does not read like ``100/1h`` (what was wrong, for a load error)."""


@dataclass(frozen=True)
class Limit:
    """At most ``count`` events in any ``window`` seconds."""

    count: int
    window: float

    @classmethod
    def parse(cls, text: Any) -> "Limit":
        match = _LIMIT.match(str(text))
        if match is None:
            raise RateSyntaxError(
                f"{text!r} is not a rate like 100/1h (a count, '/', a number of s, m, h or d)")
        count, amount, unit = int(match.group(1)), int(match.group(2) or 1), match.group(3)
        if amount <= 0:
            raise RateSyntaxError(f"{text!r}: the window must be longer than zero")
        return cls(count, float(amount * _UNITS[unit]))

    def __str__(self) -> str:
        for unit in ("d", "h", "m"):
            if self.window % _UNITS[unit] == 0:
                return f"{self.count}/{int(self.window // _UNITS[unit])}{unit}"
        return f"{self.count}/{int(self.window)}s"


@dataclass(frozen=True)
class Rates:
    """The limits of one identity; None means unlimited."""

    messages: Limit | None = None
    recipients: Limit | None = None

    @classmethod
    def parse(cls, value: Any) -> "Rates":
        """From a config mapping (``{messages: 100/1h, recipients: 1000/1d}``), or from
        the same written as a string, as an LDAP attribute or a JWT claim carries it
        (``messages=100/1h, recipients=1000/1d``; ``:`` works as well as ``=``)."""
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"messages", "recipients"})
            if unknown:
                raise RateSyntaxError(f"unknown rate key(s) {unknown}: expected messages "
                                      f"and/or recipients")
            pairs = dict(value)
        elif isinstance(value, str):
            pairs = dict(_PAIR.findall(value))
            if not pairs:
                raise RateSyntaxError(f"{value[:80]!r} names no messages=… or recipients=… rate")
        else:
            raise RateSyntaxError(f"expected a mapping or a string, got {type(value).__name__}")
        return cls(
            messages=Limit.parse(pairs["messages"]) if pairs.get("messages") is not None
            else None,
            recipients=Limit.parse(pairs["recipients"])
            if pairs.get("recipients") is not None else None)

    def or_else(self, default: "Rates") -> "Rates":
        """Each limit of ours, else the default's."""
        return Rates(self.messages or default.messages, self.recipients or default.recipients)

    @property
    def unlimited(self) -> bool:
        return self.messages is None and self.recipients is None


__all__ = ["Limit", "RateSyntaxError", "Rates"]
