"""The relay's settings, typed and frozen: built once, when the options are parsed.

``esmtpfa.runtime.options`` reads the flags and the environment (its ``SETTINGS``
table), checks every value once, and builds one ``Settings``; from then on nothing
looks a setting up by its flag's name.  Each area is a frozen dataclass, and each
part of the relay is handed the area it needs: the SMTP server its ``ServerSettings``,
the HTTP listeners their ``HTTPLimits``, the limits their ``ThrottleSettings`` and
``StateSettings``, the spool its ``SpoolSettings`` and ``RetryPolicy``.  Only
``esmtpfa.runtime``, which assembles the relay, holds the whole object.

Every value remembers where it came from (``Source``): ``--print-config`` writes
``Settings.effective``, the startup warning and ``--check-config`` name the source
(docs/config-loading.md, "The settings object").
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from esmtpfa.auth.sendingrates import Rates
from esmtpfa.limits.settings import StateSettings, ThrottleSettings
from esmtpfa.relay.settings import PoolSettings
from esmtpfa.smtp.devices import LegacyProfile
from esmtpfa.smtp.settings import ServerSettings
from esmtpfa.spool.backends import SpoolSettings
from esmtpfa.spool.runner import RetryPolicy
from esmtpfa.web.bounds import HTTPLimits


@dataclass(frozen=True)
class Source:
    """Where a setting's effective value came from: ``--print-config`` shows it, the
    startup warning and ``--check-config`` name it.

    ``kind`` is ``default``, ``flag`` (the command line), ``environment`` or ``demo``
    (set by ``--demo``); ``name`` is the flag or variable; ``overrides`` is the flag an
    environment variable won over (docs/config-loading.md, "Flags and the environment").
    A variable from systemd's ``EnvironmentFile`` or a Kubernetes Secret is an
    environment variable: the process cannot tell the two apart.
    """

    kind: str
    name: str = ""
    overrides: str = ""

    def __str__(self) -> str:
        if self.kind == "default":
            return "default"
        if self.kind == "environment":
            return f"env {self.name}" + (f" (overrides {self.overrides})"
                                         if self.overrides else "")
        return self.name


DEFAULT = Source("default")


@dataclass(frozen=True)
class Sourced:
    """One row of the table: the value as ``--print-config`` writes it (credentials
    already redacted, ``(invalid)`` for a value that did not parse) and its source.
    The typed value itself lives in the area dataclasses."""

    shown: str
    source: Source = DEFAULT


@dataclass(frozen=True)
class TLSSettings:
    """Certificate files and TLS policy of one listener group (SMTP or HTTP).
    ``sni_certs`` and ``ca_cert`` are the SMTP listeners' only."""

    cert: str | None = None
    key: str | None = None
    ca_cert: str | None = None
    sni_certs: Any = None  # (CERT:KEY pairs, directories), esmtpfa.common.certificates
    min_version: str = "1.2"
    ciphers: str | None = None
    poll_interval: float = 5.0


@dataclass(frozen=True)
class Listener:
    """One listening socket as the operator placed it: the flags that did so name it
    in a startup error (``esmtpfa.runtime.tap``)."""

    name: str           # the service name: plain, tls, legacy-plain, legacy-tls, http, metrics
    label: str          # what an operator calls it
    enabled: bool
    addr: str           # empty: every interface
    port: int
    addr_flag: str
    port_flag: str

    @property
    def flags(self) -> str:
        """The flags that place it, as a startup error names them: ``--addr, --port``,
        or one flag where one says both (``--legacy-plain ADDR:PORT``)."""
        if self.addr_flag == self.port_flag:
            return f"--{self.addr_flag}"
        return f"--{self.addr_flag}, --{self.port_flag}"


@dataclass(frozen=True)
class SMTPSettings:
    """The SMTP listeners (``--plain``, ``--tls``) and the sessions they serve."""

    plain: bool
    tls_enabled: bool
    addr: str
    port: int
    tls_port: int
    #: ``--hostname`` as given (None: this host's FQDN, which ``server`` holds).
    hostname: str | None
    server: ServerSettings
    tls: TLSSettings
    proxy_protocol: bool = False
    proxy_trusted: Any = None  # networks, esmtpfa.smtp.proxy.parse_networks
    #: The listeners for old devices (``--legacy-*``; docs/devices.md).
    legacy: LegacyProfile = LegacyProfile()


@dataclass(frozen=True)
class HTTPSettings:
    """The HTTP submission listener and the bounds every HTTP listener keeps."""

    enabled: bool
    addr: str
    port: int
    tls: TLSSettings
    allow_anonymous: bool
    limits: HTTPLimits


@dataclass(frozen=True)
class MetricsSettings:
    addr: str
    port: int
    namespace: str
    address_labels: int


@dataclass(frozen=True)
class RelaySettings:
    """Where messages go.  ``upstreams`` are the ``UpstreamEntry`` rows (``--relay-addr``
    or ``--relay-config``; empty: the Maildir), None when the options had problems and
    were never resolved that far (``--check-config`` then leaves the relay alone).
    ``defaults`` are the ``UpstreamSettings`` fields the ``--relay-*`` flags give every
    entry; ``esmtpfa.runtime.service.build_relay`` makes the ``UpstreamSettings``, so
    that one refused entry is a problem of the relay, not of the flags."""

    upstreams: tuple | None
    defaults: Mapping[str, Any]
    pool: PoolSettings
    maildir: str
    relay_from: str | None
    config_file: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def __repr__(self) -> str:
        # ``defaults`` holds the relay password: say which fields are set, never values.
        return (f"RelaySettings(upstreams={len(self.upstreams or ())}, "
                f"maildir={self.maildir!r}, config_file={self.config_file!r})")


@dataclass(frozen=True)
class DeliverySettings:
    """What the client's 250 means and the spool behind it (docs/spool.md)."""

    mode: str
    undeliverable: str
    spool: SpoolSettings
    retry: RetryPolicy
    concurrency: int
    #: ``--spool-url`` set explicitly: providers whose policy spools can use it.
    spool_url_given: bool

    @property
    def uses_spool(self) -> bool:
        """Whether the relay opens a spool: a spooling ``--delivery-mode``, or an
        explicit ``--spool-url`` for providers whose policy chooses one."""
        return self.mode != "passthrough" or self.spool_url_given

    def __repr__(self) -> str:
        return (f"DeliverySettings(mode={self.mode!r}, undeliverable="
                f"{self.undeliverable!r}, concurrency={self.concurrency!r})")


@dataclass(frozen=True)
class ProviderSettings:
    """Where the identity providers come from and how often they are looked at."""

    config: str
    config_given: bool  # --config set explicitly: a missing file is then an error
    service_url: str | None
    poll_interval: float
    service_interval: float
    service_timeout: float
    service_token: str | None
    demo: bool

    def __repr__(self) -> str:
        return (f"ProviderSettings(config={self.config!r}, service="
                f"{'set' if self.service_url else None}, demo={self.demo!r})")


@dataclass(frozen=True)
class LoggingSettings:
    level: str
    format: str
    recipients: str
    recipients_key: str | None

    def __repr__(self) -> str:
        return (f"LoggingSettings(level={self.level!r}, format={self.format!r}, "
                f"recipients={self.recipients!r})")


@dataclass(frozen=True)
class ProcessSettings:
    """The process as a whole: its workers, its listening queues, its shutdown."""

    workers: int
    listen_backlog: int
    shutdown_grace: float


@dataclass(frozen=True)
class Actions:
    """Flags that choose what ``twistd esmtpfa`` does rather than how the relay
    behaves (``--print-config`` does not list them)."""

    check_config: bool = False
    check_connect: bool = False
    print_config: bool = False
    non_default: bool = False


@dataclass(frozen=True)
class Settings:
    """Every setting of one relay, typed and checked (see the module docstring)."""

    smtp: SMTPSettings
    http: HTTPSettings
    metrics: MetricsSettings
    relay: RelaySettings
    throttle: ThrottleSettings
    rates: Rates
    state: StateSettings
    delivery: DeliverySettings
    providers: ProviderSettings
    logging: LoggingSettings
    process: ProcessSettings
    actions: Actions
    demo: bool
    #: Every row of the options table, by flag: its value as shown and its ``Source``.
    table: Mapping[str, Sourced]

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", MappingProxyType(dict(self.table)))

    def source(self, flag: str) -> Source:
        """Where ``--flag``'s value came from."""
        return self.table[flag].source

    def effective(self, non_default: bool = False) -> list[str]:
        """``name = value  # source`` for every setting, sorted by name, credentials
        redacted; with ``non_default`` only those set explicitly (a flag, the
        environment, ``--demo``), even to the default value, as ``postconf -n`` shows
        what main.cf sets."""
        return [f"{flag} = {row.shown}  # {row.source}"
                for flag, row in sorted(self.table.items())
                if not (non_default and row.source.kind == "default")]

    def listeners(self) -> list[Listener]:
        """Every listener, enabled or not (the legacy ones only when configured), in
        the order the relay opens them."""
        smtp, http, metrics = self.smtp, self.http, self.metrics
        return [
            Listener("plain", "SMTP listener", smtp.plain, smtp.addr, smtp.port,
                     "addr", "port"),
            Listener("tls", "submissions (implicit TLS) listener", smtp.tls_enabled,
                     smtp.addr, smtp.tls_port, "addr", "tls-port"),
            *(Listener(name, f"{name} listener for old devices", True, address.host,
                       address.port, name, name)
              for name, address in smtp.legacy.listeners.items()),
            Listener("http", "HTTP listener", http.enabled, http.addr, http.port,
                     "http-addr", "http-port"),
            Listener("metrics", "metrics listener", True, metrics.addr, metrics.port,
                     "metrics-addr", "metrics-port"),
        ]

    def __repr__(self) -> str:
        return f"Settings({len(self.table)} settings)"


def settings_of(parsed: Any) -> Settings:
    """The ``Settings`` of parsed options (``Options.settings``), or ``parsed`` itself:
    what the relay's builders take, so that a caller holding the parsed options (twistd,
    a worker, a test) and one holding the settings alone both work."""
    if isinstance(parsed, Settings):
        return parsed
    settings = getattr(parsed, "settings", None)
    if not isinstance(settings, Settings):
        raise TypeError(f"expected Settings or parsed Options, got {type(parsed).__name__}")
    return settings
