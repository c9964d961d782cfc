"""docs/openapi.yaml is the HTTP API's contract: schemathesis holds the live listener to it.

The whole ``RelayService`` runs in-process with ``--http`` in front of a recording
upstream; schemathesis's command line (``st run``, a child process, so the reactor keeps
serving while it asks) loads the document, generates requests from it (the spec's own
example, the coverage phase's boundary and wrong-type bodies, then random ones) and sends
them to the listener on loopback, once with valid credentials and once with none.

Every check it has is on (``--checks all``): no 5xx, status codes and JSON bodies and
headers as documented, ``application/json`` everywhere, refused bodies that the schema
calls invalid (``negative_data_rejection``) and accepted ones that it calls valid
(``positive_data_acceptance``: the check that holds the spec to what the server really
accepts).  Bounded and reproducible: 50 examples per phase and operation,
``--generation-deterministic`` (no seed, no example database), one worker; a few seconds.
"""

from __future__ import annotations

import os
import re
import sys

import yaml
from jsonschema_rs import Draft4Validator
from twisted.internet import defer, utils
from twisted.trial import unittest

from tests.support.processes import PROJECT, child_environment
from tests.support.relayfixture import PASSWORD, USER, RelayFixture

SPEC = os.path.join(PROJECT, "docs", "openapi.yaml")
MAX_EXAMPLES = 50
#: The CLI the tests drive, from the same environment as the interpreter running them.
SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "st")


def run_schemathesis(url: str, *extra: str):
    """``st run`` against ``url``; fires with ``(output, exit code)``.

    A missing schemathesis fails the test (it is a tox dependency), it does not skip."""
    if not os.access(SCHEMATHESIS, os.X_OK):
        raise AssertionError(f"schemathesis is not installed next to {sys.executable}: "
                             f"pip install 'schemathesis>=4.32' (tox.ini has it)")
    args = ["run", SPEC, "--url", url, "--checks", "all",
            "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
            "--workers", "1", "--request-timeout", "10", "--no-color", *extra]
    d = utils.getProcessOutputAndValue(SCHEMATHESIS, args, env=child_environment(),
                                       path=os.getcwd())
    return d.addCallback(lambda r: ((r[0] + r[1]).decode("utf-8", "replace"), r[2]))


def generated(output: str) -> tuple[int, int]:
    """The run's ``N generated, M passed`` counts (``(0, 0)`` when the line is missing)."""
    match = re.search(r"(\d+) generated, (\d+) passed", output)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class LiveSchemaTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fixture = RelayFixture(self.mktemp(), "--http")
        self.addCleanup(self.fixture.stop)
        yield self.fixture.start()
        self.url = f"http://127.0.0.1:{self.fixture.http_port}"

    @defer.inlineCallbacks
    def test_with_valid_credentials_every_answer_is_the_documented_one(self):
        output, code = yield run_schemathesis(self.url, "--auth", f"{USER}:{PASSWORD}")
        self.assertEqual(code, 0, output)
        total, passed = generated(output)
        self.assertGreater(total, MAX_EXAMPLES, output)
        self.assertEqual(passed, total, output)
        # The generated valid submissions really went through to the upstream.
        self.assertTrue(self.fixture.upstream.messages, output)

    @defer.inlineCallbacks
    def test_without_credentials_every_answer_is_a_documented_401(self):
        output, code = yield run_schemathesis(self.url)
        self.assertEqual(code, 0, output)
        total, passed = generated(output)
        self.assertGreater(total, MAX_EXAMPLES, output)
        self.assertEqual(passed, total, output)
        self.assertIn("returned only 401/403 responses", output)
        self.assertEqual(self.fixture.upstream.messages, [])


class SubmissionSchemaTests(unittest.TestCase):
    """The request schema refuses what the server refuses, where JSON Schema can say it.

    The address grammar (RFC 5321 Mailbox) is more than a JSON Schema ``format`` checks,
    but an empty or one-character address cannot be one: a client that validates against
    the spec must not be told such a document is valid and then get a ``400``."""

    def setUp(self):
        with open(SPEC) as f:
            spec = yaml.safe_load(f)
        schema = dict(spec["components"]["schemas"]["Submission"])
        schema["components"] = spec["components"]
        self.validator = Draft4Validator(schema)
        self.document = {"from": "app@example.com", "to": ["ops@example.net"],
                         "data": "SGVsbG8K"}

    def test_the_example_is_valid(self):
        self.assertTrue(self.validator.is_valid(self.document))

    def test_an_empty_recipient_or_sender_is_invalid(self):
        for field, value in (("to", [""]), ("to", ["x"]), ("from", ""), ("from", "@")):
            with self.subTest(field=field, value=value):
                self.assertFalse(self.validator.is_valid({**self.document, field: value}))

    def test_an_address_longer_than_a_path_may_be_is_invalid(self):
        # RFC 5321 §4.5.3.1: a path is at most 256 octets, 254 without the brackets.
        address = "a" * 64 + "@" + "b" * 186 + ".org"
        self.assertEqual(len(address), 255)
        self.assertFalse(self.validator.is_valid({**self.document, "from": address}))
