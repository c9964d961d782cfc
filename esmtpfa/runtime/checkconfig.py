"""``twistd esmtpfa --check-config [--check-connect]``: check a configuration before a
rollout, print what was found, exit 0 when it is sound and 1 otherwise.

The checks load exactly what startup loads, with the same code: the options and their
files (``esmtpfa.runtime.options``), the providers and their policy (``service.load_providers``),
the listeners' TLS files (``service.load_tls_options``) and the relay
(``service.build_relay``: the relay file, client TLS).  Nothing listens.  With
``--check-connect`` one connection is made to each upstream through the relay's own
session code (greeting, EHLO, STARTTLS, AUTH, QUIT: ``relay.session``) and to each
identity back end (the LDAP service bind, the JWKS fetch, one request to an HTTP auth
endpoint, through the providers' own code), to the shared state (a PING to
``--state-url`` through the relay's Redis client) and to the spool when a delivery mode
uses it (opened and counted as the relay opens it), all at once, each bounded.

Every option and variable that does not parse is one ``PROBLEM`` line naming it
(``options.OptionsProblems``); the checks after it still run, with such a setting at
its default, so the report is complete and never a traceback.

A problem names where it is (the file, the provider entry, the param or flag) and never
a value from the configuration: params and flags may be secrets.  Startup's messages are
written that way already (``esmtpfa.config.providers``); this module only adds its own labels.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from esmtpfa.runtime.settings import settings_of

#: Longest any one --check-connect probe may take, whatever the configured timeouts.
CONNECT_TIMEOUT = 30.0

_LEVELS = {level: i for i, level in enumerate(LogLevel.iterconstants())}


@dataclass
class Report:
    """What the check found, printed as it goes; ``problems`` decides the exit code."""

    out: IO[str] = field(default_factory=lambda: sys.stdout)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.out.write(f"ok       {text}\n")

    def note(self, text: str) -> None:
        self.out.write(f"         {text}\n")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.out.write(f"PROBLEM  {text}\n")

    def warning(self, text: str) -> None:
        self.warnings.append(text)
        self.out.write(f"warning  {text}\n")

    def warned(self, event: dict) -> None:
        """Warnings the loaders log (cleartext LDAP, TLS verification off, ...): shown
        here, since twistd has not started its log yet."""
        if _LEVELS.get(event.get("log_level"), 0) < _LEVELS[LogLevel.warn]:
            return
        if not str(event.get("log_namespace", "")).startswith("esmtpfa"):
            return
        self.warning(formatEvent(event))

    def finish(self) -> int:
        if self.problems:
            self.out.write(f"{len(self.problems)} problem(s) found\n")
            self.out.flush()
            return 1
        self.out.write("configuration ok\n")
        self.out.flush()
        return 0


def run(options, reactor=None, out: IO[str] | None = None) -> int:
    """Check, print, and return the exit code (``tap.makeService`` raises SystemExit)."""
    if reactor is None:
        from twisted.internet import reactor
    report = Report(out or sys.stdout)
    # Twisted's annotation wants an ILogObserver provider; any callable of an event is one.
    globalLogPublisher.addObserver(report.warned)  # type: ignore[arg-type]
    try:
        from esmtpfa.common.resources import Resources
        loaded = check_static(options, Resources.build(reactor), report)
        if settings_of(options).actions.check_connect:
            _run_reactor(reactor, lambda: check_connect(loaded, reactor, report))
        else:
            loaded.stop()
    finally:
        globalLogPublisher.removeObserver(report.warned)  # type: ignore[arg-type]
    return report.finish()


@dataclass
class Loaded:
    """What the static checks built, for ``--check-connect`` to use and then stop."""

    providers: list = field(default_factory=list)
    relay: Any = None
    state: Any = None  # the --state-url, parsed
    spool: Any = None  # the --spool-url, when a delivery mode uses it

    def stop(self) -> Deferred:
        from esmtpfa.config.reload import stop_providers
        d = stop_providers(self.providers)
        if self.relay is not None:
            relay = self.relay
            d.addBoth(lambda _: relay.close())
        return d


def check_static(options, resources, report: Report) -> Loaded:
    """Options, providers, TLS files, relay: each part that can be checked is, built
    with ``resources`` (``esmtpfa.common.resources``) as the relay builds them.
    ``options`` are the parsed options: their ``settings`` (a refused value stands at
    its default), ``problems`` and ``overrides``."""
    from esmtpfa.runtime.service import build_relay, load_providers, load_tls_options
    settings = settings_of(options)
    problems = getattr(options, "problems", None) or []
    for problem in problems:  # one line each, naming the flag or variable
        report.problem(problem)
    if not problems:
        report.ok("options and environment")
    for line in getattr(options, "overrides", ()):
        report.warning(line)
    loaded = Loaded()

    if settings.providers.service_url:
        from esmtpfa.common.urls import redact_url
        report.note("providers come from the config service "
                    f"{redact_url(settings.providers.service_url)} "
                    "(not fetched by --check-config)")
    else:
        try:
            providers = load_providers(settings.providers, resources)
        except usage.UsageError as error:
            report.problem(str(error))
        except Exception as error:  # options that did not resolve (reported above)
            report.problem(f"providers not checked: {type(error).__name__}")
        else:
            loaded.providers = list(providers.providers)
            path = settings.providers.config
            source = os.path.abspath(path) if os.path.exists(path) else "no provider file"
            report.ok(f"providers ({source}): {len(loaded.providers)} loaded")
            configs = getattr(providers, "config_by_name", {})
            for provider in loaded.providers:
                report.note(_describe_provider(provider, configs.get(provider.meta.name)))

    for prefix, what, listener, tls in (
            ("tls", "SMTP TLS", "smtp", settings.smtp.tls),
            ("http-tls", "HTTP TLS", "http", settings.http.tls)):
        if not tls.cert:
            continue
        if not all(os.path.isfile(path or "") for path in (tls.cert, tls.key)):
            continue  # reported with the options
        try:
            load_tls_options(tls, what, listener)
        except usage.UsageError as error:
            report.problem(f"{str(error)} (--{prefix}-cert, --{prefix}-key)")
        else:
            report.ok(f"{what}: certificate {tls.cert} and its key")

    relay = settings.relay
    if relay.upstreams is not None:  # None: the options stopped before the relay
        try:
            loaded.relay = build_relay(settings, resources,
                                       settings.smtp.hostname or "localhost")
        except Exception as error:  # a relay file entry or client TLS file that fails
            where = (f"--relay-config {relay.config_file}" if relay.config_file
                     else "relay settings (--relay-*)")
            report.problem(f"{where}: {error}")
        else:
            report.ok(f"relay: {loaded.relay.description}")

    if settings.state.url:
        from esmtpfa.limits.resp import RedisURL
        try:
            loaded.state = RedisURL.parse(settings.state.url)
        except ValueError as error:  # never quotes the URL: it may hold a password
            report.problem(f"--state-url: {error}")
        else:
            report.ok(f"shared state: {loaded.state.redacted} (failing "
                      f"{settings.state.failure})")
    delivery = settings.delivery
    if delivery.uses_spool:
        loaded.spool = _spool_where(delivery.spool.url, report, delivery.mode)
    if settings.process.workers > 1:
        report.note(f"{settings.process.workers} worker processes (docs/workers.md)")
    return loaded


def _spool_where(url: str, report: Report, mode: str) -> str | None:
    """The spool's URL when it parses (its problems were found with the options), with
    a line saying where it is, never its credentials."""
    from esmtpfa.spool.backends import file_path
    path = file_path(url)
    if path is not None:
        report.ok(f"spool: {path} (delivery mode {mode}; docs/spool.md)")
        return url
    from esmtpfa.spool.amqp import AMQPURL
    try:
        where = AMQPURL.parse(url).redacted
    except ValueError as error:  # never quotes the URL: it may hold a password
        report.problem(f"--spool-url: {error}")
        return None
    report.ok(f"spool: RabbitMQ {where} (delivery mode {mode}; docs/spool.md)")
    return url


def _describe_provider(provider, config) -> str:
    meta = provider.meta
    parts = [f"{meta.name} ({meta.type})"]
    if meta.domain:
        parts.append(f"domain {meta.domain}")
    if meta.fallback:
        parts.append("fallback")
    if config is not None and config.policy != type(config.policy)():
        parts.append("with a policy")
    return ", ".join(parts)


def _run_reactor(reactor, work: Callable[[], Deferred]) -> None:
    """Run the reactor until ``work`` is done (twistd has not started it yet)."""
    def start() -> None:
        d = work()
        d.addErrback(lambda failure: sys.stderr.write(failure.getTraceback()))
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)


def check_connect(loaded: Loaded, reactor, report: Report) -> Deferred:
    """Every component with a back end asked at once through its own ``probe()``
    (``esmtpfa.common.probe``), each bounded by ``CONNECT_TIMEOUT``; one line each, in
    the order upstreams, providers, shared state, spool."""
    from esmtpfa.common.probe import probes_of
    components = [*probes_of(loaded.relay),
                  *(probe for provider in loaded.providers for probe in probes_of(provider))]
    closing: list[Callable[[], Deferred]] = []
    if loaded.state is not None:
        from esmtpfa.limits.redis import RedisState
        from esmtpfa.limits.resp import RedisClient
        client = RedisClient(loaded.state, reactor, timeout=CONNECT_TIMEOUT)
        closing.append(client.close)
        components.append(RedisState(client))
    if loaded.spool is not None:
        from esmtpfa.spool.backends import SpoolCheck
        components.append(SpoolCheck(loaded.spool, reactor))

    def bounded(component) -> Deferred:
        d = component.probe().addTimeout(CONNECT_TIMEOUT, reactor)
        return d.addErrback(_no_answer)

    def done(results) -> Deferred:
        for component, result in zip(components, results, strict=True):
            line = f"{component.probe_subject}: {result.detail}"
            if result.ok:
                report.ok(line)
            else:
                report.problem(line)
        d = loaded.stop()
        for close in closing:
            d.addBoth(lambda _, close: close(), close)
        return d

    return gatherResults([bounded(component) for component in components]).addCallback(done)


def _no_answer(failure) -> Any:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    from esmtpfa.common.probe import ProbeResult
    failure.trap(DeferredTimeout)
    return ProbeResult.failed(f"no answer within {CONNECT_TIMEOUT:g} s")
