"""Assembles the relay: providers → Portal → SMTP and HTTP listeners → relay, with
metrics, health and hot reload, in one MultiService.

This is the only module that knows every part; each part knows only its seam
(``ICredentialsChecker``, ``IMessageDelivery``, ``IRelay``, the observers of
``esmtpfa.web.metrics``).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from esmtpfa.common.logs import RecipientLog, logger, set_level
from esmtpfa import __version__
from esmtpfa.auth.realm import SubmissionRealm
from esmtpfa.limits.throttle import AuthThrottle, ThrottlingChecker
from esmtpfa.auth.selection import ProviderDirectory, ProviderSelector, ProviderSet
from esmtpfa.config.providers import ProviderConfig, build_providers, parse_provider_document
from esmtpfa.config.documents import read_document
from esmtpfa.common import internals
from esmtpfa.delivery.transaction import DeliveryPolicy, RelayDelivery
from esmtpfa.limits.rates import RateLimiter
from esmtpfa.auth.sendingrates import Rates
from esmtpfa.common.ids import new_id
from esmtpfa.web.metrics import RelayMetrics
from esmtpfa.common.errors import ConfigError
from esmtpfa.auth.provider import ProviderMeta
from esmtpfa.relay.interfaces import IRelay
from esmtpfa.config.reload import (
    ConfigServicePoller, FileWatcher, ProviderReloader, ReloadService, redact_url,
    stop_providers)
from esmtpfa.smtp.factory import ConnectionLimits, SMTPServerFactory, drain_listeners
from esmtpfa.smtp.proxy import ProxyProtocolFactory, TrustedProxies
from esmtpfa.runtime.sigterm import SigtermStop
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.spool.backends import SPOOL_THREADS, SpoolService, SpoolSettings, open_spool
from esmtpfa.spool.interfaces import Mode
from esmtpfa.spool.modes import DeliveryModes
from esmtpfa.spool.runner import QueueRunner, RetryPolicy
from esmtpfa.limits.ledgers import Ledgers
from esmtpfa.limits.redis import ledgers_from_options
from esmtpfa.common.certificates import (
    CertificatePair, CertificateSources, CertificateStore, CertificateWatcher)
from esmtpfa.common.servertls import MIN_VERSIONS, TLSConfigError, TLSPolicy, read_ca_certificates
from esmtpfa.common.transport import write_through
from esmtpfa.web.health import (
    SHUTTING_DOWN, Check, ListenersCheck, MaildirCheck, Readiness, SpoolCheck, TokensCheck)
from esmtpfa.web.status import RelayStatus
from esmtpfa.web.limits import HTTPLimits
from esmtpfa.web.site import metrics_listener, submission_listener

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


def server_settings(options) -> ServerSettings:
    return ServerSettings(
        hostname=options["hostname"] or socket.getfqdn(),
        max_message_size=options["max-message-size"],
        max_recipients=options["max-recipients"],
        max_line_length=options["max-line-length"],
        max_auth_failures=options["max-auth-failures"],
        idle_timeout=options["idle-timeout"],
        tls_handshake_timeout=options["tls-handshake-timeout"],
        close_grace=options["close-grace"],
        command_timeout=options["command-timeout"],
        min_data_rate=options["min-data-rate"],
        write_stall_timeout=options["write-stall-timeout"],
        send_buffer=options["client-send-buffer"],
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


def build_relay(options, reactor, hostname: str, observer=None) -> IRelay:
    """The relay the options describe; ``observer`` (the metrics) hears about OAuth2
    token refreshes."""
    from esmtpfa.relay.maildir import MaildirRelay
    from esmtpfa.relay.oauth2 import TokenBrokers
    from esmtpfa.relay.upstream import PoolSettings, SMTPRelay, UpstreamSettings

    entries = options["relay-upstreams"]
    if entries:
        defaults = dict(
            implicit_tls=options["relay-tls"],
            starttls=options["relay-starttls"],
            ca_cert=options["relay-tls-ca-cert"],
            client_cert=options["relay-tls-cert"], client_key=options["relay-tls-key"],
            skip_verify=options["relay-tls-skip-verify"],
            server_name=options["relay-tls-server-name"],
            username=options["relay-user"], password=options["relay-pass"],
            auth_mechanism=options["relay-auth-mech"],
            allow_insecure_auth=options["relay-allow-insecure-auth"],
            helo_name=hostname,
            connect_timeout=options["relay-connect-timeout"],
            command_timeout=options["relay-timeout"],
            data_timeout=options["relay-data-timeout"])
        upstreams = [UpstreamSettings(host=entry.host, port=entry.port,
                                      **_entry_settings(defaults, entry.overrides))
                     for entry in entries]
        relay = SMTPRelay(upstreams, reactor=reactor, pool=PoolSettings(
            size=options["relay-pool-size"],
            idle_timeout=options["relay-pool-idle-timeout"],
            breaker_failures=options["relay-breaker-failures"],
            breaker_cooldown=options["relay-breaker-cooldown"],
            rcpt_deadline=options["relay-rcpt-deadline"],
            data_deadline=options["relay-data-deadline"],
            client_share=options["relay-pool-client-share"]),
            tokens=TokenBrokers.for_upstreams(upstreams, reactor, observer))
    else:
        relay = MaildirRelay(os.path.abspath(options["maildir"]))
    if options["relay-from"]:
        from esmtpfa.relay.rewrite import RelayFromRewriter
        relay = RelayFromRewriter(relay, options["relay-from"])
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


def unwrap(relay: IRelay):
    """The relay and those it wraps (``RelayFromRewriter`` keeps its inner as ``inner``)."""
    while relay is not None:
        yield relay
        relay = getattr(relay, "inner", None)


def demo_config() -> ProviderConfig:
    """The ``--demo`` provider, as config: every reload keeps the same instance."""
    meta = ProviderMeta(name="demo-userpass", type="userpass", fallback=True)
    return ProviderConfig.create(meta, {"username": DEMO_USER, "password": DEMO_PASSWORD},
                                 source="--demo")


def extra_configs(options) -> list[ProviderConfig]:
    return [demo_config()] if options["demo"] else []


def load_providers(options, reactor) -> ProviderSet:
    """The startup provider set; any problem is a UsageError naming file and provider.

    With ``--config-svc`` the service is the source of providers and the file is not
    read: the first document arrives once the relay runs (``/readyz`` waits for it).
    """
    path = options["config"]
    configs: list[ProviderConfig] = []
    try:
        if not options["config-svc"] and os.path.exists(path):
            # Before the reactor runs: synchronous, within the same DocumentLimits.
            configs = parse_provider_document(read_document(path), path)
        elif not options["config-svc"] and not options.defaulted("config"):
            raise ConfigError(f"no such file: {path}")
        return build_providers([*configs, *extra_configs(options)], reactor=reactor).providers
    except ConfigError as error:
        raise usage.UsageError(f"provider configuration: {error}") from None


def load_tls_options(options, prefix: str = "tls", what: str = "SMTP TLS"
                     ) -> CertificateStore | None:
    """A listener group's certificates (``esmtpfa.common.certificates``), or None without one.
    The SMTP listeners also get the ``--tls-sni-certs``; both get the version floor and
    the ciphers."""
    if not options[prefix + "-cert"]:
        return None
    extra, directories = (options["tls-sni-certs"] or ((), ())) if prefix == "tls" else ((), ())
    try:
        ca = options["tls-ca-cert"] if prefix == "tls" else None
        policy = TLSPolicy(MIN_VERSIONS[options["tls-min-version"]], options["tls-ciphers"],
                           read_ca_certificates(ca) if ca else ())
        sources = CertificateSources(
            CertificatePair(options[prefix + "-cert"], options[prefix + "-key"]),
            extra, directories)
        return CertificateStore(sources, policy, what=what,
                                listener="smtp" if prefix == "tls" else "http")
    except TLSConfigError as error:
        raise usage.UsageError(f"{what}: {error}") from None


def upstream_label(options) -> str:
    """The ``server`` label of the upstream duration metric: where messages go."""
    entries = options["relay-upstreams"]
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
        self.options = options
        self.adopted = adopted
        self.ledgers = ledgers or Ledgers()
        self.settings = server_settings(options)
        #: ``--log-recipients``, shared by the message line and the spool's attempt line.
        self.log_recipients = RecipientLog(options["log-recipients"],
                                           (options["log-recipients-key"] or "").encode())
        self.smtp_factories: list[SMTPServerFactory] = []
        providers = options.get("provider-set") or load_providers(options, reactor)
        self.directory = ProviderDirectory(providers)
        self.metrics = RelayMetrics(
            options["metrics-namespace"], providers=lambda: self.directory.current,
            connections=self._open_connections, upstream=upstream_label(options),
            address_labels=options["metrics-address-labels"], upstreams=self.upstreams,
            http_connections=lambda: len(self._http_channels()))
        self.relay = build_relay(options, reactor, self.settings.hostname,
                                 observer=self.metrics)
        for relay in unwrap(self.relay):
            if hasattr(relay, "observers"):  # the SMTP relay reports failed attempts
                relay.observers.append(self.metrics.attempt_failed)
        self.metrics.initialise()  # the upstreams' series, now that they exist
        self.spool_service = self._spool()
        self.modes = DeliveryModes(
            self.relay, self.spool_service and self.spool_service.spool,
            self.spool_service and self.spool_service.runner,
            mode=options["delivery-mode"], ending=options["spool-undeliverable"],
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
        options = self.options
        if not options.uses_spool():
            return None
        threads = ThreadPool(minthreads=0, maxthreads=SPOOL_THREADS, name="esmtpfa-spool")
        spool = open_spool(SpoolSettings(
            options["spool-url"], options["spool-max-size"], options["spool-min-free"],
            prefetch=options["spool-concurrency"]), self.reactor, threads)
        runner = QueueRunner(
            spool, self.relay, clock=self.reactor, threads=threads,
            hostname=self.settings.hostname, retry=RetryPolicy(
                options["spool-retry-min"], options["spool-retry-max"],
                options["spool-lifetime"]),
            concurrency=options["spool-concurrency"], observer=self.metrics,
            log_recipients=self.log_recipients)
        service = SpoolService(spool, threads, runner, self.reactor,
                               stop_timeout=self.settings.close_grace)
        service.setServiceParent(self)
        return service

    @property
    def anonymous_allowed(self) -> bool:
        return self.settings.allow_anonymous or self.options["http-allow-anonymous"]

    def _portal(self) -> Portal:
        if self.options["state-url"]:  # shared by every replica: Redis wins
            login, rates = ledgers_from_options(
                self.options, self.reactor, observer=self.metrics, parent=self)
        else:  # a worker's supervisor, or (None) this process
            login, rates = self.ledgers.login, self.ledgers.rates
            if login is not None or rates is not None:
                # Another process keeps the counts: when it cannot answer in time, the
                # operator's --state-failure decides, as for Redis (esmtpfa.limits.guard).
                from esmtpfa.limits.guard import (
                    FailurePolicy, GuardedLoginLedger, GuardedRateLedger)
                policy = FailurePolicy(self.options["state-failure"], self.reactor,
                                       observer=self.metrics)
                login = login and GuardedLoginLedger(login, policy)
                rates = rates and GuardedRateLedger(rates, policy)
        policy = DeliveryPolicy(self.settings.hostname, self.settings.hide_client_in_received,
                                observer=self.metrics,
                                rates=rates or RateLimiter(self.reactor),
                                default_rates=Rates(self.options["rate-messages"],
                                                    self.options["rate-recipients"]),
                                log_recipients=self.log_recipients)
        realm = SubmissionRealm(lambda identity: RelayDelivery(
            identity, self.modes.relay_for(identity), policy))
        self.throttle = AuthThrottle(
            per_address=self.options["max-auth-failures-per-ip"],
            per_identity=self.options["max-auth-failures-per-user"],
            window=self.options["auth-failure-window"], clock=self.reactor,
            max_delay=self.options["auth-failure-max-delay"],
            ledger=login)
        checkers = [ThrottlingChecker(
            ProviderSelector(self.directory, observer=self.metrics), self.throttle)]
        if self.anonymous_allowed:
            # Each front end still enforces its own flag before an anonymous login.
            checkers.append(AllowAnonymousAccess())
        return Portal(realm, checkers)

    def _reloader(self) -> ProviderReloader:
        """Hot reload (docs/design.md §7): the config service when set, else the file."""
        options, reactor = self.options, self.reactor
        service_url = options["config-svc"]
        reloader = ProviderReloader(
            self.directory, reactor=reactor, extra=extra_configs(options),
            observer=self.metrics, loaded=not service_url)
        if self.adopted is not None:
            return reloader  # a worker: its supervisor watches and tells it (reload())
        if service_url:
            poller = ConfigServicePoller(
                service_url, reloader, interval=options["config-svc-interval"],
                timeout=options["config-svc-timeout"], token=options["config-svc-token"],
                reactor=reactor)
            ReloadService(reloader, reactor=reactor, poller=poller,
                          also=[self.reload_certificates]).setServiceParent(self)
        else:
            self.metrics.config_loaded()  # the startup load
            watcher = FileWatcher(os.path.abspath(options["config"]), reloader,
                                  interval=options["config-poll-interval"], reactor=reactor)
            ReloadService(reloader, reactor=reactor, watcher=watcher,
                          also=[self.reload_certificates]).setServiceParent(self)
        return reloader

    def _factory(self, name: str, **kwargs) -> SMTPServerFactory:
        factory = SMTPServerFactory(self.settings, self.portal, name=name,
                                    limits=self.metrics.admissions(self.limits, name),
                                    reactor=self.reactor, **kwargs)
        factory.observer = self.metrics  # TLS handshake failures, size refusals
        self.smtp_factories.append(factory)
        return factory

    def _open_connections(self) -> dict[str, int]:
        return {factory.name: len(factory.sessions) for factory in self.smtp_factories}

    def _add_listeners(self) -> None:
        options = self.options
        smtp_tls = options.get("tls-options") or load_tls_options(options)
        http_tls = options.get("http-tls-options") or load_tls_options(
            options, "http-tls", "HTTP TLS") if options["http"] else None
        self.certificates = CertificateWatcher(
            [store for store in (smtp_tls, http_tls) if store is not None],
            interval=options["tls-poll-interval"], clock=self.reactor)
        self.certificates.setServiceParent(self)
        for store in self.certificates.stores:
            store.observe(self.metrics.certificates_loaded)
        tls_options = smtp_tls and smtp_tls.tls
        if options["plain"]:
            factory = self._factory("plain", tls_options=tls_options)
            self._listen("plain", options["addr"], options["port"],
                         self._proxied("plain", factory))
        if options["tls"]:
            factory = self._factory("tls", tls_options=tls_options, implicit_tls=True)
            self._listen("tls", options["addr"], options["tls-port"], self._proxied(
                "tls", TLSMemoryBIOFactory(tls_options, False, factory)))
        if options["http"]:
            # caps (outermost, before TLS), then TLS, then the guarded HTTP channel
            listener = submission_listener(
                self.portal, self.settings, reactor=self.reactor,
                allow_anonymous=options["http-allow-anonymous"],
                limits=HTTPLimits.from_options(options), tls_options=http_tls and http_tls.tls,
                connections=self.metrics.admissions(
                    self.ledgers.http_connections
                    or HTTPLimits.from_options(options).connection_limits("http"), "http"),
                observer=self.metrics)
            self._listen("http", options["http-addr"], options["http-port"], listener)
        self.readiness = self._readiness()
        self.status = RelayStatus(
            self.metrics, self._open_connections, lambda: len(self._http_channels()),
            self.upstreams, lambda: self.reloader.applied_digest,
            lambda: len(self.directory.current), lambda: self.draining)
        if self.adopted is not None:
            return  # a worker: the supervisor serves metrics and health for all
        self._listen("metrics", options["metrics-addr"], options["metrics-port"],
                     metrics_listener(self.metrics, self.readiness, self.status,
                                      reactor=self.reactor,
                                      limits=HTTPLimits.from_options(options)))

    def _readiness(self) -> Readiness:
        """/readyz: this replica's own state, never the upstream's (docs/metrics.md,
        "Health"): every replica shares the upstream, so following it would take them
        all out of the load balancer at once."""
        checks = [("config", self.providers_ready),
                  ("listeners", ListenersCheck(lambda: [
                      s for s in self if s.name in ("plain", "tls", "http")]))]
        if self.options["relay-upstreams"]:
            checks.append(("oauth2", TokensCheck(self.upstreams)))
        else:
            checks.append(("maildir", MaildirCheck(os.path.abspath(self.options["maildir"]))))
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
        if not self.options["proxy-protocol"]:
            return factory
        return ProxyProtocolFactory(
            factory, trusted=TrustedProxies(self.options["proxy-protocol-trusted"]),
            timeout=self.settings.tls_handshake_timeout, name=name, reactor=self.reactor)

    def _listen(self, name: str, addr: str, port: int, factory) -> None:
        if self.adopted is not None:
            from esmtpfa.runtime.sockets import AdoptedPort, family_of
            AdoptedPort(self.reactor, name, self.adopted[name],
                        family_of(listen_address(addr)), factory).setServiceParent(self)
            return
        endpoint = server_endpoint(self.reactor, addr, port, self.options["listen-backlog"])
        service = internals.listening_service(endpoint, factory)  # a port in use stops startup
        service.setName(name)
        service.setServiceParent(self)

    def startService(self) -> None:
        options = self.options
        set_level(options["log-level"])
        log.info("esmtpfa {version} starting, server id {id}", version=__version__, id=self.id)
        providers = self.directory.current.providers
        log.info("{count} provider(s): {names}", count=len(providers),
                 names=", ".join(f"{p.meta.name} ({p.meta.type})" for p in providers) or "none")
        if self.adopted is not None:
            log.info("providers: reloaded when the supervisor says so (it watches "
                     "{source})", source=redact_url(options["config-svc"]) if
                     options["config-svc"] else os.path.abspath(options["config"]))
        elif options["config-svc"]:
            log.info("providers come from the config service {url}, polled every {interval:g} s "
                     "(--config is not read)", url=redact_url(options["config-svc"]),
                     interval=options["config-svc-interval"])
            if options["config-svc-token"] and options["config-svc"].lower().startswith("http:"):
                log.warn("--config-svc-token is sent over cleartext HTTP")
        else:
            log.info("providers come from {path}, checked for changes every {interval:g} s "
                     "and on SIGHUP", path=os.path.abspath(options["config"]),
                     interval=options["config-poll-interval"])
            if not providers:
                log.warn("no providers configured: every AUTH will be refused")
        for store in self.certificates.stores:
            store.log_in_use()
        if self.certificates.stores:
            log.info("certificate files checked for changes every {interval:g} s and on "
                     "SIGHUP", interval=options["tls-poll-interval"])
        if options["demo"]:
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
        if options["relay-config"]:
            log.info("relay servers read from {path}; changes to that file take a restart "
                     "(SIGHUP reloads providers only)", path=options["relay-config"])
        if not (options["plain"] or options["tls"] or options["http"]):
            log.warn("no listener enabled (--plain, --tls, --http): nothing accepts mail")
        for name in ("plain", "tls"):
            if options[name]:
                port = options["port"] if name == "plain" else options["tls-port"]
                log.info("SMTP {name} listener on [{addr}]:{port}", name=name,
                         addr=listen_address(options["addr"]), port=port)
        if options["proxy-protocol"]:
            log.info("SMTP connections start with a PROXY header, accepted from {networks}",
                     networks=TrustedProxies(options["proxy-protocol-trusted"]))
        if options["http"]:
            secure = bool(options["http-tls-cert"])
            log.info("HTTP submission listener on {scheme}://[{addr}]:{port}/",
                     scheme="https" if secure else "http",
                     addr=listen_address(options["http-addr"]), port=options["http-port"])
            if options["http-allow-anonymous"]:
                log.warn("--http-allow-anonymous: HTTP submissions without credentials are "
                         "relayed WITHOUT authentication")
            if not secure:
                log.warn("HTTP submission without --http-tls-cert: Basic credentials travel "
                         "in cleartext")
        if self.adopted is None:
            log.info("metrics and health on http://[{addr}]:{port}/metrics (/status "
                     "/healthz /readyz)", addr=listen_address(options["metrics-addr"]),
                     port=options["metrics-port"])
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
        return gatherResults(waits).addCallback(lambda ports: dict(zip(names, ports)))

    #: Set when the service stops (SIGTERM): ``/readyz`` answers 503 from then on.
    draining = False

    def stopping_already(self) -> bool:
        return self.draining

    def sigterm_received(self) -> None:
        log.info("SIGTERM: draining for up to {grace:g} s, then exiting",
                 grace=self.options["shutdown-grace"])

    def stopService(self):
        """SIGTERM (docs/smtp-limits.md, "Shutdown"): out of the load balancer's rotation,
        no new connections, the transactions in progress finish within
        ``--shutdown-grace`` (the rest hear 421), then the relay and everything else stop.
        The metrics listener serves ``/readyz`` until the end."""
        from twisted.internet.defer import gatherResults, maybeDeferred
        self.draining = True
        deadline = self.reactor.seconds() + self.options["shutdown-grace"]
        listeners = [s for s in self if s.name in ("plain", "tls", "http")]
        d = gatherResults([maybeDeferred(s.stopService) for s in listeners])
        d.addBoth(lambda _: gatherResults([
            drain_listeners(self.smtp_factories, self.options["shutdown-grace"],
                            self.reactor),
            http_requests_done(self._http_channels, deadline, self.reactor)]))
        if self.spool_service is not None:  # no new delivery attempts from the spool
            d.addBoth(lambda _: self.spool_service.pause())
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
