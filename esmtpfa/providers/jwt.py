"""The ``jwt`` provider: a signed JWT (RFC 7519) checked against the IdP's JWKS (docs/design.md,
"Provider types").

Verification follows the JWT BCP (RFC 8725) and trusts nothing in the token before the
signature is checked:

1. size (≤ 12 KiB, docs/design.md, "The SMTP session") and shape (compact JWS, RFC 7515 §7.1: three
   segments);
2. header ``alg`` must be asymmetric — RS*/PS*/ES*/EdDSA.  ``none`` and HS* are refused
   *before* any key is looked up (RFC 8725 §2.1, §3.1): an HS256 token "signed" with the
   RSA public key as HMAC secret never reaches a verifier;
3. the key is chosen by ``kid`` (RFC 7515 §4.1.4); a token without ``kid`` is accepted
   only when the JWKS holds exactly one key;
4. the key decides which algorithms it verifies (its own ``alg`` when the JWK has one,
   RFC 7517 §4.4, else its ``kty``/``crv``), never the token: a key with the right kid but
   the wrong type fails (RFC 8725 §3.1);
5. signature (PyJWT's ``PyJWS``, with ``crit`` handling per RFC 7515 §4.1.11);
6. claims, with our clock (so tests use fixed timestamps): ``exp`` required and enforced,
   ``nbf`` and ``iat`` enforced (RFC 7519 §4.1.4-4.1.6), all with ``leeway``; ``iss``,
   ``sub`` exact; ``aud`` a string or a list containing the configured value (§4.1.3;
   when no ``aud`` is configured it is not checked, like the original — configure it,
   RFC 8725 §3.9);
   each configured ``claims`` entry present and equal *by value* (``["bar"]`` is not
   ``["bar", "baz"]``, ``"1"`` is not ``1``, ``true`` is not ``1``).

The JWKS is fetched with treq (PyJWT's ``PyJWKClient`` blocks the reactor in urllib),
cached, and refreshed lazily: when it is older than ``refresh_interval`` a login triggers
a background refresh and is checked with the cached keys; an unknown ``kid`` triggers a
refresh the login waits for.  Refreshes are rate-limited to one per
``min_refresh_interval`` (1,000 tokens with random kids cost one fetch), concurrent
logins share the one fetch in flight, a failed refresh keeps the last good key set, and
the last good set per URL survives config reloads (``Resources.jwks``).

Who logged in: the token's ``sub`` (RFC 7519 §4.1.2: the principal, unique per issuer);
without one, ``preferred_username`` then ``email`` (OIDC Core §5.1).  A token naming no
principal is refused: every login must be attributable in logs and metrics.  The claims
the provider's policy names (``sender_claim``, docs/policy.md) go with the identity, as the
strings of a string or list claim; nothing else of the token is kept.

Logs carry kid, alg, iss and the reason of a rejection — never the token.
"""

from __future__ import annotations

import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from hyperlink import URL
from jwt.api_jwk import PyJWK
from jwt.api_jws import PyJWS
from jwt.exceptions import PyJWTError
from jwt.utils import base64url_decode
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpfa.auth.credentials import IBearerTokenCredentials
from esmtpfa.auth.errors import (
    BAD_TOKEN,
    EXPIRED_TOKEN,
    MALFORMED,
    LoginRefused,
    ProviderUnavailable,
)
from esmtpfa.auth.policy import string_values
from esmtpfa.auth.provider import IProvider, Principal, Provider, ProviderMeta
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.httpclient import (
    describe_failure,
    loopback_host,
    read_body,
    timed_out,
)
from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.common.resources import LastGood, Resources
from esmtpfa.common.urls import redact_url
from esmtpfa.providers.base import session_of
from esmtpfa.providers.httpcheck import DEFAULT_TIMEOUT, parse_seconds, parse_url

log = logger("esmtpfa.providers.jwt")

#: RFC 8725 §3.1: an allow-list, asymmetric only.
ALLOWED_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "ES256K", "EdDSA",
})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP_CURVES = {"Ed25519": "EdDSA", "Ed448": "EdDSA"}  # X25519/X448 are ECDH, not signatures
#: Members that make a JWK private (RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2): never needed
#: to verify, so dropped before the key is built.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS = 2048  # RFC 7518 §3.3

#: What the JWKS request asks for (typed as treq wants its headers).
ACCEPT_JWKS: dict[bytes | str, bytes | str] = {
    "Accept": "application/jwk-set+json, application/json"}
MAX_TOKEN_LENGTH = 12 * 1024  # docs/design.md, "The SMTP session": AUTH lines up to 12288 octets
MAX_JWKS_BYTES = 1024 * 1024
DEFAULT_LEEWAY = 30.0
DEFAULT_REFRESH_INTERVAL = 300.0
DEFAULT_MIN_REFRESH_INTERVAL = 30.0
#: While no key set was ever loaded, a failed fetch is retried at most this often.
FIRST_FETCH_RETRY = 5.0


class Rejected(Exception):
    """The token is not acceptable; the text is the reason (no token material), the
    ``kind`` what the failed-login line says (esmtpfa.auth.errors)."""

    def __init__(self, reason: str, kind: str = BAD_TOKEN):
        super().__init__(reason)
        self.kind = kind


# --- keys -----------------------------------------------------------------------------

@dataclass(frozen=True)
class VerificationKey:
    """A public key from the JWKS with the algorithms it may verify."""

    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any  # a cryptography public key


def _key_algorithms(jwk: Mapping[str, Any]) -> frozenset[str]:
    """What this JWK may verify: decided by the key, never by the token (RFC 8725 §3.1)."""
    kty, crv, alg = jwk.get("kty"), jwk.get("crv"), jwk.get("alg")
    if kty == "RSA":
        family = _RSA_ALGORITHMS
    elif kty == "EC" and crv in _EC_CURVES:
        family = frozenset({_EC_CURVES[crv]})
    elif kty == "OKP" and crv in _OKP_CURVES:
        family = frozenset({"EdDSA"})
    else:
        raise ValueError(f"unsupported key type {kty!r}/{crv!r}")
    if alg is None:
        return family
    if alg not in family:
        raise ValueError(f"alg {alg!r} does not fit key type {kty!r}")
    return frozenset({alg})


def key_from_jwk(jwk: Any) -> VerificationKey:
    """One verification key, or ``ValueError`` saying why the JWK is not usable."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":  # RFC 7517 §4.2
        raise ValueError("not a signature key (use)")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):  # §4.3
        raise ValueError("not a verification key (key_ops)")
    algorithms = _key_algorithms(jwk)
    public = {name: value for name, value in jwk.items() if name not in _PRIVATE_MEMBERS}
    try:
        # PyJWK builds the key; its own algorithm binding is not used (an RSA JWK without
        # "alg" would be bound to RS256 and fail PS256 tokens).
        built = PyJWK(public, algorithm=min(algorithms)).key
    except (PyJWTError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"unusable key material ({type(error).__name__})") from None
    if jwk["kty"] == "RSA" and built.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key under {MIN_RSA_BITS} bits")
    return VerificationKey(kid, jwk["kty"], algorithms, built)


class KeySet:
    """The usable keys of one JWKS document (RFC 7517 §5), indexed by kid."""

    def __init__(self, keys: Iterable[VerificationKey]):
        self.keys: tuple[VerificationKey, ...] = tuple(keys)
        self.by_kid: dict[str | None, list[VerificationKey]] = {}
        for key in self.keys:
            self.by_kid.setdefault(key.kid, []).append(key)

    @classmethod
    def from_json(cls, body: bytes, label: str = "jwt") -> "KeySet":
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise ValueError("JWKS is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("JWKS has no 'keys' list")
        usable = []
        for jwk in document["keys"]:
            try:
                usable.append(key_from_jwk(jwk))
            except ValueError as error:
                kid = jwk.get("kid") if isinstance(jwk, dict) else None
                log.debug("{label}: JWKS key {kid} skipped: {reason}",
                          label=label, kid=_short(kid), reason=str(error))
        if not usable:
            raise ValueError("JWKS has no usable signature key")
        return cls(usable)

    def candidates(self, kid: str | None) -> list[VerificationKey]:
        if kid is None:
            return list(self.keys) if len(self.keys) == 1 else []
        return self.by_kid.get(kid, [])

    @property
    def kids(self) -> list[str | None]:
        return [key.kid for key in self.keys]

    def __len__(self) -> int:
        return len(self.keys)


# --- the JWKS cache -------------------------------------------------------------------

class JWKSCache:
    """The key set of one JWKS URL: fetched with treq, cached, refreshed without storms.

    From ``resources``: ``clock`` times the refreshes, the reactor carries the network
    and the fetch deadline, ``http_client`` makes the client, and ``jwks`` keeps
    the last good key set per URL, shared by the successive provider instances that
    reloads create, so a reload neither refetches nor loses the cache.
    """

    def __init__(self, url: str, *, resources: Resources, refresh_interval: float,
                 min_refresh_interval: float, timeout: float, label: str = "jwt"):
        self.url = url
        self._reactor = resources.reactor
        self._clock = resources.clock
        self.refresh_interval = refresh_interval
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self._store: LastGood[KeySet] = resources.jwks
        self._label = label
        self._client, self._pool = resources.http_client(timeout)
        self.keys: KeySet | None = None
        self.fetched_at = -math.inf
        self._last_attempt = -math.inf
        self._fetching = False
        self._request: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._stopped = False
        self.fetches = 0  # attempts, for tests and metrics
        cached = self._store.get(url)
        if cached is not None:
            self.keys, self.fetched_at = cached

    # What logins call.

    def refresh_if_stale(self) -> None:
        """Start a background refresh when the keys are older than ``refresh_interval``;
        the login goes on with the cached keys (a failure keeps them)."""
        if self._fetching or self.keys is None or self._stopped:
            return
        now = self._clock.seconds()
        if (now - self.fetched_at >= self.refresh_interval
                and now - self._last_attempt >= self.min_refresh_interval):
            self._start_fetch(now, "periodic refresh")

    def refreshed(self) -> Deferred[KeySet]:
        """Keys for a login whose kid the cache does not know (or with no cache yet).

        Joins the fetch in flight, or starts one if the rate limit allows; otherwise the
        current keys are the answer.  Fails with ``ProviderUnavailable`` when the fetch
        this login waited for failed.
        """
        if self._stopped:
            return fail(ProviderUnavailable(f"{self._label}: stopped"))
        if self._fetching:
            return self._wait()
        now = self._clock.seconds()
        since = now - self._last_attempt
        if self.keys is None:
            if since < min(FIRST_FETCH_RETRY, self.min_refresh_interval):
                return fail(ProviderUnavailable(f"{self._label}: JWKS not loaded yet"))
        elif since < self.min_refresh_interval:
            return succeed(self.keys)
        waiter = self._wait()  # before the fetch: it may fail synchronously
        self._start_fetch(now, "first fetch" if self.keys is None else "unknown kid")
        return waiter

    # The fetch.

    def _wait(self) -> Deferred[KeySet]:
        waiter: Deferred[KeySet] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _start_fetch(self, now: float, why: str) -> None:
        self._fetching = True
        self._last_attempt = now
        self.fetches += 1
        log.debug("{label}: fetching JWKS ({why})", label=self._label, why=why)
        d = self._client.request(
            "GET", self.url,
            headers=ACCEPT_JWKS,
            allow_redirects=False, unbuffered=True, reactor=self._reactor)
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        d.addCallback(KeySet.from_json, self._label)
        d.addCallbacks(self._fetched, self._failed)
        self._request = d

    def _read(self, response) -> Deferred[bytes]:
        code = response.code
        body = read_body(response, MAX_JWKS_BYTES, keep=(code == 200))

        def check(content: bytes) -> bytes:
            if code != 200:
                raise ValueError(f"JWKS endpoint answered HTTP {code}")
            return content
        return body.addCallback(check)

    def _fetched(self, keys: KeySet) -> None:
        now = self._clock.seconds()
        self.keys, self.fetched_at = keys, now
        self._store.put(self.url, keys, now)
        log.info("{label}: JWKS loaded: {count} key(s), kids {kids}",
                 label=self._label, count=len(keys), kids=[_short(k) for k in keys.kids])
        self._done(keys, None)

    def _failed(self, failure: Failure) -> None:
        if failure.check(ValueError):
            reason = str(failure.value)
        elif self._stopped and failure.check(CancelledError):
            reason = "stopped"
        else:
            reason = describe_failure(failure)
        if self.keys is None:
            log.warn("{label}: JWKS fetch failed: {reason}; no keys yet",
                     label=self._label, reason=reason)
        else:
            log.warn("{label}: JWKS refresh failed: {reason}; keeping the {count} cached "
                     "key(s)", label=self._label, reason=reason, count=len(self.keys))
        self._done(None, ProviderUnavailable(f"{self._label}: JWKS fetch failed: {reason}"))

    def _done(self, keys: KeySet | None, error: Exception | None) -> None:
        self._fetching = False
        self._request = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if error is None:
                waiter.callback(keys)
            else:
                waiter.errback(error)

    def stop(self) -> Deferred[None]:
        self._stopped = True
        if self._request is not None:
            self._request.cancel()
        return self._pool.closeCachedConnections()


# --- claims ---------------------------------------------------------------------------

def same_value(a: Any, b: Any) -> bool:
    """JSON equality without Python's coercions: ``"1" != 1``, ``True != 1``, lists in
    order, objects by keys and values (``1 == 1.0``: JSON has one number type)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) or isinstance(b, str):
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return False


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: a JSON number (not a string, not a boolean)."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise Rejected(f"'{name}' is not a NumericDate")
    return float(value)


@dataclass(frozen=True)
class ClaimRules:
    """What a token's claims must satisfy, from the provider's params."""

    iss: str | None = None
    sub: str | None = None
    aud: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    leeway: float = DEFAULT_LEEWAY

    def check(self, claims: Mapping[str, Any], now: float) -> None:
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise Rejected("no 'exp' claim")  # a token that never expires is refused
        if now - self.leeway >= exp:  # RFC 7519 §4.1.4: "on or after" exp
            raise Rejected("expired", EXPIRED_TOKEN)
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and now + self.leeway < nbf:  # §4.1.5
            raise Rejected("not valid yet (nbf)")
        iat = _numeric_date(claims, "iat")
        if iat is not None and now + self.leeway < iat:  # §4.1.6: issued in the future
            raise Rejected("issued in the future (iat)")
        if self.iss is not None and not same_value(claims.get("iss"), self.iss):
            raise Rejected("wrong issuer")
        if self.sub is not None and not same_value(claims.get("sub"), self.sub):
            raise Rejected("wrong subject")
        if self.aud is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or self.aud not in [
                    a for a in audiences if isinstance(a, str)]:
                raise Rejected("wrong audience")
        for name, expected in self.claims.items():
            if name not in claims:
                raise Rejected(f"claim {_short(name)} missing")
            if not same_value(claims[name], expected):
                raise Rejected(f"claim {_short(name)} differs")


def principal(claims: Mapping[str, Any]) -> str:
    """The user the token vouches for: ``sub``, else ``preferred_username``, else
    ``email``; refuses a token without one."""
    for name in ("sub", "preferred_username", "email"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    raise Rejected("no 'sub', 'preferred_username' or 'email' claim")


def _short(value: Any, limit: int = 64) -> str:
    """An attacker-supplied header value, safe and short for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _b64_json(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(base64url_decode(segment))
    except (ValueError, binascii.Error, RecursionError, UnicodeDecodeError):
        raise Rejected(f"{what} is not base64url JSON", MALFORMED) from None
    if not isinstance(value, dict):
        raise Rejected(f"{what} is not a JSON object", MALFORMED)
    return value


def unverified_header(token: str) -> dict[str, Any]:
    """Size, shape and header checks that need no key (RFC 7515 §7.1, RFC 8725 §3.1)."""
    if not isinstance(token, str):
        raise Rejected("not a compact JWS", MALFORMED)
    if len(token) > MAX_TOKEN_LENGTH:
        raise Rejected("token too large", MALFORMED)
    if not token.isascii():
        raise Rejected("not a compact JWS", MALFORMED)
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        # A JWE has five parts; unsigned JWTs end in ".".
        raise Rejected("not a compact JWS", MALFORMED)
    header = _b64_json(parts[0], "header")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise Rejected(f"algorithm {_short(alg)} not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Rejected("kid is not a string")
    return header


# --- the provider ---------------------------------------------------------------------

def _optional_string(meta: ProviderMeta, params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param {key!r} must be "
                          f"a string")
    return value


def _claims_param(meta: ProviderMeta, params: Mapping[str, Any]) -> dict[str, Any]:
    value = params.get("claims")
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param 'claims' must be "
                          f"a mapping of claim names to values")
    if not _is_json_value(dict(value)):
        raise ConfigError(f"provider {meta.name!r} ({meta.type}): param 'claims' holds a "
                          f"value that is not JSON (string, number, boolean, null, list, "
                          f"map)")
    return dict(value)


def _is_loopback(url: str) -> bool:
    return loopback_host(URL.from_text(url).host)


@implementer(IProvider, IProbe)
class JWTProvider(Provider):
    """Accepts a bearer JWT signed by a key of the configured JWKS."""

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, meta: ProviderMeta, cache: JWKSCache, rules: ClaimRules, clock):
        super().__init__(meta)
        self.cache = cache
        self.rules = rules
        self._clock = clock
        self._jws = PyJWS(options={"verify_signature": True})
        self._label = f"{meta.type} provider {meta.name!r}"

    @classmethod
    def from_params(cls, meta: ProviderMeta, params: Mapping[str, Any], *,
                    resources: Resources) -> "JWTProvider":
        """From ``resources``: the reactor (network), the clock (token times, refresh
        timing, deadlines), the HTTP client, and the JWKS cache (the last good key
        sets, kept across reloads)."""
        url = parse_url(meta, params, "jwks_url")
        rules = ClaimRules(
            iss=_optional_string(meta, params, "iss"),
            sub=_optional_string(meta, params, "sub"),
            aud=_optional_string(meta, params, "aud"),
            claims=_claims_param(meta, params),
            leeway=parse_seconds(meta, params, "leeway", DEFAULT_LEEWAY, maximum=3600,
                                 allow_zero=True),
        )
        refresh = parse_seconds(meta, params, "refresh_interval", DEFAULT_REFRESH_INTERVAL,
                                minimum=1, maximum=7 * 86400)
        min_refresh = parse_seconds(meta, params, "min_refresh_interval",
                                    DEFAULT_MIN_REFRESH_INTERVAL, maximum=86400,
                                    allow_zero=True)
        if min_refresh > refresh:
            raise ConfigError(f"provider {meta.name!r} ({meta.type}): min_refresh_interval "
                              f"must not exceed refresh_interval")
        timeout = parse_seconds(meta, params, "timeout", DEFAULT_TIMEOUT)
        label = f"{meta.type} provider {meta.name!r}"
        if url.lower().startswith("http:") and not _is_loopback(url):
            log.warn("{label}: jwks_url is plain http: keys can be replaced in transit",
                     label=label)
        if rules.aud is None:
            # Compatibility with the original: no aud configured, aud not checked.  RFC
            # 7519 §4.1.3 and RFC 8725 §3.9 want it checked: say so once.
            log.info("{label}: no 'aud' configured: tokens for any audience of this "
                     "issuer are accepted", label=label)
        cache = JWKSCache(url, resources=resources, refresh_interval=refresh,
                          min_refresh_interval=min_refresh, timeout=timeout, label=label)
        return cls(meta, cache, rules, resources.clock)

    # Twisted's ICredentialsChecker says bytes; the relay's realm takes a Principal.
    def requestAvatarId(self, credentials: IBearerTokenCredentials) -> Deferred[Principal]:  # type: ignore[override]
        token = credentials.token
        session = session_of(credentials)
        try:
            header = unverified_header(token)
        except Rejected as rejected:
            return fail(self._reject(rejected, {}, session))
        kid = header.get("kid")
        self.cache.refresh_if_stale()
        if self.cache.keys is not None:
            candidates = self.cache.keys.candidates(kid)
            if candidates:
                return self._verify(token, header, candidates, session)
        if kid is None and self.cache.keys is not None:
            return fail(self._reject(
                Rejected("no kid and the JWKS has several keys"), header, session))
        d = self.cache.refreshed()
        return d.addCallback(self._verify_with, token, header, session)

    def _verify_with(self, keys: KeySet, token: str, header: dict[str, Any],
                     session: str = "-") -> Principal:
        candidates = keys.candidates(header.get("kid"))
        if not candidates:
            raise self._reject(Rejected("unknown kid"), header, session)
        return self._verify(token, header, candidates, session)  # type: ignore[return-value]

    def _verify(self, token: str, header: dict[str, Any],
                candidates: list[VerificationKey], session: str = "-"
                ) -> Deferred[Principal]:
        try:
            claims = self._verified_claims(token, header, candidates)
        except Rejected as rejected:
            return fail(self._reject(rejected, header, session))
        try:
            self.rules.check(claims, self._clock.seconds())
            user = principal(claims)
        except Rejected as rejected:
            return fail(self._reject(rejected, header, session, claims))
        log.debug("{connection_id} {label}: token accepted (kid={kid}, alg={alg}, "
                  "iss={iss})", connection_id=session,
                  label=self._label, kid=_short(header.get("kid")), alg=header["alg"],
                  iss=_short(claims.get("iss")))
        return succeed(Principal.of(user, attributes={
            name: string_values(claims.get(name)) for name in self.identity_attributes}))

    def _verified_claims(self, token: str, header: dict[str, Any],
                         candidates: list[VerificationKey]) -> dict[str, Any]:
        """The payload of a token whose signature one of ``candidates`` verifies with
        an algorithm that key allows (RFC 8725 §3.1: the key decides, not the token)."""
        alg = header["alg"]
        usable = [key for key in candidates if alg in key.algorithms]
        if not usable:
            raise Rejected("key does not allow this algorithm")
        for key in usable:  # more than one only when the JWKS repeats a kid
            try:
                decoded = self._jws.decode_complete(token, key=key.key, algorithms=[alg])
            except (PyJWTError, ValueError, TypeError):
                continue
            return _claims_from(decoded["payload"])
        raise Rejected("bad signature")

    def _reject(self, rejected: Rejected, header: Mapping[str, Any], session: str = "-",
                claims: Mapping[str, Any] | None = None) -> LoginRefused:
        log.debug("{connection_id} {label}: login refused ({reason}): {detail} (kid={kid}, "
                  "alg={alg}, iss={iss})", connection_id=session, label=self._label,
                  reason=rejected.kind, detail=str(rejected), kid=_short(header.get("kid")),
                  alg=_short(header.get("alg")),
                  iss=_short((claims or {}).get("iss")))
        return LoginRefused(rejected.kind, f"jwt: {rejected}")

    def probe(self) -> Deferred[ProbeResult]:
        """One JWKS fetch, as a login with an unknown kid makes it."""
        where = redact_url(str(self.cache.url))
        d: Deferred[ProbeResult] = self.cache.refreshed().addCallback(
            lambda keys: ProbeResult.passed(f"JWKS fetched from {where}: {len(keys)} key(s)"))
        d.addErrback(ProbeResult.from_failure)
        return d

    def stopProvider(self) -> Deferred[None]:
        return self.cache.stop()


def _claims_from(payload: bytes) -> dict[str, Any]:
    """The JWT Claims Set (RFC 7519 §7.2 step 10): a JSON object."""
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError):
        raise Rejected("payload is not JSON") from None
    if not isinstance(claims, dict):
        raise Rejected("payload is not a JSON object")
    return claims


__all__ = [
    "ALLOWED_ALGORITHMS", "ClaimRules", "JWKSCache", "JWTProvider",
    "KeySet", "MAX_TOKEN_LENGTH", "Rejected", "VerificationKey",
    "key_from_jwk", "principal", "same_value", "unverified_header",
]
