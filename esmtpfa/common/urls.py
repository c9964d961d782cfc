"""URLs that may hold a password (``--state-url``, ``--spool-url``): split and checked
without ever quoting them back, so no error, log line or ``repr`` can leak the secret.
"""

from __future__ import annotations

from typing import Iterable
from urllib.parse import SplitResult, parse_qs, urlsplit

from hyperlink import URL


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: those may carry credentials."""
    try:
        parsed = URL.from_text(url)
    except Exception:
        return "<config service>"
    return parsed.replace(userinfo="", query=(), fragment="").to_text()


def split_secret_url(text: str, schemes: tuple[str, ...]
                     ) -> tuple[SplitResult, str, str, int | None]:
    """The parts, the scheme (lower case), the host and the port (None: the scheme's
    default) of ``text``; ``ValueError`` names what is wrong, never the URL."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError("expected " + " or ".join(f"a {s}://" for s in schemes) + " URL")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if not host:
        raise ValueError("the URL names no host")
    return parts, scheme, host, port


def query_parameters(parts: SplitResult, known: Iterable[str]) -> dict[str, list[str]]:
    """The URL's query, refusing a parameter not in ``known`` (a typo is an error)."""
    query = parse_qs(parts.query)
    allowed = list(known)
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValueError(f"unknown URL parameter(s) {', '.join(unknown)} "
                         f"(known: {', '.join(allowed)})")
    return query
