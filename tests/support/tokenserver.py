"""A real OAuth2 token endpoint on loopback, for the token broker and the XOAUTH2 /
OAUTHBEARER relay tests.

Why twisted.web and not npm's ``oidc-provider``: it runs in the test's own reactor (no
node, npm install or network in CI, no process to start and stop), starts in
milliseconds, and every behaviour a test needs (a stalled answer, a forced error, a
key rotation, request counts) is an attribute.  What it checks is what a real
authorization server checks, with the same libraries and real signatures:

* ``client_secret_basic`` (RFC 6749 §2.3.1: the form-encoded id and secret in Basic),
  ``client_secret_post`` (both in the body) and ``private_key_jwt`` (RFC 7523 §2.2 /
  §3: the assertion's signature against the client's registered public key or
  certificate, ``iss``/``sub`` = client id, ``aud`` = the token URL, ``exp``, no
  replayed ``jti``, and ``x5t`` = the certificate's thumbprint when the client
  registered one, as Entra ID does);
* grants ``client_credentials`` and ``refresh_token``; refresh tokens rotate (the old
  one is revoked when a new one is issued, the way Entra and many others do);
* access tokens are real JWTs (RS256, a generated key with a ``kid``) that verify
  against ``/jwks`` — ``revoke_all()`` rotates the signing key, so earlier tokens stop
  verifying, which is how a resource server (esmtpfa B's ``jwt`` provider) sees a
  revoked token.

Use::

    server = TokenServer()
    server.register(ClientRegistration("app", secret="s3cret"))
    server.start(); self.addCleanup(server.stop)
    server.token_url          # http://127.0.0.1:<port>/token
    server.jwks_url           # http://127.0.0.1:<port>/jwks
    server.requests           # every token request (grant, client, outcome)

``stalled_port()`` gives a TCP server that accepts and never answers (for timeouts).
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import jwt
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import NOT_DONE_YET

from tests.support.httpservers import JWKSEndpoint, LoopbackHTTPServer, TestKey, _Scripted, make_key

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class ClientRegistration:
    """One client of the server: a secret, or a public key PEM / certificate PEM for
    ``private_key_jwt``.  ``require_x5t``: the assertion must name the certificate."""

    client_id: str
    secret: str | None = None
    public_key_pem: bytes | None = None
    certificate_pem: bytes | None = None
    require_x5t: bool = False
    #: What access tokens for this client carry (``sub`` defaults to the client id).
    subject: str | None = None


@dataclass
class TokenRequest:
    grant_type: str
    client_id: str | None
    auth_method: str | None
    outcome: str           # "ok" or the OAuth error code
    form: dict[str, str] = field(default_factory=dict)


class TokenEndpoint(_Scripted):
    """``POST /token``.  Attributes a test may change: ``lifetime`` (expires_in),
    ``hang`` (never answer), ``status``/``error`` (force an error answer),
    ``raw_body`` (answer this with 200), ``rotate_refresh_tokens``."""

    def __init__(self, server: "TokenServer"):
        super().__init__()
        self.owner = server
        self.lifetime = 3600
        self.hang = False
        self.status: int | None = None
        self.error = "temporarily_unavailable"
        self.raw_body: bytes | None = None
        self.rotate_refresh_tokens = True
        self.token_requests: list[TokenRequest] = []
        self._seen_jti: set[str] = set()

    # -- the request --------------------------------------------------------------------

    def render_POST(self, request) -> Any:
        self._record(request)
        if self.hang:
            return NOT_DONE_YET
        form = {key.decode(): values[0].decode() for key, values in request.args.items()}
        grant = form.get("grant_type", "")
        if self.status is not None:
            return self._error(request, self.status, self.error, "forced by the test",
                               TokenRequest(grant, None, None, self.error, form))
        if self.raw_body is not None:
            request.setHeader(b"content-type", b"application/json")
            return self.raw_body
        client, method, problem = self._authenticate(request, form)
        record = TokenRequest(grant, client.client_id if client else None, method, "ok", form)
        if client is None:
            record.outcome = "invalid_client"
            return self._error(request, 401, "invalid_client",
                               f"client authentication failed: {problem}", record,
                               basic=method == "client_secret_basic")
        if grant == "client_credentials":
            subject = client.subject or client.client_id
            answer = self._issue(subject, form.get("scope"), client.client_id)
        elif grant == "refresh_token":
            presented = form.get("refresh_token", "")
            owner = self.owner.refresh_tokens.get(presented)
            if owner is None or owner[0] != client.client_id:
                record.outcome = "invalid_grant"
                return self._error(request, 400, "invalid_grant",
                                   "the refresh token is unknown, expired or revoked", record)
            subject = owner[1]
            answer = self._issue(subject, form.get("scope") or owner[2], client.client_id)
            if self.rotate_refresh_tokens:
                del self.owner.refresh_tokens[presented]
                answer["refresh_token"] = self.owner.new_refresh_token(
                    client.client_id, subject, owner[2])
        else:
            record.outcome = "unsupported_grant_type"
            return self._error(request, 400, "unsupported_grant_type",
                               f"grant {grant!r} is not supported", record)
        self.token_requests.append(record)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(answer).encode()

    def _authenticate(self, request, form: dict[str, str]):
        """(client, method, problem): the client when it proved itself."""
        header = request.getHeader(b"authorization")
        registry = self.owner.clients
        if header and header.lower().startswith(b"basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
                raw_id, raw_secret = pair.split(":", 1)
            except ValueError:
                return None, "client_secret_basic", "malformed Basic header"
            client = registry.get(unquote_plus(raw_id))
            if client is None or client.secret is None or not secrets.compare_digest(
                    unquote_plus(raw_secret), client.secret):
                return None, "client_secret_basic", "wrong client id or secret"
            return client, "client_secret_basic", ""
        if "client_assertion" in form:
            return self._assertion(form)
        if "client_secret" in form:
            client = registry.get(form.get("client_id", ""))
            if client is None or client.secret is None or not secrets.compare_digest(
                    form["client_secret"], client.secret):
                return None, "client_secret_post", "wrong client id or secret"
            return client, "client_secret_post", ""
        return None, None, "no client authentication"

    def _assertion(self, form: dict[str, str]):
        method = "private_key_jwt"
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return None, method, "wrong client_assertion_type"
        assertion = form["client_assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return None, method, "malformed assertion"
        client = self.owner.clients.get(unverified.get("iss", ""))
        if client is None or (client.public_key_pem is None and client.certificate_pem is None):
            return None, method, "unknown client"
        if client.certificate_pem is not None:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes
            certificate = x509.load_pem_x509_certificate(client.certificate_pem)
            public = certificate.public_key()
            thumbprint = base64.urlsafe_b64encode(
                certificate.fingerprint(hashes.SHA1())).rstrip(b"=").decode()
            if client.require_x5t and header.get("x5t") != thumbprint:
                return None, method, "x5t does not name the registered certificate"
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            public = load_pem_public_key(client.public_key_pem)
        try:
            claims = jwt.decode(assertion, public, algorithms=["RS256", "ES256"],
                                audience=self.owner.token_url, issuer=client.client_id,
                                options={"require": ["exp", "iss", "sub", "aud", "jti"]})
        except jwt.PyJWTError as error:
            return None, method, f"assertion refused ({type(error).__name__})"
        if claims["sub"] != client.client_id:
            return None, method, "sub is not the client id"
        if form.get("client_id") not in (None, client.client_id):
            return None, method, "client_id does not match the assertion"
        if claims["jti"] in self._seen_jti:
            return None, method, "assertion replayed"
        self._seen_jti.add(claims["jti"])
        return client, method, ""

    def _issue(self, subject: str, scope: str | None, client_id: str) -> dict[str, Any]:
        now = int(time.time())
        key = self.owner.signing_key
        claims = {"iss": self.owner.issuer, "sub": subject, "aud": self.owner.audience,
                  "azp": client_id, "iat": now, "nbf": now, "exp": now + self.lifetime,
                  "jti": secrets.token_hex(8)}
        if scope:
            claims["scp"] = scope
        token = jwt.encode(claims, key.private, algorithm=key.alg, headers={"kid": key.kid})
        self.owner.issued.append(token)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.lifetime}
        if scope:
            answer["scope"] = scope
        return answer

    def _error(self, request, code: int, error: str, description: str,
               record: TokenRequest, basic: bool = False) -> bytes:
        self.token_requests.append(record)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        if basic:
            request.setHeader(b"www-authenticate", b'Basic realm="token"')
        return json.dumps({"error": error, "error_description": description}).encode()


class TokenServer:
    """The endpoint (``/token``) and its key set (``/jwks``) on one loopback port."""

    def __init__(self, reactor=None, audience: str = "smtp"):
        self._kids = itertools.count(1)
        self.signing_key: TestKey = make_key("RS256", kid=f"sig-{next(self._kids)}")
        self.jwks = JWKSEndpoint([self.signing_key])
        self.endpoint = TokenEndpoint(self)
        self.http = LoopbackHTTPServer({"token": self.endpoint, "jwks": self.jwks},
                                       reactor=reactor)
        self.audience = audience
        self.clients: dict[str, ClientRegistration] = {}
        #: refresh token → (client id, subject, scope)
        self.refresh_tokens: dict[str, tuple[str, str, str | None]] = {}
        self.issued: list[str] = []
        self.running = False

    def start(self) -> "TokenServer":
        self.http.start()
        self.running = True
        return self

    def stop(self):
        """Stop listening and drop open connections (Deferred)."""
        self.running = False
        return self.http.stop()

    @property
    def port(self) -> int:
        return self.http.port_number

    @property
    def issuer(self) -> str:
        return self.http.url("")

    @property
    def token_url(self) -> str:
        return self.http.url("/token")

    @property
    def jwks_url(self) -> str:
        return self.http.url("/jwks")

    @property
    def requests(self) -> list[TokenRequest]:
        """Token requests answered (successes and OAuth errors)."""
        return self.endpoint.token_requests

    @property
    def hits(self) -> int:
        """Every POST that reached /token, answered or not."""
        return self.endpoint.count

    def register(self, client: ClientRegistration) -> ClientRegistration:
        self.clients[client.client_id] = client
        return client

    def new_refresh_token(self, client_id: str, subject: str, scope: str | None = None) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens[token] = (client_id, subject, scope)
        return token

    def revoke_all(self) -> None:
        """Rotate the signing key: every token issued so far fails against /jwks."""
        self.signing_key = make_key("RS256", kid=f"sig-{next(self._kids)}")
        self.jwks.keys = [self.signing_key]

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims if it verifies against the current JWKS (as a resource
        server would see it), else ``jwt.PyJWTError``."""
        header = jwt.get_unverified_header(token)
        for key in self.jwks.keys:
            if key.kid == header.get("kid"):
                return jwt.decode(token, key.private.public_key(), algorithms=[key.alg],
                                  audience=self.audience, issuer=self.issuer)
        raise jwt.InvalidKeyError(f"no key {header.get('kid')!r} in the JWKS")


def thumbprint(certificate_pem: bytes) -> str:
    """SHA-1 thumbprint, base64url: what ``x5t`` carries (RFC 7515 §4.1.7)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    digest = x509.load_pem_x509_certificate(certificate_pem).fingerprint(hashes.SHA1())
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Silent(Protocol):
    """Accepts and never answers (the connection stays open until the test ends)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)


class StalledServer:
    """A TCP server on loopback that accepts connections and never answers."""

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self.factory = Factory.forProtocol(_Silent)
        self.factory.connections = []
        self.factory.received = 0
        self.port = None

    def start(self) -> "StalledServer":
        self.port = self._reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/token"

    def stop(self):
        for transport in self.factory.connections:
            transport.abortConnection()
        return self.port.stopListening()


@dataclass
class ClientKey:
    """A client's key pair in files, for ``private_key_jwt``."""

    key_path: str
    cert_path: str | None
    public_pem: bytes
    cert_pem: bytes | None


def client_key_files(directory: str, name: str = "client", alg: str = "RS256",
                     certificate: bool = True) -> ClientKey:
    """A new RSA (RS256) or P-256 (ES256) key, and a self-signed certificate for it (what
    an Entra app registration is given), written as PEM into ``directory``."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256"
           else ec.generate_private_key(ec.SECP256R1()))
    os.makedirs(directory, exist_ok=True)
    key_path = os.path.join(directory, f"{name}.key")
    with open(key_path, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not certificate:
        return ClientKey(key_path, None, public_pem, None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path = os.path.join(directory, f"{name}.crt")
    with open(cert_path, "wb") as file:
        file.write(cert_pem)
    return ClientKey(key_path, cert_path, public_pem, cert_pem)
