"""The OAuth2 token broker against a real token endpoint over real HTTP.

The endpoint is ``tests.support.tokenserver`` (twisted.web on loopback: it checks
client secrets, verifies ``private_key_jwt`` assertions against the registered key or
certificate, rotates refresh tokens, and signs RS256 access tokens that verify against
its ``/jwks``).  HTTP runs on the real reactor; the broker's notion of time is a
``Clock``, so expiry and refresh are exact and instant.
"""

from __future__ import annotations

import json
import time

import jwt
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from twisted.web.resource import Resource

from esmtpfa.relay.oauth2 import (
    FAILURE_HOLD,
    MAX_DESCRIPTION,
    MAX_RESPONSE_BYTES,
    ClientAssertion,
    OAuth2Settings,
    TokenBroker,
    TokenUnavailable,
    refresh_delay,
)
from esmtpfa.web.metrics import RelayMetrics
from tests.support.httpservers import LoopbackHTTPServer
from tests.support.logcapture import capture_logs
from tests.support.ports import free_port
from tests.support.resources import resources
from tests.support.tokenserver import (
    ClientRegistration,
    StalledServer,
    TokenServer,
    client_key_files,
    thumbprint,
)

SECRET = "s3cret-Client-Value"
WRONG = "wr0ng-Client-Value"


class BrokerTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.client, pool = resources().http_client(10)
        self.addCleanup(pool.closeCachedConnections)  # after the server dropped them
        self.server = TokenServer().start()
        self.addCleanup(self.server.stop)
        self.server.register(ClientRegistration("app", secret=SECRET, subject="app-sp"))
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.logs = capture_logs(self)
        self.secrets = [SECRET, WRONG]

    def settings(self, **overrides) -> OAuth2Settings:
        fields = dict(token_url=self.server.token_url, client_id="app", client_secret=SECRET,
                      scope="https://outlook.office365.com/.default")
        fields.update(overrides)
        return OAuth2Settings(**fields)

    def broker(self, settings: OAuth2Settings | None = None, **kwargs) -> TokenBroker:
        kwargs.setdefault("reactor", reactor)
        broker = TokenBroker(settings or self.settings(), self.client, self.clock,
                             upstream="smtp.example:587", **kwargs)
        self.addCleanup(broker.stop)
        return broker

    async def until(self, condition, limit: float = 5.0) -> None:
        """Let the real reactor run (HTTP) until ``condition()``, at most ``limit`` s."""
        deadline = time.monotonic() + limit
        while not condition():
            self.assertLess(time.monotonic(), deadline, "condition not reached in time")
            await deferLater(reactor, 0.01, lambda: None)

    def assertNoSecretAnywhere(self, *texts: str) -> None:
        """Neither the client secret, a refresh token, nor an access token appears in
        ``texts`` or in any log line so far (debug included)."""
        from twisted.logger import formatEvent
        lines = [formatEvent(event) for event in self.logs]
        lines += [repr(event) for event in self.logs]
        forbidden = self.secrets + list(self.server.issued) + list(self.server.refresh_tokens)
        for text in list(texts) + lines:
            for secret in forbidden:
                self.assertNotIn(secret, text)


class GrantTests(BrokerTestCase):
    """Each grant and client authentication gets a token that verifies at the JWKS."""

    async def check(self, broker: TokenBroker, method: str, sub: str = "app-sp") -> str:
        token = await broker.token()
        claims = self.server.verify(token)
        self.assertEqual(claims["sub"], sub)
        self.assertEqual([r.auth_method for r in self.server.requests], [method])
        self.assertEqual(self.server.requests[-1].outcome, "ok")
        self.assertNoSecretAnywhere(repr(broker), repr(broker.settings))
        return token

    async def test_client_secret_basic(self):
        token = await self.check(self.broker(), "client_secret_basic")
        self.assertEqual(self.server.verify(token)["scp"],
                         "https://outlook.office365.com/.default")

    async def test_client_secret_basic_form_encodes_the_secret(self):
        # RFC 6749 §2.3.1: id and secret are form-encoded before Basic; a secret with
        # ":" "+" or "%" must still be the same secret at the server.
        self.server.register(ClientRegistration("odd:id", secret="p+a:s%s w"))
        self.secrets.append("p+a:s%s w")
        broker = self.broker(self.settings(client_id="odd:id", client_secret="p+a:s%s w"))
        await self.check(broker, "client_secret_basic", sub="odd:id")

    async def test_client_secret_post(self):
        broker = self.broker(self.settings(auth_method="client_secret_post"))
        await self.check(broker, "client_secret_post")

    async def test_private_key_jwt_rsa_with_certificate(self):
        """What Entra ID app-only uses: RS256 and the certificate's x5t."""
        keys = client_key_files(self.mktemp(), alg="RS256")
        self.server.register(ClientRegistration(
            "entra-app", certificate_pem=keys.cert_pem, require_x5t=True))
        broker = self.broker(OAuth2Settings(
            token_url=self.server.token_url, client_id="entra-app",
            private_key=keys.key_path, certificate=keys.cert_path,
            scope="https://outlook.office365.com/.default"))
        await self.check(broker, "private_key_jwt", sub="entra-app")
        assertion = self.server.requests[0].form["client_assertion"]
        header = jwt.get_unverified_header(assertion)
        self.assertEqual((header["alg"], header["x5t"]), ("RS256", thumbprint(keys.cert_pem)))
        self.assertIn("x5t#S256", header)
        claims = jwt.decode(assertion, options={"verify_signature": False})
        self.assertEqual((claims["iss"], claims["sub"], claims["aud"]),
                         ("entra-app", "entra-app", self.server.token_url))
        self.assertLessEqual(claims["exp"] - claims["iat"], 600)

    async def test_private_key_jwt_es256_with_a_registered_public_key(self):
        keys = client_key_files(self.mktemp(), alg="ES256", certificate=False)
        self.server.register(ClientRegistration("ec-app", public_key_pem=keys.public_pem))
        broker = self.broker(OAuth2Settings(token_url=self.server.token_url,
                                            client_id="ec-app", private_key=keys.key_path))
        await self.check(broker, "private_key_jwt", sub="ec-app")
        # Each request gets a fresh assertion (the server refuses a replayed jti).
        broker.invalidate(await broker.token())
        self.server.verify(await broker.token())
        self.assertEqual([r.outcome for r in self.server.requests], ["ok", "ok"])

    async def test_private_key_jwt_signed_by_another_key_is_refused(self):
        registered = client_key_files(self.mktemp(), "registered", alg="RS256")
        other = client_key_files(self.mktemp(), "other", alg="RS256")
        self.server.register(ClientRegistration("app2", certificate_pem=registered.cert_pem))
        broker = self.broker(OAuth2Settings(token_url=self.server.token_url,
                                            client_id="app2", private_key=other.key_path))
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        self.assertIn("invalid_client", caught.exception.reason)

    def test_mismatched_certificate_and_key_refused_at_startup(self):
        one = client_key_files(self.mktemp(), "one")
        two = client_key_files(self.mktemp(), "two")
        settings = OAuth2Settings(token_url="https://login.example/token", client_id="x",
                                  private_key=one.key_path, certificate=two.cert_path)
        with self.assertRaises(ValueError) as caught:
            ClientAssertion(settings)
        self.assertIn("is not the one of", str(caught.exception))

    def test_unreadable_key_error_quotes_no_key(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n"
                       "-----END PRIVATE KEY-----\n")
        settings = OAuth2Settings(token_url="https://login.example/token", client_id="x",
                                  private_key=path)
        with self.assertRaises(ValueError) as caught:
            ClientAssertion(settings)
        self.assertNotIn("c2VjcmV0", str(caught.exception))
        self.assertIn(path, str(caught.exception))

    async def test_refresh_token_grant_keeps_the_rotated_token(self):
        """Gmail-style: a refresh token; the server rotates it and revokes the old one,
        so only a broker that kept the new one can refresh a second time."""
        first = self.server.new_refresh_token("app", "alerts@example.com",
                                              "https://mail.google.com/")
        broker = self.broker(self.settings(refresh_token=first, scope=None))
        token = await self.check(broker, "client_secret_basic", sub="alerts@example.com")
        self.assertNotIn(first, self.server.refresh_tokens)  # rotated: the old one is gone
        self.assertEqual(self.server.requests[0].form["refresh_token"], first)
        self.clock.advance(3300)  # the refresh time: renewed in the background
        self.assertEqual(await broker.token(), token)
        await self.until(lambda: self.server.hits == 2)
        second = await broker.token()
        self.assertNotEqual(second, token)
        self.assertEqual(self.server.requests[1].outcome, "ok")
        self.assertNotEqual(self.server.requests[1].form["refresh_token"], first)
        self.assertNoSecretAnywhere(repr(broker), repr(broker.settings))

    async def test_unknown_refresh_token(self):
        broker = self.broker(self.settings(refresh_token="rt-revoked-long-ago", scope=None))
        self.secrets.append("rt-revoked-long-ago")
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        self.assertIn("HTTP 400: invalid_grant", caught.exception.reason)
        self.assertNoSecretAnywhere(str(caught.exception), repr(caught.exception))


class CacheTests(BrokerTestCase):
    """Refresh timing (Clock), single flight, invalidation."""

    def test_refresh_delay(self):
        self.assertEqual(refresh_delay(3600, 300), 3300)    # an hour: 5 minutes early
        self.assertEqual(refresh_delay(600, 300), 480)      # short: 80% of the lifetime
        self.assertEqual(refresh_delay(60, 300), 48)
        self.assertEqual(refresh_delay(1500, 300), 1200)    # where the two rules meet
        self.assertEqual(refresh_delay(3600, 0), 3600)

    async def test_cached_until_the_refresh_time(self):
        broker = self.broker()
        token = await broker.token()
        self.clock.advance(3299)
        self.assertEqual(await broker.token(), token)
        self.assertEqual(self.server.hits, 1)
        self.clock.advance(1)
        # The refresh time: the renewal starts, but this caller gets the valid token.
        self.assertEqual(self.successResultOf(broker.token()), token)
        await self.until(lambda: self.server.hits == 2 and broker.readiness()[0])
        newer = self.successResultOf(broker.token())
        self.assertNotEqual(newer, token)
        self.assertEqual(self.server.hits, 2)

    async def test_short_tokens_refresh_at_80_percent(self):
        self.server.endpoint.lifetime = 60
        broker = self.broker()
        token = await broker.token()
        self.clock.advance(47)
        self.assertEqual(await broker.token(), token)
        self.assertEqual(self.server.hits, 1)
        self.clock.advance(1)
        self.assertEqual(await broker.token(), token)
        await self.until(lambda: self.server.hits == 2)

    async def test_a_renewal_that_hangs_holds_no_message(self):
        """A 60-second token, an endpoint that never answers at renewal time (t+48 s):
        until the token expires every caller gets it at once, and single flight still
        holds (one renewal request however many callers).  Only past expiry does a
        caller wait, and no longer than the request's deadline."""
        self.server.endpoint.lifetime = 60
        broker = self.broker(timeout=0.5)
        token = await broker.token()
        self.server.endpoint.hang = True
        self.clock.advance(48)
        for _ in range(5):
            self.assertEqual(self.successResultOf(broker.token()), token)
        self.clock.advance(11.9)
        self.assertEqual(self.successResultOf(broker.token()), token)
        self.assertEqual(broker.requests, 2)  # the first token, one renewal in flight
        self.clock.advance(0.1)  # expired: now a caller must wait for the renewal
        waiting = broker.token()
        self.assertNoResult(waiting)
        started = time.monotonic()
        with self.assertRaises(TokenUnavailable) as caught:
            await waiting
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("timed out", str(caught.exception))

    async def test_single_flight(self):
        broker = self.broker()
        waiting = [broker.token() for _ in range(25)]
        tokens = await defer.gatherResults(waiting)
        self.assertEqual(len(set(tokens)), 1)
        self.assertEqual(self.server.hits, 1)

    async def test_a_caller_that_gives_up_does_not_cancel_the_others(self):
        broker = self.broker()
        impatient, patient = broker.token(), broker.token()
        impatient.cancel()
        self.failureResultOf(impatient, defer.CancelledError)
        self.server.verify(await patient)

    async def test_invalidate_then_a_new_token(self):
        broker = self.broker()
        token = await broker.token()
        broker.invalidate(token)
        newer = await broker.token()
        self.assertNotEqual(newer, token)
        self.assertEqual(self.server.hits, 2)
        broker.invalidate(token)  # an old token: the current one stays
        self.assertEqual(await broker.token(), newer)
        self.assertEqual(self.server.hits, 2)

    async def test_revoked_at_the_server(self):
        """The server rotates its signing key: the cached token no longer verifies (the
        upstream refuses it), the session invalidates it, and the next one verifies."""
        broker = self.broker()
        token = await broker.token()
        self.server.revoke_all()
        self.assertRaises(jwt.PyJWTError, self.server.verify, token)
        broker.invalidate(token)
        self.server.verify(await broker.token())

    async def test_background_refresh(self):
        broker = self.broker()
        broker.start()
        self.clock.advance(0)
        await self.until(lambda: self.server.hits == 1 and broker.readiness()[0])
        first = await broker.token()
        self.clock.advance(3300)  # the refresh time: a request, with nobody waiting
        await self.until(lambda: self.server.hits == 2 and broker.readiness()[0])
        self.assertNotEqual(await broker.token(), first)
        self.assertEqual(self.server.hits, 2)  # the message did not wait for it
        broker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_background_refresh_retries_and_keeps_a_valid_token(self):
        broker = self.broker()
        broker.start()
        self.clock.advance(0)
        await self.until(lambda: broker.readiness()[0])
        token = await broker.token()
        self.server.endpoint.status = 503
        self.clock.advance(3300)
        await self.until(lambda: self.server.hits == 2 and broker.readiness()[1] != "")
        await self.until(lambda: "last refresh failed" in broker.readiness()[1])
        self.assertEqual(await broker.token(), token)  # 5 minutes left: still used
        for _ in range(3):  # messages do not hurry the retry: the backoff decides
            self.clock.advance(FAILURE_HOLD / 2)
            self.assertEqual(self.successResultOf(broker.token()), token)
        self.assertEqual(broker.requests, 2)
        ok, detail = broker.readiness()
        self.assertTrue(ok)
        self.assertIn("HTTP 503", detail)
        self.server.endpoint.status = None
        self.clock.advance(10)  # the retry
        await self.until(lambda: self.server.hits == 3 and "failed" not in broker.readiness()[1])
        self.assertNotEqual(await broker.token(), token)


class FailureTests(BrokerTestCase):
    """Failures are ``TokenUnavailable`` with a reason an operator can act on, quickly,
    and never with a secret."""

    async def test_wrong_client_secret(self):
        broker = self.broker(self.settings(client_secret=WRONG))
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        error = caught.exception
        self.assertIn("HTTP 401: invalid_client", error.reason)
        self.assertIn("smtp.example:587", error.reason)
        self.assertEqual(error.result, "refused")
        self.assertEqual(broker.readiness(), (False, error.detail))
        # The relay's readiness names the upstream; the broker's text does not repeat it.
        self.assertEqual(error.detail, str(error))
        self.assertNotIn("smtp.example:587", error.detail)
        self.assertEqual(error.reason, f"smtp.example:587: {error.detail}")
        self.assertNoSecretAnywhere(str(error), repr(error), repr(broker),
                                    repr(broker.settings))
        warnings = [e for e in self.logs if "no access token" in e.get("log_text", "")]
        self.assertEqual(len(warnings), 1)

    async def test_wrong_secret_post(self):
        broker = self.broker(self.settings(client_secret=WRONG,
                                           auth_method="client_secret_post"))
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        self.assertIn("invalid_client", caught.exception.reason)
        self.assertNoSecretAnywhere(str(caught.exception))

    async def test_credentials_the_server_quotes_back_are_redacted(self):
        """An endpoint that quotes what it was sent: the client secret straddling the
        point where the description is cut short, and the client assertion (a JWT, a
        credential until it expires).  Neither reaches the reason or a log line, not
        even the secret's first characters."""
        echoed = []

        class Echo(Resource):
            isLeaf = True

            def render_POST(self, request):
                form = {k.decode(): v[0].decode() for k, v in request.args.items()}
                echoed.append(form)
                quoted = form.get("client_secret") or form.get("client_assertion")
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"application/json")
                return json.dumps({"error": "invalid_request", "error_description":
                                   "x" * (MAX_DESCRIPTION - 6) + " " + quoted}).encode()
        server = LoopbackHTTPServer({"token": Echo()}).start()
        self.addCleanup(server.stop)
        keys = client_key_files(self.mktemp(), "echo", alg="RS256")
        for settings in (self.settings(token_url=server.url("/token"),
                                       auth_method="client_secret_post"),
                         OAuth2Settings(token_url=server.url("/token"), client_id="app",
                                        private_key=keys.key_path)):
            with self.assertRaises(TokenUnavailable) as caught:
                await self.broker(settings).token()
            # Redacted first, shortened after: what is left of the quote is the marker.
            self.assertIn("x <reda", caught.exception.reason)
        self.assertEqual(len(echoed), 2)
        assertion = echoed[1]["client_assertion"]
        self.assertTrue(assertion.startswith("eyJ"), "the assertion is a JWT")
        self.secrets += [SECRET[:5], assertion, assertion.split(".")[2][:8]]
        self.assertNoSecretAnywhere()

    async def test_endpoint_down(self):
        url = f"http://127.0.0.1:{free_port()}/token"  # nothing listens
        broker = self.broker(self.settings(token_url=url))
        started = time.monotonic()
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("unreachable", caught.exception.reason)
        self.assertIn("ConnectionRefused", caught.exception.reason)
        self.assertEqual(caught.exception.result, "unavailable")

    async def test_endpoint_stopped_after_a_token(self):
        broker = self.broker()
        token = await broker.token()
        await self.server.stop()
        broker.invalidate(token)
        with self.assertRaises(TokenUnavailable):
            await broker.token()
        self.assertFalse(broker.readiness()[0])

    async def test_stalled_endpoint_times_out(self):
        stalled = StalledServer().start()
        self.addCleanup(stalled.stop)
        broker = self.broker(self.settings(token_url=stalled.url), timeout=0.5)
        started = time.monotonic()
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        elapsed = time.monotonic() - started
        self.assertTrue(0.4 < elapsed < 3, elapsed)
        self.assertIn("timed out after 0.5 s", caught.exception.reason)
        self.assertGreater(stalled.factory.received, 0)  # the request did reach it

    async def test_stalled_token_server(self):
        self.server.endpoint.hang = True
        broker = self.broker(timeout=0.3)
        with self.assertRaises(TokenUnavailable) as caught:
            await broker.token()
        self.assertIn("timed out", caught.exception.reason)

    async def test_a_failure_is_held_briefly(self):
        """A burst of messages behind a failing endpoint sends one request, not one each;
        the next one goes after ``FAILURE_HOLD`` seconds."""
        self.server.endpoint.status = 500
        broker = self.broker()
        with self.assertRaises(TokenUnavailable):
            await broker.token()
        for _ in range(5):
            with self.assertRaises(TokenUnavailable) as caught:
                await broker.token()
        self.assertIn("HTTP 500", caught.exception.reason)
        self.assertEqual(self.server.hits, 1)
        self.server.endpoint.status = None
        self.clock.advance(FAILURE_HOLD)
        self.server.verify(await broker.token())

    async def test_malformed_answers(self):
        for body, words in ((b"<html>", "without a JSON object"),
                            (b'{"token_type": "Bearer"}', "usable access_token"),
                            (b'{"access_token": "a b", "token_type": "Bearer"}',
                             "usable access_token"),
                            (b'{"access_token": "abc", "token_type": "mac"}', "not Bearer"),
                            (b'{"access_token": "abc", "expires_in": -5}', "expires_in"),
                            (b'{"access_token": "' + b"x" * MAX_RESPONSE_BYTES + b'"}',
                             "over 65536 bytes")):
            self.server.endpoint.raw_body = body
            broker = self.broker()
            with self.assertRaises(TokenUnavailable) as caught:
                await broker.token()
            self.assertIn(words, caught.exception.reason)
            self.assertEqual(caught.exception.result, "malformed")

    async def test_expires_in_as_a_string_and_missing(self):
        self.server.endpoint.raw_body = b'{"access_token": "abc.def", "token_type": "bearer",' \
                                        b' "expires_in": "600"}'
        broker = self.broker()
        self.assertEqual(await broker.token(), "abc.def")
        self.clock.advance(480)
        self.server.endpoint.raw_body = b'{"access_token": "ghi", "token_type": "Bearer"}'
        self.assertEqual(await broker.token(), "abc.def")  # renewed in the background
        await self.until(lambda: self.server.hits == 2 and broker.readiness()[0])
        self.assertEqual(await broker.token(), "ghi")
        self.assertIn("valid for 3600 s", broker.readiness()[1])

    async def test_stop_fails_the_waiters(self):
        self.server.endpoint.hang = True
        broker = self.broker()
        waiting = broker.token()
        await deferLater(reactor, 0.05, lambda: None)
        broker.stop()
        failure = self.failureResultOf(waiting, TokenUnavailable)
        self.assertIn("stopped", failure.value.reason)
        self.failureResultOf(broker.token(), TokenUnavailable)


class ObservabilityTests(BrokerTestCase):

    async def test_readiness(self):
        broker = self.broker()
        self.assertEqual(broker.readiness(), (None, "no token requested yet"))
        await broker.token()
        self.assertEqual(broker.readiness(), (True, "token valid for 3600 s"))
        broker.invalidate(await broker.token())
        self.assertIsNone(broker.readiness()[0])
        await broker.token()
        self.clock.advance(3601)
        self.assertEqual(broker.readiness(), (False, "token expired"))

    async def test_metrics(self):
        metrics = RelayMetrics()
        broker = self.broker(observer=metrics)
        token = await broker.token()
        text = metrics.render().decode()
        self.assertIn('esmtpfa_oauth2_token_refreshes_total{result="ok",'
                      'upstream="smtp.example:587"} 1.0', text)
        [line] = [line for line in text.splitlines()
                  if line.startswith("esmtpfa_oauth2_token_expiry_seconds{")]
        self.assertTrue(3590 < float(line.split()[-1]) <= 3600, line)
        broker.invalidate(token)
        self.server.endpoint.status = 503
        with self.assertRaises(TokenUnavailable):
            await broker.token()
        text = metrics.render().decode()
        self.assertIn('esmtpfa_oauth2_token_refreshes_total{result="unavailable",'
                      'upstream="smtp.example:587"} 1.0', text)
        self.assertIn('esmtpfa_oauth2_token_expiry_seconds{upstream="smtp.example:587"} 0.0',
                      text)
        self.assertNoSecretAnywhere(text)

    async def test_observer_bug_changes_nothing(self):
        """A metrics observer that raises is logged; the token still arrives, and the
        upstream's refusal of it is still taken (the SMTP client calls ``invalidate``)."""
        class Broken(Exception):
            pass

        class BrokenObserver:
            def token_refreshed(self, upstream, result):
                raise Broken("refreshed")

            def token_expires_in(self, upstream, seconds):
                raise Broken("expires")

        broker = self.broker(observer=BrokenObserver())
        d = defer.ensureDeferred(broker.token())
        token = await d.addTimeout(5, reactor)
        self.assertEqual(broker.readiness(), (True, "token valid for 3600 s"))
        broker.invalidate(token)
        self.assertIsNone(broker.readiness()[0])
        again = await defer.ensureDeferred(broker.token()).addTimeout(5, reactor)
        self.assertNotEqual(again, token)
        self.assertEqual(len(self.flushLoggedErrors(Broken)), 5)

    def test_no_expiry_series_without_oauth2(self):
        self.assertNotIn(b"oauth2_token_expiry", RelayMetrics().render())

    async def test_logs_say_what_happened_without_secrets(self):
        refresh = self.server.new_refresh_token("app", "alerts@example.com")
        broker = self.broker(self.settings(refresh_token=refresh))
        token = await broker.token()
        broker.invalidate(token)
        await broker.token()
        bad = self.broker(self.settings(client_secret=WRONG))
        with self.assertRaises(TokenUnavailable):
            await bad.token()
        from twisted.logger import formatEvent
        text = "\n".join(formatEvent(e) for e in self.logs)
        self.assertIn("refresh token rotated", text)
        self.assertIn("refused the access token", text)
        self.assertIn("invalid_client", text)
        self.secrets.append(refresh)
        self.assertNoSecretAnywhere()


class SettingsTests(unittest.TestCase):

    def test_repr_hides_secrets(self):
        settings = OAuth2Settings(token_url="https://login.example/t", client_id="id",
                                  client_secret=SECRET, refresh_token="rt-secret-value")
        self.assertNotIn(SECRET, repr(settings))
        self.assertNotIn("rt-secret-value", repr(settings))
        self.assertIn("client_id='id'", repr(settings))
        self.assertEqual((settings.grant, settings.auth_method),
                         ("refresh_token", "client_secret_basic"))

    def test_validation(self):
        url = "https://login.example/token"
        for fields, words in (
                (dict(token_url="ftp://x/", client_id="i", client_secret="s"), "token_url"),
                (dict(token_url="http://login.example/t", client_id="i", client_secret="s"),
                 "must be https (http only on loopback)"),
                (dict(token_url=url, client_id="", client_secret="s"), "client_id"),
                (dict(token_url=url, client_id="i"), "needs client_secret"),
                (dict(token_url=url, client_id="i", client_secret="s",
                      auth_method="private_key_jwt"), "needs private_key"),
                (dict(token_url=url, client_id="i", client_secret="s",
                      private_key="/k"), "not both"),
                (dict(token_url=url, client_id="i", client_secret="s",
                      auth_method="tls_client_auth"), "auth_method"),
                (dict(token_url=url, client_id="i", client_secret="s",
                      certificate="/c"), "private_key_jwt")):
            with self.assertRaises(ValueError) as caught:
                OAuth2Settings(**fields)
            self.assertIn(words, str(caught.exception))
            self.assertNotIn("'s'", str(caught.exception))
        self.assertEqual(OAuth2Settings(token_url=url, client_id="i", private_key="/k")
                         .auth_method, "private_key_jwt")


class RealUpstreamTests(BrokerTestCase):
    """The broker's tokens through the client mechanisms (``relay.client_sasl``) against a real
    upstream that verifies them: esmtpfa "B" in-process, with a ``jwt`` provider reading
    the token server's JWKS, relaying to a recording SMTP server.

    A token revoked at the server (signing key rotated before B ever saw the token) is
    refused with the RFC 7628 error challenge; the mechanism answers it and records the
    refusal; ``invalidate()`` and a new token on a new connection deliver the message.
    (The SMTP session doing this by itself is the integration step after this one.)
    """

    PROVIDER = "corp-oauth"
    timeout = 60

    async def upstream_b(self):
        import json

        from tests.support.relayfixture import RelayFixture
        providers = json.dumps({"providers": [{
            "meta": {"name": self.PROVIDER, "type": "jwt"},
            "params": {"jwks_url": self.server.jwks_url, "iss": self.server.issuer,
                       "aud": self.server.audience}}]})
        fixture = RelayFixture(self.mktemp(), providers=providers)
        self.addCleanup(fixture.stop)
        await fixture.start()
        return fixture

    def login(self, fixture, mechanism, message: bytes | None = None):
        """One connection to B over implicit TLS: AUTH with ``mechanism`` (a
        ``relay.client_sasl`` client), then a message if accepted.  Runs in a thread."""
        import base64

        from tests.support.rawsmtp import RawSMTP
        client = RawSMTP("127.0.0.1", fixture.tls_port, tls=fixture.client_context(),
                         server_hostname="relay.test")
        try:
            client.command("EHLO a.example")
            initial = base64.b64encode(mechanism.initial()).decode()
            code, text = client.command(f"AUTH {mechanism.name} {initial}")
            replies = [code]
            while code == 334:
                answer = mechanism.respond(base64.b64decode(text))
                code, text = client.command(base64.b64encode(answer))
                replies.append(code)
            if code == 235 and message is not None:
                replies.append(client.send_message(message, "app@example.com",
                                                   ["bob@example.net"])[0])
            return replies
        finally:
            client.close()

    async def test_xoauth2_and_oauthbearer_through_a_verifying_upstream(self):
        from twisted.internet import threads

        from esmtpfa.relay.client_sasl import OAuthBearer, XOAuth2
        fixture = await self.upstream_b()
        broker = self.broker()
        revoked = await broker.token()
        self.server.revoke_all()

        refused = XOAuth2(self.PROVIDER, revoked)
        replies = await threads.deferToThread(self.login, fixture, refused)
        self.assertEqual(replies, [334, 535])  # error challenge, our empty answer, refusal
        self.assertTrue(refused.token_refused)
        self.assertEqual(refused.refusal.status, "invalid_token")

        broker.invalidate(revoked)
        for index, mechanism in enumerate((XOAuth2, OAuthBearer)):
            token = await broker.token()
            self.assertNotEqual(token, revoked)
            client = (XOAuth2(self.PROVIDER, token) if mechanism is XOAuth2 else
                      OAuthBearer(token, "127.0.0.1", fixture.tls_port, self.PROVIDER))
            content = f"Subject: via {client.name}\r\n\r\nhello {index}\r\n".encode()
            replies = await threads.deferToThread(self.login, fixture, client, content)
            self.assertEqual(replies, [235, 250], client.name)
        self.assertEqual(self.server.hits, 2)  # the revoked token, then one new one
        delivered = [m.data for m in fixture.upstream.accepted]
        self.assertEqual(len(delivered), 2)
        self.assertIn(b"hello 0", delivered[0])
        self.assertIn(b"hello 1", delivered[1])
        from twisted.logger import formatEvent
        text = "\n".join(formatEvent(event) for event in self.logs)
        # B logged who each token is for (its sub).
        self.assertIn("AUTH XOAUTH2 ok as corp-oauth/app-sp", text)
        self.assertIn("AUTH OAUTHBEARER ok as corp-oauth/app-sp", text)
        self.assertNoSecretAnywhere()
