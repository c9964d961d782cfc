"""OAuth2 access tokens for an upstream that logs in with XOAUTH2 or OAUTHBEARER.

Microsoft 365 and Gmail no longer take a password for SMTP submission: they want an
access token, which expires within the hour.  The clients behind esmtpfa cannot get one,
so the relay does, for each upstream with an ``oauth2`` block (docs/oauth2.md):

* **grants** — client credentials (RFC 6749 §4.4; Entra ID app-only) or refresh token
  (RFC 6749 §6; Gmail, where a mailbox owner consented once).  The client
  authenticates with ``client_secret_basic``, ``client_secret_post`` or
  ``private_key_jwt`` (RFC 7523 §2.2: a short JWT signed with the client's key; with a
  certificate, its thumbprint goes in ``x5t``/``x5t#S256`` as Entra requires);
* **one request for everyone** — concurrent ``token()`` calls share one request
  (single flight), so a burst of messages after expiry costs one round trip;
* **refreshed before expiry** — see ``refresh_delay``; ``start()`` also refreshes in the
  background so that no message waits for the token endpoint;
* **bounded** — one deadline covers connect, TLS, request, headers and body; the body
  is read up to ``MAX_RESPONSE_BYTES`` (a token response is a few kB: parsing that in
  the reactor thread costs microseconds, so no thread is used);
* **errors are values** — a failure is a ``TokenUnavailable`` whose ``reason`` says what
  an operator needs (endpoint down, timeout, HTTP status with the OAuth ``error`` and
  ``error_description``, malformed answer).  The session turns it into ``451 4.7.0``.

Secrets (client secret, refresh token, private key, access tokens) appear in no log
line, no repr and no exception text.  A rotated refresh token is kept in memory only:
docs/oauth2.md says how an operator persists one.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol
from urllib.parse import quote_plus, urlencode, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from esmtpfa.common.httpclient import loopback_host, timed_out
from esmtpfa.common.logs import logger
from esmtpfa.common.observers import notify
from esmtpfa.common.resources import Resources

log = logger("esmtpfa.relay.oauth2")

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
#: RFC 7523 §2.2.
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

DEFAULT_TIMEOUT = 10.0
DEFAULT_MARGIN = 300.0
#: A token whose margin would eat more than 1 - this of its life is refreshed at this
#: fraction of it instead (see ``refresh_delay``).
SHORT_TOKEN_FRACTION = 0.8
#: ``expires_in`` is only RECOMMENDED (RFC 6749 §5.1); without it we assume an hour,
#: what Entra and Google both give.
DEFAULT_LIFETIME = 3600.0
#: A token response is ~2 kB (Entra's JWTs are the longest); anything past this is not one.
MAX_RESPONSE_BYTES = 64 * 1024
#: Lifetime of a client assertion (Entra accepts up to 10 minutes).
ASSERTION_LIFETIME = 300
#: After a failed request, ``token()`` answers with that failure for this long instead of
#: sending a request per waiting message to an endpoint that just failed.
FAILURE_HOLD = 5.0
#: Background retries after a failed proactive refresh: first delay, doubled up to the max.
RETRY_DELAY = 10.0
MAX_RETRY_DELAY = 300.0
#: What ``error``/``error_description`` may keep from the server's answer.
MAX_DESCRIPTION = 200

#: ``token_refreshed`` results (a bounded metric label).
OK, REFUSED, UNAVAILABLE, MALFORMED = "ok", "refused", "unavailable", "malformed"


class TokenUnavailable(Exception):
    """No token could be obtained; the texts are safe to log and hold no secret.

    ``detail`` says what went wrong (``token endpoint timed out after 10 s``) and is the
    exception's text: the callers that report it name the upstream themselves (the
    session's ``RelayError``, the relay's readiness), so naming it here too would say it
    twice.  ``reason`` is the detail after the upstream's name, for the broker's own log
    line.  ``result`` is the metric label: ``refused`` (the server said no: HTTP 4xx
    with an OAuth error), ``unavailable`` (down, timeout, 5xx, stopped) or ``malformed``.
    """

    def __init__(self, detail: str, result: str = UNAVAILABLE, upstream: str = ""):
        super().__init__(detail)
        self.detail = detail
        self.upstream = upstream
        self.reason = f"{upstream}: {detail}" if upstream else detail
        self.result = result


@dataclass(frozen=True)
class OAuth2Settings:
    """The ``oauth2`` block of one upstream (or the ``--relay-oauth2-*`` flags).

    ``private_key`` and ``certificate`` are PEM file paths.  ``auth_method`` defaults to
    ``private_key_jwt`` when a key is given, else ``client_secret_basic``.  A
    ``refresh_token`` selects the refresh-token grant; without one the grant is client
    credentials.  ``audience`` is the ``aud`` of a client assertion (default: the token
    URL, what Entra and RFC 7523 §3 expect).
    """

    token_url: str
    client_id: str
    client_secret: str | None = None
    private_key: str | None = None
    certificate: str | None = None
    auth_method: str | None = None
    scope: str | None = None
    refresh_token: str | None = None
    audience: str | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.token_url or "")
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError("token_url must be an http(s) URL")
        if url.scheme == "http" and not loopback_host(url.hostname):
            # The request carries the client secret or a refresh token.
            raise ValueError("token_url must be https (http only on loopback)")
        if not self.client_id:
            raise ValueError("client_id is required")
        method = (self.auth_method or ("private_key_jwt" if self.private_key
                                       else "client_secret_basic")).strip().lower()
        if method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}")
        object.__setattr__(self, "auth_method", method)
        if method == "private_key_jwt":
            if not self.private_key:
                raise ValueError("auth_method private_key_jwt needs private_key")
            if self.client_secret:
                raise ValueError("give client_secret or private_key, not both")
        else:
            if not self.client_secret:
                raise ValueError(f"auth_method {method} needs client_secret")
            if self.private_key or self.certificate:
                raise ValueError(f"private_key/certificate are for private_key_jwt, "
                                 f"not {method}")
        if self.certificate and not self.private_key:
            raise ValueError("certificate goes with private_key")

    @property
    def grant(self) -> str:
        return "refresh_token" if self.refresh_token else "client_credentials"

    def __repr__(self) -> str:
        fields = []
        for name, value in self.__dict__.items():
            if name in ("client_secret", "refresh_token") and value:
                value = "<redacted>"
            fields.append(f"{name}={value!r}")
        return f"OAuth2Settings({', '.join(fields)})"


class TokenObserver(Protocol):
    """What ``metrics.RelayMetrics`` implements for the broker."""

    def token_refreshed(self, upstream: str, result: str) -> None: ...

    def token_expires_in(self, upstream: str, seconds: float) -> None: ...


def refresh_delay(lifetime: float, margin: float = DEFAULT_MARGIN) -> float:
    """Seconds after a token is obtained at which it is refreshed.

    ``lifetime - margin``, so that a token is never used in its last ``margin`` seconds,
    except for short tokens: when the margin would leave less than 80% of the lifetime
    used (``lifetime < 5 × margin``: 25 minutes with the default 300 s), the token is
    refreshed at 80% of its lifetime instead.  In other words the *later* of
    ``lifetime - margin`` and ``0.8 × lifetime``: an hour-long token is refreshed after
    55 minutes, a 10-minute one after 8, a 60-second one after 48 — never at once, which
    is what ``lifetime - margin`` would give for a token shorter than the margin.
    """
    return max(lifetime - margin, SHORT_TOKEN_FRACTION * lifetime, 0.0)


# --- the client's authentication ------------------------------------------------------

class ClientAssertion:
    """RFC 7523 §2.2 ``private_key_jwt``: the key and certificate, loaded once (at
    startup, from files), and a new signed assertion per token request."""

    def __init__(self, settings: OAuth2Settings, wall: Callable[[], float] = time.time):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        self._client_id = settings.client_id
        self._audience = settings.audience or settings.token_url
        self._wall = wall
        if settings.private_key is None:  # OAuth2Settings gives private_key_jwt one
            raise ValueError("private_key_jwt needs private_key")
        try:
            with open(settings.private_key, "rb") as file:
                data = file.read()
            key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError, TypeError):
            # The text of a parsing error could quote the key: the path is enough.
            raise ValueError(f"private_key {settings.private_key}: not a readable, "
                             "unencrypted PEM private key") from None
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
            self.algorithm = "ES256"
        else:
            raise ValueError(f"private_key {settings.private_key}: an RSA or P-256 key "
                             "is needed (RS256, ES256)")
        self._key = key
        self.headers: dict[str, str] = {}
        if settings.certificate:
            try:
                with open(settings.certificate, "rb") as file:
                    certificate = x509.load_pem_x509_certificate(file.read())
            except (OSError, ValueError):
                raise ValueError(f"certificate {settings.certificate}: not a readable PEM "
                                 "certificate") from None
            public = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if (certificate.public_key().public_bytes(der, public)
                    != key.public_key().public_bytes(der, public)):
                raise ValueError(f"certificate {settings.certificate} is not the one of "
                                 f"private_key {settings.private_key}")
            # Entra identifies the key by the certificate's thumbprint (RFC 7515 §4.1.7-8).
            self.headers["x5t"] = _b64url(certificate.fingerprint(hashes.SHA1()))
            self.headers["x5t#S256"] = _b64url(certificate.fingerprint(hashes.SHA256()))

    def __repr__(self) -> str:
        return f"<ClientAssertion {self.algorithm} for {self._client_id!r}>"

    def make(self) -> str:
        import jwt
        now = int(self._wall())
        claims = {"iss": self._client_id, "sub": self._client_id, "aud": self._audience,
                  "jti": secrets.token_urlsafe(16), "iat": now, "nbf": now,
                  "exp": now + ASSERTION_LIFETIME}
        return jwt.encode(claims, self._key, algorithm=self.algorithm,
                          headers=self.headers or None)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- the broker -----------------------------------------------------------------------

class TokenBroker:
    """The access token of one upstream: obtained, cached, refreshed.

    ``http_client`` is a treq ``HTTPClient`` (``Resources.http_client``: no redirect
    followed, so a secret is never sent to a second host; no cookies), ``clock`` times the
    cache and the background refresh; ``upstream`` (the upstream's ``host:port``) names
    it in logs, reasons and metric labels; ``reactor`` (default: ``clock``) carries the
    request deadline.  They are the same object outside tests, where a ``Clock`` can
    drive expiry while real HTTP runs on the real reactor.  ``wall`` is the real time
    for the claims of a client assertion (the server compares them with its own clock).
    """

    def __init__(self, settings: OAuth2Settings, http_client, clock, *,
                 reactor=None, timeout: float = DEFAULT_TIMEOUT,
                 margin: float = DEFAULT_MARGIN, observer: TokenObserver | None = None,
                 upstream: str = "", wall: Callable[[], float] = time.time):
        if timeout <= 0 or margin < 0:
            raise ValueError("timeout must be positive and margin not negative")
        self.settings = settings
        self.upstream = upstream or (urlsplit(settings.token_url).hostname or "oauth2")
        self._client = http_client
        self._clock = clock
        self._reactor = reactor if reactor is not None else clock
        self.timeout = timeout
        self.margin = margin
        self._observer = observer
        self._assertion = (ClientAssertion(settings, wall)
                           if settings.auth_method == "private_key_jwt" else None)
        self._refresh_token = settings.refresh_token
        self._token: str | None = None
        self._expires_at = 0.0
        self._refresh_at = 0.0
        self._request: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._failure: TokenUnavailable | None = None
        self._failed_at = -float("inf")
        self._attempted = False
        self._dropped = False      # invalidated, no new token asked for yet
        self._call = None          # the scheduled background refresh (start())
        self._retry = RETRY_DELAY
        self._running = False
        self._stopped = False
        self.requests = 0          # requests sent, for tests

    def __repr__(self) -> str:
        return (f"<TokenBroker {self.upstream} {self.settings.grant}/"
                f"{self.settings.auth_method} cached={self._token is not None}>")

    # -- what the session calls ----------------------------------------------------------

    def token(self) -> Deferred[str]:
        """A valid access token.  Fails with ``TokenUnavailable``.

        While the cached token is valid it is the answer, at once, even past its
        refresh time, so an endpoint that is slow or hangs at renewal time delays no
        message (docs/oauth2.md, "The token's life").  The renewal is the background
        schedule's (``start``, with its backoff after a failure); without one, the
        first caller past the refresh time starts it, and does not wait for it either.
        Only a caller with no valid token waits, for the one request every such caller
        shares, bounded by ``timeout``.
        """
        if self._stopped:
            return fail(self._unavailable("token broker stopped"))
        now = self._clock.seconds()
        held = self._failure is not None and now - self._failed_at < FAILURE_HOLD
        if self._token is not None and now < self._expires_at:
            if (now >= self._refresh_at and self._request is None and not held
                    and not self._running):
                self._fetch()  # in the background: its waiters are whoever has no token
            # ``_fetch`` may have ended at once (a key that cannot sign), and a failure
            # keeps the token; only a success replaces it, so this is still valid.
            return succeed(self._token)
        if self._request is None and held:
            assert self._failure is not None
            return fail(self._failure)
        waiter: Deferred[str] = Deferred(self._forget)
        self._waiters.append(waiter)
        if self._request is None:
            self._fetch()
        return waiter

    def invalidate(self, token: str) -> None:
        """The upstream refused ``token`` (its 334 error challenge): drop it, if it is
        still the cached one, so that the next ``token()`` asks for a new one at once.
        A token already replaced by a refresh is left alone."""
        if self._token is not None and secrets.compare_digest(
                token.encode("utf-8", "replace"), self._token.encode("utf-8", "replace")):
            self._token = None
            self._dropped = True
            self._failure = None  # the next token() must try, not replay an old failure
            log.info("oauth2 {upstream}: the upstream refused the access token; it is "
                     "dropped", upstream=self.upstream)
            if self._observer is not None:
                notify(self._observer.token_expires_in, self.upstream, 0.0)

    def readiness(self) -> tuple[bool | None, str]:
        """For ``/readyz``: (None, …) before the first attempt, (True, …) while a token is
        valid, (False, why) when none can be had.  The text does not name the upstream:
        the relay's readiness, which reports every upstream, puts its name in front."""
        now = self._clock.seconds()
        if self._token is not None and now < self._expires_at:
            detail = f"token valid for {int(self._expires_at - now)} s"
            if self._failure is not None:
                detail += f"; last refresh failed: {self._failure.detail}"
            return True, detail
        if self._failure is not None:
            return False, self._failure.detail
        if not self._attempted:
            return None, "no token requested yet"
        if self._request is not None:
            return None, "token request in progress"
        if self._dropped:
            return None, "token refused by the upstream; a new one is asked for on next use"
        return False, "token expired"

    # -- background refresh ----------------------------------------------------------------

    def start(self) -> None:
        """Get a token now and refresh it before it is due, so that messages never wait
        for the endpoint.  A failure is retried after 10 s, doubling up to 5 minutes."""
        if self._running or self._stopped:
            return
        self._running = True
        self._schedule(0.0)

    def stop(self) -> None:
        """Cancel the background refresh and any request in flight (its waiters get
        ``TokenUnavailable``).  The broker refuses further calls."""
        self._running = False
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._request is not None:
            self._request.cancel()

    def _schedule(self, delay: float) -> None:
        if not self._running:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._clock.callLater(max(delay, 0.0), self._background)

    def _background(self) -> None:
        self._call = None
        if self._request is None:
            self._fetch()

    # -- the request -----------------------------------------------------------------------

    def _forget(self, waiter: Deferred) -> None:
        """A caller gave up (its own deadline): the shared request goes on for the rest."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _fetch(self) -> None:
        self._attempted = True
        self.requests += 1
        try:
            body, headers = self._request_parts()
        except Exception as error:  # a key that cannot sign: never quote the error text
            self._done(None, self._unavailable(
                f"cannot build the token request ({type(error).__name__})", MALFORMED))
            return
        d = self._request = self._client.post(
            self.settings.token_url, data=body, headers=headers, allow_redirects=False,
            unbuffered=True, reactor=self._reactor)
        # Set before the callbacks: ``_done`` clears it, even if d has already fired.
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        d.addCallback(self._parse)
        d.addErrback(self._describe)
        d.addCallback(lambda result: self._done(*result))

    def _request_parts(self) -> tuple[bytes, dict[str, list[str]]]:
        settings = self.settings
        if settings.grant == "refresh_token":
            form: list[tuple[str, str]] = [("grant_type", "refresh_token"),
                                           ("refresh_token", self._refresh_token or "")]
        else:
            form = [("grant_type", "client_credentials")]
        if settings.scope:
            form.append(("scope", settings.scope))
        headers = {"Content-Type": ["application/x-www-form-urlencoded"],
                   "Accept": ["application/json"]}
        if settings.auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: both parts form-encoded before Basic.
            pair = f"{quote_plus(settings.client_id)}:{quote_plus(settings.client_secret or '')}"
            headers["Authorization"] = [
                "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")]
        elif settings.auth_method == "client_secret_post":
            form += [("client_id", settings.client_id),
                     ("client_secret", settings.client_secret or "")]
        else:
            assert self._assertion is not None
            form += [("client_id", settings.client_id),
                     ("client_assertion_type", ASSERTION_TYPE),
                     ("client_assertion", self._assertion.make())]
        return urlencode(form).encode("ascii"), headers

    def _read(self, response) -> Deferred:
        from esmtpfa.common.httpclient import read_body
        code = response.code
        return read_body(response, MAX_RESPONSE_BYTES).addCallback(lambda body: (code, body))

    def _parse(self, answer: tuple[int, bytes]) -> tuple[dict | None, TokenUnavailable | None]:
        code, body = answer
        try:
            document = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError):
            document = None
        if code != 200:
            return None, self._http_error(code, document)
        if not isinstance(document, dict):
            return None, self._unavailable(
                "token endpoint answered 200 without a JSON object", MALFORMED)
        token = document.get("access_token")
        if not isinstance(token, str) or not _B64TOKEN.match(token):
            return None, self._unavailable(
                "token response without a usable access_token", MALFORMED)
        kind = document.get("token_type", "Bearer")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            return None, self._unavailable(
                f"token_type {_safe(str(kind))!r} is not Bearer", MALFORMED)
        lifetime = document.get("expires_in", DEFAULT_LIFETIME)
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)  # Entra v1 and some others send a string
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) \
                or not 0 < lifetime < 10 ** 8:
            return None, self._unavailable("token response with a bad expires_in",
                                           MALFORMED)
        refresh = document.get("refresh_token")
        return {"token": token, "lifetime": float(lifetime),
                "refresh_token": refresh if isinstance(refresh, str) and refresh else None,
                }, None

    def _http_error(self, code: int, document: Any) -> TokenUnavailable:
        """``HTTP 401: invalid_client (description)``: RFC 6749 §5.2's fields, trimmed
        and scrubbed of anything we sent that is secret."""
        detail = f"token endpoint answered HTTP {code}"
        result = UNAVAILABLE if code >= 500 or code in (408, 429) else REFUSED
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            detail += f": {self._scrub(document['error'])}"
            description = document.get("error_description")
            if isinstance(description, str) and description:
                detail += f" ({self._scrub(description)})"
        return self._unavailable(detail, result)

    def _unavailable(self, detail: str, result: str = UNAVAILABLE) -> TokenUnavailable:
        return TokenUnavailable(detail, result, self.upstream)

    def _scrub(self, text: str) -> str:
        # Before ``_safe`` shortens the text: a secret cut by the shortening would no
        # longer match, and its first characters would reach the log.
        for secret in (self.settings.client_secret, self._refresh_token,
                       self.settings.refresh_token):
            if secret and len(secret) >= 4 and secret in text:
                text = text.replace(secret, "<redacted>")
        # A JWT the server quotes (our client assertion, a token) is a credential too.
        return _safe(_JWT.sub("<redacted>", text))

    def _describe(self, failure: Failure) -> tuple[None, TokenUnavailable]:
        from esmtpfa.common.httpclient import BodyTooLarge, describe_failure
        if self._stopped:
            why = "token broker stopped"
        elif failure.check(BodyTooLarge):
            return None, self._unavailable(
                f"token response over {MAX_RESPONSE_BYTES} bytes", MALFORMED)
        elif describe_failure(failure) == "timed out":
            why = f"token endpoint timed out after {self.timeout:g} s"
        else:
            why = f"token endpoint unreachable ({describe_failure(failure)})"
        return None, self._unavailable(why, UNAVAILABLE)

    def _done(self, grant: dict | None, error: TokenUnavailable | None) -> None:
        self._request = None
        self._dropped = False
        now = self._clock.seconds()
        if grant is not None:
            lifetime = grant["lifetime"]
            self._token = grant["token"]
            self._expires_at = now + lifetime
            self._refresh_at = now + refresh_delay(lifetime, self.margin)
            self._failure = None
            self._retry = RETRY_DELAY
            rotated = (grant["refresh_token"] is not None
                       and grant["refresh_token"] != self._refresh_token
                       and self.settings.grant == "refresh_token")
            if rotated:
                self._refresh_token = grant["refresh_token"]
            log.info("oauth2 {upstream}: access token obtained ({grant}, expires in "
                     "{lifetime:.0f} s{rotated})", upstream=self.upstream,
                     grant=self.settings.grant, lifetime=lifetime,
                     rotated="; refresh token rotated" if rotated else "")
            self._observe(OK, lifetime)
            self._schedule(self._refresh_at - now)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(self._token)
            return
        assert error is not None
        self._failure, self._failed_at = error, now
        log.warn("oauth2: no access token: {reason}", reason=error.reason)
        still_valid = self._token is not None and now < self._expires_at
        self._observe(error.result, self._expires_at - now if still_valid else 0.0)
        if self._running:
            delay = self._retry
            self._retry = min(self._retry * 2, MAX_RETRY_DELAY)
            if still_valid:  # try again, but never later than the token lives
                delay = min(delay, max((self._expires_at - now) / 2, 1.0))
            self._schedule(delay)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if still_valid:
                waiter.callback(self._token)
            else:
                waiter.errback(Failure(error))

    def _observe(self, result: str, expires_in: float) -> None:
        if self._observer is None:
            return
        notify(self._observer.token_refreshed, self.upstream, result)
        notify(self._observer.token_expires_in, self.upstream, max(expires_in, 0.0))


#: RFC 6750 §2.1 b64token: an access token we can put in an AUTH exchange.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
#: A JWS in compact form: base64url JSON header ("eyJ" is '{"'), payload, signature.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _safe(text: str) -> str:
    """Printable ASCII only, and short: server text going into a log line."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:MAX_DESCRIPTION] + ("…" if len(cleaned) > MAX_DESCRIPTION else "")


class TokenBrokers:
    """The brokers of one relay's OAuth2 upstreams, by upstream address, sharing one
    HTTP client; ``stop`` stops them and closes that client's connections."""

    def __init__(self, brokers: dict[str, TokenBroker] | None = None, pool=None):
        self._brokers = dict(brokers or {})
        self._pool = pool

    @classmethod
    def for_upstreams(cls, upstreams, *, resources: Resources,
                      observer: TokenObserver | None = None) -> "TokenBrokers":
        """A broker for each upstream that logs in with OAuth2 (``uses_oauth2``), all
        over one client from ``resources.http_client``."""
        wanted = [settings for settings in upstreams if settings.uses_oauth2]
        if not wanted:
            return cls()
        client, pool = resources.http_client(DEFAULT_TIMEOUT)
        return cls({settings.address: TokenBroker(settings.oauth2, client, resources.clock,
                                                  reactor=resources.reactor,
                                                  observer=observer,
                                                  upstream=settings.address)
                    for settings in wanted}, pool)

    def get(self, address: str) -> TokenBroker | None:
        return self._brokers.get(address)

    def __len__(self) -> int:
        return len(self._brokers)

    def start(self) -> None:
        """Fetch every token now and keep it fresh (``TokenBroker.start``)."""
        for broker in self._brokers.values():
            broker.start()

    def stop(self) -> Deferred:
        for broker in self._brokers.values():
            broker.stop()
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()
