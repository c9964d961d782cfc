"""The legacy listeners: a place for old printers and scanners (docs/devices.md).

Scan-to-mail devices outlive their TLS stacks: many speak only TLS 1.0 or 1.1, which
RFC 8996 retires and the relay's own listeners refuse, and some speak no TLS at all and
still want to log in.  Rather than weaken the listeners everybody uses, the relay can
open separate ones with a profile of their own:

* only clients from ``--legacy-networks`` are served; any other hears ``554 5.7.1``
  instead of a greeting and is closed (RFC 5321 section 3.1 lets a server refuse a
  session so), counted as a refused connection with reason ``network``;
* TLS 1.0 and up (``esmtpfa.common.servertls.legacy_policy``);
* AUTH without TLS only from ``--legacy-cleartext-auth-networks``, which must lie
  inside the legacy networks and be private address space; every other client hears
  the same ``538 5.7.11`` as on any listener.

Nothing here is on by default: without ``--legacy-plain`` or ``--legacy-tls`` no
legacy listener exists, and without ``--legacy-cleartext-auth-networks`` no password
travels in cleartext.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet import defer

from esmtpfa.common.replies import Reply
from esmtpfa.common.servertls import LEGACY_CIPHERS
from esmtpfa.limits.interfaces import IConnectionLedger
from esmtpfa.limits.ledgers import ConnectionLedgerWrapper
from esmtpfa.smtp.proxy import Network, TrustedProxies

#: The ledger's word for a client outside the listener's networks; the metrics label it
#: ``network`` (``connections_refused_total``).
NETWORK_NOT_ALLOWED = "network not allowed"
#: What such a client hears instead of the greeting (RFC 5321 section 3.1; RFC 3463
#: X.7.1: delivery not authorized).
NOT_ALLOWED = Reply(554, "5.7.1", "Connections from your address are not accepted here")


class Networks(TrustedProxies):
    """Networks a client address is looked up in (an IPv4-mapped IPv6 peer, as a
    dual-stack socket reports it, counts as its IPv4 address)."""

    def allows(self, host: str) -> bool:
        return self.trusts(host)


class NetworkGate(ConnectionLedgerWrapper):
    """An ``IConnectionLedger`` that refuses clients outside ``networks`` before the
    counts are asked: a refused client takes no slot, and the refusal reaches the
    metrics and the log's refusal summary like any limit."""

    def __init__(self, ledger: IConnectionLedger, networks: Networks):
        super().__init__(ledger)
        self.networks = networks

    def refusal(self, ip: str) -> defer.Deferred:
        if not self.networks.allows(ip):
            return defer.succeed(NETWORK_NOT_ALLOWED)
        return self._ledger.refusal(ip)


@dataclass(frozen=True)
class ListenAddress:
    """A legacy listener's own ``ADDR:PORT`` (empty address: every interface)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """``192.168.10.5:2525``, ``[fd00::25]:2525`` or ``:2525`` (every interface)."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"expected ADDR:PORT, e.g. 192.168.10.5:2525, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (ADDR:PORT)") from None
    number = int(port)
    if not 0 < number <= 65535:
        raise ValueError(f"port {number} out of range 1-65535")
    return ListenAddress(host, number)


def _whole_space(network: Network) -> bool:
    return network.prefixlen == 0


def _public(network: Network) -> bool:
    return not network.is_private


def _inside(inner: Network, outer: Network) -> bool:
    """``inner.subnet_of(outer)``, false across address families."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


@dataclass(frozen=True)
class LegacyProfile:
    """The legacy listeners' settings, checked together (``problem``)."""

    plain: ListenAddress | None = None
    tls: ListenAddress | None = None
    networks: tuple[Network, ...] = ()
    cleartext_auth: tuple[Network, ...] = ()
    ciphers: str = LEGACY_CIPHERS  # legacy_cipher_string adds the security level

    @property
    def listeners(self) -> dict[str, ListenAddress]:
        """``legacy-plain`` and ``legacy-tls``, those configured."""
        return {name: address for name, address in
                (("legacy-plain", self.plain), ("legacy-tls", self.tls)) if address}

    def problem(self, *, certificate: bool) -> str | None:
        """One line naming the setting at fault, or None; ``certificate``: whether
        ``--tls-cert`` is set.

        A legacy listener open to the whole address space would be TLS 1.0 for
        everybody, so ``/0`` is refused; cleartext passwords are only ever right on a
        private network the operator controls (a printer VLAN), so a public network
        there is refused too, and so is one outside ``--legacy-networks`` (its clients
        could never connect: a sign the two settings disagree)."""
        if not self.listeners:
            if self.cleartext_auth:
                return ("--legacy-cleartext-auth-networks applies to the legacy listeners "
                        "only: give --legacy-plain or --legacy-tls")
            return None
        if not self.networks:
            return ("--legacy-plain and --legacy-tls need --legacy-networks: the networks "
                    "of the devices allowed to connect")
        for network in self.networks:
            if _whole_space(network):
                return (f"--legacy-networks: {network} would open TLS 1.0 to every "
                        "address; name the devices' networks")
        allowed = Networks(self.networks)
        for network in self.cleartext_auth:
            if _whole_space(network) or _public(network):
                return (f"--legacy-cleartext-auth-networks: {network} is not private "
                        "address space; cleartext passwords only from a network you "
                        "control (docs/devices.md)")
            if not any(_inside(network, outer) for outer in self.networks):
                return (f"--legacy-cleartext-auth-networks: {network} is not inside "
                        f"--legacy-networks {allowed}")
        if self.tls and not certificate:
            return "--legacy-tls needs --tls-cert and --tls-key"
        return None

    def public_networks(self) -> list[Network]:
        """The legacy networks outside private address space (warned at start)."""
        return [network for network in self.networks if _public(network)]


__all__ = ["LegacyProfile", "ListenAddress", "NETWORK_NOT_ALLOWED", "NOT_ALLOWED",
           "NetworkGate", "Networks", "parse_listen_address"]
