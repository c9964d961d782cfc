"""Real HTTP servers on loopback for provider tests: a scripted auth endpoint, a JWKS
endpoint with keys made in the test, and helpers to mint JWTs.

Everything runs in-process on the test's reactor (twisted.web on ``127.0.0.1`` port 0),
so a test sees exactly what a provider put on the wire.  Typical use in a trial test::

    self.auth = AuthEndpoint(expect_basic=("alice", "s3cret"))
    self.server = LoopbackHTTPServer({"auth": self.auth, "target": CountingResource()})
    self.server.start()
    self.addCleanup(self.server.stop)          # Deferred: aborts open connections
    url = self.server.url("/auth")

    key = make_key("RS256", kid="k1")
    self.jwks = JWKSEndpoint([key])           # .keys is mutable: rotate by assigning
    token = mint(key, standard_claims(now=NOW, sub="alice"))

``AuthEndpoint`` behaviour is set by attributes that a test may change at any time:
``expect_basic``/``expect_header`` (what makes a request "good"), ``ok_status`` and
``fail_status``, ``status`` (forced for every request), ``delay`` (answer later),
``hang`` (never answer), ``hang_body`` (headers promise a body that never finishes),
``redirect_to`` (a 302), ``set_cookie``.  ``LoopbackHTTPServer(..., tls=(cert_pem,
key_pem))`` serves https (certificates from ``tests.support.certs``).  It records every request
(``requests``: method,
path, headers with lower-case names).  ``LoopbackHTTPServer`` counts TCP connections
(``connections_made``) so tests can prove keep-alive reuse.

For benchmarks the auth endpoint also runs as its own process::

    python3 -m tests.support.httpservers --basic alice:s3cret --header X-Token=t0k3n
    # prints "PORT <n>" once listening; serves /basic, /header and /auth (scripted by
    # nothing: always 200) until stdin closes; the line "stats" on stdin answers
    # "CONNECTIONS <n> REQUESTS <n>" (TCP connections accepted, requests served)
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_encode
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support.ports import free_port

# --- a server that counts its connections ---------------------------------------------

class _TrackedChannel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.server._opened(self)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.site.server._closed(self)


class _QuietSite(Site):
    protocol = _TrackedChannel
    noisy = False

    def log(self, request) -> None:  # no access log: benchmarks and test logs stay clean
        pass


class LoopbackHTTPServer:
    """A twisted.web server on ``127.0.0.1`` (port 0 = any free port).

    ``children`` maps first path segments (``"auth"``) to resources.  ``stop()`` stops
    listening, aborts open connections and fires once they are all closed, so the
    reactor is clean at the end of a test.
    """

    def __init__(self, children: Mapping[str, Resource], reactor=None,
                 interface: str = "127.0.0.1", port: int = 0,
                 tls: tuple[bytes, bytes] | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.root = Resource()
        for name, resource in children.items():
            self.root.putChild(name.encode("ascii"), resource)
            if isinstance(resource, _Scripted):
                resource.reactor = reactor
        self.site = _QuietSite(self.root)
        self.site.server = self
        self._interface = interface
        # Never 0: a port the kernel chose could be taken while a test has the server
        # stopped, and a restart comes back on the same one (tests/support/ports.py).
        self._port_number = port or free_port(interface)
        self.port = None
        self._tls = tls  # (certificate PEM, key PEM): serve https
        self.connections_made = 0
        self._open: dict[HTTPChannel, defer.Deferred] = {}

    def start(self) -> "LoopbackHTTPServer":
        if self._tls is not None:
            from twisted.internet.ssl import PrivateCertificate
            cert_pem, key_pem = self._tls
            options = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem).options()
            self.port = self.reactor.listenSSL(self._port_number, self.site, options,
                                               interface=self._interface)
        else:
            self.port = self.reactor.listenTCP(self._port_number, self.site,
                                               interface=self._interface)
        self._port_number = self.port.getHost().port  # a restart comes back on it
        return self

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    def url(self, path: str = "/") -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self._interface}:{self.port_number}{path}"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _opened(self, channel: HTTPChannel) -> None:
        self.connections_made += 1
        self._open[channel] = defer.Deferred()

    def _closed(self, channel: HTTPChannel) -> None:
        closed = self._open.pop(channel, None)
        if closed is not None:
            closed.callback(None)

    def drop_connections(self) -> defer.Deferred:
        """Abort every open connection; fires when all are closed."""
        waiting = list(self._open.values())
        for channel in list(self._open):
            channel.transport.abortConnection()
        return defer.gatherResults(waiting)

    def stop(self) -> defer.Deferred:
        for resource in self.root.children.values():
            if isinstance(resource, _Scripted):
                resource.cancel_pending()
        stopped = defer.maybeDeferred(self.port.stopListening) if self.port else defer.succeed(None)
        return defer.gatherResults([stopped, self.drop_connections()])


# --- scripted resources ---------------------------------------------------------------

@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, list[str]]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class _Scripted(Resource):
    """Shared bookkeeping: recorded requests and delayed answers to cancel on stop."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reactor = None
        self.requests: list[RecordedRequest] = []
        self._pending: list[IDelayedCall] = []

    @property
    def count(self) -> int:
        return len(self.requests)

    def _record(self, request) -> RecordedRequest:
        headers = {name.decode("latin-1").lower(): [v.decode("utf-8", "replace") for v in values]
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        recorded = RecordedRequest(request.method.decode("ascii"),
                                   request.path.decode("utf-8", "replace"), headers)
        self.requests.append(recorded)
        return recorded

    def _later(self, request, seconds: float, answer) -> object:
        call = self.reactor.callLater(seconds, answer)
        self._pending.append(call)

        def cancelled(_):
            if call.active():
                call.cancel()
        request.notifyFinish().addErrback(cancelled)
        return NOT_DONE_YET

    def cancel_pending(self) -> None:
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()


class CountingResource(_Scripted):
    """Answers 200 and counts: a redirect target that must never be hit."""

    def render(self, request) -> bytes:
        self._record(request)
        return b"target\n"


class AuthEndpoint(_Scripted):
    """An HTTP auth endpoint whose verdict and misbehaviour the test scripts."""

    def __init__(self, *, expect_basic: tuple[str, str] | None = None,
                 expect_header: tuple[str, str] | None = None,
                 ok_status: int = 200, fail_status: int = 401):
        super().__init__()
        self.expect_basic = expect_basic
        self.expect_header = expect_header
        self.ok_status = ok_status
        self.fail_status = fail_status
        self.status: int | None = None
        self.delay: float = 0.0
        self.hang = False
        self.hang_body = False
        self.redirect_to: str | None = None
        self.set_cookie: str | None = None
        self.body = b"verdict\n"

    def is_good(self, recorded: RecordedRequest) -> bool:
        if self.expect_basic is not None:
            user, password = self.expect_basic
            raw = f"{user}:{password}".encode("utf-8")
            if recorded.header("authorization") != "Basic " + base64.b64encode(raw).decode():
                return False
        if self.expect_header is not None:
            name, value = self.expect_header
            if recorded.header(name) != value:
                return False
        return True

    def render(self, request) -> Any:
        recorded = self._record(request)
        if self.hang:
            return NOT_DONE_YET
        if self.set_cookie:
            request.addCookie(*self.set_cookie.split("=", 1), path="/")
        if self.hang_body:
            request.setResponseCode(self.ok_status)
            request.setHeader(b"content-length", b"1000")
            request.write(b"partial body")
            return NOT_DONE_YET
        if self.redirect_to is not None:
            request.setResponseCode(302)
            request.setHeader(b"location", self.redirect_to.encode("ascii"))
            return b"moved\n"
        if self.status is not None:
            code = self.status
        else:
            code = self.ok_status if self.is_good(recorded) else self.fail_status
        if self.delay > 0:
            def answer():
                request.setResponseCode(code)
                request.write(self.body)
                request.finish()
            return self._later(request, self.delay, answer)
        request.setResponseCode(code)
        return self.body


# --- keys, JWKS and tokens ------------------------------------------------------------

def _generate(alg: str):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1,
              "ES256K": ec.SECP256K1}
    if alg in curves:
        return ec.generate_private_key(curves[alg]())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no test keys for {alg}")


@dataclass
class TestKey:
    """A signing key made in the test and its public JWK (RFC 7517)."""

    alg: str
    kid: str | None
    private: Any
    jwk: dict[str, Any] = field(default_factory=dict)

    __test__ = False  # not a test case, despite the name


def make_key(alg: str = "RS256", kid: str | None = "k1", *, jwk_alg: bool | str = True,
             private=None, **jwk_extra: Any) -> TestKey:
    """A new key pair (or ``private``) for ``alg``.  The public JWK carries ``kid``, and
    ``alg`` unless ``jwk_alg`` is False (a string sets a different ``alg``); extra
    members (``use="enc"``…) are added as given."""
    private = private if private is not None else _generate(alg)
    jwk = dict(get_default_algorithms()[alg].to_jwk(private.public_key(), as_dict=True))
    if kid is not None:
        jwk["kid"] = kid
    if jwk_alg:
        jwk["alg"] = alg if jwk_alg is True else jwk_alg
    jwk.update(jwk_extra)
    return TestKey(alg, kid, private, jwk)


def _segment(obj: Mapping[str, Any]) -> str:
    return base64url_encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def compact(header: Mapping[str, Any], claims: Mapping[str, Any] | bytes,
            sign=lambda signing_input: b"") -> str:
    """A compact JWS (RFC 7515 §7.1) from raw parts: for forgeries the libraries refuse
    to make (``alg: none``, HS256 keyed with a PEM)."""
    payload = (base64url_encode(claims).decode() if isinstance(claims, bytes)
               else _segment(claims))
    signing_input = f"{_segment(header)}.{payload}"
    return f"{signing_input}.{base64url_encode(sign(signing_input.encode())).decode()}"


def mint(key: TestKey, claims: Mapping[str, Any] | bytes,
         headers: Mapping[str, Any] | None = None) -> str:
    """A token signed by ``key``; header ``alg``/``kid`` from the key unless ``headers``
    overrides them (a ``None`` value removes a header member)."""
    header: dict[str, Any] = {"typ": "JWT", "alg": key.alg}
    if key.kid is not None:
        header["kid"] = key.kid
    for name, value in (headers or {}).items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    algorithm = get_default_algorithms()[key.alg]
    prepared = algorithm.prepare_key(key.private)
    return compact(header, claims, lambda data: algorithm.sign(data, prepared))


def forge_hs256(secret: bytes, claims: Mapping[str, Any],
                headers: Mapping[str, Any] | None = None) -> str:
    """An HS256 token keyed with ``secret`` (e.g. the RSA public key PEM: the classic
    algorithm-confusion attack, RFC 8725 §2.1)."""
    import hashlib
    import hmac
    header = {"typ": "JWT", "alg": "HS256", **(headers or {})}
    return compact(header, claims,
                   lambda data: hmac.new(secret, data, hashlib.sha256).digest())


def standard_claims(now: float, lifetime: float = 300, **extra: Any) -> dict[str, Any]:
    """``iat``/``nbf`` = now and ``exp`` = now + lifetime, plus ``extra`` (a ``None``
    value removes a claim)."""
    claims: dict[str, Any] = {"iat": int(now), "nbf": int(now), "exp": int(now + lifetime)}
    for name, value in extra.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


class JWKSEndpoint(_Scripted):
    """Serves ``{"keys": [...]}`` from ``keys`` (``TestKey``s) and ``extra`` (raw JWK
    dicts); both are mutable, so a test rotates keys by assigning.  ``fetches`` counts
    requests; ``status`` forces an error answer; ``hang`` never answers."""

    def __init__(self, keys: Iterable[TestKey] = (), extra: Iterable[dict] = ()):
        super().__init__()
        self.keys = list(keys)
        self.extra = list(extra)
        self.status: int | None = None
        self.hang = False
        self.raw_body: bytes | None = None

    @property
    def fetches(self) -> int:
        return self.count

    def document(self) -> dict[str, Any]:
        return {"keys": [key.jwk for key in self.keys] + list(self.extra)}

    def render_GET(self, request) -> Any:
        self._record(request)
        if self.hang:
            return NOT_DONE_YET
        if self.status is not None:
            request.setResponseCode(self.status)
            return b"unavailable\n"
        request.setHeader(b"content-type", b"application/json")
        if self.raw_body is not None:
            return self.raw_body
        return json.dumps(self.document()).encode()


def until(predicate, timeout: float = 5.0, step: float = 0.01, reactor=None) -> defer.Deferred:
    """Fires once ``predicate()`` is true, polling on the reactor; fails after
    ``timeout`` seconds so no test waits forever."""
    import time
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield deferLater(reactor, step, lambda: None)
    return poll()


# --- standalone process (benchmarks) --------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="scripted auth endpoint on loopback")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--basic", help="user:password that /basic accepts")
    parser.add_argument("--header", help="Name=value that /header accepts")
    args = parser.parse_args(argv)
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    children: dict[str, Resource] = {"auth": AuthEndpoint()}
    if args.basic:
        user, _, password = args.basic.partition(":")
        children["basic"] = AuthEndpoint(expect_basic=(user, password))
    if args.header:
        name, _, value = args.header.partition("=")
        children["header"] = AuthEndpoint(expect_header=(name, value))
    server = LoopbackHTTPServer(children, reactor, port=args.port).start()

    class _Control(LineReceiver):
        """``stats`` → ``CONNECTIONS <n> REQUESTS <n>``; end of input stops the server."""

        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"stats":
                requests = sum(r.count for r in children.values())
                self.sendLine(f"CONNECTIONS {server.connections_made} "
                              f"REQUESTS {requests}".encode())

        def connectionLost(self, reason=None):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(_Control())
    sys.stdout.write(f"PORT {server.port_number}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
