"""http_basic and http_header (docs/design.md, "Provider types") against real twisted.web servers on
loopback.

What is on the wire is checked on the server side (the exact Authorization / header
value, how many requests and TCP connections), and every failure mode that must be a
*temporary* failure (454) rather than "wrong password" (535) is produced for real:
5xx, a hanging endpoint, a body that never ends, a refused port.
"""

from __future__ import annotations

import hashlib
import time

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from esmtpfa.auth.credentials import (
    BearerToken,
    IBearerTokenCredentials,
    IUserPasswordCredentials,
    UserPassword,
)
from esmtpfa.auth.errors import ProviderUnavailable, UnauthorizedLogin
from esmtpfa.auth.provider import IProvider, ProviderMeta
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.errors import ConfigError
from esmtpfa.providers.http_basic import HTTPBasicProvider
from esmtpfa.providers.http_header import HTTPHeaderProvider
from tests.support.certs import CertificateAuthority
from tests.support.httpservers import (
    AuthEndpoint,
    CountingResource,
    LoopbackHTTPServer,
    until,
)
from tests.support.logcapture import capture_logs
from tests.support.ports import free_port
from tests.support.resources import resources

CONTEXT = ConnectionContext("urn:uuid:00000000-0000-0000-0000-0000000000b1", "smtp")
BASIC = ProviderMeta(name="idp-basic", type="http_basic")
HEADER = ProviderMeta(name="idp-header", type="http_header")
USER, PASSWORD = "alice", "p4ss:w\u00f6rd"  # a colon and non-ASCII in the password are fine
TOKEN = "Bearer abc.def-ghi"

#: Every wait in this module is bounded by trial's timeout as well as the providers'.
TEST_TIMEOUT = 20


class _ServerTestCase(unittest.TestCase):
    timeout = TEST_TIMEOUT

    def setUp(self):
        self.auth = AuthEndpoint(expect_basic=(USER, PASSWORD),
                                 expect_header=None)
        self.target = CountingResource()
        self.server = LoopbackHTTPServer({"auth": self.auth, "target": self.target}).start()
        self.addCleanup(self.server.stop)

    def basic(self, **params) -> HTTPBasicProvider:
        params.setdefault("url", self.server.url("/auth"))
        provider = HTTPBasicProvider.from_params(BASIC, params, resources=resources())
        self.addCleanup(provider.stopProvider)  # runs before server.stop (LIFO)
        return provider

    def header(self, **params) -> HTTPHeaderProvider:
        params.setdefault("url", self.server.url("/auth"))
        params.setdefault("header", "X-Bearer-Token")
        provider = HTTPHeaderProvider.from_params(HEADER, params, resources=resources())
        self.addCleanup(provider.stopProvider)
        return provider

    def login(self, provider, user=USER, password=PASSWORD) -> defer.Deferred:
        """Fires with the user of the ``Principal`` the provider vouched for."""
        return provider.requestAvatarId(UserPassword(user, password, CONTEXT)).addCallback(
            lambda principal: principal.user)

    def bearer(self, provider, token=TOKEN, username="") -> defer.Deferred:
        return provider.requestAvatarId(BearerToken(token, CONTEXT, username)).addCallback(
            lambda principal: principal.user)


class BasicTests(_ServerTestCase):
    def test_interfaces(self):
        provider = self.basic()
        self.assertTrue(verifyObject(IProvider, provider))
        self.assertTrue(ICredentialsChecker.providedBy(provider))
        self.assertEqual(provider.credentialInterfaces, (IUserPasswordCredentials,))
        self.assertTrue(provider.needs_password)

    @defer.inlineCallbacks
    def test_accepts_and_sends_exact_authorization(self):
        user = yield self.login(self.basic())
        self.assertEqual(user, USER)
        self.assertEqual(self.auth.count, 1)
        request = self.auth.requests[0]
        self.assertEqual(request.method, "GET")
        # RFC 7617: base64 of UTF-8 "user:password", the password's own colon kept.
        self.assertEqual(request.header("authorization"),
                         "Basic YWxpY2U6cDRzczp3w7ZyZA==")

    @defer.inlineCallbacks
    def test_wrong_password(self):
        yield self.assertFailure(self.login(self.basic(), password="nope"), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 1)

    @defer.inlineCallbacks
    def test_4xx_other_than_401_is_a_rejection(self):
        self.auth.status = 403
        yield self.assertFailure(self.login(self.basic()), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_colon_in_username_refused_without_request(self):
        yield self.assertFailure(self.login(self.basic(), user="al:ice"), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 0)

    @defer.inlineCallbacks
    def test_empty_or_control_characters_refused_without_request(self):
        provider = self.basic()
        for user, password in [("", PASSWORD), (USER, ""), ("al\x00ice", PASSWORD),
                               (USER, "pass\r\nX-Evil: 1")]:
            yield self.assertFailure(self.login(provider, user, password), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 0)

    @defer.inlineCallbacks
    def test_custom_method_and_success_codes(self):
        self.auth.ok_status = 204
        provider = self.basic(method="post", success_codes=["204", 202])
        user = yield self.login(provider)
        self.assertEqual(user, USER)
        self.assertEqual(self.auth.requests[0].method, "POST")
        # 200 is not a success any more: it is a rejection (not in success_codes).
        self.auth.status = 200
        yield self.assertFailure(self.login(provider), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_redirect_not_followed(self):
        self.auth.redirect_to = self.server.url("/target")
        yield self.assertFailure(self.login(self.basic()), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 1)
        self.assertEqual(self.target.count, 0)  # the credential never reached the target

    @defer.inlineCallbacks
    def test_redirect_status_may_be_a_success_code(self):
        self.auth.redirect_to = self.server.url("/target")
        yield self.login(self.basic(success_codes=[200, 302]))
        self.assertEqual(self.target.count, 0)

    @defer.inlineCallbacks
    def test_5xx_is_unavailable(self):
        provider = self.basic()
        for status in (500, 502, 503):
            self.auth.status = status
            yield self.assertFailure(self.login(provider), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_429_and_408_are_unavailable(self):
        provider = self.basic()
        for status in (408, 429):
            self.auth.status = status
            yield self.assertFailure(self.login(provider), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_hanging_endpoint_times_out(self):
        self.auth.hang = True
        provider = self.basic(timeout=0.5)
        started = time.monotonic()
        failure = yield self.assertFailure(self.login(provider), ProviderUnavailable)
        elapsed = time.monotonic() - started
        self.assertTrue(0.4 <= elapsed < 3, elapsed)
        self.assertIn("timed out", str(failure))

    @defer.inlineCallbacks
    def test_body_that_never_ends_times_out(self):
        # Headers and 200 arrive at once; the body stalls.  treq's own timeout= would not
        # cover this: the deadline must include reading the body.
        self.auth.hang_body = True
        provider = self.basic(timeout=0.5)
        started = time.monotonic()
        yield self.assertFailure(self.login(provider), ProviderUnavailable)
        self.assertTrue(time.monotonic() - started < 3)
        # The stalled connection was dropped, not returned to the pool.
        yield until(lambda: self.server.open_connections == 0)

    @defer.inlineCallbacks
    def test_slow_but_in_time_is_fine(self):
        self.auth.delay = 0.1
        user = yield self.login(self.basic(timeout=2))
        self.assertEqual(user, USER)

    @defer.inlineCallbacks
    def test_refused_port_is_unavailable(self):
        provider = self.basic(url=f"http://127.0.0.1:{free_port()}/auth", timeout=2)
        yield self.assertFailure(self.login(provider), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_dns_failure_is_unavailable(self):
        provider = self.basic(url="http://esmtpfa-test.invalid/auth", timeout=3)
        yield self.assertFailure(self.login(provider), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_tls_failure_is_unavailable(self):
        # A plain HTTP server spoken to over https: the handshake never completes (the
        # server waits for a request line), and the deadline turns that into a 454.
        provider = self.basic(url=self.server.url("/auth").replace("http:", "https:"),
                              timeout=1)
        yield self.assertFailure(self.login(provider), ProviderUnavailable)
        self.assertEqual(self.auth.count, 0)

    @defer.inlineCallbacks
    def test_https_certificate_is_verified(self):
        # A real https endpoint whose certificate is signed by a CA nobody trusts: the
        # handshake fails and the credential is never sent.
        ca = CertificateAuthority(self.mktemp())
        leaf = ca.issue("127.0.0.1")
        tls_auth = AuthEndpoint(expect_basic=(USER, PASSWORD))
        tls_server = LoopbackHTTPServer({"auth": tls_auth},
                                        tls=(leaf.cert_pem, leaf.key_pem)).start()
        self.addCleanup(tls_server.stop)
        provider = self.basic(url=tls_server.url("/auth"), timeout=3)
        failure = yield self.assertFailure(self.login(provider), ProviderUnavailable)
        self.assertEqual(tls_auth.count, 0)
        self.assertIn("TLS failure (certificate verify failed)", str(failure))

    @defer.inlineCallbacks
    def test_sequential_checks_reuse_one_connection(self):
        provider = self.basic()
        for _ in range(10):
            yield self.login(provider)
        yield self.assertFailure(self.login(provider, password="wrong"), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 11)
        self.assertEqual(self.server.connections_made, 1)

    @defer.inlineCallbacks
    def test_concurrent_checks_keep_their_connections(self):
        provider = self.basic()
        yield defer.gatherResults([self.login(provider) for _ in range(8)])
        first = self.server.connections_made
        self.assertLessEqual(first, 8)
        yield defer.gatherResults([self.login(provider) for _ in range(8)])
        self.assertEqual(self.server.connections_made, first)  # all 8 went back to the pool

    @defer.inlineCallbacks
    def test_cookies_are_never_sent_back(self):
        # A session cookie set during A's login must not ride along with B's request.
        self.auth.set_cookie = "session=for-alice"
        provider = self.basic()
        yield self.login(provider)
        yield self.assertFailure(self.login(provider, "bob", "guess"), UnauthorizedLogin)
        self.assertIsNone(self.auth.requests[1].header("cookie"))

    @defer.inlineCallbacks
    def test_stop_closes_pooled_connections(self):
        provider = self.basic()
        yield self.login(provider)
        self.assertEqual(self.server.open_connections, 1)
        yield provider.stopProvider()
        yield until(lambda: self.server.open_connections == 0)

    @defer.inlineCallbacks
    def test_stop_fails_checks_in_flight(self):
        self.auth.hang = True
        provider = self.basic(timeout=10)
        d = self.login(provider)
        yield until(lambda: self.auth.count == 1)
        started = time.monotonic()
        yield provider.stopProvider()
        failure = yield self.assertFailure(d, ProviderUnavailable)
        self.assertIn("stopped", str(failure))
        self.assertLess(time.monotonic() - started, 1)

    @defer.inlineCallbacks
    def test_no_secret_in_errors_or_logs(self):
        events = capture_logs(self)
        provider = self.basic(timeout=0.5)
        yield self.login(provider)
        yield self.assertFailure(self.login(provider, password="nope"), UnauthorizedLogin)
        self.auth.status = 503
        error = yield self.assertFailure(self.login(provider), ProviderUnavailable)
        self.auth.status, self.auth.hang = None, True
        timeout = yield self.assertFailure(self.login(provider), ProviderUnavailable)
        texts = [str(error), str(timeout)] + [formatEvent(e) for e in events]
        self.assertTrue(any("login refused (rejected): endpoint answered HTTP 401" in text
                            for text in texts), texts)
        for text in texts:
            for secret in (PASSWORD, "nope", "YWxpY2U6", self.server.url("/auth")):
                self.assertNotIn(secret, text)


class HeaderTests(_ServerTestCase):
    def setUp(self):
        super().setUp()
        self.auth.expect_basic = None
        self.auth.expect_header = ("X-Bearer-Token", TOKEN)

    def test_interfaces(self):
        provider = self.header()
        self.assertTrue(verifyObject(IProvider, provider))
        self.assertEqual(provider.credentialInterfaces, (IBearerTokenCredentials,))
        self.assertFalse(provider.needs_password)

    @defer.inlineCallbacks
    def test_accepts_and_sends_whole_token(self):
        user = yield self.bearer(self.header(), username="carol")
        # the endpoint named nobody, so the identity is the token's
        # fingerprint, never the token nor a name the client chose
        self.assertEqual(user, "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12])
        request = self.auth.requests[0]
        self.assertEqual(request.header("x-bearer-token"), TOKEN)
        self.assertIsNone(request.header("authorization"))

    @defer.inlineCallbacks
    def test_wrong_token(self):
        yield self.assertFailure(self.bearer(self.header(), "Bearer nope"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_header_injection_refused_without_request(self):
        provider = self.header()
        for token in (TOKEN + "\r\nX-Admin: yes", TOKEN + "\nX-Admin: yes",
                      TOKEN + "\r", TOKEN + "\x00", "a\x7fb", ""):
            yield self.assertFailure(self.bearer(provider, token), UnauthorizedLogin)
        self.assertEqual(self.auth.count, 0)

    @defer.inlineCallbacks
    def test_tab_and_non_ascii_allowed(self):
        self.auth.expect_header = ("X-Bearer-Token", "t\u00f6ken\twith tab")
        yield self.bearer(self.header(), "t\u00f6ken\twith tab")

    @defer.inlineCallbacks
    def test_custom_method_success_codes_and_5xx(self):
        self.auth.ok_status = 201
        provider = self.header(method="PUT", success_codes="201")
        yield self.bearer(provider)
        self.assertEqual(self.auth.requests[0].method, "PUT")
        self.auth.status = 503
        yield self.assertFailure(self.bearer(provider), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_hanging_endpoint_times_out(self):
        self.auth.hang = True
        yield self.assertFailure(self.bearer(self.header(timeout=0.5)), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_redirect_not_followed(self):
        self.auth.redirect_to = self.server.url("/target")
        yield self.assertFailure(self.bearer(self.header()), UnauthorizedLogin)
        self.assertEqual(self.target.count, 0)


class ConfigTests(unittest.TestCase):
    def assertConfigError(self, cls, meta, params, *fragments):
        error = self.assertRaises(ConfigError, cls.from_params, meta, params,
                                  resources=resources())
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        return error

    def test_url_required_and_checked(self):
        self.assertConfigError(HTTPBasicProvider, BASIC, {}, "'url'", "idp-basic")
        for url in ("ftp://example.com/", "example.com/auth", "http:///auth",
                    "https://user:secret@example.com/", "http://example.com:99999/"):
            error = self.assertConfigError(HTTPBasicProvider, BASIC, {"url": url}, "'url'")
            self.assertNotIn("secret", str(error))

    def test_method(self):
        for method in ("GE T", "GET\r\n", 7, "CONNECT"):
            self.assertConfigError(HTTPBasicProvider, BASIC,
                                   {"url": "http://x.test/", "method": method}, "'method'")

    def test_success_codes(self):
        for codes in ([], ["abc"], [99], [600], [True], "2x0", {"a": 1}):
            self.assertConfigError(HTTPBasicProvider, BASIC,
                                   {"url": "http://x.test/", "success_codes": codes},
                                   "'success_codes'")

    def test_timeout(self):
        for timeout in ("soon", 0, -1, float("nan"), 10_000, True):
            self.assertConfigError(HTTPBasicProvider, BASIC,
                                   {"url": "http://x.test/", "timeout": timeout}, "'timeout'")

    @defer.inlineCallbacks
    def test_defaults_and_parsing(self):
        provider = HTTPBasicProvider.from_params(
            BASIC, {"url": "https://x.test/auth", "success_codes": ["200", 204],
                    "timeout": "2.5", "method": "head"}, resources=resources())
        checker = provider.checker
        self.assertEqual(checker.success_codes, {200, 204})
        self.assertEqual(checker.timeout, 2.5)
        self.assertEqual(checker.method, "HEAD")
        yield provider.stopProvider()
        provider = HTTPBasicProvider.from_params(BASIC, {"url": "http://x.test/"},
                                                 resources=resources())
        self.assertEqual(provider.checker.success_codes, {200})
        self.assertEqual(provider.checker.method, "GET")
        self.assertEqual(provider.checker.timeout, 5.0)
        yield provider.stopProvider()

    def test_header_param(self):
        url = "http://x.test/"
        self.assertConfigError(HTTPHeaderProvider, HEADER, {"url": url}, "'header'")
        for header in ("X Token", "X-Token:", "X-Token\r\nEvil", "", "Host",
                       "content-length", "Transfer-Encoding"):
            self.assertConfigError(HTTPHeaderProvider, HEADER, {"url": url, "header": header},
                                   "'header'")

