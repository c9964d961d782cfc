"""The HTTP API as its clients meet it: a real ``twistd esmtpfa --http`` and curl.

* ``Authorization: Bearer`` reaches the token providers the way XOAUTH2 does over SMTP:
  the provider named by ``Esmtpfa-Provider``, else the ``fallback`` token providers;
  a password provider never gets the token (against a real JWKS endpoint on loopback);
* a body that is not declared ``application/json`` is a ``415``: a web page cannot
  submit a ``text/plain`` form with a browser's saved Basic credentials;
* the OpenAPI document is served, without a login, exactly as it ships.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import time

import yaml
from twisted.internet import defer
from twisted.trial import unittest

from tests.support.builders import write_providers
from tests.support.httpservers import (
    JWKSEndpoint,
    LoopbackHTTPServer,
    make_key,
    mint,
    standard_claims,
)
from tests.support.ports import free_port
from tests.support.processes import PROJECT, Twistd, run_tool

SPEC = os.path.join(PROJECT, "docs", "openapi.yaml")
ISSUER, AUDIENCE = "https://sso.corp.test", "smtp-relay"
FALLBACK_ISSUER = "https://default.corp.test"
MESSAGE = b"From: ci@example.com\nTo: ops@example.net\nSubject: build\n\nGreen.\n"
DOCUMENT = json.dumps({"from": "ci@example.com", "to": ["ops@example.net"],
                       "data": base64.b64encode(MESSAGE).decode()})


def providers(jwks_url: str) -> str:
    """``ci-jwt`` only by name, ``default-jwt`` (another issuer) as the fallback token
    provider, ``office`` a password provider that is also a fallback."""
    return yaml.safe_dump({"providers": [
        {"meta": {"name": "ci-jwt", "type": "jwt"},
         "params": {"jwks_url": jwks_url, "iss": ISSUER, "aud": AUDIENCE}},
        {"meta": {"name": "default-jwt", "type": "jwt", "fallback": True},
         "params": {"jwks_url": jwks_url, "iss": FALLBACK_ISSUER, "aud": AUDIENCE}},
        {"meta": {"name": "office", "type": "userpass", "fallback": True},
         "params": {"username": "alice", "password": "s3cret"}},
    ]})


class HTTPAPITests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.key = make_key("ES256", "ci-1")
        self.jwks = JWKSEndpoint([self.key])
        self.server = LoopbackHTTPServer({"jwks": self.jwks}).start()
        self.addCleanup(self.server.stop)
        config = write_providers(directory, providers(self.server.url("/jwks")))
        self.maildir = os.path.join(directory, "maildir")
        self.http_port = free_port()
        self.relay = Twistd(["--http", "--http-addr", "127.0.0.1",
                             "--http-port", str(self.http_port), "--port", str(free_port()),
                             "--config", config, "--maildir", self.maildir])
        self.relay.start()
        self.addCleanup(self.relay.stop)
        yield self.relay.wait_for_port(self.http_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def token(self, issuer: str = ISSUER) -> str:
        return mint(self.key, standard_claims(time.time(), iss=issuer, aud=AUDIENCE,
                                              sub="ci-pipeline"))

    @defer.inlineCallbacks
    def curl(self, *args: str, path: str = ""):
        """(status, headers with lower-case names, body) of one curl request."""
        output, code = yield run_tool(
            "curl", "--silent", "--show-error", "--max-time", "15", "--include", *args,
            self.url + path)
        self.assertEqual(code, 0, output)
        head, _, body = output.replace("\r\n", "\n").partition("\n\n")
        status_line, *lines = head.split("\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, body

    def submit(self, *headers: str, body: str = DOCUMENT):
        args = []
        for header in headers:
            args += ["-H", header]
        return self.curl(*args, "--data-binary", body)

    def delivered(self) -> int:
        return len(glob.glob(os.path.join(self.maildir, "new", "*")))

    @defer.inlineCallbacks
    def test_bearer_token_reaches_the_named_or_the_fallback_token_provider(self):
        json_type = "Content-Type: application/json"
        status, _, body = yield self.submit(
            json_type, f"Authorization: Bearer {self.token()}", "Esmtpfa-Provider: ci-jwt")
        self.assertEqual(status, 202, body + self.relay.output)
        self.assertEqual(self.delivered(), 1)
        self.assertIn("ci-jwt/ci-pipeline", self.relay.output)
        # without the header: the fallback token provider, which knows its own issuer
        status, _, body = yield self.submit(
            json_type, f"Authorization: Bearer {self.token(FALLBACK_ISSUER)}")
        self.assertEqual(status, 202, body + self.relay.output)
        self.assertEqual(self.delivered(), 2)
        # ... and not ci-jwt's tokens, which need the header
        status, headers, body = yield self.submit(
            json_type, f"Authorization: Bearer {self.token()}")
        self.assertEqual(status, 401, body)
        self.assertIn('Bearer realm="esmtpfa", error="invalid_token"',
                      headers["www-authenticate"])
        self.assertEqual(json.loads(body), {"error": "authentication failed"})
        # a password provider never gets a token, even named
        status, _, body = yield self.submit(
            json_type, f"Authorization: Bearer {self.token()}", "Esmtpfa-Provider: office")
        self.assertEqual(status, 401, body)
        # and a token that is no RFC 6750 token is malformed
        status, headers, body = yield self.submit(json_type, "Authorization: Bearer a b")
        self.assertEqual(status, 401, body)
        self.assertIn('error="invalid_request"', headers["www-authenticate"])
        self.assertEqual(self.delivered(), 2)
        # no token reaches the log
        self.assertNotIn(self.token().split(".")[2], self.relay.output)

    @defer.inlineCallbacks
    def test_without_credentials_both_schemes_are_offered(self):
        status, headers, _ = yield self.submit("Content-Type: application/json")
        self.assertEqual(status, 401)
        self.assertEqual(headers["www-authenticate"],
                         'Basic realm="esmtpfa", charset="UTF-8", Bearer realm="esmtpfa"')

    @defer.inlineCallbacks
    def test_a_body_not_declared_as_json_is_415(self):
        basic = ["--user", "office:alice:s3cret"]
        for content_type in ("text/plain", "text/plain;charset=UTF-8",
                             "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x",
                             "application/json; charset=iso-8859-1"):
            status, headers, body = yield self.curl(
                *basic, "-H", f"Content-Type: {content_type}", "--data-binary", DOCUMENT)
            self.assertEqual(status, 415, (content_type, body))
            self.assertEqual(headers["content-type"], "application/json")
            self.assertEqual(headers["accept-post"], "application/json")
            self.assertIn("error", json.loads(body))
        # curl -d without -H sends application/x-www-form-urlencoded; -H "Content-Type:"
        # removes the header altogether
        for args in ([], ["-H", "Content-Type:"]):
            status, _, body = yield self.curl(*basic, *args, "--data-binary", DOCUMENT)
            self.assertEqual(status, 415, (args, body))
        self.assertEqual(self.delivered(), 0)
        status, _, body = yield self.curl(
            *basic, "-H", "Content-Type: application/json; charset=utf-8",
            "--data-binary", DOCUMENT)
        self.assertEqual(status, 202, body + self.relay.output)
        self.assertEqual(self.delivered(), 1)

    @defer.inlineCallbacks
    def test_the_openapi_document_is_served_without_a_login(self):
        with open(SPEC, "rb") as file:
            shipped = file.read()
        status, headers, body = yield self.curl(path="openapi.yaml")
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["content-type"], "application/yaml")
        self.assertEqual(body.encode("utf-8"), shipped)
        status, headers, body = yield self.curl(path="openapi.json")
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body), yaml.safe_load(shipped))
        status, headers, body = yield self.curl("--head", path="openapi.json")
        self.assertEqual((status, body), (200, ""))
        self.assertGreater(int(headers["content-length"]), 1000)
        status, headers, _ = yield self.curl("-X", "DELETE", path="openapi.yaml")
        self.assertEqual((status, headers["allow"]), (405, "GET, HEAD"))
        status, _, body = yield self.curl(path="swagger.json")
        self.assertEqual(status, 404)
        self.assertIn("/openapi.yaml", json.loads(body)["error"])
