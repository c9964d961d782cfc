"""The HTTP client every outbound HTTP call uses: identity providers, the OAuth2 token
endpoint, a configuration service.

Each caller asks a different question, but all need the same hygiene, kept here once: a
client that follows no redirect and keeps no cookie (a credential is never replayed to a
second host or a second user), a persistent pool so a busy relay does not pay a TCP and
TLS handshake per request, a body read to a limit (treq's ``content()`` reads without
one), and a failure described without the URL or any header (both may hold secrets).
"""

from __future__ import annotations

import ipaddress
from http.cookiejar import DefaultCookiePolicy

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from esmtpfa.common.transport import IStreamTransport

#: Persistent connections kept per host: the benchmark's 50 concurrent logins should
#: not each pay a TCP (and TLS) handshake.
MAX_PERSISTENT_PER_HOST = 32
#: Idle pooled connections are closed after this long (many servers drop idle
#: keep-alive connections after 5–75 s; a stale one costs a retry or a 454).
CACHED_CONNECTION_TIMEOUT = 30


def loopback_host(host: str | None) -> bool:
    """Whether ``host`` names this machine (``localhost`` or a loopback address): the
    one place a secret may travel over cleartext HTTP (a sidecar, a test server)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class BodyTooLarge(Exception):
    """The response body exceeded the limit; the connection was dropped."""


class _BoundedBody(Protocol):
    """Collects (or discards) a response body up to ``limit`` bytes.

    Fires ``finished`` with the bytes (``b""`` when discarding) on a complete body, with
    ``BodyTooLarge`` past the limit, and with the transport's reason when the body is cut
    short.  Cancelling ``finished`` (the deadline) closes the connection so a stalled
    server does not keep a pooled slot.
    """

    transport: IStreamTransport  # the response's: it can stop producing

    def __init__(self, limit: int, keep: bool):
        self.finished: Deferred[bytes] = Deferred(self._cancel)
        self._limit = limit
        self._keep = keep
        self._chunks: list[bytes] = []
        self._size = 0

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            self.finished.errback(BodyTooLarge(f"response body over {self._limit} bytes"))
            return
        if self._keep:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: a body delimited by connection close (HTTP/1.0 style).
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


def read_body(response: IResponse, limit: int, keep: bool = True) -> Deferred[bytes]:
    """The response body, bounded (treq's ``content()`` reads without limit)."""
    protocol = _BoundedBody(limit, keep)
    response.deliverBody(protocol)
    return protocol.finished


def new_http_client(reactor, connect_timeout: float) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client that follows nothing and remembers nothing between requests,
    over a persistent pool; the caller owns the pool and closes it."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    pool.retryAutomatically = True  # idempotent requests on a connection closed under us
    agent = Agent(reactor, pool=pool, connectTimeout=connect_timeout)
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(agent, cookiejar=no_cookies), pool


def timed_out(result: object, timeout: float) -> None:
    """``addTimeout``'s ``onTimeoutCancel``: whatever the cancellation turned into
    (Agent wraps it in ``ResponseNeverReceived``), the deadline passed."""
    raise DeferredTimeout(f"timed out after {timeout:g} s")


def describe_failure(failure: Failure) -> str:
    """A short, credential-free reason for logs and ``ProviderUnavailable`` text."""
    if failure.check(DeferredTimeout, CancelledError):
        return "timed out"
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived, ResponseFailed…
    if reasons:
        return f"{type(value).__name__}: {_exception_name(reasons[0].value)}"
    return _exception_name(value) if value is not None else "unknown error"


def _exception_name(error: BaseException) -> str:
    if type(error).__module__.startswith("OpenSSL"):
        # pyOpenSSL's Error carries [(library, function, reason)]: the reason (e.g.
        # "certificate verify failed") is what an operator needs, and holds no secret.
        details = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reason = next((entry[-1] for entry in details
                       if isinstance(entry, tuple) and entry and entry[-1]), "")
        return f"TLS failure ({reason})" if reason else "TLS failure"
    return type(error).__name__
