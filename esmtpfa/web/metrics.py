"""The relay's Prometheus metrics (docs/design.md, "Metrics"), one ``CollectorRegistry`` per
``RelayService``.

The original esmtpfa's metric names, types and label names are kept, so its dashboards
keep working; what they count is defined in ``docs/metrics.md``.  Three things differ on
purpose:

* **no addresses by default** — who mails whom is private, and ``/metrics`` is read by
  whoever can reach it, without authentication.  The original's address-labelled series
  (``ADDRESS_SERIES``) are not even registered unless ``address_labels`` is above zero
  (``--metrics-address-labels``); the per-address detail is in the log lines;
* **bounded labels** — a label value never comes straight from client input.  Provider
  labels are configured provider names (or ``none`` / ``anonymous``), never the AUTH
  username; opted-in ``from``/``to`` labels are addresses of *authenticated* senders,
  the first ``address_labels`` distinct values of each, and ``other`` after that;
* **no stale series** — ``configured_providers`` and the active-connection gauge are read
  from the live objects at scrape time, so a removed provider's series disappears.

Names follow Prometheus's conventions (``_total`` on every counter, base units): the
original's ``connections_total``, which counted login verdicts, is ``logins_total``, and
its ``mail_from_to`` is ``mail_from_to_total``.  Series whose labels are known at start
(configured providers and upstreams, fixed outcomes, the listeners) exist from the first
scrape with 0, so ``rate()`` and ``absent()`` work before the first event.

The registry is rendered by ``render()`` rather than ``generate_latest``, which writes
``_created`` samples (noise here) and no Go-style ``untyped``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from esmtpfa import __version__
from esmtpfa.auth.selection import VIA_FALLBACK, ProviderSet
from esmtpfa.common.logs import logger
from esmtpfa.common.message import Envelope
from esmtpfa.limits.ledgers import ConnectionLedgerWrapper

log = logger("esmtpfa.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Label value for anything past the address bound, and for anonymous submissions.
OTHER = "other"
#: ``provider`` label when no provider gave a verdict (unknown username, no fallback).
NONE = "none"

#: The original's buckets for the upstream duration (up to 10 minutes: slow smarthosts).
UPSTREAM_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 15, 20, 25, 30, 35,
                    40, 45, 50, 55, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600)
AUTH_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

#: Selector outcomes → the original's label values.
_AUTH_STATUS = {"accepted": "valid", "rejected": "invalid", "unavailable": "unavailable"}
_FALLBACK_STATUS = {"accepted": "1", "rejected": "0", "unavailable": "unavailable"}

#: Kinds of relayed message (outcome, provider, sender, recipients) whose series are
#: kept ready; past this many the cache starts over (client input: it must be bounded).
SERIES_CACHE = 4096

#: The original's series labelled with envelope addresses: served only on opt-in.
ADDRESS_SERIES = ("bytes_sent_from_address_total", "bytes_sent_to_address_total",
                  "mail_from_to_total")

#: Closed label sets, initialised to 0 at start (``RelayMetrics.initialise``).
RELAY_OUTCOMES = ("accepted", "rejected", "unavailable", "error")
RELOAD_SOURCES = ("file", "service")
TOKEN_RESULTS = ("ok", "refused", "unavailable", "malformed")
#: Why a connection was refused (``connections_refused_total{reason}``): the ledger's
#: two limits, or ``unavailable`` when the count could not be had (``--workers``).
REFUSAL_REASONS = {"total limit": "total_limit", "per-address limit": "per_address_limit",
                   "network not allowed": "network"}  # a legacy listener's networks
UNAVAILABLE = "unavailable"
#: Circuit breaker states (``esmtpfa.common.breaker``), one 0/1 series each.
BREAKER_STATES = ("closed", "half-open", "open")


class BoundedLabels:
    """First come, first kept: at most ``limit`` distinct values are admitted as labels.

    Addresses are chosen by clients (even authenticated ones), so an unbounded label
    would let one sender create a series per random recipient.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._kept: set = set()

    def admit(self, value) -> bool:
        if value in self._kept:
            return True
        if len(self._kept) < self.limit:
            self._kept.add(value)
            return True
        return False


def address_label(address: str) -> str:
    return address.lower() if address else "<>"


class RelayMetrics:
    """Every metric of one relay, and the observer methods the relay's parts call.

    ``checked``/``unmatched`` implement ``auth.selection.AuthObserver``; ``relayed``
    implements ``delivery.DeliveryObserver``; ``config_reloaded``/``config_loaded`` are
    called by ``reload``.
    """

    def __init__(self, namespace: str = "esmtpfa", *,
                 providers: Callable[[], ProviderSet] = ProviderSet,
                 connections: Callable[[], Mapping[str, int]] = dict,
                 upstream: str = "", address_labels: int = 0,
                 upstreams: Callable[[], Iterable[Any]] = tuple,
                 http_connections: Callable[[], int] | None = None,
                 process: bool = True):
        self.namespace = namespace
        self.upstream = upstream
        self.registry = CollectorRegistry()
        self._providers = providers
        self._upstreams = upstreams
        #: Reloads applied since start (the startup load is generation 1): ``/status``.
        self.config_generation = 0
        #: Whether the last load attempt succeeded (``/status``).
        self.config_ok = True
        #: upstream -> result of its last token request (``/status``).
        self.token_results: dict[str, str] = {}
        self._from = BoundedLabels(address_labels)
        self._to = BoundedLabels(address_labels)
        self._pairs = BoundedLabels(address_labels)
        self._children: dict = {}  # (id(metric), labels) -> labelled child
        self._series: dict = {}  # what relayed() updates, per kind of message

        def counter(name, doc, labels):
            return Counter(name, doc, labels, namespace=namespace, registry=self.registry)

        # -- the original's metrics ------------------------------------------------------
        self.logins = counter(
            "logins_total", "Login verdicts (SMTP AUTH, HTTP Basic) by provider and status",
            ["provider", "status"])
        self.fallback_connections = counter(
            "fallback_connections_total", "Fallback provider checks by provider and status",
            ["provider", "status"])
        self.auth_successes = counter(
            "auth_successes_total", "Successful authentications by provider", ["provider"])
        self.auth_failures = counter(
            "auth_failures_total", "Refused credentials by provider", ["provider"])
        self.bytes_sent = counter(
            "bytes_sent_total", "Octets of messages the upstream accepted, by provider",
            ["provider"])
        self.messages_sent = counter(
            "messages_sent_total", "Messages the upstream accepted, by provider", ["provider"])
        #: The address-labelled series (``ADDRESS_SERIES``), or None: not registered.
        self.bytes_from: Counter | None = None
        self.bytes_to: Counter | None = None
        self.mail_from_to: Counter | None = None
        if address_labels > 0:
            self.bytes_from = counter(
                "bytes_sent_from_address_total",
                "Octets of messages the upstream accepted, by provider and sender",
                ["provider", "from"])
            self.bytes_to = counter(
                "bytes_sent_to_address_total",
                "Octets of messages the upstream accepted, by provider and recipient",
                ["provider", "to"])
            self.mail_from_to = counter(
                "mail_from_to_total",
                "Sender/recipient pairs of relayed messages (status 1: accepted)",
                ["from", "to", "status"])
        self.upstream_duration = Histogram(
            "smtp_server_request_duration_seconds",
            "Time the upstream took to accept or refuse a message (status 1: accepted)",
            ["server", "status"], namespace=namespace, registry=self.registry,
            buckets=UPSTREAM_BUCKETS)
        # -- additions ------------------------------------------------------------------
        self.auth_duration = Histogram(
            "auth_duration_seconds", "Time a provider took to answer a check",
            ["provider", "outcome"], namespace=namespace, registry=self.registry,
            buckets=AUTH_BUCKETS)
        self.relay_outcomes = counter(
            "relay_outcomes_total",
            "Messages handed to the relay by outcome (accepted, rejected, unavailable, error)",
            ["reason"])
        self.relay_attempt_failures = counter(
            "relay_attempt_failures_total",
            "Failed attempts toward an upstream (failover may still deliver the message)",
            ["upstream", "command", "kind"])
        self.policy_rejections = counter(
            "policy_rejections_total",
            "Senders refused by the policy of the login's provider (reason: mail_from, "
            "header_from)", ["provider", "reason"])
        self.rate_limited_total = counter(
            "rate_limited_total",
            "Messages and recipients refused by the sending rate of the login's identity "
            "(kind: messages, recipients)", ["provider", "kind"])
        self.state_errors = counter(
            "state_errors_total",
            "Decisions of the login throttle and sending rates made without the shared "
            "state (--state-url) because it did not answer or was degraded, by operation "
            "and the --state-failure policy applied (open: this process's own counts "
            "decided; closed: refused temporarily)", ["operation", "outcome"])
        self.state_degraded_gauge = Gauge(
            "state_degraded",
            "1 while the shared state (--state-url) is degraded: not answering, so "
            "decisions are made without it (see state_errors_total), else 0",
            namespace=namespace, registry=self.registry)
        self.config_reloads = counter(
            "config_reloads_total", "Provider configuration reloads by source and result",
            ["source", "result"])
        self.config_last_success = Gauge(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last good provider configuration load (startup included)",
            namespace=namespace, registry=self.registry)
        self.config_last_ok = Gauge(
            "config_last_reload_successful",
            "1 if the last provider configuration load succeeded, else 0",
            namespace=namespace, registry=self.registry)
        self.oauth2_refreshes = counter(
            "oauth2_token_refreshes_total",
            "OAuth2 token requests to an upstream's token endpoint by result (ok, refused, "
            "unavailable, malformed)", ["upstream", "result"])
        # -- the spool (docs/spool.md, "Operating it") ------------------------------------
        self.spool_accepted_total = counter(
            "spool_accepted_total",
            "Messages stored in the spool, by delivery mode (fallback: the upstream could "
            "not take it before the final dot)", ["mode"])
        self.spool_attempts = counter(
            "spool_delivery_attempts_total",
            "Delivery attempts of spooled messages by result (delivered, deferred, failed, "
            "unknown, error)", ["result"])
        self.spool_bounces = counter(
            "spool_bounces_total", "Delivery status notifications queued to senders", [])
        self.spool_holds = counter(
            "spool_holds_total", "Spooled messages held for an operator", [])
        for mode in ("spool", "fallback"):
            self.spool_accepted_total.labels(mode)
        for result in ("delivered", "deferred", "failed", "unknown", "error"):
            self.spool_attempts.labels(result)
        self._spool_stats: list = []  # the latest SpoolStats, when there is a spool
        self._token_deadlines: dict[str, float] = {}  # upstream -> wall time of expiry
        self.registry.register(_SpoolCollector(self._name, self._spool_stats))
        self.registry.register(_LiveCollector(self._name, providers, connections))
        self.registry.register(_TokenExpiryCollector(self._name, self._token_deadlines))
        #: listener -> [(name, file, key type, notAfter)] of the certificates in use
        self._certificates: dict[str, list[tuple[str, str, str, float]]] = {}
        self.registry.register(_CertificateExpiryCollector(self._name, self._certificates))
        # -- what an operator alerts on (docs/metrics.md, "Operating the relay") ---------
        self.connections_accepted = counter(
            "connections_accepted_total",
            "Client connections admitted under the connection limits, by listener",
            ["listener"])
        self.connections_refused = counter(
            "connections_refused_total",
            "Client connections refused by the connection limits, by listener and reason "
            "(total_limit, per_address_limit, network, unavailable)", ["listener", "reason"])
        self.tls_failures = counter(
            "tls_handshake_failures_total",
            "Connections that ended before their TLS handshake completed (SMTP: implicit "
            "TLS, or after STARTTLS; HTTP with TLS), by listener", ["listener"])
        self.size_refusals = counter(
            "message_size_refusals_total",
            "Messages refused for their size (SMTP 552 5.3.4 at MAIL SIZE= or in the "
            "data, HTTP 413), by listener", ["listener"])
        Gauge("build_info", "Always 1; the running version in its label", ["version"],
              namespace=namespace, registry=self.registry).labels(__version__).set(1)
        self.registry.register(_UpstreamCollector(self._name, upstreams))
        if http_connections is not None:
            self.registry.register(_HTTPCollector(self._name, http_connections))
        if process:  # process_* (unprefixed, as every exporter names them)
            ProcessCollector(registry=self.registry)
        self.initialise()

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels)``, remembered: the relay updates seven labelled series
        per message, and every label set is bounded (``BoundedLabels``), so is this."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}" if self.namespace else name

    # -- auth.selection.AuthObserver -------------------------------------------------------

    def checked(self, provider: str, via: str, outcome: str, seconds: float) -> None:
        self.auth_duration.labels(provider, outcome).observe(seconds)
        if via == VIA_FALLBACK:
            self.fallback_connections.labels(provider, _FALLBACK_STATUS[outcome]).inc()
            if outcome != "accepted":
                return  # not a verdict: the next fallback is asked
        self.logins.labels(provider, _AUTH_STATUS[outcome]).inc()
        if outcome == "accepted":
            self.auth_successes.labels(provider).inc()
        elif outcome == "rejected":
            self.auth_failures.labels(provider).inc()

    def unmatched(self, outcome: str = "rejected") -> None:
        self.logins.labels(NONE, _AUTH_STATUS[outcome]).inc()
        if outcome == "rejected":
            self.auth_failures.labels(NONE).inc()

    # -- relay.oauth2.TokenObserver --------------------------------------------------------

    def token_refreshed(self, upstream: str, result: str) -> None:
        """One token request of an upstream's broker (labels: configured upstreams and
        the four results of ``relay.oauth2``)."""
        self._child(self.oauth2_refreshes, upstream, result).inc()
        self.token_results[upstream] = result

    def token_expires_in(self, upstream: str, seconds: float) -> None:
        """The upstream's token now lives ``seconds`` more (0: none).  Kept as a deadline,
        so the gauge counts down between refreshes instead of freezing."""
        self._token_deadlines[upstream] = time.time() + max(seconds, 0.0)

    # -- esmtpfa.common.certificates.CertificateObserver -------------------------------------------

    def certificates_loaded(self, listener: str, certificates) -> None:
        """The certificates ``listener`` (``smtp``, ``http``) serves now.  Labels are the
        certificate's primary name, its file's basename and its key type: public, and
        bounded by the configuration."""
        self._certificates[listener] = [
            (c.name, os.path.basename(c.pair.cert_path), c.key_type, c.not_after)
            for c in certificates]

    # -- delivery.DeliveryObserver ---------------------------------------------------------

    def attempt_failed(self, error) -> None:
        """``relay.upstream.SMTPRelay.observers``: one failed upstream attempt.

        Labels are bounded: configured upstream addresses, SMTP verbs and the
        connection phases of ``RelayError.command``, permanent or transient."""
        command = (error.command or "connection").replace(" ", "_")[:16]
        self.relay_attempt_failures.labels(
            error.upstream or "none", command,
            "permanent" if error.permanent else "transient").inc()

    def relayed(self, identity, envelope: Envelope, size: int, outcome: str,
                seconds: float) -> None:
        key: tuple = (outcome, identity.provider, identity.via == "anonymous")
        if self.mail_from_to is not None:  # the addresses decide the series too
            key += (envelope.mail_from, envelope.recipients)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= SERIES_CACHE:
                self._series.clear()
            series = self._series[key] = self._series_for(identity, envelope, outcome)
        duration, counted, sized = series
        duration.observe(seconds)
        for child in counted:
            child.inc()
        for child in sized:
            child.inc(size)

    def _series_for(self, identity, envelope: Envelope, outcome: str) -> tuple:
        """The series one relayed message updates: (duration histogram, counters +1,
        counters +size).  Computed once per kind of message and kept (``_series``): the
        address bounds only ever admit more, so an address's label never changes once
        decided, and a message from a regular sender costs a dict lookup and the
        increments."""
        accepted = outcome == "accepted"
        status = "1" if accepted else "0"
        child = self._child
        counted = [child(self.relay_outcomes, outcome)]
        duration = child(self.upstream_duration, self.upstream, status)
        sized = []
        if accepted:
            provider = identity.provider
            counted.append(child(self.messages_sent, provider))
            sized.append(child(self.bytes_sent, provider))
        if self.mail_from_to is None:  # no address series: nothing below applies
            return duration, tuple(counted), tuple(sized)
        authenticated = identity.via != "anonymous"
        sender = self._address(self._from, envelope.mail_from, authenticated)
        recipients = [self._address(self._to, rcpt, authenticated)
                      for rcpt in envelope.recipients]
        for recipient in recipients:
            pair = (sender, recipient) if self._pairs.admit((sender, recipient)) else (OTHER, OTHER)
            counted.append(child(self.mail_from_to, pair[0], pair[1], status))
        if accepted:
            sized.append(child(self.bytes_from, identity.provider, sender))
            for recipient in recipients:
                sized.append(child(self.bytes_to, identity.provider, recipient))
        return duration, tuple(counted), tuple(sized)

    def policy_rejected(self, identity, reason: str) -> None:
        """``delivery.DeliveryObserver``: labels are a configured provider name (only
        providers with a policy refuse) and ``delivery.MAIL_FROM``/``HEADER_FROM``."""
        self._child(self.policy_rejections, identity.provider, reason).inc()

    def rate_limited(self, identity, kind: str) -> None:
        """``delivery.DeliveryObserver``: a configured provider name and the kind of
        limit (messages or recipients)."""
        self._child(self.rate_limited_total, identity.provider, kind).inc()

    # -- esmtpfa.limits.guard -----------------------------------------------------------------

    def state_error(self, operation: str, outcome: str) -> None:
        """The shared state did not answer; labels come from a closed set (the guard's
        operations; open or closed)."""
        self._child(self.state_errors, operation, outcome).inc()

    def state_degraded(self, degraded: bool) -> None:
        """The shared state became degraded (its breaker opened), or answers again."""
        self.state_degraded_gauge.set(1 if degraded else 0)

    @staticmethod
    def _address(bound: BoundedLabels, address: str, authenticated: bool) -> str:
        label = address_label(address)
        return label if authenticated and bound.admit(label) else OTHER

    # -- reload ------------------------------------------------------------------------------

    def config_loaded(self) -> None:
        self.config_generation += 1
        self.config_last_success.set(time.time())
        self.config_last_ok.set(1)
        self.config_ok = True
        self.initialise()  # a provider added by the reload starts at 0

    def config_reloaded(self, source: str, ok: bool) -> None:
        self.config_reloads.labels(source, "success" if ok else "failure").inc()
        if ok:
            self.config_loaded()
        else:
            self.config_last_ok.set(0)
            self.config_ok = False

    # -- exposition --------------------------------------------------------------------------

    # -- esmtpfa.spool: modes.SpoolObserver, runner.RunnerObserver ---------------------

    def spool_accepted(self, mode: str) -> None:
        self._child(self.spool_accepted_total, mode).inc()

    def spool_attempt(self, result: str) -> None:
        self._child(self.spool_attempts, result).inc()

    def spool_ended(self, how: str) -> None:
        (self.spool_bounces if how == "bounced" else self.spool_holds).inc()

    def spool_stats(self, stats) -> None:
        self._spool_stats[:] = [stats]

    def latest_spool_stats(self) -> Any:
        """The spool's counts the queue runner read last; None without a spool."""
        return self._spool_stats[0] if self._spool_stats else None

    def token_deadlines(self) -> dict[str, float]:
        """upstream -> wall time its OAuth2 token expires (only upstreams with OAuth2)."""
        return dict(self._token_deadlines)

    def render(self) -> bytes:
        return render(self.registry.collect())

    # -- series that exist before their first event -------------------------------------

    def initialise(self) -> None:
        """Create, at 0, every series whose labels are known now: an alert on
        ``rate(x[5m])`` or ``increase()`` needs the series before the first event, and a
        dashboard should show 0, not "no data".  Called at start and after each load
        (a new provider's series appear with it); labels are configured names only."""
        child = self._child
        names = [provider.meta.name for provider in self._providers().providers]
        for name in names:
            for status in _AUTH_STATUS.values():
                child(self.logins, name, status)
            for metric in (self.auth_successes, self.auth_failures, self.messages_sent,
                           self.bytes_sent):
                child(metric, name)
        for status in ("invalid", "unavailable"):
            child(self.logins, NONE, status)
        child(self.auth_failures, NONE)
        for reason in RELAY_OUTCOMES:
            child(self.relay_outcomes, reason)
        for source in RELOAD_SOURCES:
            for result in ("success", "failure"):
                child(self.config_reloads, source, result)
        for upstream in self._upstreams():
            if getattr(upstream, "tokens", None) is not None:
                for result in TOKEN_RESULTS:
                    child(self.oauth2_refreshes, upstream.address, result)

    def listening(self, listener: str) -> None:
        """A mail listener exists: its connection counters start at 0."""
        self._child(self.connections_accepted, listener)
        for reason in (*REFUSAL_REASONS.values(), UNAVAILABLE):
            self._child(self.connections_refused, listener, reason)
        self._child(self.size_refusals, listener)
        self._child(self.tls_failures, listener)

    # -- smtp.server and web.site: what a listener refused -------------------------------

    def tls_handshake_failed(self, listener: str) -> None:
        """A connection of ``listener`` ended inside its TLS handshake."""
        self._child(self.tls_failures, listener).inc()

    def size_refused(self, listener: str) -> None:
        """A message of ``listener`` was refused for its size."""
        self._child(self.size_refusals, listener).inc()

    def admissions(self, ledger: Any, listener: str) -> CountedAdmissions:
        """``ledger`` (an ``IConnectionLedger``) with its verdicts for ``listener``
        counted in ``connections_accepted_total`` / ``connections_refused_total``."""
        self.listening(listener)
        return CountedAdmissions(ledger, self._child(self.connections_accepted, listener),
                                 lambda reason: self._child(
                                     self.connections_refused, listener, reason))


class CountedAdmissions(ConnectionLedgerWrapper):
    """An ``IConnectionLedger`` that counts each verdict it passes on: a slot taken is a
    connection accepted, a limit named is one refused, a ledger that could not answer
    (the supervisor of ``--workers``, late) is one refused as ``unavailable``."""

    def __init__(self, ledger: Any, accepted: Any, refused: Callable[[str], Any]):
        super().__init__(ledger)
        self._accepted = accepted
        self._refused = refused

    def refusal(self, ip: str) -> Any:
        return self._ledger.refusal(ip).addBoth(self._count)

    def _count(self, verdict: Any) -> Any:
        if verdict is None:
            self._accepted.inc()
        elif isinstance(verdict, str):
            self._refused(REFUSAL_REASONS.get(verdict, UNAVAILABLE)).inc()
        else:  # a Failure: the caller refuses for now; passed on as it came
            self._refused(UNAVAILABLE).inc()
        return verdict


class _LiveCollector:
    """Series read from live objects at scrape time: nothing stale survives a reload."""

    def __init__(self, name: Callable[[str], str], providers: Callable[[], ProviderSet],
                 connections: Callable[[], Mapping[str, int]]):
        self._name = name
        self._providers = providers
        self._connections = connections

    def collect(self):
        configured = GaugeMetricFamily(
            self._name("configured_providers"), "A gauge of configured providers",
            labels=["name", "domain", "domain_selection", "fallback", "type"])
        for provider in self._providers().providers:
            meta = provider.meta
            configured.add_metric(
                [meta.name, meta.domain or "*", _bool(meta.unique_domain_auth),
                 _bool(meta.fallback), meta.type], 1)
        yield configured
        active = GaugeMetricFamily(
            self._name("smtp_active_connections"), "Open SMTP connections by listener",
            labels=["listener"])
        for listener, count in sorted(self._connections().items()):
            active.add_metric([listener], count)
        yield active


class _UpstreamCollector:
    """Each configured upstream's pool and breaker, read at scrape time: sessions by
    state (``idle``, ``busy``, ``opening``), messages waiting for one, the pool's size,
    and the breaker's state as one 0/1 series per state.  Labels are the configured
    ``host:port``; present from start (at 0) for every upstream."""

    def __init__(self, name: Callable[[str], str], upstreams: Callable[[], Iterable[Any]]):
        self._name = name
        self._upstreams = upstreams

    def collect(self):
        name = self._name
        sessions = GaugeMetricFamily(
            name("upstream_pool_sessions"),
            "Upstream sessions in the pool by state (idle, busy, opening)",
            labels=["upstream", "state"])
        waiting = GaugeMetricFamily(
            name("upstream_pool_waiting"), "Messages waiting for an upstream session",
            labels=["upstream"])
        size = GaugeMetricFamily(
            name("upstream_pool_max_sessions"),
            "Sessions the pool may hold per upstream (--relay-pool-size)",
            labels=["upstream"])
        breaker = GaugeMetricFamily(
            name("upstream_breaker_state"),
            "1 for the circuit breaker's current state (closed, half-open, open), else 0",
            labels=["upstream", "state"])
        for upstream in self._upstreams():
            address = upstream.address
            usage = upstream.pool.usage()
            for state in ("idle", "busy", "opening"):
                sessions.add_metric([address, state], usage[state])
            waiting.add_metric([address], usage["waiting"])
            size.add_metric([address], upstream.pool.settings.size)
            current = breaker_state(upstream.breaker)
            for state in BREAKER_STATES:
                breaker.add_metric([address, state], 1 if state == current else 0)
        yield from (sessions, waiting, size, breaker)


class _HTTPCollector:
    """``http_active_connections{listener="http"}``: open HTTP submission connections."""

    def __init__(self, name: Callable[[str], str], count: Callable[[], int]):
        self._name = name
        self._count = count

    def collect(self):
        family = GaugeMetricFamily(self._name("http_active_connections"),
                                   "Open HTTP submission connections by listener",
                                   labels=["listener"])
        family.add_metric(["http"], self._count())
        yield family


def breaker_state(breaker: Any) -> str:
    """What the breaker does now: an open breaker past its cool-down lets the next
    message try, so it is reported ``half-open`` (``esmtpfa.common.breaker``)."""
    if breaker.state == "open" and not breaker.open_now():
        return "half-open"
    return breaker.state


class _SpoolCollector:
    """The spool's gauges from the counts the queue runner last read (every few
    seconds): messages by state, octets, and the age of the oldest message.  Absent
    without a spool.  Every worker reads the same spool, so the supervisor keeps the
    highest of their values (``esmtpfa.runtime.workers.merged_metrics``)."""

    def __init__(self, name: Callable[[str], str], latest: list):
        self._name = name
        self._latest = latest

    def collect(self):
        if not self._latest:
            return
        stats = self._latest[0]
        messages = GaugeMetricFamily(
            self._name("spool_messages"), "Messages in the spool by state (queued, held)",
            labels=["state"])
        for state in ("queued", "held"):
            messages.add_metric([state], stats.messages.get(state, 0))
        yield messages
        if stats.bytes is None:  # a broker's spool: it does not say cheaply
            return
        yield GaugeMetricFamily(self._name("spool_bytes"),
                                "Octets of message content in the spool",
                                value=stats.bytes)
        oldest = stats.oldest_received
        yield GaugeMetricFamily(
            self._name("spool_oldest_message_age_seconds"),
            "Age of the oldest message in the spool (0: empty)",
            value=max(time.time() - oldest, 0.0) if oldest is not None else 0.0)


class _TokenExpiryCollector:
    """``oauth2_token_expiry_seconds{upstream}``: seconds until each upstream's OAuth2
    token expires, computed at scrape time (0 when it has none).  Absent when no upstream
    uses OAuth2."""

    def __init__(self, name: Callable[[str], str], deadlines: Mapping[str, float]):
        self._name = name
        self._deadlines = deadlines

    def collect(self):
        if not self._deadlines:
            return
        family = GaugeMetricFamily(
            self._name("oauth2_token_expiry_seconds"),
            "Seconds until the upstream's OAuth2 access token expires (0: no valid token)",
            labels=["upstream"])
        now = time.time()
        for upstream, deadline in sorted(self._deadlines.items()):
            family.add_metric([upstream], max(deadline - now, 0.0))
        yield family


class _CertificateExpiryCollector:
    """``tls_certificate_expiry_seconds``: notAfter minus now for each certificate the
    listeners serve, computed at scrape time so it counts down between reloads;
    negative once expired."""

    def __init__(self, name: Callable[[str], str],
                 certificates: Mapping[str, list[tuple[str, str, str, float]]]):
        self._name = name
        self._certificates = certificates

    def collect(self):
        if not self._certificates:
            return
        family = GaugeMetricFamily(
            self._name("tls_certificate_expiry_seconds"),
            "Seconds until a certificate the TLS listeners serve expires (notAfter minus "
            "now; negative once expired)", labels=["listener", "name", "file", "key"])
        now = time.time()
        for listener, certificates in sorted(self._certificates.items()):
            for name, file, key, not_after in certificates:
                family.add_metric([listener, name, file, key], not_after - now)
        yield family


def _bool(value: bool) -> str:
    return "true" if value else "false"  # Go's strconv.FormatBool, as the original


# -- text exposition format 0.0.4 -------------------------------------------------------------

def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def render(families: Iterable) -> bytes:
    """Prometheus text format, Go client style: every counter's name ends in ``_total``,
    ``_created`` samples are left out."""
    out: list[str] = []
    for family in families:
        name, kind = family.name, family.type
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if kind == "counter":
            name += "_total"
        elif kind == "unknown":
            kind = "untyped"
        out.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
        out.append(f"# TYPE {name} {kind}\n")
        for sample in samples:
            labels = ",".join(f'{key}="{_escape_value(value)}"'
                              for key, value in sorted(sample.labels.items()))
            labels = "{" + labels + "}" if labels else ""
            out.append(f"{sample.name}{labels} {floatToGoString(sample.value)}\n")
    return "".join(out).encode("utf-8")


__all__ = [
    "ADDRESS_SERIES",
    "CONTENT_TYPE",
    "NONE",
    "OTHER",
    "CountedAdmissions",
    "RelayMetrics",
    "breaker_state",
    "render",
]
