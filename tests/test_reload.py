"""Hot reload (docs/design.md, "Configuration, reload and limits") under a running relay: file
edits, SIGHUP, a config service.

The relay runs in-process on loopback; the provider file is edited on disk, SIGHUP is
sent to this very process, and the config service is a twisted.web server in the test
that answers 200, 304, 500, garbage, or nothing.  What counts is what a client sees
(AUTH works or not, live sessions unharmed) and what ``/metrics`` says.
"""

from __future__ import annotations

import os
import re
import signal

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from esmtpfa.common.urls import redact_url
from esmtpfa.config.reload import REMIND_SECONDS
from tests.support.httpservers import AuthEndpoint, LoopbackHTTPServer, until
from tests.support.logcapture import capture_logs, log_text
from tests.support.relayfixture import PASSWORD, PROVIDERS, USER, RelayFixture
from tests.support.webclient import metrics, request
from tests.test_config import billion_laughs

NS = "esmtpfa"
SCRIPTS = """\
- meta: {name: scripts, type: userpass}
  params: {username: bot, password: "s3cret"}
"""


def auth(fixture, user: str, password: str):
    """One AUTH PLAIN over STARTTLS in a thread; fires with the reply code."""
    def script(fixture):
        client = fixture.secure_session()
        try:
            return client.auth_plain(user, password)[0]
        finally:
            client.close()
    return fixture.run(script, fixture)


def large_document(size: int = 3_900_000) -> str:
    """A well-formed provider document of about ``size`` bytes (3.9 MB: under the 4 MiB
    cap) with far more values than the limit: the shape that froze the relay for 18 s.
    Even with libyaml's scanner, reaching the values limit takes a second or more."""
    item = ("- meta: {{name: p{n}, type: userpass}}\n"
            "  params: {{username: user{n}, password: 'pw-{n}-" + "x" * 60 + "'}}\n")
    parts, total, n = ["providers:\n"], 0, 0
    while total < size:
        parts.append(item.format(n=n))
        total += len(parts[-1])
        n += 1
    return "".join(parts)


class ResponsiveWatch:
    """Samples, every 10 ms on the reactor, whether a document is being examined: each
    sample taken while one is proves the reactor ran during the parse, and the longest
    gap between samples is how long the reactor was held (18 s before the fix)."""

    def __init__(self, case, reloader):
        self.samples: list[bool] = []
        self.longest_gap = 0.0
        self._last = reactor.seconds()
        self._reloader = reloader
        self._loop = LoopingCall(self._tick)
        self._loop.start(0.01, now=False)
        case.addCleanup(self.stop)

    def _tick(self) -> None:
        now = reactor.seconds()
        self.longest_gap, self._last = max(self.longest_gap, now - self._last), now
        self.samples.append(bool(getattr(self._reloader, "examining", False)))

    @property
    def during_parse(self) -> int:
        return sum(self.samples)

    def assert_responsive(self, case) -> None:
        case.assertGreaterEqual(self.during_parse, 2)  # the reactor ticked while parsing
        # a generous bound (a loaded machine): the parse takes seconds, a tick ~10 ms
        case.assertLess(self.longest_gap, 1.0)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


def login_during_parse(fixture, user: str = USER, password: str = PASSWORD):
    """A real SMTP login (STARTTLS, AUTH) started while a document is being examined;
    fires with (reply code, whether the parse was still going when the reply came)."""
    reloader = fixture.service.reloader
    return auth(fixture, user, password).addCallback(
        lambda code: (code, reloader.examining))


class ReloadMixin:
    timeout = 30
    fixture_args: tuple = ("--config-poll-interval", "0.05")
    providers = PROVIDERS

    @defer.inlineCallbacks
    def setUp(self):
        self.events = capture_logs(self)
        self.fixture = RelayFixture(self.mktemp(), *self.fixture_args,
                                    providers=self.providers)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    @property
    def directory(self):
        return self.fixture.service.directory

    @property
    def reloader(self):
        return self.fixture.service.reloader

    def reloads(self, result: str, source: str = "file") -> float:
        registry = self.fixture.service.metrics.registry
        return registry.get_sample_value(f"{NS}_config_reloads_total",
                                         {"source": source, "result": result}) or 0

    def until_reloads(self, result: str, count: int, source: str = "file"):
        return until(lambda: self.reloads(result, source) >= count, timeout=10)

    def scrape(self):
        return metrics(self.fixture.metrics_port)

    def reload_now(self):
        """What SIGHUP does (without the signal); fires once the reload is done."""
        return self.fixture.service.getServiceNamed("reload").reload_now()


class FileReloadTests(ReloadMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_edited_file_is_loaded_without_restart(self):
        self.assertEqual((yield auth(self.fixture, "scripts", "bot:s3cret")), 535)
        self.fixture.write_providers(PROVIDERS + SCRIPTS)
        yield self.until_reloads("success", 1)
        self.assertEqual((yield auth(self.fixture, "scripts", "bot:s3cret")), 235)
        self.assertEqual((yield auth(self.fixture, USER, PASSWORD)), 235)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_config_reloads_total", source="file",
                                      result="success"), 1)
        self.assertEqual(scrape.value(f"{NS}_config_last_reload_successful"), 1)
        self.assertIn(frozenset({("name", "scripts"), ("domain", "*"), ("type", "userpass"),
                                 ("domain_selection", "false"), ("fallback", "false")}),
                      scrape.labelsets(f"{NS}_configured_providers"))
        self.assertIn("added ['scripts']", log_text(self.events))

    @defer.inlineCallbacks
    def test_in_place_rewrite_of_the_same_size_is_noticed(self):
        """Same size, same second: the content hash catches what stat cannot."""
        changed = PROVIDERS.replace("correct horse", "correct house")
        self.assertEqual(len(changed), len(PROVIDERS))
        with open(self.fixture.config_path, "w") as f:  # not atomic, same inode
            f.write(changed)
        yield self.until_reloads("success", 1)
        self.assertEqual((yield auth(self.fixture, USER, "correct house")), 235)

    @defer.inlineCallbacks
    def test_broken_file_keeps_the_last_good_config_until_fixed(self):
        self.fixture.write_providers("providers:\n- meta: {name: x, type: userpass\n")
        yield self.until_reloads("failure", 1)
        # the running config is untouched, and the failure is counted once, not per poll
        self.assertEqual((yield auth(self.fixture, USER, PASSWORD)), 235)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.reloads("failure"), 1)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_config_last_reload_successful"), 0)
        self.assertIn("NOT loaded, keeping the last good one: "
                      + os.path.abspath(self.fixture.config_path) + ": malformed YAML",
                      log_text(self.events))
        # a semantically bad file: named reason, still nothing changes
        self.fixture.write_providers(PROVIDERS + "- meta: {name: y, type: usrpass}\n")
        yield self.until_reloads("failure", 2)
        self.assertIn("unknown type 'usrpass'", log_text(self.events))
        self.assertEqual(sorted(self.directory.current.by_name), ["office", "printers"])
        # fixed: loaded, and the gauge says so
        self.fixture.write_providers(PROVIDERS + SCRIPTS)
        yield self.until_reloads("success", 1)
        self.assertEqual((yield auth(self.fixture, "scripts", "bot:s3cret")), 235)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_config_last_reload_successful"), 1)
        self.assertEqual(scrape.value(f"{NS}_config_reloads_total", source="file",
                                      result="failure"), 2)

    @defer.inlineCallbacks
    def test_deleted_file_keeps_the_config_and_counts_once(self):
        os.unlink(self.fixture.config_path)
        yield self.until_reloads("failure", 1)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.reloads("failure"), 1)
        self.assertEqual((yield auth(self.fixture, USER, PASSWORD)), 235)
        self.fixture.write_providers(PROVIDERS)
        yield self.until_reloads("success", 1)

    @defer.inlineCallbacks
    def test_unchanged_providers_keep_their_instances_removed_ones_stop(self):
        office = self.directory.current.by_name["office"]
        printers = self.directory.current.by_name["printers"]
        stopped = []
        printers.stopProvider = lambda: stopped.append("printers") or defer.succeed(None)
        self.reloader.grace = 0.2
        self.fixture.write_providers(PROVIDERS.split("- meta: {name: printers")[0] + SCRIPTS)
        yield self.until_reloads("success", 1)
        self.assertIs(self.directory.current.by_name["office"], office)
        self.assertNotIn("printers", self.directory.current.by_name)
        # removed: no longer selected by name (and the fallback rejects these credentials)
        self.assertEqual((yield auth(self.fixture, "printers", "printer1:p:with:colons")), 535)
        self.assertEqual(stopped, [])  # still in its grace period
        yield until(lambda: stopped == ["printers"], timeout=5)
        scrape = yield self.scrape()
        names = {dict(labels)["name"] for labels in
                 scrape.labelsets(f"{NS}_configured_providers")}
        self.assertEqual(names, {"office", "scripts"})


class SighupTests(ReloadMixin, unittest.TestCase):
    fixture_args = ("--config-poll-interval", "3600")  # only the signal can reload

    @defer.inlineCallbacks
    def test_sighup_reloads_at_once(self):
        self.fixture.write_providers(PROVIDERS + SCRIPTS)
        os.kill(os.getpid(), signal.SIGHUP)
        yield self.until_reloads("success", 1)
        self.assertEqual((yield auth(self.fixture, "scripts", "bot:s3cret")), 235)
        self.assertIn("SIGHUP: reloading", log_text(self.events))

    @defer.inlineCallbacks
    def test_sighup_with_an_unchanged_file_reloads_and_keeps_everything(self):
        before = self.directory.current.providers
        os.kill(os.getpid(), signal.SIGHUP)
        yield self.until_reloads("success", 1)
        self.assertEqual(self.directory.current.providers, before)

    @defer.inlineCallbacks
    def test_handler_is_restored_when_the_relay_stops(self):
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        yield self.fixture.stop()
        self.assertIn(signal.getsignal(signal.SIGHUP), (signal.SIG_DFL, None))


class StartupSighupTests(unittest.TestCase):
    """twistd binds the listeners before the reload service starts: a SIGHUP in between
    (``systemctl reload`` right after a start) must neither end the relay, which is
    SIGHUP's default action, nor be lost.  CI once lost a relay this way."""

    timeout = 30

    @defer.inlineCallbacks
    def test_a_sighup_while_starting_is_kept_and_reloaded_once_started(self):
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP,
                        signal.SIG_DFL if previous is None else previous)
        events = capture_logs(self)
        fixture = RelayFixture(self.mktemp(), "--config-poll-interval", "3600",
                               providers=PROVIDERS)
        self.addCleanup(fixture.stop)

        def operator_reloads():
            fixture.write_providers(PROVIDERS + SCRIPTS)
            # Checked first, so that a regression fails here instead of killing trial.
            self.assertNotIn(signal.getsignal(signal.SIGHUP), (signal.SIG_DFL, None),
                             "the listeners are bound and SIGHUP would end the relay")
            os.kill(os.getpid(), signal.SIGHUP)
        yield fixture.start(while_starting=operator_reloads)
        yield until(lambda: "scripts" in [p.meta.name for p in
                                          fixture.service.directory.current.providers],
                    timeout=10)
        self.assertEqual((yield auth(fixture, "scripts", "bot:s3cret")), 235)
        self.assertIn("SIGHUP came during startup: reloading now", log_text(events))


FALLBACK_PROVIDERS = """\
providers:
- meta: {{name: remote, type: http_basic, fallback: true}}
  params: {{url: "{url}", timeout: "5"}}
- meta: {{name: rotating, type: userpass}}
  params: {{username: u, password: "pw-{n}"}}
"""


class FallbackReloadTests(ReloadMixin, unittest.TestCase):
    """However many reloads happen, a fallback is listed once and asked once."""

    fixture_args = ("--config-poll-interval", "3600")
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.endpoint = AuthEndpoint(expect_basic=(USER, PASSWORD))
        self.server = LoopbackHTTPServer({"auth": self.endpoint}).start()
        self.addCleanup(self.server.stop)
        self.providers = self.document(0)
        yield super().setUp()

    def document(self, n: int, timeout: str = "5") -> str:
        return FALLBACK_PROVIDERS.format(url=self.server.url("/auth"), n=n).replace(
            'timeout: "5"', f'timeout: "{timeout}"')

    @defer.inlineCallbacks
    def test_500_reloads_then_one_failed_auth_reaches_the_fallback_once(self):
        fallback = self.directory.current.by_name["remote"]
        for n in range(1, 501):
            self.fixture.write_providers(self.document(n))
            yield self.reload_now()
        self.assertEqual(self.reloads("success"), 500)
        self.assertEqual(self.reloads("failure"), 0)
        current = self.directory.current
        self.assertEqual([p.meta.name for p in current.fallbacks], ["remote"])
        self.assertIs(current.by_name["remote"], fallback)
        self.assertEqual((yield auth(self.fixture, "nobody", "wrong")), 535)
        self.assertEqual(self.endpoint.count, 1)
        self.assertEqual((yield auth(self.fixture, USER, PASSWORD)), 235)
        self.assertEqual(self.endpoint.count, 2)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_fallback_connections_total", provider="remote",
                                      status="0"), 1)

    @defer.inlineCallbacks
    def test_auth_in_flight_during_a_reload_completes(self):
        self.endpoint.delay = 0.5
        login = auth(self.fixture, USER, PASSWORD)
        yield until(lambda: self.endpoint.count == 1)
        self.fixture.write_providers(self.document(1))  # another provider changes
        yield self.reload_now()
        self.assertEqual((yield login), 235)

    @defer.inlineCallbacks
    def test_auth_in_flight_on_a_replaced_provider_still_gets_its_answer(self):
        self.endpoint.delay = 0.5
        old = self.directory.current.by_name["remote"]
        login = auth(self.fixture, USER, PASSWORD)
        yield until(lambda: self.endpoint.count == 1)
        self.fixture.write_providers(self.document(0, timeout="4"))  # remote itself changes
        yield self.reload_now()
        self.assertIsNot(self.directory.current.by_name["remote"], old)
        self.assertEqual((yield login), 235)  # the old instance answered, not stopped yet


class LargeDocumentFileTests(ReloadMixin, unittest.TestCase):
    """A 3.9 MB document is parsed off the reactor, and only once."""

    timeout = 60

    @defer.inlineCallbacks
    def test_file_watch_parses_in_a_thread_and_refuses_the_document_once(self):
        document = large_document()  # built before the watch: the test's own cost
        watch = ResponsiveWatch(self, self.reloader)
        self.fixture.write_providers(document)
        yield until(lambda: getattr(self.reloader, "examining", False), timeout=10)
        code, still_parsing = yield login_during_parse(self.fixture)
        self.assertEqual(code, 235)  # the running config serves logins meanwhile
        yield self.until_reloads("failure", 1)
        self.assertTrue(still_parsing, "the login should complete during the parse")
        watch.assert_responsive(self)
        # the file stays "racy" (just written) for 2 s: re-read and re-hashed at every
        # 50 ms tick, but never parsed again, counted again or logged again
        yield deferLater(reactor, 2.5, lambda: None)
        self.assertEqual(self.reloader.parsed, 1)
        self.assertEqual(self.reloads("failure"), 1)
        text = log_text(self.events)
        self.assertEqual(text.count("NOT loaded"), 1)
        # the values limit or the deadline, whichever it reaches first on this machine
        self.assertRegex(text, re.escape(os.path.abspath(self.fixture.config_path))
                         + r": providers\[\d+\]\S* \(line \d+\): document refused: ")
        self.assertEqual(sorted(self.directory.current.by_name), ["office", "printers"])

    @defer.inlineCallbacks
    def test_billion_laughs_is_refused_with_a_clear_error(self):
        self.fixture.write_providers(billion_laughs())
        yield self.until_reloads("failure", 1)
        self.assertIn(os.path.abspath(self.fixture.config_path) + ": providers[0].params.l4[7]"
                      " (line 7): document refused: more than 100000 values (counting each "
                      "YAML alias as a copy)", log_text(self.events))
        self.assertEqual((yield auth(self.fixture, USER, PASSWORD)), 235)

    @defer.inlineCallbacks
    def test_oversized_file_is_refused_unparsed(self):
        with open(self.fixture.config_path, "w") as f:
            f.write(PROVIDERS + "#" * (4 * 1024 * 1024))
        yield self.until_reloads("failure", 1)
        self.assertIn("document refused: larger than 4194304 bytes", log_text(self.events))
        self.assertEqual(self.reloader.parsed, 0)


class LargeDocumentSighupTests(ReloadMixin, unittest.TestCase):
    fixture_args = ("--config-poll-interval", "3600")  # only the signal can reload
    timeout = 60

    @defer.inlineCallbacks
    def test_sighup_parses_in_a_thread_and_reparses_on_request(self):
        document = large_document()
        watch = ResponsiveWatch(self, self.reloader)
        self.fixture.write_providers(document)
        os.kill(os.getpid(), signal.SIGHUP)
        yield until(lambda: getattr(self.reloader, "examining", False), timeout=10)
        code, still_parsing = yield login_during_parse(self.fixture)
        self.assertEqual(code, 235)
        yield self.until_reloads("failure", 1)
        self.assertTrue(still_parsing, "the login should complete during the parse")
        watch.assert_responsive(self)
        self.assertEqual(self.reloader.parsed, 1)
        # SIGHUP is the operator asking: the same document is examined again
        yield self.reload_now()
        self.assertEqual(self.reloader.parsed, 2)
        self.assertEqual(self.reloads("failure"), 2)
        # a good document after it loads, and the refusal reminder state is reset
        self.fixture.write_providers(PROVIDERS + SCRIPTS)
        yield self.reload_now()
        self.assertEqual((yield auth(self.fixture, "scripts", "bot:s3cret")), 235)


class ConfigService(Resource):
    """A scripted config service: ``document``/``etag``/``last_modified`` answer (None:
    no such validator), ``status`` forces an error, ``hang`` never answers; every
    request's headers are recorded."""

    isLeaf = True

    def __init__(self, document: bytes, etag: str | None = '"v1"'):
        super().__init__()
        self.document = document
        self.etag = etag
        self.status: int | None = None
        self.hang = False
        self.requests: list[dict[str, str]] = []
        self.not_modified = 0
        self.served = 0  # 200s with the document
        self.last_modified: str | None = None
        self.content_type = b"application/json"

    def render_GET(self, request):
        self.requests.append({name.decode().lower(): values[0].decode()
                              for name, values in request.requestHeaders.getAllRawHeaders()})
        if self.hang:
            return NOT_DONE_YET
        if self.status is not None:
            request.setResponseCode(self.status)
            return b"service error\n"
        if self.etag is not None and request.getHeader(b"if-none-match") == self.etag.encode():
            self.not_modified += 1
            request.setResponseCode(304)
            return b""
        if (self.last_modified is not None
                and request.getHeader(b"if-modified-since") == self.last_modified.encode()):
            self.not_modified += 1
            request.setResponseCode(304)
            return b""
        if self.etag is not None:
            request.setHeader(b"etag", self.etag.encode())
        if self.last_modified is not None:
            request.setHeader(b"last-modified", self.last_modified.encode())
        request.setHeader(b"content-type", self.content_type)
        self.served += 1
        return self.document


SERVICE_DOCUMENT = b"""{"providers": [{"meta": {"name": "svc", "type": "userpass"},
                   "params": {"username": "robot", "password": "from-the-service"}}]}"""
TOKEN = "svc-token-4b1d"


class ConfigServiceTests(ReloadMixin, unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.service = ConfigService(SERVICE_DOCUMENT)
        self.server = LoopbackHTTPServer({"providers": self.service}).start()
        self.addCleanup(self.server.stop)
        self.events = capture_logs(self)
        self.fixture = RelayFixture(
            self.mktemp(), "--config-svc", self.server.url("/providers?key=secret-q"),
            "--config-svc-interval", "0.1", "--config-svc-timeout", "0.5",
            env={"PROVIDER_CONFIG_SERVICE_TOKEN": TOKEN})
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def until_provider(self, name: str):
        return until(lambda: name in self.directory.current.by_name, timeout=10)

    @defer.inlineCallbacks
    def test_200_then_304_with_token_and_etag(self):
        yield self.until_provider("svc")
        self.assertEqual((yield auth(self.fixture, "svc", "robot:from-the-service")), 235)
        # the file (office, printers) is not a source when a service is configured
        self.assertEqual(sorted(self.directory.current.by_name), ["svc"])
        yield until(lambda: self.service.not_modified >= 3)
        first, *later = self.service.requests
        self.assertEqual(first["authorization"], f"Bearer {TOKEN}")
        self.assertNotIn("if-none-match", first)
        self.assertEqual(later[-1]["if-none-match"], '"v1"')
        self.assertEqual(self.reloads("success", "service"), 1)
        self.assertEqual(self.reloads("failure", "service"), 0)

    @defer.inlineCallbacks
    def test_500_garbage_and_hang_keep_the_last_good_config(self):
        yield self.until_provider("svc")
        svc = self.directory.current.by_name["svc"]
        self.service.status = 500
        yield self.until_reloads("failure", 1, "service")
        self.service.status = None
        self.service.document, self.service.etag = b'{"providers": [{"meta": ', '"v2"'
        yield self.until_reloads("failure", 2, "service")
        self.assertEqual((yield auth(self.fixture, "svc", "robot:from-the-service")), 235)
        failures = self.reloads("failure", "service")
        self.service.hang = True
        yield self.until_reloads("failure", failures + 1, "service")
        self.assertIs(self.directory.current.by_name["svc"], svc)
        self.assertEqual((yield auth(self.fixture, "svc", "robot:from-the-service")), 235)
        text = log_text(self.events)
        for reason in ("HTTP 500", "malformed JSON", "timed out after 0.5 s"):
            self.assertIn(reason, text)
        # the service recovers with a new provider: loaded
        self.service.hang = False
        self.service.document = SERVICE_DOCUMENT.replace(b"}}]}", b"}}, " + b"""
            {"meta": {"name": "svc2", "type": "userpass", "fallback": true},
             "params": {"username": "r2", "password": "p2"}}]}""")
        self.service.etag = '"v3"'
        yield self.until_provider("svc2")
        self.assertIs(self.directory.current.by_name["svc"], svc)
        self.assertEqual((yield auth(self.fixture, "r2", "p2")), 235)

    @defer.inlineCallbacks
    def test_secrets_never_reach_the_log(self):
        yield self.until_provider("svc")
        self.service.status = 500
        yield self.until_reloads("failure", 1, "service")
        text = log_text(self.events) + repr(self.events)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn("secret-q", text)  # the URL's query may carry a key
        self.assertNotIn("from-the-service", text)
        self.assertIn(self.server.url("/providers"), text)


class ConfigServiceStartupTests(unittest.TestCase):
    """A relay whose service is down at startup runs, is not ready, then becomes ready."""

    timeout = 30

    @defer.inlineCallbacks
    def test_not_ready_until_the_first_document(self):
        service = ConfigService(SERVICE_DOCUMENT)
        service.status = 503
        server = LoopbackHTTPServer({"providers": service}).start()
        self.addCleanup(server.stop)
        fixture = RelayFixture(self.mktemp(), "--config-svc", server.url("/providers"),
                               "--config-svc-interval", "0.1")
        self.addCleanup(fixture.stop)
        yield fixture.start()
        readyz = f"http://127.0.0.1:{fixture.metrics_port}/readyz"
        response = yield request("GET", readyz)
        self.assertEqual(response.code, 503)
        self.assertIn("waiting for the first document",
                      response.json()["checks"]["config"]["detail"])
        self.assertEqual((yield auth(fixture, "svc", "robot:from-the-service")), 535)
        service.status = None
        yield until(lambda: "svc" in fixture.service.directory.current.by_name, timeout=10)
        response = yield request("GET", readyz)
        self.assertEqual(response.code, 200, response.body)


class LargeDocumentServiceTests(unittest.TestCase):
    """A refused document from the config service is parsed once, not at every poll."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, service: "ConfigService"):
        self.events = capture_logs(self)
        self.server = LoopbackHTTPServer({"providers": service}).start()
        self.addCleanup(self.server.stop)
        self.fixture = RelayFixture(self.mktemp(), "--config-svc",
                                    self.server.url("/providers"),
                                    "--config-svc-interval", "0.1",
                                    "--config-svc-timeout", "5")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()
        self.reloader = self.fixture.service.reloader
        yield until(lambda: "svc" in self.reloader._directory.current.by_name, timeout=10)

    def failures(self) -> float:
        registry = self.fixture.service.metrics.registry
        return registry.get_sample_value(f"{NS}_config_reloads_total",
                                         {"source": "service", "result": "failure"}) or 0

    @defer.inlineCallbacks
    def refused_once(self, service: "ConfigService", polls):
        """Serve the large document; the relay stays responsive while it is parsed and
        then never parses, counts or logs it again however often it polls."""
        document = large_document().encode()
        watch = ResponsiveWatch(self, self.reloader)
        parsed = getattr(self.reloader, "parsed", 0)  # the first, good document
        service.document = document
        yield until(lambda: getattr(self.reloader, "examining", False), timeout=10)
        code, still_parsing = yield login_during_parse(self.fixture, "svc",
                                                       "robot:from-the-service")
        self.assertEqual(code, 235)  # the last good document still serves logins
        yield until(lambda: self.failures() >= 1, timeout=20)
        self.assertTrue(still_parsing, "the login should complete during the parse")
        watch.assert_responsive(self)
        requests = len(service.requests)
        yield until(lambda: polls() and len(service.requests) >= requests + 5, timeout=10)
        self.assertEqual(self.failures(), 1)
        self.assertEqual(log_text(self.events).count("NOT loaded"), 1)
        self.assertEqual(self.reloader.parsed, parsed + 1)
        self.assertIn("svc", self.reloader._directory.current.by_name)

    @defer.inlineCallbacks
    def test_with_etag_the_refused_document_is_not_downloaded_again(self):
        service = ConfigService(SERVICE_DOCUMENT)
        yield self.start(service)
        service.etag = '"big"'
        yield self.refused_once(service, lambda: service.not_modified >= 5)
        self.assertEqual(service.requests[-1]["if-none-match"], '"big"')

    @defer.inlineCallbacks
    def test_with_last_modified_only(self):
        service = ConfigService(SERVICE_DOCUMENT, etag=None)
        service.last_modified = "Tue, 01 Dec 2026 10:00:00 GMT"
        yield self.start(service)
        service.last_modified = "Wed, 02 Dec 2026 10:00:00 GMT"
        yield self.refused_once(service, lambda: service.not_modified >= 5)
        self.assertEqual(service.requests[-1]["if-modified-since"],
                         "Wed, 02 Dec 2026 10:00:00 GMT")

    @defer.inlineCallbacks
    def test_without_validators_the_digest_saves_the_parse(self):
        service = ConfigService(SERVICE_DOCUMENT, etag=None)
        yield self.start(service)
        yield self.refused_once(service, lambda: service.served >= 6)

    @defer.inlineCallbacks
    def test_reminder_after_a_few_minutes_and_recovery(self):
        service = ConfigService(SERVICE_DOCUMENT, etag=None)
        yield self.start(service)
        parsed = getattr(self.reloader, "parsed", 0)
        service.document = billion_laughs().encode()
        yield until(lambda: self.failures() >= 1, timeout=10)
        self.assertIn("more than 100000 values (counting each YAML alias as a copy)",
                      log_text(self.events))
        served = service.served
        yield until(lambda: service.served >= served + 3)
        self.assertEqual(self.failures(), 1)  # not refused again at every poll
        self.assertEqual(log_text(self.events).count("NOT loaded"), 1)
        # pretend the refusal was logged REMIND_SECONDS ago: the next poll reminds, once
        self.reloader._refused_logged -= REMIND_SECONDS
        yield until(lambda: "still the refused document" in log_text(self.events))
        served = service.served
        yield until(lambda: service.served >= served + 3)
        self.assertEqual(log_text(self.events).count("still the refused document"), 1)
        self.assertEqual(self.reloader.parsed, parsed + 1)
        service.document = SERVICE_DOCUMENT.replace(b'"svc"', b'"svc-b"')
        yield until(lambda: "svc-b" in self.reloader._directory.current.by_name)
        # back to the document refused before: a change from the one in use, examined again
        service.document = billion_laughs().encode()
        yield until(lambda: self.failures() >= 2, timeout=10)
        self.assertEqual(self.reloader.parsed, parsed + 3)

    @defer.inlineCallbacks
    def test_oversized_body_is_refused_once_and_not_downloaded_again(self):
        service = ConfigService(SERVICE_DOCUMENT)
        yield self.start(service)
        parsed = self.reloader.parsed
        service.document, service.etag = b" " * (4 * 1024 * 1024 + 1), '"huge"'
        yield until(lambda: self.failures() >= 1, timeout=10)
        self.assertIn("document refused: larger than 4194304 bytes", log_text(self.events))
        yield until(lambda: service.not_modified >= 3, timeout=10)
        self.assertEqual(service.requests[-1]["if-none-match"], '"huge"')
        self.assertEqual(self.failures(), 1)
        self.assertEqual(self.reloader.parsed, parsed)
        self.assertEqual(log_text(self.events).count("NOT loaded"), 1)
        self.assertIn("svc", self.reloader._directory.current.by_name)


class RedactionTests(unittest.TestCase):
    def test_redact_url(self):
        self.assertEqual(redact_url("https://user:pw@cfg.example:8443/p?token=x#f"),
                         "https://cfg.example:8443/p")
