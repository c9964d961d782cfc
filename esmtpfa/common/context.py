"""What esmtpfa knows about the client at the moment it authenticates or submits.

The same snapshot is carried by SMTP credentials, HTTP credentials and outbound messages,
so provider selection (docs/design.md, "Provider selection") and the Received header read one source
of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


def normalize_domain(name: str | None) -> str | None:
    """Case-insensitive, trailing dot ignored (docs/design.md, "Provider selection"); empty means
    unknown."""
    if not name:
        return None
    name = name.strip().rstrip(".").lower()
    return name or None


def domain_key(name: str) -> str | None:
    """``name`` as a key that two spellings of one domain share: ``normalize_domain``,
    then IDNA 2008 A-labels with the UTS #46 mapping (``bücher.example`` and
    ``xn--bcher-kva.example`` are one key).  None for what is no valid domain name."""
    normalized = normalize_domain(name)
    if normalized is None:
        return None
    if normalized.isascii():
        return normalized
    import idna  # a dependency of Twisted's (hyperlink)
    try:
        return idna.encode(normalized, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@dataclass(frozen=True)
class ConnectionContext:
    connection_id: str
    protocol: str  # "smtp" or "http"
    peer_host: str = ""
    peer_port: int = 0
    local_host: str = ""
    local_port: int = 0
    tls: bool = False
    sni: str | None = None
    helo: str | None = None
    http_host: str | None = None
    oauth_host: str | None = None

    @property
    def connected_domain(self) -> str | None:
        """The name the client used to reach us: SNI, else EHLO (SMTP) or Host (HTTP).

        OAUTHBEARER's ``host=`` counts only when there is no SNI (RFC 7628 §3.1).
        """
        return normalize_domain(
            self.sni or self.oauth_host or self.helo or self.http_host)

    def evolve(self, **changes) -> "ConnectionContext":
        return replace(self, **changes)
