"""How to reach the upstream smarthosts (flags ``-relay-*``, docs/design.md,
"The relay and the delivery guarantee") and how to pool them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from esmtpfa.relay.client_sasl import MECHANISMS, TOKEN_MECHANISMS

if TYPE_CHECKING:
    from esmtpfa.relay.oauth2 import OAuth2Settings

STARTTLS_MODES = ("opportunistic", "required", "none")


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream smarthost and how to talk to it."""

    host: str
    port: int = 25
    implicit_tls: bool = False          # RFC 8314: TLS from the first byte (port 465)
    starttls: str = "opportunistic"     # RFC 3207: "opportunistic", "required" or "none"
    ca_cert: str | None = None          # PEM bundle to trust instead of the platform store
    client_cert: str | None = None      # PEM, leaf first, then intermediates
    client_key: str | None = None
    skip_verify: bool = False           # encrypt without authenticating the upstream
    server_name: str | None = None      # SNI and certificate name; defaults to ``host``
    username: str | None = None
    password: str | None = None
    auth_mechanism: str | None = None   # force one SASL mechanism (default: the strongest)
    allow_insecure_auth: bool = False   # permit AUTH over cleartext
    helo_name: str = socket.gethostname()
    connect_timeout: float = 30.0
    command_timeout: float = 300.0      # RFC 5321 §4.5.3.2: 5 minutes
    data_timeout: float = 600.0         # RFC 5321 §4.5.3.2.6: 10 minutes for the final reply
    #: Log in with an OAuth2 access token (XOAUTH2 / OAUTHBEARER) for ``username``
    #: instead of a password; docs/oauth2.md.
    oauth2: OAuth2Settings | None = None

    def __post_init__(self) -> None:
        if self.starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {STARTTLS_MODES}, not {self.starttls!r}")
        if not self.host:
            raise ValueError("the relay host is empty")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"bad relay port {self.port}")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("a relay client certificate needs both -relay-tls-cert and -key")
        if self.auth_mechanism is not None:
            mechanism = self.auth_mechanism.upper()
            if mechanism not in MECHANISMS:
                raise ValueError(f"unsupported SASL mechanism {self.auth_mechanism!r} "
                                 f"(one of {', '.join(sorted(MECHANISMS))})")
            object.__setattr__(self, "auth_mechanism", mechanism)
        if self.oauth2 is not None:
            if not self.username:
                raise ValueError("an upstream with oauth2 needs a user (the mailbox the "
                                 "token is for)")
            if self.password:
                raise ValueError("an upstream logs in with oauth2 or a password, not both")
            if self.auth_mechanism and self.auth_mechanism not in TOKEN_MECHANISMS:
                raise ValueError(f"an oauth2 upstream logs in with "
                                 f"{' or '.join(sorted(TOKEN_MECHANISMS))}, not "
                                 f"{self.auth_mechanism}")
        elif self.auth_mechanism in TOKEN_MECHANISMS:
            raise ValueError(f"{self.auth_mechanism} needs an oauth2 block (or the "
                             "--relay-oauth2-* flags): it logs in with a token")
        for name in ("connect_timeout", "command_timeout", "data_timeout"):
            value = float(getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be positive")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "port", int(self.port))

    def __repr__(self) -> str:
        return f"UpstreamSettings({redacted(self.__dict__)})"

    @property
    def tls_server_name(self) -> str:
        return self.server_name or self.host

    @property
    def authenticates(self) -> bool:
        return bool(self.username) and self.password is not None and self.password != ""

    @property
    def uses_oauth2(self) -> bool:
        """Logs in with a token from ``relay.oauth2.TokenBroker`` (``authenticates`` is
        about passwords and stays False for such an upstream)."""
        return self.oauth2 is not None and bool(self.username)

    @property
    def uses_tls(self) -> bool:
        return self.implicit_tls or self.starttls != "none"

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def ip_version(self) -> int | None:
        """4 or 6 for an IP literal (connect without a resolver), None for a name."""
        try:
            return ipaddress.ip_address(self.host).version
        except ValueError:
            return None


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (the form ``--relay-addr`` takes)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Fields whose values a repr never shows (``oauth2`` hides its own secrets).
SECRET_FIELDS = frozenset({"password", "client_secret", "refresh_token"})


def redacted(fields: Mapping[str, Any]) -> str:
    """``name=value, …`` for a repr: the password never reaches a log line, a test
    failure or a traceback, even through a repr (docs/design.md, "Identifiers and logs")."""
    return ", ".join(f"{name}={'<redacted>' if name in SECRET_FIELDS and value else value!r}"
                     for name, value in fields.items())


@dataclass(frozen=True)
class PoolSettings:
    """Connection reuse and failover, shared by every upstream of one relay."""

    size: int = 20               # connections per upstream (busy + idle)
    idle_timeout: float = 30.0   # an unused connection is closed (QUIT) after this
    breaker_failures: int = 3    # consecutive connection-level failures that open the breaker
    breaker_cooldown: float = 30.0  # seconds an open breaker skips its upstream
    max_replays: int = 2         # re-opened transactions after a lost connection
    #: The longest a client waits for our answer to a RCPT (the first one opens the
    #: upstream transaction) and to its final dot, across every upstream, connection and
    #: replay tried for it.  RFC 5321 §4.5.3.2 gives clients 5 and 10 minutes; answering
    #: before they give up keeps them from retrying a message we may still deliver.
    rcpt_deadline: float = 240.0
    data_deadline: float = 540.0
    #: The part of ``size`` one client (an address or an identity) may hold at once; the
    #: rest stays for everybody else (docs/delivery-guarantee.md, "fair use").
    client_share: float = 0.5

    @property
    def client_cap(self) -> int:
        """Upstream sessions one client may hold at once (at least one)."""
        return max(1, int(self.size * self.client_share))

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("the pool size must be at least 1")
        if not 0 < self.client_share <= 1:
            raise ValueError("client_share must be in (0, 1]")
        for name in ("rcpt_deadline", "data_deadline"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.breaker_failures < 1:
            raise ValueError("breaker_failures must be at least 1")
        for name in ("idle_timeout", "breaker_cooldown"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")


def parse_upstream_addresses(text: str, default_port: int = 25) -> list[tuple[str, int]]:
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address, separated
    by commas; ``default_port`` applies where no port is given.  Order is preference."""
    result: list[tuple[str, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty upstream address in {text!r}")
        port = default_port
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in upstream address {item!r}")
            host, rest = item[1:end], item[end + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"unexpected {rest!r} after ']' in {item!r}")
                port = _port(rest[1:], item)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"[{host}] is not an IPv6 address") from None
        elif item.count(":") > 1:
            host = item  # a bare IPv6 address: no port possible without brackets
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{item!r} is not an IPv6 address (use [addr]:port)") from None
        elif ":" in item:
            host, _, port_text = item.partition(":")
            port = _port(port_text, item)
        else:
            host = item
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"bad upstream host in {item!r}")
        if (host.lower(), port) in {(h.lower(), p) for h, p in result}:
            raise ValueError(f"upstream {item!r} is listed twice")
        result.append((host, port))
    return result


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in upstream address {item!r}")
    return int(text)
