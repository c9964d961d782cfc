"""What the HTTP providers share: one bounded HTTP request whose status is the verdict.

``http_basic`` and ``http_header`` (docs/design.md, "Provider types") both ask a remote endpoint
"is this
credential good?" and read only the status code.  Getting that right is mostly about
what must *not* happen:

* **no redirects** — a 3xx is just a status (not a success unless configured), so a
  credential is never replayed to a second host (treq follows redirects by default);
* **no cookies** — treq keeps a cookie jar per client; a session cookie set for user A
  would ride along with user B's request.  Our jar refuses every cookie;
* **one deadline for everything** — treq's ``timeout=`` stops at the response headers,
  so a server that sends headers and then stalls the body would hang a login.  The
  deadline here covers connect, TLS, request, headers *and* the body;
* **the body is read and discarded** (bounded), so the persistent connection goes back
  to the pool (``HTTPConnectionPool(persistent=True)`` with more than the default two
  connections per host) instead of a new TCP/TLS handshake per login;
* **temporary is not wrong** — 5xx, 408, 429, timeouts, refused connections, DNS and
  TLS failures raise ``ProviderUnavailable`` (SMTP 454: the client retries), never
  ``UnauthorizedLogin`` (535: "your password is wrong").

The client itself (no redirects, no cookies, the pool, the bounded body) is
``esmtpfa.common.httpclient``, shared with every other outbound HTTP call.

HTTPS certificate verification is Twisted's default (``BrowserLikePolicyForHTTPS``).
Neither the URL nor any header value appears in logs or exception text: URLs may carry
API keys in their query, headers carry the credential.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from hyperlink import URL
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from esmtpfa.auth.errors import REJECTED, LoginRefused, ProviderUnavailable
from esmtpfa.auth.provider import Provider, ProviderMeta
from esmtpfa.common.errors import ConfigError
from esmtpfa.common.httpclient import describe_failure, read_body, timed_out
from esmtpfa.common.logs import logger
from esmtpfa.common.probe import IProbe, ProbeResult
from esmtpfa.common.resources import Resources
from esmtpfa.common.urls import redact_url
from esmtpfa.providers.base import require_string

log = logger("esmtpfa.providers.httpcheck")

DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 300.0
DEFAULT_SUCCESS_CODES = (200,)
#: A verdict needs no body; read this much at most, then drop the connection.
DISCARD_LIMIT = 64 * 1024
#: Statuses that say "not now" rather than "no" (RFC 9110 §15.5.9, RFC 6585 §4).
TEMPORARY_4XX = frozenset({408, 429})

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def is_http_token(value: str) -> bool:
    return bool(_TOKEN.match(value))


def _error(meta: ProviderMeta, text: str) -> ConfigError:
    return ConfigError(f"provider {meta.name!r} ({meta.type}): {text}")


# --- parameter parsing (shared with the jwt provider) ---------------------------------

def parse_url(meta: ProviderMeta, params: Mapping[str, Any], key: str = "url") -> str:
    """An absolute http(s) URL with a host and no userinfo (credentials in a URL would
    be logged by proxies and are never sent as Basic auth by Twisted anyway)."""
    text = require_string(meta, params, key)
    try:
        url = URL.from_text(text)
    except Exception:
        raise _error(meta, f"param {key!r} is not a valid URL") from None
    if url.scheme.lower() not in ("http", "https"):
        raise _error(meta, f"param {key!r} must be an http:// or https:// URL")
    if not url.host:
        raise _error(meta, f"param {key!r} has no host")
    if url.userinfo:
        raise _error(meta, f"param {key!r} must not carry credentials (user:password@)")
    if url.fragment:
        raise _error(meta, f"param {key!r} must not have a fragment")
    if url.port is not None and not 0 < url.port < 65536:
        raise _error(meta, f"param {key!r} has an invalid port")
    return text


def parse_method(meta: ProviderMeta, params: Mapping[str, Any]) -> str:
    """An HTTP method token (RFC 9110 §9), upper-cased (treq upper-cases it anyway)."""
    value = params.get("method")
    if value is None or value == "":
        return "GET"
    if not isinstance(value, str) or not is_http_token(value):
        raise _error(meta, "param 'method' must be an HTTP method name such as GET or POST")
    method = value.upper()
    if method in ("CONNECT", "TRACE"):
        raise _error(meta, f"param 'method' cannot be {method}")
    return method


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_success_codes(meta: ProviderMeta, params: Mapping[str, Any]) -> frozenset[int]:
    """A non-empty list of status codes; numeric strings accepted (params come from
    ``${VAR}`` expansion), as is one code or a comma-separated string."""
    value = params.get("success_codes")
    if value is None:
        return frozenset(DEFAULT_SUCCESS_CODES)
    items: Iterable[Any]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value]
    codes = []
    for item in items:
        code = _as_int(item)
        if code is None or not 100 <= code <= 599:
            raise _error(meta, "param 'success_codes' must be a list of HTTP status "
                               "codes (100-599)")
        codes.append(code)
    if not codes:
        raise _error(meta, "param 'success_codes' is empty")
    return frozenset(codes)


def parse_seconds(meta: ProviderMeta, params: Mapping[str, Any], key: str, default: float,
                  *, minimum: float = 0.0, maximum: float = MAX_TIMEOUT,
                  allow_zero: bool = False) -> float:
    """A duration in seconds: a number or a numeric string, finite and within bounds."""
    value = params.get(key)
    if value is None or value == "":
        return float(default)
    if isinstance(value, bool):
        raise _error(meta, f"param {key!r} must be a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise _error(meta, f"param {key!r} must be a number of seconds") from None
    if not math.isfinite(seconds) or seconds < minimum or seconds > maximum or (
            seconds == 0 and not allow_zero):
        raise _error(meta, f"param {key!r} must be between {minimum:g} and {maximum:g} s"
                           + ("" if allow_zero else " and not zero"))
    return seconds


@dataclass(frozen=True)
class Verdict:
    """A success from the endpoint: its status, and the value of the response header the
    caller asked for (None when absent, repeated, or not UTF-8)."""

    code: int
    captured: str | None = None
    #: The headers the policy names (``Provider.identity_attributes``), as
    #: ``Principal`` attributes: each present exactly once, as one value.
    kept: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _single_header(response: IResponse, name: str | None) -> str | None:
    if name is None:
        return None
    values = response.headers.getRawHeaders(name) or []
    if len(values) != 1:
        return None  # absent, or ambiguous: the endpoint named nobody for sure
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


class HTTPAuthChecker:
    """One configured endpoint: sends a request with the caller's headers and turns the
    status into a verdict.  Owns its connection pool (``close()`` on provider stop)."""

    def __init__(self, url: str, *, resources: Resources, method: str = "GET",
                 success_codes: Iterable[int] = DEFAULT_SUCCESS_CODES,
                 timeout: float = DEFAULT_TIMEOUT, label: str = "http"):
        self._reactor = resources.reactor
        self.url = url
        self.method = method
        self.success_codes = frozenset(success_codes)
        self.timeout = timeout
        self._label = label
        self._client, self._pool = resources.http_client(timeout)
        self._pending: set[Deferred] = set()
        self._closed = False

    def check(self, headers: Mapping[str, str], capture: str | None = None, *,
              connection_id: str = "-", keep: Iterable[str] = ()) -> Deferred[Verdict]:
        """Fires with a ``Verdict`` when the status is a success code (with the value of
        the response header ``capture``); fails with ``LoginRefused`` (``rejected``: an
        endpoint says no without saying why) or ``ProviderUnavailable`` otherwise.
        ``connection_id`` is the session the check is for, for the log lines."""
        sent: dict[bytes | str, bytes | str] = {name: value for name, value in headers.items()}
        d: Deferred[Any] = self._client.request(  # a Verdict, once the callbacks ran
            self.method, self.url, headers=sent,
            allow_redirects=False, unbuffered=True, reactor=self._reactor)
        d.addCallback(self._read, capture, tuple(keep))
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)
        d.addCallbacks(self._verdict, self._unavailable, callbackArgs=(connection_id,),
                       errbackArgs=(connection_id,))
        self._pending.add(d)
        d.addBoth(self._forget, d)
        return d

    def _forget(self, result: object, d: Deferred) -> object:
        self._pending.discard(d)
        return result

    def _read(self, response: IResponse, capture: str | None,
              keep: tuple[str, ...] = ()) -> Deferred[Verdict]:
        # Wait for the whole body: a verdict on a half-sent response is no verdict, and
        # a fully read response is what lets the pool reuse the connection.
        kept = tuple((name, (value,)) for name in keep
                     if (value := _single_header(response, name)) is not None)
        verdict = Verdict(response.code, _single_header(response, capture), kept)
        return read_body(response, DISCARD_LIMIT, keep=False).addCallback(lambda _: verdict)

    def _verdict(self, verdict: Verdict, connection_id: str = "-") -> Verdict:
        code = verdict.code
        if code in self.success_codes:
            return verdict
        if code >= 500 or code in TEMPORARY_4XX:
            log.info("{connection_id} {label}: endpoint answered HTTP {code}: unavailable",
                     connection_id=connection_id, label=self._label, code=code)
            raise ProviderUnavailable(f"{self._label}: endpoint answered HTTP {code}")
        log.debug("{connection_id} {label}: login refused ({reason}): endpoint answered "
                  "HTTP {code}", connection_id=connection_id, label=self._label,
                  reason=REJECTED, code=code)
        raise LoginRefused(REJECTED, f"{self._label}: endpoint answered HTTP {code}")

    def _unavailable(self, failure: Failure, connection_id: str = "-") -> None:
        if self._closed:
            reason = "provider stopped"
        elif failure.check(DeferredTimeout):
            reason = f"timed out after {self.timeout:g} s"
        else:
            reason = describe_failure(failure)
        log.info("{connection_id} {label}: endpoint unavailable: {reason}",
                 connection_id=connection_id, label=self._label, reason=reason)
        raise ProviderUnavailable(f"{self._label}: {reason}")

    def close(self) -> Deferred[None]:
        """Fail the checks in flight (``ProviderUnavailable``) and close the pool, so a
        removed provider leaves no connection or timer behind."""
        self._closed = True
        for d in list(self._pending):
            d.cancel()
        return self._pool.closeCachedConnections()


@implementer(IProbe)
class HTTPCheckProvider(Provider):
    """Base of the providers whose verdict is an HTTP status (http_basic, http_header)."""

    def __init__(self, meta: ProviderMeta, checker: HTTPAuthChecker):
        super().__init__(meta)
        self.checker = checker

    @staticmethod
    def checker_from_params(meta: ProviderMeta, params: Mapping[str, Any], *,
                            resources: Resources) -> HTTPAuthChecker:
        url = parse_url(meta, params)
        method = parse_method(meta, params)
        codes = parse_success_codes(meta, params)
        timeout = parse_seconds(meta, params, "timeout", DEFAULT_TIMEOUT)
        return HTTPAuthChecker(url, resources=resources, method=method, success_codes=codes,
                               timeout=timeout, label=f"{meta.type} provider {meta.name!r}")

    def probe(self) -> Deferred[ProbeResult]:
        """One request without credentials: a "yes" or a "no" both mean the endpoint
        is there and answering; only "cannot tell" (``ProviderUnavailable``) fails."""
        answered = ProbeResult.passed(f"endpoint {redact_url(self.checker.url)} answered")
        d: Deferred[ProbeResult] = self.checker.check({}).addCallback(lambda _: answered)
        d.addErrback(lambda failure: failure.trap(UnauthorizedLogin) and answered)
        d.addErrback(ProbeResult.from_failure)
        return d

    def stopProvider(self) -> Deferred[None]:
        return self.checker.close()


def has_control_chars(value: str, *, allow_tab: bool = False) -> bool:
    """CTLs (RFC 5234 §B.1: %x00-1F / %x7F): never valid in a header value except HTAB."""
    for char in value:
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            if allow_tab and char == "\t":
                continue
            return True
    return False


__all__ = [
    "DEFAULT_TIMEOUT", "HTTPAuthChecker", "HTTPCheckProvider", "Verdict",
    "has_control_chars", "is_http_token", "parse_method", "parse_seconds",
    "parse_success_codes", "parse_url",
]
