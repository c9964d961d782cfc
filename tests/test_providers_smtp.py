"""Every provider type authenticates real SMTP sessions, in every selection mode.

The three modes of docs/design.md, "Provider selection" — the username names the provider, the
connected domain (TLS SNI)
names a unique-domain provider, or fallback — against the real servers each provider
talks to: slapd, twisted.web auth endpoints and a JWKS endpoint.  Each session goes on
to send a message, which must reach the recording upstream.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.builders import b64
from tests.support.httpservers import (
    AuthEndpoint,
    JWKSEndpoint,
    LoopbackHTTPServer,
    make_key,
    mint,
    standard_claims,
)
from tests.support.relayfixture import RelayFixture
from tests.support.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SharedSlapd
from tests.test_smtp_server import MESSAGE, send_message

NAME = "idp"
UNIQUE_DOMAIN = "relay.test"


def provider_yaml(type_: str, params: dict, mode: str) -> str:
    meta = {"name": NAME, "type": type_}
    if mode == "unique_domain":
        meta.update(domain=UNIQUE_DOMAIN, unique_domain_auth=True)
    elif mode == "fallback":
        meta["fallback"] = True
    return json.dumps({"providers": [{"meta": meta, "params": params}]})


class ModesMixin:
    """Subclasses say how to configure their provider and what a user sends."""

    timeout = 60
    type_ = ""
    user, secret = "", ""
    needs_password = True

    def params(self) -> dict:
        raise NotImplementedError

    def offered(self, mode: str) -> tuple[str, str]:
        """What the client types as AUTH username and password in ``mode``."""
        if mode == "username":
            return NAME, (f"{self.user}:{self.secret}" if self.needs_password else self.secret)
        return self.user, self.secret

    @defer.inlineCallbacks
    def session(self, mode: str, secret: str | None = None, mechanism: str = "PLAIN"):
        fixture = RelayFixture(self.mktemp(), providers=provider_yaml(
            self.type_, self.params(), mode))
        self.addCleanup(fixture.stop)
        yield fixture.start()
        user, password = self.offered(mode)
        if secret is not None:
            password = secret
        sni = UNIQUE_DOMAIN if mode == "unique_domain" else "localhost"

        def script(fixture):
            client = fixture.secure_session(server_hostname=sni)
            if mechanism == "XOAUTH2":
                auth = client.command("AUTH XOAUTH2 " + b64(
                    f"user={user}\x01auth=Bearer {password}\x01\x01"))
            else:
                auth = client.auth_plain(user, password)
            if auth[0] != 235:
                return auth, None
            return auth, send_message(client)
        auth, sent = yield fixture.run(script, fixture)
        defer.returnValue((auth, sent, fixture.upstream.messages))

    @defer.inlineCallbacks
    def assert_delivers(self, mode: str, **kwargs):
        auth, sent, delivered = yield self.session(mode, **kwargs)
        self.assertEqual(auth[0], 235, auth)
        self.assertEqual(sent[0], 250, sent)
        self.assertEqual(len(delivered), 1)
        self.assertTrue(delivered[0].data.endswith(MESSAGE.replace(b"\r\n..", b"\r\n.")))

    @defer.inlineCallbacks
    def assert_refused(self, mode: str, secret: str):
        auth, _, delivered = yield self.session(mode, secret=secret)
        self.assertEqual((auth[0], auth[1][:5]), (535, "5.7.8"))
        self.assertEqual(delivered, [])

    def test_selected_by_username(self):
        return self.assert_delivers("username")

    def test_selected_by_unique_domain(self):
        return self.assert_delivers("unique_domain")

    def test_selected_as_fallback(self):
        return self.assert_delivers("fallback")


class UserPassTests(ModesMixin, unittest.TestCase):
    type_ = "userpass"
    user, secret = "ann", "ann-secret"

    def params(self):
        return {"username": self.user, "password": self.secret}

    def test_wrong_password(self):
        return self.assert_refused("fallback", "not-it")


class HTTPServerMixin(ModesMixin):
    endpoint: AuthEndpoint

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LoopbackHTTPServer({"auth": self.endpoint_factory()})
        yield defer.maybeDeferred(self.server.start)
        self.addCleanup(self.server.stop)


class HTTPBasicTests(HTTPServerMixin, unittest.TestCase):
    type_ = "http_basic"
    user, secret = "printer7", "toner:low"  # a colon in the password survives the split

    def endpoint_factory(self):
        return AuthEndpoint(expect_basic=(self.user, self.secret))

    def params(self):
        return {"url": self.server.url("/auth")}

    def test_wrong_password(self):
        return self.assert_refused("username", f"{self.user}:nope")


class HTTPHeaderTests(HTTPServerMixin, unittest.TestCase):
    type_ = "http_header"
    user, secret = "any-user", "api-key-0123456789"
    needs_password = False

    def endpoint_factory(self):
        return AuthEndpoint(expect_header=("X-Api-Key", self.secret))

    def params(self):
        return {"url": self.server.url("/auth"), "header": "X-Api-Key"}

    def test_wrong_token(self):
        return self.assert_refused("fallback", "api-key-wrong")


class JWTTests(ModesMixin, unittest.TestCase):
    type_ = "jwt"
    user = "ci-bot"
    needs_password = False

    @defer.inlineCallbacks
    def setUp(self):
        self.key = make_key("ES256", kid="signing-1")
        self.jwks = JWKSEndpoint([self.key])
        self.server = LoopbackHTTPServer({"jwks": self.jwks})
        yield defer.maybeDeferred(self.server.start)
        self.addCleanup(self.server.stop)
        self.secret = mint(self.key, standard_claims(
            time.time(), iss="https://sso.test", aud=["smtp-relay", "other"], sub=self.user,
            groups=["mail-senders"]))

    def params(self):
        return {"jwks_url": self.server.url("/jwks"), "iss": "https://sso.test",
                "aud": "smtp-relay", "claims": {"groups": ["mail-senders"]}}

    def test_xoauth2_with_the_token(self):
        return self.assert_delivers("fallback", mechanism="XOAUTH2")

    def test_token_signed_by_a_foreign_key(self):
        foreign = make_key("ES256", kid="signing-1")
        forged = mint(foreign, standard_claims(time.time(), iss="https://sso.test",
                                               aud="smtp-relay", sub=self.user,
                                               groups=["mail-senders"]))
        return self.assert_refused("fallback", forged)


class LDAPTests(SharedSlapd, ModesMixin, unittest.TestCase):
    type_ = "ldap"
    user, secret = "alice", "alice-pw"

    def params(self):
        return {"server": "127.0.0.1", "port": self.slapd.port, "enable_tls": True,
                "tls_ca": self.slapd.ca_path, "bind_user": SERVICE_DN,
                "bind_pass": SERVICE_PW, "base_dn": PEOPLE,
                "filter_string": "(&(objectClass=inetOrgPerson)(uid=%s))"}

    def test_wrong_password(self):
        return self.assert_refused("username", "alice:bob-pw")

    def test_filter_injection_is_refused(self):
        return self.assert_refused("username", "*)(uid=*:alice-pw")
