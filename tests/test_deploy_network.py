"""deploy/'s NetworkPolicy lets the pods reach every service a setting can point them at,
and the manifests hold for the oldest Kubernetes the README names.

A port left out of the policy's egress does not fail a deployment: the connections time
out and the relay takes the service behind them for down (Redis: the login throttle and
the rates fall back to each pod's counts, with ``STATE_FAILURE=open`` silently).  So the
ports come from the code that connects, not from a list kept beside the policy.
"""

from __future__ import annotations

import os

import yaml
from twisted.trial import unittest

from esmtpfa.limits import resp
from esmtpfa.spool import amqp
from tests.test_deploy import DEPLOY, objects, the

#: The oldest release the README supports: the pods' preStop sleep action is on by
#: default from 1.30 (beta; alpha and off in 1.29).
MINIMUM_KUBERNETES = "1.30.0"
README = os.path.join(os.path.dirname(DEPLOY), "README.md")

#: Outbound TCP ports and the settings that make esmtpfa connect to them.
OUTBOUND = {
    resp.DEFAULT_PORT: "STATE_URL=redis:// (docs/shared-state.md)",
    amqp.DEFAULT_PORT: "SPOOL_URL=amqp://",
    amqp.DEFAULT_TLS_PORT: "SPOOL_URL=amqps://",
    25: "RELAY_ADDR", 465: "RELAY_ADDR with --relay-tls", 587: "RELAY_ADDR",
    389: "ldap", 636: "ldap over TLS", 443: "jwt, http_basic, http_header",
    53: "name resolution",
}


def egress_ports() -> dict[tuple[int, str], list[dict]]:
    """(port, protocol) -> the ``to`` of each rule allowing it (empty: anywhere)."""
    allowed: dict[tuple[int, str], list[dict]] = {}
    for rule in the("NetworkPolicy")["spec"]["egress"]:
        for port in rule.get("ports", []):
            allowed.setdefault((port["port"], port.get("protocol", "TCP")), []).append(
                rule.get("to", []))
    return allowed


class EgressTests(unittest.TestCase):
    def test_every_outbound_port_is_allowed(self):
        allowed = egress_ports()
        for port, setting in OUTBOUND.items():
            self.assertIn((port, "TCP"), allowed, f"{setting}: port {port} is blocked")
        self.assertIn((53, "UDP"), allowed)

    def test_redis_is_reached_wherever_it_runs(self):
        """Shipped open (no ``to``): the policy cannot know where the operator's Redis
        is, and its comments say how to narrow it."""
        self.assertIn([], egress_ports()[(resp.DEFAULT_PORT, "TCP")])
        with open(os.path.join(DEPLOY, "networkpolicy.yaml"), encoding="utf-8") as file:
            text = file.read()
        self.assertIn("namespaceSelector", text)


class MinimumVersionTests(unittest.TestCase):
    def test_manifests_validate_against_the_oldest_supported_release(self):
        import kubernetes_validate
        documents = objects()
        path = os.path.join(DEPLOY, "examples", "statefulset-spool.yaml")
        with open(path, encoding="utf-8") as file:
            documents += [doc for doc in yaml.safe_load_all(file) if doc is not None]
        for obj in documents:
            try:
                kubernetes_validate.validate(obj, MINIMUM_KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as error:
                self.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error}")

    def test_the_readme_names_the_minimum_the_pods_need(self):
        pod = the("Deployment")["spec"]["template"]["spec"]
        uses_sleep = any("sleep" in c.get("lifecycle", {}).get("preStop", {})
                         for c in pod["containers"])
        with open(README, encoding="utf-8") as file:
            readme = file.read()
        minimum = ".".join(MINIMUM_KUBERNETES.split(".")[:2])
        self.assertTrue(uses_sleep)
        self.assertIn(f"Kubernetes {minimum} or later", readme)
