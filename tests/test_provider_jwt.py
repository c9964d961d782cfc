"""jwt (docs/design.md, "Provider types", RFC 7519/7515/7517, RFC 8725) against a real JWKS endpoint
on loopback.

Token times are fixed: the provider's clock is a ``task.Clock`` set to ``NOW`` (it also
times JWKS refreshes, so rate limits are tested by advancing it), while the network
and the fetch deadline run on the real reactor.
"""

from __future__ import annotations

import random
import string
from dataclasses import replace

from cryptography.hazmat.primitives import serialization
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from esmtpfa.auth.credentials import BearerToken, IBearerTokenCredentials
from esmtpfa.auth.errors import ProviderUnavailable, UnauthorizedLogin
from esmtpfa.auth.provider import IProvider, ProviderMeta
from esmtpfa.common.context import ConnectionContext
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.resources import LastGood
from esmtpfa.providers.jwt import (
    MAX_TOKEN_LENGTH,
    JWTProvider,
    KeySet,
    same_value,
)
from tests.support.httpservers import (
    JWKSEndpoint,
    LoopbackHTTPServer,
    compact,
    forge_hs256,
    make_key,
    mint,
    standard_claims,
    until,
)
from tests.support.logcapture import capture_logs
from tests.support.ports import free_port
from tests.support.resources import resources

CONTEXT = ConnectionContext("urn:uuid:00000000-0000-0000-0000-0000000000j1", "smtp")
META = ProviderMeta(name="idp-jwt", type="jwt")
NOW = 1_700_000_000
ISS, AUD, SUB = "https://idp.example.test", "esmtpfa", "user-42"

_KEYS: dict[str, object] = {}


def key(name: str):
    """Keys are made once per test run (RSA generation is slow)."""
    if name not in _KEYS:
        makers = {
            "rsa": lambda: make_key("RS256", "rsa-1"),
            "ec": lambda: make_key("ES256", "ec-1"),
            "ed": lambda: make_key("EdDSA", "ed-1"),
            "rsa2": lambda: make_key("RS256", "rsa-2"),
            # Same kid as "rsa", a different key: an attacker's own key pair.
            "foreign": lambda: make_key("RS256", "rsa-1"),
        }
        _KEYS[name] = makers[name]()
    return _KEYS[name]


def claims(**extra):
    base = {"iss": ISS, "aud": AUD, "sub": SUB}
    base.update(extra)
    return standard_claims(NOW, **base)


class _JWKSTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.jwks = JWKSEndpoint([key("rsa"), key("ec"), key("ed")])
        self.server = LoopbackHTTPServer({"jwks": self.jwks}).start()
        self.addCleanup(self.server.stop)
        self.store = LastGood()

    def provider(self, store: LastGood | None = None, **params) -> JWTProvider:
        params.setdefault("jwks_url", self.server.url("/jwks"))
        provider = JWTProvider.from_params(
            META, params, resources=replace(resources(self.clock), jwks=store or self.store))
        self.addCleanup(provider.stopProvider)
        return provider

    def login(self, provider, token) -> defer.Deferred:
        """Fires with the user of the ``Principal`` the provider vouched for."""
        return provider.requestAvatarId(BearerToken(token, CONTEXT, "")).addCallback(
            lambda principal: principal.user)

    @defer.inlineCallbacks
    def accepted(self, provider, token, user=SUB):
        got = yield self.login(provider, token)
        self.assertEqual(got, user)

    @defer.inlineCallbacks
    def rejected(self, provider, token, reason: str | None = None):
        failure = yield self.assertFailure(self.login(provider, token), UnauthorizedLogin)
        if reason is not None:
            self.assertIn(reason, str(failure))


class VerificationTests(_JWKSTestCase):
    def test_interfaces(self):
        provider = self.provider()
        self.assertTrue(verifyObject(IProvider, provider))
        self.assertTrue(ICredentialsChecker.providedBy(provider))
        self.assertEqual(provider.credentialInterfaces, (IBearerTokenCredentials,))
        self.assertFalse(provider.needs_password)

    @defer.inlineCallbacks
    def test_rs256_es256_eddsa_accepted(self):
        provider = self.provider(iss=ISS, aud=AUD)
        for name in ("rsa", "ec", "ed"):
            yield self.accepted(provider, mint(key(name), claims()))
        self.assertEqual(self.jwks.fetches, 1)

    @defer.inlineCallbacks
    def test_ps256_with_an_rsa_key_without_alg(self):
        rsa = make_key("PS256", "ps", private=key("rsa").private, jwk_alg=False)
        self.jwks.keys = [rsa]
        provider = self.provider()
        yield self.accepted(provider, mint(rsa, claims()))
        # The same key also verifies RS256 (no "alg" in the JWK: kty RSA decides).
        yield self.accepted(provider, mint(make_key("RS256", "ps", private=rsa.private),
                                           claims()))

    @defer.inlineCallbacks
    def test_jwk_alg_pins_the_algorithm(self):
        # The JWK says RS256: a PS256 token signed by the very same private key fails.
        pinned = make_key("RS256", "pinned", private=key("rsa").private)
        self.jwks.keys = [pinned]
        provider = self.provider()
        ps = make_key("PS256", "pinned", private=key("rsa").private)
        yield self.rejected(provider, mint(ps, claims()), "algorithm")

    @defer.inlineCallbacks
    def test_alg_none_rejected_before_any_key(self):
        provider = self.provider()
        for alg in ("none", "None", "NONE", "", None, "HS512", "RSA-OAEP", "ES521"):
            # Unsigned (empty signature segment) and with a signature of some sort.
            yield self.rejected(provider, compact({"alg": alg, "kid": "rsa-1"}, claims()))
            token = compact({"alg": alg, "kid": "rsa-1"}, claims(), lambda _: b"sig")
            yield self.rejected(provider, token, "algorithm")
        yield self.rejected(provider, compact({"kid": "rsa-1"}, claims(), lambda _: b"s"),
                            "algorithm")
        self.assertEqual(self.jwks.fetches, 0)

    @defer.inlineCallbacks
    def test_hs256_keyed_with_the_rsa_public_key_rejected(self):
        provider = self.provider()
        public = key("rsa").private.public_key()
        for encoding, fmt in [(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo),
                              (serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
                              (serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)]:
            secret = public.public_bytes(encoding, fmt)
            for alg in ("HS256",):
                token = forge_hs256(secret, claims(), {"kid": "rsa-1", "alg": alg})
                yield self.rejected(provider, token, "algorithm")
        self.assertEqual(self.jwks.fetches, 0)

    @defer.inlineCallbacks
    def test_expired(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), claims(exp=NOW - 31)), "expired")
        # Within the 30 s leeway.
        yield self.accepted(provider, mint(key("rsa"), claims(exp=NOW - 29)))
        no_leeway = self.provider(leeway=0, store=LastGood())
        yield self.rejected(no_leeway, mint(key("rsa"), claims(exp=NOW)), "expired")

    @defer.inlineCallbacks
    def test_nbf_in_the_future(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), claims(nbf=NOW + 60)), "nbf")
        yield self.accepted(provider, mint(key("rsa"), claims(nbf=NOW + 20)))

    @defer.inlineCallbacks
    def test_iat_far_in_the_future(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), claims(iat=NOW + 3600)), "iat")
        yield self.accepted(provider, mint(key("rsa"), claims(iat=NOW + 10)))

    @defer.inlineCallbacks
    def test_exp_required_and_typed(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), claims(exp=None)), "exp")
        for bad in (str(NOW + 300), True, [NOW + 300], None.__class__.__name__):
            yield self.rejected(provider, mint(key("rsa"), claims(exp=bad)), "exp")
        yield self.rejected(provider, mint(key("rsa"), claims(nbf="0")), "nbf")
        # A fractional NumericDate is valid (RFC 7519 §2).
        yield self.accepted(provider, mint(key("rsa"), claims(exp=NOW + 1.5)))

    @defer.inlineCallbacks
    def test_iss_aud_sub(self):
        provider = self.provider(iss=ISS, aud=AUD, sub=SUB)
        yield self.accepted(provider, mint(key("ec"), claims()))
        yield self.rejected(provider, mint(key("ec"), claims(iss=ISS + "/")), "issuer")
        yield self.rejected(provider, mint(key("ec"), claims(iss=None)), "issuer")
        yield self.rejected(provider, mint(key("ec"), claims(aud="other")), "audience")
        yield self.rejected(provider, mint(key("ec"), claims(aud=None)), "audience")
        yield self.rejected(provider, mint(key("ec"), claims(aud=[])), "audience")
        yield self.rejected(provider, mint(key("ec"), claims(aud={"esmtpfa": 1})), "audience")
        yield self.rejected(provider, mint(key("ec"), claims(sub="user-43")), "subject")
        yield self.rejected(provider, mint(key("ec"), claims(sub=None)), "subject")

    @defer.inlineCallbacks
    def test_aud_list_containing_the_value(self):
        provider = self.provider(aud=AUD)
        yield self.accepted(provider, mint(key("ed"), claims(aud=["other", AUD])))
        yield self.rejected(provider, mint(key("ed"), claims(aud=["other", "x"])), "audience")
        yield self.rejected(provider, mint(key("ed"), claims(aud=["esmtpfa-x"])), "audience")

    @defer.inlineCallbacks
    def test_custom_claims_equal_by_value(self):
        provider = self.provider(claims={"foo": ["bar"], "another": "claim-value",
                                         "org": {"id": 7, "tags": ["a", "b"]}, "n": "1"})
        good = dict(foo=["bar"], another="claim-value", org={"tags": ["a", "b"], "id": 7},
                    n="1")
        # A map claim equal by value (key order differs) is accepted.
        yield self.accepted(provider, mint(key("rsa"), claims(**good)))
        for name, value in [("foo", ["bar", "baz"]), ("foo", "bar"), ("foo", []),
                            ("another", "claim-value2"), ("org", {"id": 7}),
                            ("org", {"id": "7", "tags": ["a", "b"]}),
                            ("org", {"id": 7, "tags": ["b", "a"]}), ("n", 1)]:
            token = mint(key("rsa"), claims(**{**good, name: value}))
            yield self.rejected(provider, token, "differs")
        yield self.rejected(provider, mint(key("rsa"), claims(**{**good, "foo": None})),
                            "missing")

    @defer.inlineCallbacks
    def test_right_kid_foreign_key(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("foreign"), claims()), "signature")

    @defer.inlineCallbacks
    def test_tampered_payload(self):
        provider = self.provider()
        token = mint(key("ec"), claims(sub="alice"))
        header, _, signature = token.split(".")
        forged = compact({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}, claims(sub="admin"))
        token = ".".join([header, forged.split(".")[1], signature])
        yield self.rejected(provider, token, "signature")

    @defer.inlineCallbacks
    def test_right_kid_wrong_key_type(self):
        # kid "rsa-1" now names an EC key: an RS256 token with that kid must fail, even
        # though the RSA signature itself is genuine.
        impostor = make_key("ES256", "rsa-1", private=key("ec").private)
        self.jwks.keys = [impostor]
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), claims()), "algorithm")
        # And ES384 on a P-256 key is refused by the key's curve.
        self.jwks.keys = [make_key("ES256", "ec-1", private=key("ec").private,
                                   jwk_alg=False)]
        provider2 = self.provider(store=LastGood())
        token = compact({"alg": "ES384", "kid": "ec-1"}, claims(), lambda _: b"x" * 96)
        yield self.rejected(provider2, token, "algorithm")

    @defer.inlineCallbacks
    def test_token_without_kid(self):
        single = self.provider()
        self.jwks.keys = [key("ed")]
        yield self.accepted(single, mint(key("ed"), claims(), {"kid": None}))
        self.jwks.keys = [key("ed"), key("ec")]
        several = self.provider(store=LastGood())
        yield self.rejected(several, mint(key("ed"), claims(), {"kid": None}), "kid")

    @defer.inlineCallbacks
    def test_principal_choice(self):
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims(preferred_username="bob")), SUB)
        yield self.accepted(provider, mint(key("rsa"), claims(
            sub=None, preferred_username="bob", email="b@example.test")), "bob")
        yield self.accepted(provider, mint(key("rsa"), claims(
            sub=None, email="b@example.test")), "b@example.test")
        yield self.rejected(provider, mint(key("rsa"), claims(sub=None)), "sub")

    @defer.inlineCallbacks
    def test_malformed_and_oversized_tokens_rejected_without_fetch(self):
        provider = self.provider()
        good = mint(key("rsa"), claims())
        header, payload, signature = good.split(".")
        big = mint(key("rsa"), claims(pad="x" * MAX_TOKEN_LENGTH))
        self.assertGreater(len(big), MAX_TOKEN_LENGTH)
        for token in ["", "abc", good + ".x.y", f"{header}.{payload}", f"{header}..{signature}",
                      "\u00e9" + good, f"!!!.{payload}.{signature}",
                      compact({"alg": "RS256", "kid": 5}, claims()),
                      f"{compact({'alg': 'RS256'}, claims()).split('.')[0][:-2]}.{payload}.x",
                      big]:
            yield self.rejected(provider, token)
        self.assertEqual(self.jwks.fetches, 0)

    @defer.inlineCallbacks
    def test_payload_not_an_object(self):
        provider = self.provider()
        yield self.rejected(provider, mint(key("rsa"), b"[1, 2]"), "payload")
        yield self.rejected(provider, mint(key("rsa"), b"not json"), "payload")

    @defer.inlineCallbacks
    def test_unknown_critical_header(self):
        provider = self.provider()
        token = mint(key("rsa"), claims(), {"crit": ["exp-ext"], "exp-ext": 1})
        yield self.rejected(provider, token)

    @defer.inlineCallbacks
    def test_unusable_jwks_keys_are_skipped(self):
        weak = make_key("RS256", "weak", private=__import__(
            "cryptography.hazmat.primitives.asymmetric.rsa", fromlist=["rsa"])
            .generate_private_key(public_exponent=65537, key_size=1024))
        enc = make_key("RS256", "enc", private=key("rsa").private, use="enc")
        self.jwks.keys = [weak, enc, key("ec")]
        self.jwks.extra = [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}, "junk",
                           {"kty": "RSA", "kid": "broken", "n": "AQAB"}]
        provider = self.provider()
        yield self.accepted(provider, mint(key("ec"), claims()))
        self.assertEqual(sorted(provider.cache.keys.kids), ["ec-1"])
        yield self.rejected(provider, mint(weak, claims()), "kid")
        yield self.rejected(provider, mint(enc, claims()), "kid")
        token = forge_hs256(b"secret", claims(), {"kid": "hmac"})
        yield self.rejected(provider, token, "algorithm")

    @defer.inlineCallbacks
    def test_private_members_in_jwks_ignored(self):
        from jwt.algorithms import RSAAlgorithm
        private_jwk = RSAAlgorithm.to_jwk(key("rsa").private, as_dict=True)
        private_jwk.pop("key_ops")  # ["sign"] would (rightly) disqualify it
        self.jwks.keys = []
        self.jwks.extra = [dict(private_jwk, kid="rsa-1", alg="RS256")]
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims()))

    @defer.inlineCallbacks
    def test_no_token_in_logs_or_errors(self):
        events = capture_logs(self)
        provider = self.provider(iss=ISS)
        tokens = [mint(key("rsa"), claims()), mint(key("rsa"), claims(iss="evil")),
                  mint(key("foreign"), claims()), mint(key("rsa"), claims(exp=NOW - 3600))]
        errors = []
        for token in tokens:
            try:
                yield self.login(provider, token)
            except UnauthorizedLogin as error:
                errors.append(str(error))
        self.assertEqual(len(errors), 3)
        texts = errors + [formatEvent(event) for event in events]
        self.assertTrue(any("login refused (bad-token): wrong issuer" in text
                            for text in texts), texts)
        self.assertTrue(any("login refused (expired-token): expired" in text
                            for text in texts), texts)
        for token in tokens:
            for part in token.split("."):
                for text in texts:
                    self.assertNotIn(part, text)


class JWKSCacheTests(_JWKSTestCase):
    @defer.inlineCallbacks
    def test_two_bundles_keep_two_caches(self):
        """The key sets live in the bundle a provider is given, not in the process: a
        provider of a second service (its own ``Resources``) fetches for itself, a
        reload's successor in the same service does not."""
        token = mint(key("rsa"), claims())
        yield self.accepted(self.provider(), token)
        yield self.accepted(self.provider(), token)  # a reload: the same bundle's cache
        self.assertEqual(self.jwks.fetches, 1)
        other = JWTProvider.from_params(META, {"jwks_url": self.server.url("/jwks")},
                                        resources=resources(self.clock))
        self.addCleanup(other.stopProvider)
        yield self.accepted(other, token)
        self.assertEqual(self.jwks.fetches, 2)

    @defer.inlineCallbacks
    def test_concurrent_first_logins_share_one_fetch(self):
        provider = self.provider()
        token = mint(key("ec"), claims())
        users = yield defer.gatherResults([self.login(provider, token) for _ in range(50)])
        self.assertEqual(set(users), {SUB})
        self.assertEqual(self.jwks.fetches, 1)

    @defer.inlineCallbacks
    def test_rotation(self):
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims()))
        self.assertEqual(self.jwks.fetches, 1)
        # The IdP publishes a new key and starts signing with it.
        self.jwks.keys = [key("rsa"), key("rsa2")]
        self.clock.advance(31)  # past min_refresh_interval since the last fetch
        yield self.accepted(provider, mint(key("rsa2"), claims(iat=NOW + 31,
                                                               exp=NOW + 331)))
        self.assertEqual(self.jwks.fetches, 2)
        yield self.accepted(provider, mint(key("rsa2"), claims(exp=NOW + 331)))
        self.assertEqual(self.jwks.fetches, 2)

    @defer.inlineCallbacks
    def test_unknown_kids_cannot_cause_a_fetch_storm(self):
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims()))
        self.assertEqual(self.jwks.fetches, 1)
        self.clock.advance(60)
        now = NOW + 60

        def random_kid_token():
            kid = "".join(random.choices(string.ascii_letters, k=12))
            return mint(key("ed"), standard_claims(now, sub="x"), {"kid": kid})
        tokens = [random_kid_token() for _ in range(1000)]
        # 1,000 concurrent logins with random unknown kids: one fetch, shared.
        results = yield defer.DeferredList([self.login(provider, t) for t in tokens],
                                           consumeErrors=True)
        self.assertTrue(all(not ok and f.check(UnauthorizedLogin) for ok, f in results))
        self.assertEqual(self.jwks.fetches, 2)
        # 1,000 more, one after the other, within min_refresh_interval: no fetch at all.
        for token in tokens:
            yield self.assertFailure(self.login(provider, token), UnauthorizedLogin)
        self.assertEqual(self.jwks.fetches, 2)
        # Once the interval has passed, one more fetch.
        self.clock.advance(30)
        for token in tokens[:100]:
            yield self.assertFailure(self.login(provider, token), UnauthorizedLogin)
        self.assertEqual(self.jwks.fetches, 3)
        # Known keys kept working throughout.
        yield self.accepted(provider, mint(key("rsa"), standard_claims(now, sub=SUB)))

    @defer.inlineCallbacks
    def test_jwks_down_at_first_use(self):
        provider = self.provider(jwks_url=f"http://127.0.0.1:{free_port()}/jwks", timeout=2)
        yield self.assertFailure(self.login(provider, mint(key("rsa"), claims())),
                                 ProviderUnavailable)

    @defer.inlineCallbacks
    def test_jwks_error_status_at_first_use_then_recovers(self):
        self.jwks.status = 503
        provider = self.provider()
        token = mint(key("rsa"), claims())
        yield self.assertFailure(self.login(provider, token), ProviderUnavailable)
        self.assertEqual(self.jwks.fetches, 1)
        # Retried at most every few seconds while nothing is loaded: no storm.
        yield self.assertFailure(self.login(provider, token), ProviderUnavailable)
        self.assertEqual(self.jwks.fetches, 1)
        self.jwks.status = None
        self.clock.advance(5)
        yield self.accepted(provider, token)
        self.assertEqual(self.jwks.fetches, 2)

    @defer.inlineCallbacks
    def test_jwks_hanging_at_first_use_times_out(self):
        self.jwks.hang = True
        provider = self.provider(timeout=0.5)
        yield self.assertFailure(self.login(provider, mint(key("rsa"), claims())),
                                 ProviderUnavailable)

    @defer.inlineCallbacks
    def test_invalid_jwks_at_first_use(self):
        provider = self.provider()
        for body in (b"not json", b'{"keys": "x"}', b'{"keys": []}',
                     b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'):
            self.jwks.raw_body = body
            self.clock.advance(60)
            yield self.assertFailure(self.login(provider, mint(key("rsa"), claims(
                exp=NOW + 3600))), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_jwks_down_later_keeps_cached_keys(self):
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims()))
        yield self.server.stop()  # the JWKS host is gone
        self.clock.advance(400)  # past refresh_interval: a refresh is due
        now = NOW + 400
        yield self.accepted(provider, mint(key("ec"), standard_claims(now, sub=SUB)))
        yield until(lambda: not provider.cache._fetching)
        self.assertEqual(provider.cache.fetches, 2)  # the refresh was tried, and failed
        yield self.accepted(provider, mint(key("ed"), standard_claims(now, sub=SUB)))
        # An unknown kid while the JWKS is down is "can't tell", not "wrong".
        self.clock.advance(31)
        token = mint(key("rsa2"), standard_claims(now, sub=SUB))
        yield self.assertFailure(self.login(provider, token), ProviderUnavailable)

    @defer.inlineCallbacks
    def test_periodic_refresh_drops_removed_keys(self):
        provider = self.provider()
        yield self.accepted(provider, mint(key("rsa"), claims()))
        self.jwks.keys = [key("ec")]  # rsa-1 revoked
        self.clock.advance(299)
        now = NOW + 299
        yield self.accepted(provider, mint(key("rsa"), standard_claims(now, sub=SUB)))
        self.assertEqual(self.jwks.fetches, 1)  # not due yet
        self.clock.advance(2)
        now += 2
        # Due: this login still uses the cached set, the refresh runs in the background.
        yield self.accepted(provider, mint(key("ec"), standard_claims(now, sub=SUB)))
        yield until(lambda: self.jwks.fetches == 2 and not provider.cache._fetching)
        yield self.rejected(provider, mint(key("rsa"), standard_claims(now, sub=SUB)), "kid")

    @defer.inlineCallbacks
    def test_reload_keeps_the_cache(self):
        first = self.provider()
        yield self.accepted(first, mint(key("rsa"), claims()))
        yield first.stopProvider()
        second = self.provider(iss=ISS)  # same store, same URL, changed params
        yield self.accepted(second, mint(key("ec"), claims()))
        self.assertEqual(self.jwks.fetches, 1)

    @defer.inlineCallbacks
    def test_stop_during_fetch(self):
        self.jwks.hang = True
        provider = self.provider()
        d = self.login(provider, mint(key("rsa"), claims()))
        yield until(lambda: self.jwks.fetches == 1)
        yield provider.stopProvider()
        yield self.assertFailure(d, ProviderUnavailable)
        yield self.assertFailure(self.login(provider, mint(key("rsa"), claims())),
                                 ProviderUnavailable)


class ConfigTests(unittest.TestCase):
    def make(self, **params):
        return JWTProvider.from_params(META, params, resources=resources(Clock()))

    def assertConfigError(self, fragment: str, **params):
        error = self.assertRaises(ConfigError, self.make, **params)
        self.assertIn(fragment, str(error))
        self.assertIn("idp-jwt", str(error))

    def test_errors(self):
        url = "https://idp.example.test/jwks"
        self.assertConfigError("'jwks_url'")
        self.assertConfigError("'jwks_url'", jwks_url="file:///etc/passwd")
        self.assertConfigError("'jwks_url'", jwks_url=5)
        self.assertConfigError("'iss'", jwks_url=url, iss=["a"])
        self.assertConfigError("'aud'", jwks_url=url, aud=7)
        self.assertConfigError("'claims'", jwks_url=url, claims=["foo"])
        self.assertConfigError("'claims'", jwks_url=url, claims={"foo": object()})
        self.assertConfigError("'claims'", jwks_url=url, claims={"": 1})
        self.assertConfigError("'leeway'", jwks_url=url, leeway=-1)
        self.assertConfigError("'leeway'", jwks_url=url, leeway="lots")
        self.assertConfigError("'refresh_interval'", jwks_url=url, refresh_interval=0)
        self.assertConfigError("min_refresh_interval", jwks_url=url, refresh_interval=10,
                               min_refresh_interval=60)
        self.assertConfigError("'timeout'", jwks_url=url, timeout=0)

    @defer.inlineCallbacks
    def test_defaults(self):
        provider = self.make(jwks_url="https://idp.example.test/jwks", leeway="0",
                             claims={"foo": ["bar"], "n": None})
        self.assertEqual(provider.rules.leeway, 0)
        self.assertEqual(provider.cache.refresh_interval, 300)
        self.assertEqual(provider.cache.min_refresh_interval, 30)
        self.assertEqual(provider.cache.timeout, 5)
        self.assertIsNone(provider.rules.iss)
        yield provider.stopProvider()


class SameValueTests(unittest.TestCase):
    def test_equal(self):
        for a, b in [("x", "x"), (1, 1), (1, 1.0), (True, True), (None, None),
                     (["bar"], ["bar"]), ({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})]:
            self.assertTrue(same_value(a, b), (a, b))

    def test_different(self):
        for a, b in [("1", 1), (True, 1), (0, False), (["bar"], ["bar", "baz"]),
                     (["a", "b"], ["b", "a"]), ({"a": 1}, {"a": 1, "b": 2}), ("x", ["x"]),
                     (None, "null"), ({"a": "1"}, {"a": 1}), ([], None)]:
            self.assertFalse(same_value(a, b), (a, b))
            self.assertFalse(same_value(b, a), (b, a))


class KeySetTests(unittest.TestCase):
    def test_candidates(self):
        keys = KeySet.from_json(b'{"keys": [%s]}' % __import__("json").dumps(
            key("ed").jwk).encode())
        self.assertEqual(len(keys.candidates(None)), 1)
        self.assertEqual(len(keys.candidates("ed-1")), 1)
        self.assertEqual(keys.candidates("other"), [])
