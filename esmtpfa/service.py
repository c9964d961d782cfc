"""Assembles the relay: providers → Portal → SMTP listeners → relay, in one MultiService.

This is the only module that knows every part; each part knows only its seam
(``ICredentialsChecker``, ``IMessageDelivery``, ``IRelay``).
"""

from __future__ import annotations

import os
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from esmtpfa.logs import logger, set_level
from esmtpfa import __version__
from esmtpfa.auth.realm import SubmissionRealm
from esmtpfa.auth.selection import ProviderDirectory, ProviderSelector, ProviderSet
from esmtpfa.delivery import DeliveryPolicy, RelayDelivery
from esmtpfa.ids import new_id
from esmtpfa.providers.base import ConfigError, ProviderMeta
from esmtpfa.relay.interfaces import IRelay
from esmtpfa.smtp.factory import ConnectionLimits, SMTPServerFactory
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.tls import TLSConfigError, server_tls_options

log = logger("esmtpfa")

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"


def listen_address(addr: str) -> str:
    """Empty means every interface: IPv6 and IPv4 (dual stack) where the host has IPv6."""
    if addr:
        return addr
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::", 0))
            return "::"
        except OSError:
            pass
    return "0.0.0.0"


def server_endpoint(reactor, addr: str, port: int):
    interface = listen_address(addr)
    if ":" in interface:
        return endpoints.TCP6ServerEndpoint(reactor, port, interface=interface)
    return endpoints.TCP4ServerEndpoint(reactor, port, interface=interface)


def server_settings(options) -> ServerSettings:
    return ServerSettings(
        hostname=options["hostname"] or socket.getfqdn(),
        max_message_size=options["max-message-size"],
        max_recipients=options["max-recipients"],
        max_line_length=options["max-line-length"],
        max_auth_failures=options["max-auth-failures"],
        idle_timeout=options["idle-timeout"],
        allow_insecure_auth=options["allow-insecure-auth"],
        allow_anonymous=options["allow-anonymous-auth"],
        smtputf8=options["enable-smtp-utf8"],
        binarymime=options["enable-binary-mime"],
        requiretls=options["enable-require-tls"],
        bare_line_ends=options["bare-line-ends"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        hide_client_in_received=options["received-hide-client"],
    )


def build_relay(options, reactor, hostname: str) -> IRelay:
    from esmtpfa.relay.maildir import MaildirRelay
    from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings

    if options["relay-addr"]:
        relay = SMTPRelay(UpstreamSettings(
            host=options["relay-addr"], port=options["relay-port"],
            implicit_tls=options["relay-tls"],
            starttls="none" if options["relay-tls"] else options["relay-starttls"],
            ca_cert=options["relay-tls-ca-cert"],
            client_cert=options["relay-tls-cert"], client_key=options["relay-tls-key"],
            skip_verify=options["relay-tls-skip-verify"],
            server_name=options["relay-tls-server-name"],
            username=options["relay-user"], password=options["relay-pass"],
            allow_insecure_auth=options["relay-allow-insecure-auth"],
            helo_name=hostname,
            connect_timeout=options["relay-connect-timeout"],
            command_timeout=options["relay-timeout"],
        ), reactor=reactor)
    else:
        relay = MaildirRelay(os.path.abspath(options["maildir"]))
    if options["relay-from"]:
        from esmtpfa.relay.rewrite import RelayFromRewriter
        relay = RelayFromRewriter(relay, options["relay-from"])
    return relay


def demo_provider(reactor):
    from esmtpfa.providers.userpass import UserPassProvider
    meta = ProviderMeta(name="demo-userpass", type="userpass", fallback=True)
    return UserPassProvider.from_params(
        meta, {"username": DEMO_USER, "password": DEMO_PASSWORD}, reactor=reactor)


def load_providers(options, reactor) -> ProviderSet:
    """The startup provider set; any problem is a UsageError naming file and provider."""
    from esmtpfa.config import load_provider_file

    path = options["config"]
    explicit = not options.defaulted("config")
    providers = []
    if os.path.exists(path):
        try:
            providers = list(load_provider_file(path, reactor=reactor).providers.providers)
        except ConfigError as error:
            raise usage.UsageError(f"provider configuration: {error}") from None
    elif explicit:
        raise usage.UsageError(f"provider configuration: no such file: {path}")
    if options["demo"]:
        providers.append(demo_provider(reactor))
    try:
        return ProviderSet(providers)
    except ConfigError as error:
        raise usage.UsageError(f"provider configuration: {error}") from None


def load_tls_options(options):
    """The listeners' TLS options, or None without a certificate."""
    if not options["tls-cert"]:
        return None
    try:
        return server_tls_options(
            options["tls-cert"], options["tls-key"], options["tls-ca-cert"])
    except TLSConfigError as error:
        raise usage.UsageError(f"SMTP TLS: {error}") from None


class RelayService(MultiService):
    """The whole relay; ``directory`` is where reloads swap providers in."""

    def __init__(self, options, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.id = new_id()
        self.reactor = reactor
        self.options = options
        self.settings = server_settings(options)
        providers = options.get("provider-set") or load_providers(options, reactor)
        self.directory = ProviderDirectory(providers)
        self.relay = build_relay(options, reactor, self.settings.hostname)
        self.portal = self._portal()
        self.limits = ConnectionLimits(
            self.settings.max_connections, self.settings.max_connections_per_ip)
        self.smtp_factories: list[SMTPServerFactory] = []
        self._add_listeners()

    def _portal(self) -> Portal:
        policy = DeliveryPolicy(self.settings.hostname, self.settings.hide_client_in_received)
        realm = SubmissionRealm(lambda identity: RelayDelivery(identity, self.relay, policy))
        checkers = [ProviderSelector(self.directory)]
        if self.settings.allow_anonymous:
            checkers.append(AllowAnonymousAccess())
        return Portal(realm, checkers)

    def _factory(self, name: str, **kwargs) -> SMTPServerFactory:
        factory = SMTPServerFactory(self.settings, self.portal, name=name,
                                    limits=self.limits, reactor=self.reactor, **kwargs)
        self.smtp_factories.append(factory)
        return factory

    def _add_listeners(self) -> None:
        options = self.options
        tls_options = options.get("tls-options") or load_tls_options(options)
        if options["plain"]:
            factory = self._factory("plain", tls_options=tls_options)
            self._listen("plain", options["port"], factory)
        if options["tls"]:
            factory = self._factory("tls", tls_options=tls_options, implicit_tls=True)
            self._listen("tls", options["tls-port"],
                         TLSMemoryBIOFactory(tls_options, False, factory))

    def _listen(self, name: str, port: int, factory) -> None:
        endpoint = server_endpoint(self.reactor, self.options["addr"], port)
        service = StreamServerEndpointService(endpoint, factory)
        service._raiseSynchronously = True  # a port in use must stop startup, loudly
        service.setName(name)
        service.setServiceParent(self)

    def startService(self) -> None:
        options = self.options
        set_level(options["log-level"])
        log.info("esmtpfa {version} starting, server id {id}", version=__version__, id=self.id)
        providers = self.directory.current.providers
        log.info("{count} provider(s): {names}", count=len(providers),
                 names=", ".join(f"{p.meta.name} ({p.meta.type})" for p in providers) or "none")
        if not providers:
            log.warn("no providers configured: every AUTH will be refused")
        if options["demo"]:
            log.warn("DEMO MODE: plain listener with AUTH over cleartext; log in as "
                     "{user!r} with the demo password from the README", user=DEMO_USER)
        if self.settings.allow_anonymous:
            log.warn("--allow-anonymous-auth: mail is relayed WITHOUT authentication")
        log.info("relay: {relay}", relay=self.relay.description)
        if not (options["plain"] or options["tls"] or options["http"]):
            log.warn("no listener enabled (--plain, --tls, --http): nothing accepts mail")
        for name in ("plain", "tls"):
            if options[name]:
                port = options["port"] if name == "plain" else options["tls-port"]
                log.info("SMTP {name} listener on [{addr}]:{port}", name=name,
                         addr=listen_address(options["addr"]), port=port)
        super().startService()

    def listening_ports(self):
        """A Deferred firing with ``{listener name: IListeningPort}`` once all listen."""
        from twisted.internet.defer import gatherResults
        services = [s for s in self if isinstance(s, StreamServerEndpointService)]
        waits = [s._waitingForPort for s in services]
        names = [s.name for s in services]
        return gatherResults(waits).addCallback(lambda ports: dict(zip(names, ports)))

    def stopService(self):
        d = super().stopService()
        d.addBoth(lambda _: self.relay.close())
        d.addBoth(lambda _: self._stop_providers())
        return d

    def _stop_providers(self):
        """Close provider pools and threads (HTTP connections, LDAP connections)."""
        from twisted.internet.defer import DeferredList, maybeDeferred
        return DeferredList([maybeDeferred(p.stopProvider)
                             for p in self.directory.current.providers], consumeErrors=True)

