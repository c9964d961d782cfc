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

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

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
    globalLogPublisher.addObserver(report.warned)
    try:
        loaded = check_static(options, reactor, report)
        if options.get("check-connect"):
            _run_reactor(reactor, lambda: check_connect(loaded, reactor, report))
        else:
            loaded.stop()
    finally:
        globalLogPublisher.removeObserver(report.warned)
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


def check_static(options, reactor, report: Report) -> Loaded:
    """Options, providers, TLS files, relay: each part that can be checked is."""
    from esmtpfa.runtime.service import build_relay, load_providers, load_tls_options
    problems = options.get("check-config-problems") or []
    for problem in problems:  # one line each, naming the flag or variable
        report.problem(problem)
    if not problems:
        report.ok("options and environment")
    for line in getattr(options, "overrides", ()):
        report.warning(line)
    loaded = Loaded()

    if options["config-svc"]:
        from esmtpfa.config.reload import redact_url
        report.note(f"providers come from the config service {redact_url(options['config-svc'])} "
                    "(not fetched by --check-config)")
    else:
        try:
            providers = load_providers(options, reactor)
        except usage.UsageError as error:
            report.problem(str(error))
        except Exception as error:  # options that did not resolve (reported above)
            report.problem(f"providers not checked: {type(error).__name__}")
        else:
            loaded.providers = list(providers.providers)
            source = os.path.abspath(options["config"]) if os.path.exists(
                options["config"]) else "no provider file"
            report.ok(f"providers ({source}): {len(loaded.providers)} loaded")
            configs = getattr(providers, "config_by_name", {})
            for provider in loaded.providers:
                report.note(_describe_provider(provider, configs.get(provider.meta.name)))

    for prefix, what in (("tls", "SMTP TLS"), ("http-tls", "HTTP TLS")):
        if not options.get(prefix + "-cert"):
            continue
        if not all(os.path.isfile(options[prefix + end] or "") for end in ("-cert", "-key")):
            continue  # reported with the options
        try:
            load_tls_options(options, prefix, what)
        except usage.UsageError as error:
            report.problem(f"{str(error)} (--{prefix}-cert, --{prefix}-key)")
        else:
            report.ok(f"{what}: certificate {options[prefix + '-cert']} and its key")

    if "relay-upstreams" in options:
        try:
            loaded.relay = build_relay(options, reactor, options["hostname"] or "localhost")
        except Exception as error:  # a relay file entry or client TLS file that fails
            where = f"--relay-config {options['relay-config']}" if options[
                "relay-config"] else "relay settings (--relay-*)"
            report.problem(f"{where}: {error}")
        else:
            report.ok(f"relay: {loaded.relay.description}")

    if options.get("state-url"):
        from esmtpfa.limits.resp import RedisURL
        try:
            loaded.state = RedisURL.parse(options["state-url"])
        except ValueError as error:  # never quotes the URL: it may hold a password
            report.problem(f"--state-url: {error}")
        else:
            report.ok(f"shared state: {loaded.state.redacted} (failing "
                      f"{options['state-failure']})")
    if "delivery-mode" in options and options.uses_spool():
        loaded.spool = _spool_where(options["spool-url"], report, options["delivery-mode"])
    if options.get("workers", 1) > 1:
        report.note(f"{options['workers']} worker processes (docs/workers.md)")
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
    probes: list[tuple[str, Deferred]] = []
    if loaded.relay is not None:
        from esmtpfa.relay.upstream import SMTPRelay
        from esmtpfa.runtime.service import unwrap
        for relay in unwrap(loaded.relay):
            if isinstance(relay, SMTPRelay):
                for upstream in relay.upstreams:
                    probes.append((f"upstream {upstream.address}",
                                   ensureDeferred(_probe_upstream(upstream, reactor))))
    for provider in loaded.providers:
        probe = _provider_probe(provider, reactor)
        if probe is not None:
            probes.append((f"provider {provider.meta.name!r} ({provider.meta.type})", probe))
    if loaded.state is not None:
        probes.append((f"shared state {loaded.state.redacted}",
                       ensureDeferred(_probe_state(loaded.state, reactor))))
    if loaded.spool is not None:
        probes.append(("spool", ensureDeferred(_probe_spool(loaded.spool, reactor))))

    def done(results) -> Deferred:
        for (label, _), (succeeded, value) in zip(probes, results):
            if succeeded:
                report.ok(f"{label}: {value}")
            else:
                report.problem(f"{label}: {_reason(value)}")
        return loaded.stop()

    for _, d in probes:
        d.addTimeout(CONNECT_TIMEOUT, reactor)
    return DeferredList([d for _, d in probes], consumeErrors=True).addCallback(done)


def _reason(failure) -> str:
    from twisted.internet.defer import TimeoutError as DeferredTimeout
    from esmtpfa.relay.interfaces import RelayError
    error = failure.value
    if isinstance(error, DeferredTimeout):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(error, RelayError):
        return error.describe()
    return str(error) or type(error).__name__


async def _probe_state(url, reactor) -> str:
    """One PING through the relay's own Redis client (AUTH, SELECT, TLS as configured)."""
    from esmtpfa.limits.resp import RedisClient
    client = RedisClient(url, reactor, timeout=CONNECT_TIMEOUT)
    try:
        answer = await client.execute("PING")
    finally:
        await client.close()
    return f"answered {answer.decode() if isinstance(answer, bytes) else answer}"


async def _probe_spool(url: str, reactor) -> str:
    """Open the spool as the relay does (the file spool's database, or a connection to
    the broker with its queues declared), read its counts, close it."""
    from twisted.python.threadpool import ThreadPool
    from esmtpfa.spool.backends import SpoolSettings, open_spool
    threads = ThreadPool(minthreads=0, maxthreads=2, name="esmtpfa-check-spool")
    threads.start()
    spool = open_spool(SpoolSettings(url, max_bytes=0, min_free_bytes=0), reactor, threads)
    try:
        await spool.start()
        stats = await spool.stats()
    finally:
        try:
            await spool.close()
        finally:
            threads.stop()
    held = stats.messages.get("held", 0)
    return (f"{spool.description}: {stats.messages.get('queued', 0)} queued, "
            f"{held} held" + (" (esmtpfa-queue list)" if held else ""))


async def _probe_upstream(upstream, reactor) -> str:
    """One session as the pool opens them (greeting, EHLO, STARTTLS, AUTH), then QUIT."""
    from esmtpfa.relay.session import UpstreamSession, dial
    # Both fail with a RelayError naming the stage (esmtpfa/relay/errors.py).
    protocol = await dial(reactor, upstream.settings, upstream.tls_options, upstream.factory)
    # An OAuth2 upstream: its broker asks the token endpoint first (docs/oauth2.md).
    session = UpstreamSession(protocol, upstream.settings, upstream.tls_options,
                              tokens=upstream.tokens)
    try:
        await session.open()
    except Exception:
        protocol.abort()
        raise
    await session.close()
    return (f"connected, {'TLS' if session.secure else 'no TLS'}, "
            f"{'AUTH ' + session.mechanism if session.mechanism else 'no AUTH'}")


def _provider_probe(provider, reactor) -> Deferred | None:
    """The back end of one provider, asked the way a login asks it; None when it has
    none (userpass)."""
    from esmtpfa.providers.httpcheck import HTTPCheckProvider
    from esmtpfa.providers.jwt import JWTProvider
    from esmtpfa.providers.ldap import LDAPProvider
    from esmtpfa.config.reload import redact_url
    if isinstance(provider, LDAPProvider):
        return _probe_ldap(provider)
    if isinstance(provider, JWTProvider):
        return provider.cache.refreshed().addCallback(
            lambda keys: f"JWKS fetched from {redact_url(str(provider.cache.url))}: {len(keys)} key(s)")
    if isinstance(provider, HTTPCheckProvider):
        # No credentials: a "yes" or a "no" means the endpoint is there and answering.
        from esmtpfa.auth.errors import UnauthorizedLogin
        answered = f"endpoint {redact_url(str(provider.checker.url))} answered"
        d = provider.checker.check({})
        d.addCallback(lambda _: answered)
        d.addErrback(lambda failure: failure.trap(UnauthorizedLogin) and answered)
        return d
    return None


def _probe_ldap(provider) -> Deferred:
    """The service connection a login's search uses: connect, TLS, bind as bind_user."""
    from twisted.internet.threads import deferToThread
    from esmtpfa.providers import ldap

    def bind() -> str:
        conn = provider._open(service=True)
        ldap._discard(conn)
        how = "bound as bind_user" if provider.bind_user else "connected (anonymous search)"
        scheme = "LDAPS" if provider.ldaps else "StartTLS" if provider.starttls else "plain LDAP"
        return f"{provider.server}:{provider.port} ({scheme}) {how}"
    return deferToThread(bind)
