"""deploy/prometheus: the alert rules, their unit tests, and the series they ask for.

The rules are checked by the real ``promtool`` (``check rules``, then ``test rules``
over ``rules.test.yaml``: one test per alert, where it fires and where it does not),
the prometheus-operator's ``PrometheusRule`` must carry the very same groups, and every
series a rule names must be on the ``/metrics`` of a real ``twistd esmtpfa`` — with
workers, a spool and an OAuth2 upstream, so that the conditional series exist too.
A renamed metric thus breaks this module, not a night's paging.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import yaml
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.faults.harness import RunningRelay
from tests.support.ports import free_port
from tests.support.processes import run_tool
from tests.support.webclient import get_blocking

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES_DIR = os.path.join(PROJECT, "deploy", "prometheus")
RULES = os.path.join(RULES_DIR, "rules.yaml")
RULE_TESTS = os.path.join(RULES_DIR, "rules.test.yaml")


def load(name: str):
    with open(os.path.join(RULES_DIR, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in load("rules.yaml")["groups"]
            for rule in group["rules"]}


def series_names(expression: str) -> set[str]:
    """The metric names an expression reads (the relay's and the process collector's)."""
    return set(re.findall(r"\b((?:esmtpfa|process)_[a-z_]+)\b", expression))


class PromtoolTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_promtool_check_rules(self):
        output, code = yield run_tool("promtool", "check", "rules", RULES)
        self.assertEqual(code, 0, output)
        self.assertIn(f"SUCCESS: {len(alerts())} rules found", output)

    @defer.inlineCallbacks
    def test_promtool_test_rules(self):
        output, code = yield run_tool("promtool", "test", "rules", RULE_TESTS)
        self.assertEqual(code, 0, output)
        self.assertIn("SUCCESS", output)

    def test_one_rule_test_per_alert_that_fires_and_does_not_fire(self):
        tested: dict[str, list[list]] = {}
        for test in load("rules.test.yaml")["tests"]:
            for case in test["alert_rule_test"]:
                tested.setdefault(case["alertname"], []).append(case["exp_alerts"])
        self.assertEqual(set(tested), set(alerts()))
        for alert, expectations in tested.items():
            self.assertIn([], expectations, f"{alert}: no case where it does not fire")
            self.assertTrue(any(expectations), f"{alert}: no case where it fires")

    @defer.inlineCallbacks
    def test_the_prometheus_rule_carries_the_same_groups(self):
        rule = load("prometheusrule.yaml")
        self.assertEqual((rule["apiVersion"], rule["kind"]),
                         ("monitoring.coreos.com/v1", "PrometheusRule"))
        self.assertEqual(rule["spec"]["groups"], load("rules.yaml")["groups"])
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, f)
        self.addCleanup(os.unlink, f.name)
        output, code = yield run_tool("promtool", "check", "rules", f.name)
        self.assertEqual(code, 0, output)

    def test_the_service_monitor_scrapes_the_services_metrics_port(self):
        monitor = load("servicemonitor.yaml")
        self.assertEqual((monitor["apiVersion"], monitor["kind"]),
                         ("monitoring.coreos.com/v1", "ServiceMonitor"))
        with open(os.path.join(PROJECT, "deploy", "service.yaml"), encoding="utf-8") as f:
            service = yaml.safe_load(f)
        selected = monitor["spec"]["selector"]["matchLabels"]
        self.assertLessEqual(selected.items(), service["metadata"]["labels"].items())
        ports = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            self.assertIn(endpoint["port"], ports)
            self.assertEqual(endpoint["path"], "/metrics")
        # the process_* alert keeps to the relay by the job label, the Service's name
        self.assertEqual(service["metadata"]["name"], "esmtpfa")

    def test_every_alert_is_documented(self):
        for name in ("metrics.md", "operations.md"):
            with open(os.path.join(PROJECT, "docs", name), encoding="utf-8") as f:
                text = f.read()
            for alert in alerts():
                self.assertIn(alert, text, f"docs/{name} does not name {alert}")


class SeriesExistTests(unittest.TestCase):
    """Every series a rule reads is served by a real relay from its first scrape."""

    timeout = 90

    @defer.inlineCallbacks
    def test_every_series_in_the_rules_is_on_a_real_relays_metrics(self):
        directory = os.path.abspath(self.mktemp())
        relay = RunningRelay(directory, upstream_port=free_port(), args=[
            "--workers", "2",
            "--delivery-mode", "fallback",
            "--spool-url", "file://" + os.path.join(directory, "spool"),
            "--relay-user", "relay@example.com",
            "--relay-oauth2-token-url", f"http://127.0.0.1:{free_port()}/token",
            "--relay-oauth2-client-id", "app",
            "--relay-oauth2-client-secret", "not-a-secret"])
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        yield defer.ensureDeferred(relay.start())
        wanted = set().union(*(series_names(rule["expr"]) for rule in alerts().values()))
        self.assertIn("esmtpfa_upstream_breaker_state", wanted)
        seen: dict[str, str] = {}

        def scrape() -> bool:
            code, text = get_blocking(relay.metrics_port, "/metrics")
            seen["text"] = text
            if code != 200:
                return False
            names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                     if line and not line.startswith("#")}
            seen["missing"] = ", ".join(sorted(wanted - names))
            return not seen["missing"]
        deadline = time.monotonic() + 30  # workers start, the spool is first read
        while not (yield threads.deferToThread(scrape)):
            if time.monotonic() > deadline:
                self.fail(f"not on /metrics: {seen.get('missing')}\n{relay.log[-3000:]}")
            yield task.deferLater(reactor, 0.5, lambda: None)
