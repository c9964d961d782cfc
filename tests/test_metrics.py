"""Metrics (docs/design.md, "Metrics") and health, scraped over HTTP like Prometheus does.

Real SMTP and HTTP sessions run against the whole relay; ``/metrics`` is fetched over
loopback and parsed with prometheus_client's text parser; each test asserts the exact
increments and the exact label sets, so a label that leaks client input, or a series
that survives its provider, fails a test.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import time

import yaml
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import RunningRelay
from tests.support.httpservers import until
from tests.support.relayfixture import PASSWORD, USER, RelayFixture
from tests.support.webclient import Scrape, get_blocking, metrics, post_json, request

NS = "esmtpfa"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: metrics\r\n\r\nHello\r\n")

#: docs/design.md, "Metrics": the original's metrics (family name as parsed, type, label names).
ORIGINAL = {
    "logins": ("counter", {"provider", "status"}),
    "bytes_sent": ("counter", {"provider"}),
    "bytes_sent_from_address": ("counter", {"provider", "from"}),
    "bytes_sent_to_address": ("counter", {"provider", "to"}),
    "messages_sent": ("counter", {"provider"}),
    "auth_successes": ("counter", {"provider"}),
    "auth_failures": ("counter", {"provider"}),
    "fallback_connections": ("counter", {"provider", "status"}),
    "configured_providers": ("gauge", {"name", "domain", "domain_selection", "fallback",
                                       "type"}),
    "mail_from_to": ("counter", {"from", "to", "status"}),
    "smtp_server_request_duration_seconds": ("histogram", {"server", "status"}),
}


def labels(**pairs: str) -> frozenset:
    return frozenset(pairs.items())


def counted(scrape, name: str) -> set[frozenset]:
    """The label sets of ``name`` that counted something: series whose labels are known
    at start exist from the first scrape with 0 (``RelayMetrics.initialise``)."""
    return {frozenset(sample.labels.items()) for sample in scrape.samples
            if sample.name == name and sample.value}


def smtp_send(client, sender="alice@example.com", recipients=("bob@example.net",),
              content=MESSAGE):
    return client.send_message(content, sender, recipients)


class MetricsMixin:
    timeout = 30
    fixture_args: tuple = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), "--http", *self.fixture_args)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    def scrape(self):
        return metrics(self.fixture.metrics_port)

    def smtp(self, script):
        return self.fixture.run(script, self.fixture)

    def login_and_send(self, user=USER, password=PASSWORD, **kwargs):
        def script(fixture):
            client = fixture.secure_session()
            code, text = client.auth_plain(user, password)
            assert code == 235, (code, text)
            reply = smtp_send(client, **kwargs)
            client.close()
            return reply
        return self.smtp(script)

    def failed_login(self, user, password):
        def script(fixture):
            client = fixture.secure_session()
            reply = client.auth_plain(user, password)
            client.close()
            return reply
        return self.smtp(script)

    def http_post(self, auth=(USER, PASSWORD), sender="alice@example.com",
                  to=("bob@example.net",)):
        body = {"from": sender, "to": list(to), "data": base64.b64encode(MESSAGE).decode()}
        return post_json(f"http://127.0.0.1:{self.fixture.http_port}/", body, auth=auth)

    @property
    def upstream_label(self) -> str:
        return f"127.0.0.1:{self.fixture.upstream.port}"


#: The original's series labelled with mail addresses: served only on opt-in.
ADDRESS_FAMILIES = ("bytes_sent_from_address", "bytes_sent_to_address", "mail_from_to")
#: What the original's dashboards ask for: the address series back.
OPT_IN = ("--metrics-address-labels", "100")


class PrivateByDefaultTests(MetricsMixin, unittest.TestCase):
    """With default settings ``/metrics`` names nobody: who mails whom is private, and
    anyone who reaches the listener reads it."""

    @defer.inlineCallbacks
    def test_no_address_is_served_after_smtp_and_http_submissions(self):
        yield self.login_and_send(sender="ceo@corp.example",
                                  recipients=("lawyer@firm.example",))
        response = yield self.http_post(sender="ceo@corp.example",
                                        to=("lawyer@firm.example",))
        self.assertEqual(response.code, 202, response.body)
        self.fixture.upstream.rcpt_replies["gone@firm.example"] = "550 5.1.1 No such user"
        yield self.http_post(sender="ceo@corp.example", to=("gone@firm.example",))
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_messages_sent_total", provider="office"), 2)
        for text in ("@", "ceo", "lawyer", "corp.example", "firm.example", USER):
            self.assertNotIn(text, scrape.text)
        for name in ADDRESS_FAMILIES:
            self.assertNotIn(f"{NS}_{name}", scrape.families)

    def test_default_listener_is_loopback(self):
        from esmtpfa.runtime.tap import Options
        options = Options(environ={"METRICS_ADDR": ""})  # empty: unset, as in the original
        options.parseOptions([])
        self.assertEqual(options["metrics-addr"], "127.0.0.1")

    @defer.inlineCallbacks
    def test_relay_started_without_an_address_serves_metrics_on_loopback_only(self):
        from esmtpfa.runtime.service import RelayService
        from esmtpfa.runtime.tap import Options
        directory = self.fixture.directory
        options = Options(environ={})
        options.parseOptions(["--config", self.fixture.config_path, "--metrics-port", "0",
                              "--maildir", directory + "/maildir-2"])
        service = RelayService(options)
        service.startService()
        self.addCleanup(service.stopService)
        ports = yield service.listening_ports()
        self.assertEqual(ports["metrics"].getHost().host, "127.0.0.1")


class ManifestTests(unittest.TestCase):
    """Kubernetes probes the pod IP: a manifest that exposes the metrics port must move
    the listener off its loopback default."""

    def test_every_manifest_with_a_metrics_port_listens_beyond_loopback(self):
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "deploy")
        checked = 0
        for path in sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)):
            with open(path, encoding="utf-8") as f:
                documents = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
            for document in documents:
                pod = document.get("spec", {}).get("template", {}).get("spec", {})
                for container in pod.get("containers", []):
                    if not any(port.get("name") == "metrics"
                               for port in container.get("ports", [])):
                        continue
                    env = {e["name"]: e.get("value") for e in container.get("env", [])}
                    self.assertIn(env.get("METRICS_ADDR"), ("0.0.0.0", "::"), path)
                    checked += 1
        self.assertGreaterEqual(checked, 2)


class OriginalMetricsTests(MetricsMixin, unittest.TestCase):
    fixture_args = OPT_IN

    @defer.inlineCallbacks
    def test_every_original_metric_with_its_name_type_and_labels(self):
        yield self.login_and_send()
        yield self.failed_login("printers", "printer1:wrong")
        scrape = yield self.scrape()
        for name, (kind, label_names) in ORIGINAL.items():
            family = scrape.families.get(f"{NS}_{name}")
            self.assertIsNotNone(family, name)
            self.assertEqual(family.type, kind, name)
            self.assertTrue(family.samples, name)
            for sample in family.samples:
                self.assertEqual(set(sample.labels) - {"le"}, label_names, sample)
        # Prometheus names on the wire: every counter ends in _total
        self.assertIn(f"# TYPE {NS}_mail_from_to_total counter\n", scrape.text)
        self.assertIn(f"# TYPE {NS}_logins_total counter\n", scrape.text)
        self.assertNotIn("_created", scrape.text)

    @defer.inlineCallbacks
    def test_smtp_session_exact_increments(self):
        yield self.login_and_send()  # alice: no provider of that name, fallback office
        [message] = self.fixture.upstream.messages
        size = len(message.data)
        scrape = yield self.scrape()
        office = {"provider": "office"}
        self.assertEqual(counted(scrape, f"{NS}_logins_total"),
                         {labels(provider="office", status="valid")})
        self.assertEqual(scrape.value(f"{NS}_logins_total", status="valid", **office), 1)
        self.assertEqual(counted(scrape, f"{NS}_fallback_connections_total"),
                         {labels(provider="office", status="1")})
        self.assertEqual(scrape.value(f"{NS}_auth_successes_total", **office), 1)
        self.assertEqual(counted(scrape, f"{NS}_auth_failures_total"), set())
        self.assertEqual(scrape.value(f"{NS}_messages_sent_total", **office), 1)
        self.assertEqual(scrape.value(f"{NS}_bytes_sent_total", **office), size)
        self.assertEqual(counted(scrape, f"{NS}_bytes_sent_from_address_total"),
                         {labels(provider="office", **{"from": "alice@example.com"})})
        self.assertEqual(scrape.value(f"{NS}_bytes_sent_from_address_total",
                                      provider="office", **{"from": "alice@example.com"}),
                         size)
        self.assertEqual(scrape.value(f"{NS}_bytes_sent_to_address_total",
                                      provider="office", to="bob@example.net"), size)
        self.assertEqual(counted(scrape, f"{NS}_mail_from_to_total"),
                         {labels(to="bob@example.net", status="1",
                                 **{"from": "alice@example.com"})})
        duration = f"{NS}_smtp_server_request_duration_seconds_count"
        self.assertEqual(counted(scrape, duration),
                         {labels(server=self.upstream_label, status="1")})
        self.assertEqual(scrape.value(f"{NS}_relay_outcomes_total", reason="accepted"), 1)
        self.assertEqual(scrape.value(f"{NS}_auth_duration_seconds_count",
                                      provider="office", outcome="accepted"), 1)

    @defer.inlineCallbacks
    def test_http_submission_counts_like_smtp(self):
        response = yield self.http_post(auth=("printers", "printer1:p:with:colons"))
        self.assertEqual(response.code, 202)
        size = len(self.fixture.upstream.messages[0].data)
        scrape = yield self.scrape()
        self.assertEqual(counted(scrape, f"{NS}_logins_total"),
                         {labels(provider="printers", status="valid")})
        self.assertEqual(counted(scrape, f"{NS}_fallback_connections_total"), set())
        self.assertEqual(scrape.value(f"{NS}_messages_sent_total", provider="printers"), 1)
        self.assertEqual(scrape.value(f"{NS}_bytes_sent_total", provider="printers"), size)
        self.assertEqual(scrape.value(f"{NS}_mail_from_to_total", to="bob@example.net",
                                      status="1", **{"from": "alice@example.com"}), 1)

    @defer.inlineCallbacks
    def test_unknown_username_is_never_a_label(self):
        stranger = "mallory-7f3a9c"
        yield self.failed_login(stranger, "guess")
        response = yield self.http_post(auth=(f"{stranger}-http", "guess"))
        self.assertEqual(response.code, 401)
        scrape = yield self.scrape()
        self.assertNotIn(stranger, scrape.text)
        self.assertEqual(counted(scrape, f"{NS}_logins_total"),
                         {labels(provider="none", status="invalid")})
        self.assertEqual(scrape.value(f"{NS}_logins_total", provider="none",
                                      status="invalid"), 2)
        self.assertEqual(scrape.value(f"{NS}_auth_failures_total", provider="none"), 2)
        self.assertEqual(counted(scrape, f"{NS}_fallback_connections_total"),
                         {labels(provider="office", status="0")})
        self.assertEqual(scrape.value(f"{NS}_fallback_connections_total", provider="office",
                                      status="0"), 2)

    @defer.inlineCallbacks
    def test_named_provider_rejection_tries_no_fallback(self):
        yield self.failed_login("printers", "printer1:wrong")
        scrape = yield self.scrape()
        self.assertEqual(counted(scrape, f"{NS}_logins_total"),
                         {labels(provider="printers", status="invalid")})
        self.assertEqual(scrape.value(f"{NS}_auth_failures_total", provider="printers"), 1)
        self.assertEqual(counted(scrape, f"{NS}_fallback_connections_total"), set())
        self.assertEqual(scrape.value(f"{NS}_auth_duration_seconds_count",
                                      provider="printers", outcome="rejected"), 1)

    @defer.inlineCallbacks
    def test_upstream_rejection_and_unavailability(self):
        upstream = self.fixture.upstream
        upstream.eom_reply = "554 5.7.1 Refused"
        response = yield self.http_post()
        self.assertEqual(response.code, 502)
        yield upstream.stop()
        response = yield self.http_post(to=("carol@example.org",))
        self.assertEqual(response.code, 503)
        scrape = yield self.scrape()
        self.assertEqual(counted(scrape, f"{NS}_relay_outcomes_total"),
                         {labels(reason="rejected"), labels(reason="unavailable")})
        self.assertEqual(scrape.value(f"{NS}_relay_outcomes_total", reason="rejected"), 1)
        self.assertEqual(scrape.value(f"{NS}_relay_outcomes_total", reason="unavailable"), 1)
        # (whether the dead upstream is noticed at MAIL or later is the relay's business:
        # a pair is only known, and counted, once a recipient was named)
        self.assertIn(labels(to="bob@example.net", status="0",
                             **{"from": "alice@example.com"}),
                      counted(scrape, f"{NS}_mail_from_to_total"))
        self.assertEqual({dict(pair)["status"] for pair in
                          counted(scrape, f"{NS}_mail_from_to_total")}, {"0"})
        self.assertEqual(counted(scrape, f"{NS}_messages_sent_total"), set())
        self.assertEqual(counted(scrape, f"{NS}_bytes_sent_total"), set())
        self.assertEqual(scrape.value(f"{NS}_smtp_server_request_duration_seconds_count",
                                      server=self.upstream_label, status="0"), 2)

    @defer.inlineCallbacks
    def test_refused_recipient(self):
        self.fixture.upstream.rcpt_replies["nobody@example.net"] = "550 5.1.1 No such user"
        response = yield self.http_post(to=("bob@example.net", "nobody@example.net"))
        self.assertEqual(response.code, 502)  # HTTP is all or nothing
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_relay_outcomes_total", reason="rejected"), 1)
        self.assertEqual(scrape.value(f"{NS}_mail_from_to_total", to="nobody@example.net",
                                      status="0", **{"from": "alice@example.com"}), 1)
        self.assertEqual(counted(scrape, f"{NS}_messages_sent_total"), set())

    @defer.inlineCallbacks
    def test_configured_providers(self):
        scrape = yield self.scrape()
        self.assertEqual(counted(scrape, f"{NS}_configured_providers"), {
            labels(name="office", domain="*", domain_selection="false", fallback="true",
                   type="userpass"),
            labels(name="printers", domain="*", domain_selection="false", fallback="false",
                   type="userpass")})

    @defer.inlineCallbacks
    def test_active_smtp_connections(self):
        clients = []

        def connect(fixture):
            clients.append(fixture.connect())
            clients.append(fixture.connect())
            clients[0].command("EHLO a.example")
            clients[1].command("EHLO b.example")
        yield self.smtp(connect)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_smtp_active_connections", listener="plain"), 2)
        self.assertEqual(scrape.value(f"{NS}_smtp_active_connections", listener="tls"), 0)
        for client in clients:
            client.close()
        yield until(lambda: not self.fixture.service.smtp_factories[0].sessions)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_smtp_active_connections", listener="plain"), 0)


class AddressBoundTests(MetricsMixin, unittest.TestCase):
    """Address labels: the first N distinct values each, then ``other``."""

    fixture_args = ("--metrics-address-labels", "2")

    @defer.inlineCallbacks
    def test_addresses_past_the_bound_count_as_other(self):
        yield self.login_and_send(recipients=("r1@example.net", "R2@Example.NET",
                                              "r3@example.net", "r4@example.net"))
        size = len(self.fixture.upstream.messages[0].data)
        scrape = yield self.scrape()
        self.assertEqual(counted(scrape, f"{NS}_bytes_sent_to_address_total"), {
            labels(provider="office", to="r1@example.net"),
            labels(provider="office", to="r2@example.net"),
            labels(provider="office", to="other")})
        self.assertEqual(scrape.value(f"{NS}_bytes_sent_to_address_total",
                                      provider="office", to="other"), 2 * size)
        pairs = counted(scrape, f"{NS}_mail_from_to_total")
        self.assertEqual(len(pairs), 3)  # two pairs kept, the rest in other/other
        self.assertIn(labels(to="other", status="1", **{"from": "other"}), pairs)
        self.assertEqual(sum(scrape.value(f"{NS}_mail_from_to_total", **dict(pair))
                             for pair in pairs), 4)


class AnonymousAddressTests(MetricsMixin, unittest.TestCase):
    fixture_args = ("--http-allow-anonymous", *OPT_IN)

    @defer.inlineCallbacks
    def test_anonymous_submissions_never_label_addresses(self):
        response = yield self.http_post(auth=None, sender="anyone@spam.example")
        self.assertEqual(response.code, 202)
        scrape = yield self.scrape()
        self.assertNotIn("spam.example", scrape.text)
        self.assertEqual(counted(scrape, f"{NS}_bytes_sent_from_address_total"),
                         {labels(provider="anonymous", **{"from": "other"})})
        self.assertEqual(counted(scrape, f"{NS}_logins_total"), set())


class NamespaceTests(MetricsMixin, unittest.TestCase):
    fixture_args = ("--metrics-namespace", "relay_eu")

    @defer.inlineCallbacks
    def test_namespace_prefixes_every_metric(self):
        yield self.login_and_send()
        scrape = yield self.scrape()
        self.assertEqual(scrape.value("relay_eu_messages_sent_total", provider="office"), 1)
        self.assertTrue(all(name.startswith(("relay_eu_", "process_"))
                            for name in scrape.families), sorted(scrape.families))


class HealthTests(MetricsMixin, unittest.TestCase):
    def get(self, path):
        return request("GET", f"http://127.0.0.1:{self.fixture.metrics_port}{path}")

    @defer.inlineCallbacks
    def test_healthz(self):
        response = yield self.get("/healthz")
        self.assertEqual((response.code, response.body), (200, b"ok"))

    @defer.inlineCallbacks
    def test_metrics_content_type(self):
        response = yield self.get("/metrics")
        self.assertEqual(response.header("content-type"),
                         "text/plain; version=0.0.4; charset=utf-8")

    @defer.inlineCallbacks
    def test_readyz_is_about_this_replica_not_the_shared_upstream(self):
        """The upstream is shared by every replica: were /readyz to follow it, every
        replica would leave the load balancer at once and clients would meet a refused
        connection instead of the 451 that makes them retry."""
        upstream = self.fixture.upstream
        yield upstream.stop()  # down before the first probe: nothing cached
        response = yield self.get("/readyz")
        self.assertEqual(response.code, 200, response.body)
        body = response.json()
        self.assertTrue(body["ready"])
        self.assertEqual(set(body["checks"]), {"config", "listeners", "oauth2"})
        self.assertEqual(body["checks"]["config"]["detail"], "2 provider(s) loaded")
        self.assertEqual(body["checks"]["listeners"]["detail"],
                         "listening: plain, tls, http")
        response = yield self.http_post()
        self.assertEqual(response.code, 503)  # the client hears it: retry later
        response = yield self.get("/readyz")
        self.assertEqual(response.code, 200, response.body)
        status = (yield self.get("/status")).json()
        self.assertGreaterEqual(status["upstreams"][self.upstream_label]["breaker"]
                                ["consecutive_failures"], 1)

    @defer.inlineCallbacks
    def test_readyz_never_opens_an_upstream_connection(self):
        before = self.fixture.upstream.connection_count
        for _ in range(5):
            response = yield self.get("/readyz")
            self.assertEqual(response.code, 200, response.body)
        self.assertEqual(self.fixture.upstream.connection_count, before)

    @defer.inlineCallbacks
    def test_readyz_without_providers(self):
        self.fixture.write_providers("providers: []\n")
        yield reload_now(self.fixture)
        response = yield self.get("/readyz")
        self.assertEqual(response.code, 503)
        checks = response.json()["checks"]
        self.assertFalse(checks["config"]["ok"])
        self.assertIn("no providers", checks["config"]["detail"])
        self.assertTrue(checks["listeners"]["ok"])


class MaildirReadinessTests(MetricsMixin, unittest.TestCase):
    """Without an upstream, mail goes to the Maildir: it must be writable."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), relay=False)
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()

    @defer.inlineCallbacks
    def test_unwritable_maildir_is_not_ready(self):
        url = f"http://127.0.0.1:{self.fixture.metrics_port}/readyz"
        response = yield request("GET", url)
        self.assertEqual(response.code, 200, response.body)
        blocker = os.path.join(self.fixture.directory, "maildir")
        with open(blocker, "w"):  # a file where the Maildir should be: not a directory
            pass
        os.chmod(blocker, 0o600)  # no search permission, even for root
        response = yield request("GET", url)
        self.assertEqual(response.code, 503, response.body)
        check = response.json()["checks"]["maildir"]
        self.assertFalse(check["ok"])
        self.assertIn("is not writable", check["detail"])


class StatusTests(MetricsMixin, unittest.TestCase):
    """``/status``: what the relay is doing, as JSON, naming nobody."""

    @defer.inlineCallbacks
    def status(self):
        response = yield request("GET", f"http://127.0.0.1:{self.fixture.metrics_port}/status")
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.header("content-type"), "application/json")
        return response

    @defer.inlineCallbacks
    def test_sessions_pools_breakers_and_config(self):
        from esmtpfa import __version__
        clients = []

        def connect(fixture):
            clients.append(fixture.connect())
            clients[0].command("EHLO a.example")
        yield self.login_and_send(sender="ceo@corp.example", recipients=("x@firm.example",))
        yield self.smtp(connect)
        self.addCleanup(lambda: [client.close() for client in clients])
        response = yield self.status()
        status = response.json()
        self.assertEqual(status["version"], __version__)
        self.assertFalse(status["draining"])
        self.assertEqual(status["sessions"], {"smtp": {"plain": 1, "tls": 0}, "http": 0})
        upstream = status["upstreams"][self.upstream_label]
        self.assertEqual(upstream["breaker"], {"state": "closed", "consecutive_failures": 0})
        self.assertEqual(upstream["pool"]["open"], upstream["pool"]["idle"]
                         + upstream["pool"]["busy"] + upstream["pool"]["opening"])
        self.assertEqual(upstream["pool"]["idle"], 1)  # the session kept for the next
        self.assertEqual(upstream["pool"]["waiting"], 0)
        self.assertGreater(upstream["pool"]["max"], 0)
        self.assertEqual(status["config"]["generation"], 1)
        self.assertEqual(status["config"]["providers"], 2)
        self.assertTrue(status["config"]["last_load_ok"])
        self.assertNotIn("spool", status)
        self.assertNotIn("oauth2", status)
        for text in ("@", "ceo", "corp.example", USER, PASSWORD, "correct"):
            self.assertNotIn(text, response.body.decode())

    @defer.inlineCallbacks
    def test_config_generation_follows_reloads(self):
        self.fixture.write_providers("providers: []\n")
        yield reload_now(self.fixture)
        status = (yield self.status()).json()
        self.assertEqual(status["config"]["generation"], 2)
        self.assertEqual(status["config"]["providers"], 0)
        self.assertEqual(len(status["config"]["sha256_prefix"] or ""), 16)


class OperatorSeriesTests(MetricsMixin, unittest.TestCase):
    """The series an operator alerts on exist from the first scrape, at 0."""

    fixture_args = ("--max-connections-per-ip", "1")

    @defer.inlineCallbacks
    def test_known_series_exist_at_zero_before_any_event(self):
        from esmtpfa import __version__
        scrape = yield self.scrape()
        for provider in ("office", "printers"):
            for status in ("valid", "invalid", "unavailable"):
                self.assertIn(labels(provider=provider, status=status),
                              scrape.labelsets(f"{NS}_logins_total"))
            self.assertIn(labels(provider=provider),
                          scrape.labelsets(f"{NS}_messages_sent_total"))
        self.assertEqual(scrape.labelsets(f"{NS}_relay_outcomes_total"), {
            labels(reason=r) for r in ("accepted", "rejected", "unavailable", "error")})
        for listener in ("plain", "tls", "http"):
            self.assertIn(labels(listener=listener),
                          scrape.labelsets(f"{NS}_connections_accepted_total"))
            for reason in ("total_limit", "per_address_limit", "unavailable"):
                self.assertIn(labels(listener=listener, reason=reason),
                              scrape.labelsets(f"{NS}_connections_refused_total"))
        upstream = self.upstream_label
        self.assertEqual(scrape.value(f"{NS}_upstream_breaker_state", upstream=upstream,
                                      state="closed"), 1)
        self.assertEqual(scrape.value(f"{NS}_upstream_breaker_state", upstream=upstream,
                                      state="open"), 0)
        self.assertEqual(scrape.labelsets(f"{NS}_upstream_pool_sessions"), {
            labels(upstream=upstream, state=s) for s in ("idle", "busy", "opening")})
        self.assertIn(labels(upstream=upstream), scrape.labelsets(f"{NS}_upstream_pool_waiting"))
        self.assertEqual(scrape.value(f"{NS}_http_active_connections", listener="http"), 0)
        self.assertEqual(scrape.value(f"{NS}_build_info", version=__version__), 1)
        self.assertGreater(scrape.value("process_resident_memory_bytes"), 0)
        self.assertGreater(scrape.value("process_start_time_seconds"), 0)
        self.assertNotIn(f"{NS}_connections_total", scrape.text)
        for family in scrape.families.values():  # Prometheus naming: _total on counters
            if family.type == "counter":
                self.assertTrue(all(sample.name.endswith(("_total", "_created"))
                                    for sample in family.samples), family.name)

    @defer.inlineCallbacks
    def test_connections_accepted_and_refused_by_reason(self):
        clients = []

        def connect(fixture):
            clients.append(fixture.connect())
            clients[0].command("EHLO a.example")
            second = fixture.connect()
            clients.append(second)
            return second.greeting
        reply = yield self.smtp(connect)
        self.addCleanup(lambda: [client.close() for client in clients])
        self.assertEqual(reply[0], 421, reply)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_connections_accepted_total", listener="plain"), 1)
        self.assertEqual(scrape.value(f"{NS}_connections_refused_total", listener="plain",
                                      reason="per_address_limit"), 1)

    @defer.inlineCallbacks
    def test_pool_and_breaker_follow_the_upstream(self):
        yield self.login_and_send()
        scrape = yield self.scrape()
        upstream = self.upstream_label
        self.assertEqual(scrape.value(f"{NS}_upstream_pool_sessions", upstream=upstream,
                                      state="idle"), 1)
        yield self.fixture.upstream.stop()
        for _ in range(3):  # --relay-breaker-failures (default 3) failed connections
            yield self.http_post()
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_upstream_breaker_state", upstream=upstream,
                                      state="open"), 1)
        self.assertEqual(scrape.value(f"{NS}_upstream_breaker_state", upstream=upstream,
                                      state="closed"), 0)


def reload_now(fixture) -> defer.Deferred:
    """Reload the providers now; fires once the new document is in use (it is parsed
    in a thread: a check made before that would still see the old one)."""
    return fixture.service.getServiceNamed("reload").reload_now()


class RelayAttemptFailureTests(unittest.TestCase):
    """Each failed upstream attempt is counted, even when failover delivers."""

    timeout = 30

    @defer.inlineCallbacks
    def test_dead_first_upstream_is_counted_and_the_second_delivers(self):
        from tests.support.ports import free_port
        from tests.support.upstream import RecordingUpstream
        upstream = RecordingUpstream().start()
        dead = free_port()
        fixture = RelayFixture(
            self.mktemp(), "--relay-addr", f"127.0.0.1:{dead},127.0.0.1:{upstream.port}",
            upstream=upstream)
        self.addCleanup(fixture.stop)
        yield fixture.start()

        def script(fixture):
            client = fixture.secure_session()
            assert client.auth_plain(USER, PASSWORD)[0] == 235
            return smtp_send(client)
        reply = yield fixture.run(script, fixture)
        self.assertEqual(reply[0], 250)
        self.assertEqual(len(upstream.messages), 1)
        scrape = yield metrics(fixture.metrics_port)
        self.assertEqual(counted(scrape, f"{NS}_relay_attempt_failures_total"),
                         {labels(upstream=f"127.0.0.1:{dead}", command="connect",
                                 kind="transient")})
        self.assertEqual(scrape.value(f"{NS}_relay_attempt_failures_total",
                                      upstream=f"127.0.0.1:{dead}", command="connect",
                                      kind="transient"), 1)


class RefusalSeriesTests(MetricsMixin, unittest.TestCase):
    """TLS handshakes that fail and messages refused for their size, by listener."""

    fixture_args = ("--max-message-size", "2048")

    @defer.inlineCallbacks
    def test_tls_handshake_failures(self):
        import socket

        def garbage_handshakes(fixture):
            with socket.create_connection(("127.0.0.1", fixture.tls_port), timeout=10) as s:
                s.sendall(b"EHLO this is not a TLS ClientHello\r\n" * 4)
                s.recv(1024)  # the relay answers with an alert, or closes
            client = fixture.connect()
            client.command("EHLO a.example")
            assert client.command("STARTTLS")[0] == 220
            client.sock.sendall(b"\x16\x03\x01\x00\x05hello" * 4)  # a broken record
            try:
                client.sock.recv(1024)
            except OSError:
                pass
            client.close()
        yield self.smtp(garbage_handshakes)
        yield until(lambda: not any(f.sessions for f in self.fixture.service.smtp_factories))
        scrape = yield self.scrape()
        for listener in ("plain", "tls"):
            self.assertEqual(scrape.value(f"{NS}_tls_handshake_failures_total",
                                          listener=listener), 1, listener)
        yield self.login_and_send()  # a handshake that works counts nothing
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_tls_handshake_failures_total",
                                      listener="plain"), 1)

    @defer.inlineCallbacks
    def test_tls_handshake_failures_on_the_http_listener(self):
        """The HTTP API with TLS counts its failed handshakes under ``listener="http"``;
        a handshake that works counts nothing."""
        import socket
        import ssl
        fixture = RelayFixture(self.mktemp(), "--http")
        fixture.extra_args += ["--http-tls-cert", fixture.leaf.cert_path,
                               "--http-tls-key", fixture.leaf.key_path]
        self.addCleanup(fixture.stop)
        yield fixture.start()

        def handshakes(fixture):
            with socket.create_connection(("127.0.0.1", fixture.http_port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")  # no ClientHello
                s.recv(1024)
            with socket.create_connection(("127.0.0.1", fixture.http_port), timeout=10) as s:
                with fixture.client_context().wrap_socket(
                        s, server_hostname="relay.test") as secure:
                    assert isinstance(secure, ssl.SSLSocket)
        yield fixture.run(handshakes, fixture)
        name = f"{NS}_tls_handshake_failures_total"

        for _ in range(50):  # the failed connection's close may come a moment later
            scrape = yield metrics(fixture.metrics_port)
            if scrape.value(name, listener="http"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(scrape.value(name, listener="http"), 1)

    @defer.inlineCallbacks
    def test_size_refusals_over_smtp_and_http(self):
        def too_big(fixture):
            client = fixture.secure_session()
            assert client.auth_plain(USER, PASSWORD)[0] == 235
            declared = client.command("MAIL FROM:<alice@example.com> SIZE=999999")
            client.command("RSET")
            sent = smtp_send(client, content=MESSAGE + b"x" * 4096 + b"\r\n")
            client.close()
            return declared, sent
        declared, sent = yield self.smtp(too_big)
        self.assertEqual((declared[0], sent[0]), (552, 552), (declared, sent))
        body = {"from": "alice@example.com", "to": ["bob@example.net"],
                "data": base64.b64encode(MESSAGE + b"x" * 4096).decode()}
        response = yield post_json(f"http://127.0.0.1:{self.fixture.http_port}/", body,
                                   auth=(USER, PASSWORD))
        self.assertEqual(response.code, 413, response.body)
        scrape = yield self.scrape()
        self.assertEqual(scrape.value(f"{NS}_message_size_refusals_total", listener="plain"), 2)
        self.assertEqual(scrape.value(f"{NS}_message_size_refusals_total", listener="http"), 1)
        self.assertIn(labels(listener="tls"),
                      scrape.labelsets(f"{NS}_message_size_refusals_total"))


class ProcessSeriesTests(unittest.TestCase):
    """``process_*`` from a real ``twistd``: one process's own, and with ``--workers``
    the supervisor's plus each worker's, labelled by worker, never added up (a sum of
    three start times is no start time)."""

    timeout = 90

    @defer.inlineCallbacks
    def relay(self, *args: str):
        relay = RunningRelay(self.mktemp(), args=list(args))
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        yield defer.ensureDeferred(relay.start())
        return relay

    @defer.inlineCallbacks
    def scrape_until(self, relay, condition):
        deadline = time.monotonic() + 30
        while True:
            code, text = yield threads.deferToThread(get_blocking, relay.metrics_port,
                                                     "/metrics")
            scrape = Scrape(text) if code == 200 else None
            if scrape is not None and condition(scrape):
                return scrape
            if time.monotonic() > deadline:
                self.fail(f"/metrics never satisfied the test:\n{text[-2000:]}")
            yield task.deferLater(reactor, 0.2, lambda: None)

    @staticmethod
    def start_times(scrape) -> dict[str, float]:
        return {sample.labels.get("worker", "supervisor"): sample.value
                for sample in scrape.samples if sample.name == "process_start_time_seconds"}

    @defer.inlineCallbacks
    def test_single_process(self):
        relay = yield self.relay()
        scrape = yield self.scrape_until(relay, lambda s: self.start_times(s))
        self.assertEqual(list(self.start_times(scrape)), ["supervisor"])  # unlabelled
        self.assertLess(time.time() - scrape.value("process_start_time_seconds"), 120)
        self.assertGreater(scrape.value("process_open_fds"), 0)

    @defer.inlineCallbacks
    def test_workers_each_with_their_own(self):
        relay = yield self.relay("--workers", "2")
        scrape = yield self.scrape_until(
            relay, lambda s: set(self.start_times(s)) == {"supervisor", "1", "2"})
        for who, started in self.start_times(scrape).items():
            self.assertLess(abs(time.time() - started), 120, who)  # not a sum
        fds = {sample.labels.get("worker") for sample in scrape.samples
               if sample.name == "process_open_fds"}
        self.assertEqual(fds, {None, "1", "2"})
        code, body = yield threads.deferToThread(get_blocking, relay.metrics_port, "/status")
        self.assertEqual(code, 200, body)
        status = json.loads(body)
        self.assertEqual(status["workers"], {"configured": 2, "serving": 2})
        self.assertEqual(set(status["by_worker"]), {"1", "2"})
        self.assertIn("plain", status["by_worker"]["1"]["sessions"]["smtp"])
        code, body = yield threads.deferToThread(get_blocking, relay.metrics_port, "/readyz")
        self.assertEqual(code, 200, body)
        self.assertEqual(set(json.loads(body)["checks"]),
                         {"workers", "config", "listeners", "maildir"})
