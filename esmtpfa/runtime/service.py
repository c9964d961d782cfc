"""Assembles the relay: providers → Portal → SMTP and HTTP listeners → relay, with
metrics, health and hot reload, in one MultiService.

This is the only module that knows every part; each part knows only its seam
(``ICredentialsChecker``, ``IMessageDelivery``, ``IRelay``, the observers of
``esmtpfa.web.metrics``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from esmtpfa import __version__
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.auth.realm import SubmissionRealm
from esmtpfa.auth.selection import ProviderDirectory, ProviderSelector, ProviderSet
from esmtpfa.common import internals
from esmtpfa.common.certificates import (
    CertificatePair,
    CertificateSources,
    CertificateStore,
    CertificateWatcher,
)
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.ids import new_id
from esmtpfa.common.logs import RecipientLog, logger, set_level
from esmtpfa.common.resources import Resources
from esmtpfa.common.servertls import (
    MIN_VERSIONS,
    TLSConfigError,
    TLSPolicy,
    legacy_policy,
    read_ca_certificates,
)
from esmtpfa.common.transport import write_through
from esmtpfa.config.documents import read_document
from esmtpfa.config.providers import ProviderConfig, build_providers, parse_provider_document
from esmtpfa.config.reload import (
    ConfigServicePoller,
    FileWatcher,
    ProviderReloader,
    ReloadService,
    redact_url,
    stop_providers,
)
from esmtpfa.delivery.transaction import DeliveryPolicy, RelayDelivery
from esmtpfa.limits.ledgers import Ledgers, RateLimiter
from esmtpfa.limits.redis import ledgers_from_settings
from esmtpfa.limits.throttle import AuthThrottle, ThrottlingChecker
from esmtpfa.relay.interfaces import IRelay
from esmtpfa.runtime.settings import ProviderSettings, RelaySettings, TLSSettings, settings_of
from esmtpfa.runtime.sigterm import SigtermStop
from esmtpfa.smtp.devices import LegacyProfile, NetworkGate, Networks
from esmtpfa.smtp.factory import ConnectionLimits, SMTPServerFactory, drain_listeners
from esmtpfa.smtp.proxy import ProxyProtocolFactory, TrustedProxies
from esmtpfa.spool.backends import SPOOL_THREADS, SpoolService, open_spool
from esmtpfa.spool.interfaces import Mode
from esmtpfa.spool.modes import DeliveryModes
from esmtpfa.spool.runner import QueueRunner
from esmtpfa.web.health import (
    SHUTTING_DOWN,
    Check,
    ListenersCheck,
    MaildirCheck,
    NamedCheck,
    Readiness,
    SpoolCheck,
    TokensCheck,
)
from esmtpfa.web.metrics import RelayMetrics
from esmtpfa.web.site import metrics_listener, submission_listener
from esmtpfa.web.status import RelayStatus

log = logger("esmtpfa")

DEMO_USER = "demo"
#: The listeners that serve clients: /readyz wants them up, a drain stops them first.
SERVING_LISTENERS = frozenset({"plain", "tls", "legacy-plain", "legacy-tls", "http"})
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


def server_endpoint(reactor, addr: str, port: int, backlog: int = 511):
    """A listening endpoint; ``backlog`` is the kernel's queue of connections not yet
    accepted (``--listen-backlog``): Twisted's default of 50 drops the handshakes of a
    burst of clients, who then wait seconds to retransmit (docs/smtp-limits.md,
    "Bursts of connections")."""
    interface = listen_address(addr)
    reactor = write_through(reactor)
    if ":" in interface:
        return endpoints.TCP6ServerEndpoint(reactor, port, backlog=backlog,
                                            interface=interface)
    return endpoints.TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)


def build_relay(settings, resources: Resources, hostname: str, observer=None) -> IRelay:
    """The relay ``settings`` (``Settings`` or the parsed options) describe, saying
    ``hostname`` in EHLO; ``observer`` (the metrics) hears about OAuth2 token
    refreshes.  An entry that does not make an ``UpstreamSettings`` is a ValueError."""
    from esmtpfa.relay.maildir import MaildirRelay
    from esmtpfa.relay.oauth2 import TokenBrokers
    from esmtpfa.relay.upstream import SMTPRelay, UpstreamSettings

    config = settings_of(settings).relay
    relay: IRelay
    if config.upstreams:
        defaults = {**config.defaults, "helo_name": hostname}
        upstreams = [UpstreamSettings(host=entry.host, port=entry.port,
                                      **_entry_settings(defaults, entry.overrides))
                     for entry in config.upstreams]
        relay = SMTPRelay(upstreams, resources=resources, pool=config.pool,
                          tokens=TokenBrokers.for_upstreams(
                              upstreams, resources=resources, observer=observer))
    else:
        relay = MaildirRelay(os.path.abspath(config.maildir), reactor=resources.reactor)
    if config.relay_from:
        from esmtpfa.relay.rewrite import RelayFromRewriter
        relay = RelayFromRewriter(relay, config.relay_from, resources=resources)
    return relay


def _entry_settings(defaults: dict, overrides) -> dict:
    """A relay file entry over the flags.  An entry that sets ``starttls`` (other than
    none) and not ``tls`` uses STARTTLS even under ``--relay-tls``; implicit TLS means no
    STARTTLS."""
    settings = {**defaults, **overrides}
    if overrides.get("starttls", "none") != "none" and "implicit_tls" not in overrides:
        settings["implicit_tls"] = False
    if settings["implicit_tls"]:
        settings["starttls"] = "none"
    return settings


@dataclass(frozen=True)
class Preloaded:
    """What ``twistd esmtpfa`` loads while it parses the options, so that a bad provider
    file or certificate is a one-line startup error (``esmtpfa.runtime.tap``): the
    relay then uses these rather than reading the files again."""

    providers: ProviderSet | None = None
    smtp_tls: CertificateStore | None = None
    http_tls: CertificateStore | None = None


def unwrap(relay: IRelay | None):
    """The relay and those it wraps (``RelayFromRewriter`` keeps its inner as ``inner``)."""
    while relay is not None:
        yield relay
        relay = getattr(relay, "inner", None)


def demo_config() -> ProviderConfig:
    """The ``--demo`` provider, as config: every reload keeps the same instance."""
    meta = ProviderMeta(name="demo-userpass", type="userpass", fallback=True)
    return ProviderConfig.create(meta, {"username": DEMO_USER, "password": DEMO_PASSWORD},
                                 source="--demo")


def extra_configs(providers: ProviderSettings) -> list[ProviderConfig]:
    return [demo_config()] if providers.demo else []


def load_providers(providers: ProviderSettings, resources: Resources) -> ProviderSet:
    """The startup provider set; any problem is a UsageError naming file and provider.

    With ``--config-svc`` the service is the source of providers and the file is not
    read: the first document arrives once the relay runs (``/readyz`` waits for it).
    """
    path = providers.config
    configs: list[ProviderConfig] = []
    try:
        if not providers.service_url and os.path.exists(path):
            # Before the reactor runs: synchronous, within the same DocumentLimits.
            configs = parse_provider_document(read_document(path), path)
        elif not providers.service_url and providers.config_given:
            raise ConfigError(f"no such file: {path}")
        return build_providers([*configs, *extra_configs(providers)],
                               resources=resources).providers
    except ConfigError as error:
        raise usage.UsageError(f"provider configuration: {error}") from None


def load_tls_options(tls: TLSSettings, what: str = "SMTP TLS", listener: str = "smtp"
                     ) -> CertificateStore | None:
    """A listener group's certificates (``esmtpfa.common.certificates``), or None without one.
    The SMTP listeners also have the ``--tls-sni-certs`` and ``--tls-ca-cert``; both get
    the version floor and the ciphers."""
    if not tls.cert:
        return None
    extra, directories = tls.sni_certs or ((), ())
    try:
        policy = TLSPolicy(MIN_VERSIONS[tls.min_version], tls.ciphers,
                           read_ca_certificates(tls.ca_cert) if tls.ca_cert else ())
        sources = CertificateSources(CertificatePair(tls.cert, tls.key or ""),
                                     extra, directories)
        return CertificateStore(sources, policy, what=what, listener=listener)
    except TLSConfigError as error:
        raise usage.UsageError(f"{what}: {error}") from None


def load_legacy_tls(tls: TLSSettings, legacy: LegacyProfile) -> CertificateStore | None:
    """The legacy listeners' certificates: the SMTP listeners' files, in contexts of
    their own at TLS 1.0 and up (docs/devices.md); None without a legacy listener or a
    certificate (``--legacy-plain`` then speaks no TLS)."""
    if not (tls.cert and legacy.listeners):
        return None
    extra, directories = tls.sni_certs or ((), ())
    try:
        policy = legacy_policy(legacy.ciphers, read_ca_certificates(tls.ca_cert)
                               if tls.ca_cert else ())
        sources = CertificateSources(CertificatePair(tls.cert, tls.key or ""),
                                     extra, directories)
        return CertificateStore(sources, policy, what="SMTP legacy TLS",
                                listener="smtp-legacy")
    except (TLSConfigError, ValueError) as error:
        raise usage.UsageError(f"SMTP legacy TLS: {error}") from None


def upstream_label(relay: RelaySettings) -> str:
    """The ``server`` label of the upstream duration metric: where messages go."""
    entries = relay.upstreams
    if not entries:
        return "maildir"
    from esmtpfa.relay.settings import host_port
    return ",".join(host_port(entry.host, entry.port) for entry in entries)


def http_requests_done(channels, deadline: float, clock, every: float = 0.1):
    """Fires once no HTTP request is in flight on ``channels()`` (or at ``deadline``):
    the drain lets a submission being uploaded or relayed finish.  Connections idle
    between requests are closed (their next request would find the relay closing).
    Channels have no completion event to wait on, so this looks every ``every`` s."""
    from twisted.internet.task import LoopingCall

    from esmtpfa.web.channel import Phase
    busy = (Phase.HEAD, Phase.LOGIN, Phase.BODY, Phase.HANDLING, Phase.UNREAD)

    def look() -> None:
        working = False
        for channel in channels():
            phase = getattr(channel, "phase", None)
            if phase is Phase.IDLE:
                channel.loseConnection()
            working = working or phase in busy
        if not working or clock.seconds() >= deadline:
            loop.stop()

    loop = LoopingCall(look)
    loop.clock = clock
    return loop.start(every, now=True).addCallback(lambda _: None)


class RelayService(SigtermStop, MultiService):
    """The whole relay; ``directory`` is where reloads swap providers in.

    A worker of a supervised relay (``esmtpfa.runtime.workers``) builds one with ``adopted``:
    the listening sockets its supervisor opened, by listener name, which it adopts
    instead of binding; it then has no metrics listener and no reload sources of its
    own (the supervisor serves and runs those for all workers).  ``ledgers`` says where
    the limits keep their counts (``esmtpfa.limits.ledgers``; in-process by default).
    """

    def __init__(self, options, reactor=None, *, adopted: Mapping[str, int] | None = None,
                 ledgers: Ledgers | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.id = new_id()
        self.reactor = reactor
        #: What every part is lent (docs/architecture.md, "Resources"): the bundle the
        #: options' preload built, so parse-time providers and the rest share it.
        self.resources: Resources = getattr(options, "resources", None) or Resources.build(
            reactor)
        #: The parsed options (twistd's own are their ``parent``), or the ``Settings``.
        self.options = options
        #: Every setting, typed (``esmtpfa.runtime.settings``).
        self.config = config = settings_of(options)
        #: What parsing already loaded (``esmtpfa.runtime.tap``), if anything.
        self.preloaded: Preloaded = getattr(options, "preloaded", None) or Preloaded()
        self.adopted = adopted
        self.ledgers = ledgers or Ledgers()
        self.settings = config.smtp.server
        #: ``--log-recipients``, shared by the message line and the spool's attempt line.
        self.log_recipients = RecipientLog(config.logging.recipients,
                                           (config.logging.recipients_key or "").encode())
        self.smtp_factories: list[SMTPServerFactory] = []
        providers = self.preloaded.providers or load_providers(config.providers, self.resources)
        self.directory = ProviderDirectory(providers)
        self.metrics = RelayMetrics(
            config.metrics.namespace, providers=lambda: self.directory.current,
            connections=self._open_connections, upstream=upstream_label(config.relay),
            address_labels=config.metrics.address_labels, upstreams=self.upstreams,
            http_connections=lambda: len(self._http_channels()))
        self.relay = build_relay(config, self.resources, self.settings.hostname,
                                 observer=self.metrics)
        for relay in unwrap(self.relay):
            if hasattr(relay, "observers"):  # the SMTP relay reports failed attempts
                relay.observers.append(self.metrics.attempt_failed)
        self.metrics.initialise()  # the upstreams' series, now that they exist
        self.spool_service = spool = self._spool()
        self.modes = DeliveryModes(
            self.relay, spool.spool if spool is not None else None,
            spool.runner if spool is not None else None,
            mode=config.delivery.mode, ending=config.delivery.undeliverable,
            observer=self.metrics)
        self.portal = self._portal()
        self.limits = self.ledgers.smtp_connections or ConnectionLimits(
            self.settings.max_connections, self.settings.max_connections_per_ip)
        self.reloader = self._reloader()
        self._add_listeners()

    def _spool(self) -> SpoolService | None:
        """The spool and its queue runner, when a delivery mode needs them: the relay's
        ``--delivery-mode``, or an explicit ``--spool-url`` for providers whose policy
        chooses a spooling mode (docs/spool.md)."""
        delivery = self.config.delivery
        if not delivery.uses_spool:
            return None
        threads = ThreadPool(minthreads=0, maxthreads=SPOOL_THREADS, name="esmtpfa-spool")
        spool = open_spool(delivery.spool, self.reactor, threads)
        runner = QueueRunner(
            spool, self.relay, clock=self.reactor, threads=threads,
            hostname=self.settings.hostname, retry=delivery.retry,
            concurrency=delivery.concurrency, observer=self.metrics,
            log_recipients=self.log_recipients)
        service = SpoolService(spool, threads, runner, self.reactor,
                               stop_timeout=self.settings.close_grace)
        service.setServiceParent(self)
        return service

    @property
    def anonymous_allowed(self) -> bool:
        return self.settings.allow_anonymous or self.config.http.allow_anonymous

    def _portal(self) -> Portal:
        config = self.config
        if config.state.url:  # shared by every replica: Redis wins
            login, rates = ledgers_from_settings(
                config.state, config.throttle, self.reactor, observer=self.metrics,
                parent=self)
        else:  # a worker's supervisor, or (None) this process
            login, rates = self.ledgers.login, self.ledgers.rates
            if login is not None or rates is not None:
                # Another process keeps the counts: when it cannot answer in time, the
                # operator's --state-failure decides, as for Redis (esmtpfa.limits.guard).
                from esmtpfa.limits.guard import (
                    FailurePolicy,
                    GuardedLoginLedger,
                    GuardedRateLedger,
                )
                failure = FailurePolicy(config.state.failure, self.reactor,
                                        observer=self.metrics)
                login = login and GuardedLoginLedger(login, failure)
                rates = rates and GuardedRateLedger(rates, failure)
        policy = DeliveryPolicy(self.settings.hostname, self.settings.hide_client_in_received,
                                observer=self.metrics,
                                rates=rates or RateLimiter(self.reactor),
                                default_rates=config.rates,
                                log_recipients=self.log_recipients,
                                in_thread=self.resources.in_thread)
        realm = SubmissionRealm(lambda identity: RelayDelivery(
            identity, self.modes.relay_for(identity), policy))
        self.throttle = AuthThrottle(
            per_address=config.throttle.per_address,
            per_identity=config.throttle.per_identity,
            window=config.throttle.window, clock=self.reactor,
            max_delay=config.throttle.max_delay,
            ledger=login)
        checkers: list[ICredentialsChecker] = [ThrottlingChecker(
            ProviderSelector(self.directory, observer=self.metrics), self.throttle)]
        if self.anonymous_allowed:
            # Each front end still enforces its own flag before an anonymous login.
            checkers.append(AllowAnonymousAccess())
        return Portal(realm, checkers)

    def _reloader(self) -> ProviderReloader:
        """Hot reload (docs/design.md, "Configuration, reload and limits"): the config service when
        set, else the file."""
        providers, reactor = self.config.providers, self.reactor
        service_url = providers.service_url
        reloader = ProviderReloader(
            self.directory, resources=self.resources, extra=extra_configs(providers),
            observer=self.metrics, loaded=not service_url)
        if self.adopted is not None:
            return reloader  # a worker: its supervisor watches and tells it (reload())
        if service_url:
            poller = ConfigServicePoller(
                service_url, reloader, interval=providers.service_interval,
                timeout=providers.service_timeout, token=providers.service_token,
                reactor=reactor, http_client=self.resources.http_client)
            ReloadService(reloader, reactor=reactor, poller=poller,
                          also=[self.reload_certificates]).setServiceParent(self)
        else:
            self.metrics.config_loaded()  # the startup load
            watcher = FileWatcher(os.path.abspath(providers.config), reloader,
                                  interval=providers.poll_interval, reactor=reactor)
            ReloadService(reloader, reactor=reactor, watcher=watcher,
                          also=[self.reload_certificates]).setServiceParent(self)
        return reloader

    def _factory(self, name: str, ledger=None, **kwargs) -> SMTPServerFactory:
        factory = SMTPServerFactory(self.settings, self.portal, name=name,
                                    limits=self.metrics.admissions(ledger or self.limits,
                                                                   name),
                                    reactor=self.reactor, **kwargs)
        factory.observer = self.metrics  # TLS handshake failures, size refusals
        self.smtp_factories.append(factory)
        return factory

    def _open_connections(self) -> dict[str, int]:
        return {factory.name: len(factory.sessions) for factory in self.smtp_factories}

    def _add_listeners(self) -> None:
        config = self.config
        smtp, http = config.smtp, config.http
        smtp_tls = self.preloaded.smtp_tls or load_tls_options(smtp.tls)
        http_tls = self.preloaded.http_tls or load_tls_options(
            http.tls, "HTTP TLS", "http") if http.enabled else None
        legacy_tls = load_legacy_tls(smtp.tls, smtp.legacy)
        self.certificates = CertificateWatcher(
            [store for store in (smtp_tls, http_tls, legacy_tls) if store is not None],
            interval=smtp.tls.poll_interval, clock=self.reactor)
        self.certificates.setServiceParent(self)
        for store in self.certificates.stores:
            store.observe(self.metrics.certificates_loaded)
        tls_options = smtp_tls.tls if smtp_tls is not None else None
        if smtp.plain:
            factory = self._factory("plain", tls_options=tls_options)
            self._listen("plain", smtp.addr, smtp.port, self._proxied("plain", factory))
        if smtp.tls_enabled:
            assert tls_options is not None  # the options refuse --tls without --tls-cert
            factory = self._factory("tls", tls_options=tls_options, implicit_tls=True)
            self._listen("tls", smtp.addr, smtp.tls_port, self._proxied(
                "tls", TLSMemoryBIOFactory(tls_options, False, factory)))
        self._add_legacy_listeners(smtp.legacy, legacy_tls)
        if http.enabled:
            # caps (outermost, before TLS), then TLS, then the guarded HTTP channel
            listener = submission_listener(
                self.portal, self.settings, resources=self.resources,
                allow_anonymous=http.allow_anonymous,
                limits=http.limits, tls_options=http_tls and http_tls.tls,
                connections=self.metrics.admissions(
                    self.ledgers.http_connections
                    or http.limits.connection_limits("http"), "http"),
                observer=self.metrics)
            self._listen("http", http.addr, http.port, listener)
        self.readiness = self._readiness()
        self.status = RelayStatus(
            self.metrics, self._open_connections, lambda: len(self._http_channels()),
            self.upstreams, lambda: self.reloader.applied_digest,
            lambda: len(self.directory.current), lambda: self.draining)
        if self.adopted is not None:
            return  # a worker: the supervisor serves metrics and health for all
        self._listen("metrics", config.metrics.addr, config.metrics.port,
                     metrics_listener(self.metrics, self.readiness, self.status,
                                      reactor=self.reactor, limits=http.limits))

    def _add_legacy_listeners(self, legacy: LegacyProfile, store) -> None:
        """The listeners for old devices (docs/devices.md): only their networks, TLS 1.0
        and up, cleartext AUTH where the profile allows it.  No PROXY header: devices
        connect directly, and the network check must see their own addresses."""
        tls_options = store and store.tls
        gate = NetworkGate(self.limits, Networks(legacy.networks))
        cleartext = Networks(legacy.cleartext_auth) if legacy.cleartext_auth else None
        for name, address in legacy.listeners.items():
            implicit = name == "legacy-tls"
            factory = self._factory(name, ledger=gate, tls_options=tls_options,
                                    implicit_tls=implicit, cleartext_auth=cleartext)
            self._listen(name, address.host, address.port,
                         TLSMemoryBIOFactory(tls_options, False, factory)
                         if implicit else factory)

    def _log_legacy(self, legacy: LegacyProfile) -> None:
        """One warning per legacy listener, naming it and who it serves."""
        cleartext = (f"cleartext AUTH from {Networks(legacy.cleartext_auth)}"
                     if legacy.cleartext_auth else "AUTH only over TLS")
        tls = ("TLS 1.0 and 1.1 allowed" if self.config.smtp.tls.cert
               else "no TLS (no --tls-cert)")
        for name, address in legacy.listeners.items():
            log.warn("SMTP {name} listener on [{addr}]:{port} for old devices: {tls}, "
                     "only from {networks}; {cleartext} (docs/devices.md)",
                     name=name, addr=listen_address(address.host), port=address.port,
                     tls=tls, networks=Networks(legacy.networks), cleartext=cleartext)
        public = legacy.public_networks() if legacy.listeners else []
        if public:
            log.warn("--legacy-networks includes public address space ({networks}): "
                     "prefer a printer VLAN", networks=Networks(tuple(public)))

    def _readiness(self) -> Readiness:
        """/readyz: this replica's own state, never the upstream's (docs/metrics.md,
        "Health"): every replica shares the upstream, so following it would take them
        all out of the load balancer at once."""
        checks: list[NamedCheck]
        checks = [("config", self.providers_ready),
                  ("listeners", ListenersCheck(lambda: [
                      s for s in self if s.name in SERVING_LISTENERS]))]
        if self.config.relay.upstreams:
            checks.append(("oauth2", TokensCheck(self.upstreams)))
        else:
            checks.append(("maildir", MaildirCheck(os.path.abspath(self.config.relay.maildir))))
        if self.spool_service is not None and self.modes.mode != Mode.PASSTHROUGH:
            checks.append(("spool", SpoolCheck(self.spool_service.spool)))
        return Readiness(checks)

    def upstreams(self) -> list:
        """The configured upstreams (their pools and breakers), for metrics and status."""
        from esmtpfa.relay.upstream import SMTPRelay
        relay = getattr(self, "relay", None)  # asked while the relay is being built
        if relay is None:
            return []
        return [u for r in unwrap(relay) if isinstance(r, SMTPRelay) for u in r.upstreams]

    def reload_certificates(self) -> None:
        """SIGHUP (and, with ``--workers``, the supervisor's word): every certificate
        file read again; the new ones serve the next handshakes."""
        self.certificates.reload_now()

    def providers_ready(self) -> Check:
        if self.draining:
            return SHUTTING_DOWN  # /readyz: 503 at once, nothing else asked
        if not self.reloader.loaded:
            return Check(False, "waiting for the first document from the config service")
        count = len(self.directory.current)
        if count:
            return Check(True, f"{count} provider(s) loaded")
        if self.anonymous_allowed:
            return Check(True, "no providers; anonymous submission is allowed")
        return Check(False, "no providers configured: every login is refused")

    def _proxied(self, name: str, factory):
        """With ``--proxy-protocol``, the PROXY header is read first, outside TLS: a proxy
        sends it before the client's TLS handshake (docs/smtp-limits.md)."""
        if not self.config.smtp.proxy_protocol:
            return factory
        return ProxyProtocolFactory(
            factory, trusted=TrustedProxies(self.config.smtp.proxy_trusted),
            timeout=self.settings.tls_handshake_timeout, name=name, reactor=self.reactor)

    def _listen(self, name: str, addr: str, port: int, factory) -> None:
        if self.adopted is not None:
            from esmtpfa.runtime.sockets import AdoptedPort, family_of
            AdoptedPort(self.reactor, name, self.adopted[name],
                        family_of(listen_address(addr)), factory).setServiceParent(self)
            return
        endpoint = server_endpoint(self.reactor, addr, port,
                                   self.config.process.listen_backlog)
        service = internals.listening_service(endpoint, factory)  # a port in use stops startup
        service.setName(name)
        service.setServiceParent(self)

    def startService(self) -> None:
        config = self.config
        providers_from = config.providers
        set_level(config.logging.level)
        log.info("esmtpfa {version} starting, server id {id}", version=__version__, id=self.id)
        providers = self.directory.current.providers
        log.info("{count} provider(s): {names}", count=len(providers),
                 names=", ".join(f"{p.meta.name} ({p.meta.type})" for p in providers) or "none")
        if self.adopted is not None:
            log.info("providers: reloaded when the supervisor says so (it watches "
                     "{source})", source=redact_url(providers_from.service_url) if
                     providers_from.service_url else os.path.abspath(providers_from.config))
        elif providers_from.service_url:
            log.info("providers come from the config service {url}, polled every {interval:g} s "
                     "(--config is not read)", url=redact_url(providers_from.service_url),
                     interval=providers_from.service_interval)
            if (providers_from.service_token
                    and providers_from.service_url.lower().startswith("http:")):
                log.warn("--config-svc-token is sent over cleartext HTTP")
        else:
            log.info("providers come from {path}, checked for changes every {interval:g} s "
                     "and on SIGHUP", path=os.path.abspath(providers_from.config),
                     interval=providers_from.poll_interval)
            if not providers:
                log.warn("no providers configured: every AUTH will be refused")
        for store in self.certificates.stores:
            store.log_in_use()
        if self.certificates.stores:
            log.info("certificate files checked for changes every {interval:g} s and on "
                     "SIGHUP", interval=config.smtp.tls.poll_interval)
        if config.demo:
            log.warn("DEMO MODE: plain listener with AUTH over cleartext; log in as "
                     "{user!r} with the demo password from the README", user=DEMO_USER)
        if self.settings.allow_anonymous:
            log.warn("--allow-anonymous-auth: mail is relayed WITHOUT authentication")
        log.info("relay: {relay}", relay=self.relay.description)
        if self.spool_service is not None:
            log.info("delivery mode {mode} (per provider: its policy); spool {spool}, "
                     "undeliverable mail is {ending}", mode=self.modes.mode,
                     spool=self.spool_service.spool.description,
                     ending={"bounce": "bounced", "hold": "held"}[self.modes.ending])
        if config.relay.config_file:
            log.info("relay servers read from {path}; changes to that file take a restart "
                     "(SIGHUP reloads providers only)", path=config.relay.config_file)
        listeners = {listener.name: listener for listener in config.listeners()}
        if not any(listeners[name].enabled for name in ("plain", "tls", "http")) and (
                not config.smtp.legacy.listeners):
            log.warn("no listener enabled (--plain, --tls, --http): nothing accepts mail")
        for name in ("plain", "tls"):
            if listeners[name].enabled:
                log.info("SMTP {name} listener on [{addr}]:{port}", name=name,
                         addr=listen_address(listeners[name].addr),
                         port=listeners[name].port)
        self._log_legacy(config.smtp.legacy)
        if config.smtp.proxy_protocol:
            log.info("SMTP connections start with a PROXY header, accepted from {networks}",
                     networks=TrustedProxies(config.smtp.proxy_trusted))
        if config.http.enabled:
            secure = bool(config.http.tls.cert)
            log.info("HTTP submission listener on {scheme}://[{addr}]:{port}/",
                     scheme="https" if secure else "http",
                     addr=listen_address(config.http.addr), port=config.http.port)
            if config.http.allow_anonymous:
                log.warn("--http-allow-anonymous: HTTP submissions without credentials are "
                         "relayed WITHOUT authentication")
            if not secure:
                log.warn("HTTP submission without --http-tls-cert: Basic credentials travel "
                         "in cleartext")
        if self.adopted is None:
            log.info("metrics and health on http://[{addr}]:{port}/metrics (/status "
                     "/healthz /readyz)", addr=listen_address(config.metrics.addr),
                     port=config.metrics.port)
        self.install_sigterm()
        super().startService()
        for relay in unwrap(self.relay):
            tokens = getattr(relay, "tokens", None)
            if tokens:  # OAuth2 upstreams: a token before the first message needs it
                tokens.start()

    def listening_ports(self):
        """A Deferred firing with ``{listener name: IListeningPort}`` once all listen."""
        from twisted.internet.defer import gatherResults
        services = [s for s in self if isinstance(s, StreamServerEndpointService)]
        waits = [internals.port_of(s) for s in services]
        names = [s.name for s in services]
        return gatherResults(waits).addCallback(lambda ports: dict(zip(names, ports, strict=True)))

    #: Set when the service stops (SIGTERM): ``/readyz`` answers 503 from then on.
    draining = False

    def stopping_already(self) -> bool:
        return self.draining

    def sigterm_received(self) -> None:
        log.info("SIGTERM: draining for up to {grace:g} s, then exiting",
                 grace=self.config.process.shutdown_grace)

    def stopService(self):
        """SIGTERM (docs/smtp-limits.md, "Shutdown"): out of the load balancer's rotation,
        no new connections, the transactions in progress finish within
        ``--shutdown-grace`` (the rest hear 421), then the relay and everything else stop.
        The metrics listener serves ``/readyz`` until the end."""
        from twisted.internet.defer import gatherResults, maybeDeferred
        self.draining = True
        grace = self.config.process.shutdown_grace
        deadline = self.reactor.seconds() + grace
        listeners = [s for s in self if s.name in SERVING_LISTENERS]
        d = gatherResults([maybeDeferred(s.stopService) for s in listeners])
        d.addBoth(lambda _: gatherResults([
            drain_listeners(self.smtp_factories, grace, self.reactor),
            http_requests_done(self._http_channels, deadline, self.reactor)]))
        spool = self.spool_service
        if spool is not None:  # no new delivery attempts from the spool
            d.addBoth(lambda _: spool.pause())
        d.addBoth(lambda _: self._close_relay(deadline))
        d.addBoth(lambda _: MultiService.stopService(self))
        d.addBoth(lambda _: stop_providers(self.directory.current.providers))
        d.addBoth(self.restore_sigterm)
        return d

    def _http_channels(self) -> list:
        """The HTTP submission listener's open channels (inside TLS when it has TLS)."""
        listener = self.namedServices.get("http")
        wrappers = getattr(getattr(listener, "factory", None), "protocols", {})
        return [getattr(w.wrappedProtocol, "wrappedProtocol", w.wrappedProtocol)
                for w in list(wrappers)]

    def _close_relay(self, deadline: float):
        """Wait for the relay's work in flight (HTTP submissions too) up to the drain's
        deadline plus ``close_grace``.  What is still running then is abandoned with the
        process: its SMTP clients were already answered 451 or 421, never 250."""
        from twisted.internet.defer import TimeoutError
        wait = max(deadline - self.reactor.seconds(), 0.0) + self.settings.close_grace
        d = self.relay.close().addTimeout(wait, self.reactor)

        def abandoned(failure):
            failure.trap(TimeoutError)
            log.warn("relay work still in flight after {wait:g} s: abandoned at exit",
                     wait=wait)
        return d.addErrback(abandoned)
